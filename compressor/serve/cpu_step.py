"""The serving engine's forward on the CPU kernels for Llama-family artifacts, without transformers.

What it replaces: transformers' forward spends ~50 small torch ops per block (norms, rotary
embedding, cache update, mask, attention, activation, residual adds) and its own dispatch around
them: 11 ms of a 24 ms decoded token on SmolLM2-135M, more than the 4-bit matmuls
(benchmarks/cpu_runtime.py --breakdown). Here every new token of the step (a decoding
sequence's one token, a prompt chunk's tokens, speculative proposals under verification) is one
row with its own slot and position, and a block is eight C calls over all rows at once:

    add_rms_norm   h += previous block's output; x = RMSNorm(h)           (kernels/cpu_decode.c)
    qkv            x @ [Wq Wk Wv] (one fused 4/8-bit matmul)              (kernels/cpu_gemm.c)
    rope_store     q, k rotated in place (after Qwen3's q/k norms); k, v written to the slot cache
    attention      each query head over keys 0..position of its own slot (the causal mask: every
                   row's k/v are in the cache before any row attends)
    o              attention output @ Wo
    add_rms_norm   h += o; x = RMSNorm(h)
    gate_up        x @ [Wgate Wup]
    silu_mul       silu(gate) * up
    down           (next block's add_rms_norm adds it to h)

Every row is computed on its own in a fixed order (the kernels' promise), so a token's result
does not depend on the batch, on how its prompt was chunked or on speculation: `compress generate`
(one request) and `compress serve` (many) give the same greedy tokens. It reads the model's own
tensors (the packed weights the runtime loaded, the norms' weights, the rotary module's cos/sin,
the embedding) and writes the engine's SlotKVCache.

`CpuStep.build` returns None, with the reason, for anything else (the engine then runs
transformers' forward): a model not on the CPU or not float32, an architecture outside the
table, linears that are not all on the CPU kernels (a dense model, 2/3-bit codes, dynamic
act-order, `--cache-dequantized`), a cache that is not float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from compressor.architectures import architecture_of
from compressor.errors import UserError

if TYPE_CHECKING:
    from compressor.kernels.cpu import CpuQuantWeight

log = logging.getLogger(__name__)


@dataclass
class _Block:
    input_norm: torch.Tensor  # float32 [H]
    post_attention_norm: torch.Tensor
    q_norm: torch.Tensor | None  # float32 [head_dim] (Qwen3), else None
    k_norm: torch.Tensor | None
    qkv: CpuQuantWeight  # q/k/v concatenated along N (the runtime's fused group)
    o: CpuQuantWeight
    gate_up: CpuQuantWeight
    down: CpuQuantWeight
    keys: torch.Tensor  # the cache layer's [slots, kv_heads, capacity, head_dim]
    values: torch.Tensor


def _group_weight(modules: list):
    """(the one kernel weight that computes these linears together, None) or (None, why not)."""
    from compressor.kernels import cpu
    from compressor.runtime.quant_linear import QuantLinear

    if not all(isinstance(m, QuantLinear) for m in modules):
        return None, "its linears are not GPTQ layers (a dense model)"
    if any(m.cache_dequantized for m in modules):
        return None, "its linears keep float weights (cache_dequantized / --cache-dequantized)"
    if len(modules) == 1:
        weight = cpu.cpu_weight(modules[0])
        return (weight, None) if weight is not None else (None, f"a {modules[0].bits}-bit linear has no CPU kernel")
    fused = [m.__dict__.get("_cpu_fused") for m in modules]
    if any(f is None for f in fused) or any(f[0] is not fused[0][0] for f in fused) or [f[1] for f in fused] != list(range(len(modules))):
        return None, "linears that read one input are not fused into one CPU kernel call"
    if fused[0][0].weight.perm is not None:  # dynamic act-order gathers x's columns per call
        return None, "a permuted g_idx (dynamic act-order)"
    return fused[0][0].weight, None


def _why_not(model, cache) -> str | None:
    """Why the step cannot run this model and cache (None when it can)."""
    from compressor.kernels import cpu

    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return "the model is not on the CPU"
    if param.dtype != torch.float32:
        return f"the model computes in {param.dtype} (the step is float32)"
    if cache.dtype != torch.float32 or cache.device.type != "cpu":
        return "the KV cache is not float32 on the CPU"
    try:
        architecture_of(model)
    except UserError as exc:
        return str(exc)
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the step implements silu)"
    rope = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rope is None:
        return "the model has no rotary_emb module"
    if not cpu.available():
        return "the CPU kernels are unavailable"
    return None


class CpuStep:
    """hidden = step(ids, positions, slots): rows are tokens (1-D, each with its slot and position);
    the final norm's output [rows, hidden]."""

    def __init__(self, model, cache, blocks: list[_Block]):
        from compressor.kernels import build

        config, arch = model.config, architecture_of(model)
        self.lib = build.load_cpu_library()
        self.quant_linear = build.load_cpu_library().cq_cpu_quant_linear  # (layer, x, y, m, threads), the kernel itself
        self.embed = model.get_input_embeddings()
        self.rotary = model.model.rotary_emb
        self.final_norm = model.get_submodule(arch.final_norm).weight.detach().float().contiguous()
        self.blocks = blocks
        attention = model.get_submodule(f"{arch.blocks}.0.{arch.attention}")
        self.heads = config.num_attention_heads
        self.kv_heads, self.head_dim = cache.layers[0].keys.shape[1], cache.layers[0].keys.shape[3]
        self.scale = float(getattr(attention, "scaling", self.head_dim**-0.5))
        self.eps = float(config.rms_norm_eps)
        self.hidden_size = config.hidden_size
        self.slots_total, self.capacity = cache.slots, cache.capacity

    @classmethod
    def build(cls, model, cache) -> CpuStep | None:
        """The step for `model` writing `cache` (a SlotKVCache), or None (reason logged at info level)."""
        reason = _why_not(model, cache)
        blocks: list[_Block] = []
        if reason is None:
            arch = architecture_of(model)
            for i, block in enumerate(arch.block_list(model)):
                attention = block.get_submodule(arch.attention)
                mlp = block.get_submodule(arch.mlp)
                q, k, v, o = (attention.get_submodule(name) for name in arch.attention_projections)
                gate, up, down = (mlp.get_submodule(name) for name in arch.mlp_projections)
                found = [_group_weight([q, k, v]), _group_weight([o]), _group_weight([gate, up]), _group_weight([down])]
                reason = next((f"block {i}: {why}" for _, why in found if why), None)
                if reason:
                    break
                weights = [weight for weight, _ in found]
                norms = [block.get_submodule(name).weight.detach().float().contiguous() for name in arch.block_norms]
                head_norms = [getattr(attention, name, None) for name in ("q_norm", "k_norm")]
                head_norms = [None if n is None else n.weight.detach().float().contiguous() for n in head_norms]
                layer = cache.layers[i]
                blocks.append(_Block(*norms, *head_norms, *weights, layer.keys, layer.values))
        if reason is not None:
            log.info("the engine runs transformers' forward: %s", reason)
            return None
        return cls(model, cache, blocks)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        lib, quant_linear = self.lib, self.quant_linear
        rows = ids.shape[0]
        threads = torch.get_num_threads()
        positions = positions.to(torch.int64).contiguous()
        slots = slots.to(torch.int64).contiguous()
        h = self.embed(ids[:, None]).reshape(rows, self.hidden_size).float().contiguous()
        cos, sin = self.rotary(h, positions[:, None])
        cos, sin = cos.reshape(rows, -1).float().contiguous(), sin.reshape(rows, -1).float().contiguous()
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qkv_width = (heads + 2 * kv_heads) * head_dim
        first = self.blocks[0]
        x = torch.empty(rows, self.hidden_size)
        qkv = torch.empty(rows, qkv_width)
        attended = torch.empty(rows, heads * head_dim)
        mixed = torch.empty(rows, self.hidden_size)
        gate_up = torch.empty(rows, first.gate_up.layer.n)
        act = torch.empty(rows, first.down.layer.k)
        hp, xp, qkvp, attp, mixp, gup, actp = (t.data_ptr() for t in (h, x, qkv, attended, mixed, gate_up, act))
        cosp, sinp, slotp, posp = cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), positions.data_ptr()
        dim, eps, delta = self.hidden_size, self.eps, None
        for b in self.blocks:
            _check(lib.cq_cpu_add_rms_norm(hp, delta, b.input_norm.data_ptr(), xp, rows, dim, dim, dim, eps), "add_rms_norm")
            _check(quant_linear(b.qkv.layer, xp, qkvp, rows, threads), "qkv matmul")
            _check(lib.cq_cpu_rope_store(
                qkvp, qkv_width, rows, heads, kv_heads, head_dim, cosp, sinp,
                None if b.q_norm is None else b.q_norm.data_ptr(), None if b.k_norm is None else b.k_norm.data_ptr(), eps,
                b.keys.data_ptr(), b.values.data_ptr(), slotp, posp, self.slots_total, self.capacity), "rope_store")  # fmt: skip
            _check(lib.cq_cpu_attention(
                qkvp, qkv_width, rows, heads, kv_heads, head_dim, b.keys.data_ptr(), b.values.data_ptr(), slotp, posp,
                self.slots_total, self.capacity, self.scale, attp, threads), "attention")  # fmt: skip
            _check(quant_linear(b.o.layer, attp, mixp, rows, threads), "o matmul")
            _check(lib.cq_cpu_add_rms_norm(hp, mixp, b.post_attention_norm.data_ptr(), xp, rows, dim, dim, dim, eps), "add_rms_norm")
            _check(quant_linear(b.gate_up.layer, xp, gup, rows, threads), "gate/up matmul")
            _check(lib.cq_cpu_silu_mul(gup, rows, b.down.layer.k, actp), "silu_mul")
            _check(quant_linear(b.down.layer, actp, mixp, rows, threads), "down matmul")
            delta = mixp
        out = torch.empty(rows, dim)
        _check(lib.cq_cpu_add_rms_norm(hp, delta, self.final_norm.data_ptr(), out.data_ptr(), rows, dim, dim, dim, eps), "add_rms_norm")
        return out


def _check(code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"CPU step: {what} rejected its arguments (code {code})")
