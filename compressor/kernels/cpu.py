"""Torch-facing CPU kernels (kernels/cpu_gemm.c): QuantLinear's CPU hook and the float16-weight linear.

`quant_linear_forward` is what QuantLinear runs for CPU inputs. It multiplies with the GPTQ v1
buffers as they are (no repack, no copy) when the layer's groups are contiguous (g_idx = k //
group_size: plain GPTQ and act-order with static groups); a permuted g_idx (dynamic act-order)
gets a row-sorted copy of qweight once, and x's columns are gathered per call, as on CUDA. It
returns None (the caller dequantizes + F.linear) for what the kernels do not cover, logging each
reason once: 2/3-bit codes, shapes the kernels cannot tile, a CPU without AVX2, no C compiler.
Calls with more than MAX_ROWS rows (a long prefill, a perplexity window) dequantize W in C for
that call and run float32 F.linear on it: one dequantization is cheap next to a GEMM over that
many rows.

Activations of any float dtype are computed in float32 (the kernels' arithmetic) and returned in
their own dtype.
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from compressor.kernels import build
from compressor.kernels.repack import Unsupported, act_order_permutation

from compressor.packing import infer_group_size, pack_along_rows, unpack_along_rows

log = logging.getLogger(__name__)

KERNEL_BITS = (4, 8)
# Rows of x up to which the kernels run; above, W is dequantized for the call (in C) and F.linear
# runs on it. Measured on SmolLM2's and Llama-7B's shapes (benchmarks/cpu_runtime.py --kernels,
# 2 AVX2 cores): the kernels beat float32 F.linear up to 32-64 rows and reach 0.5-0.8x of it at 256
# (a float GEMM reuses each weight across more rows). 512 keeps the calls of a transformers
# forward over a prompt chunk or a batch on the kernels, whose per-row results do not depend on
# the batch; perplexity windows (2048) and long prompts take the dequantize path. (The serving
# engine's CPU step, compressor/serve/cpu_step.py, calls the kernel itself, for any row count.)
MAX_ROWS = 512


@dataclass(frozen=True, eq=False)
class CpuQuantWeight:
    """What the CPU kernel reads for one layer: GPTQ v1 buffers whose groups are contiguous row ranges."""

    qweight: torch.Tensor  # int32 [K*bits/32, N], rows sorted by group when perm is set
    qzeros: torch.Tensor  # int32 [G, N*bits/32]
    scales: torch.Tensor  # fp16 [G, N]
    bias: torch.Tensor | None  # float32 [N]
    perm: torch.Tensor | None  # int64 [K]: x[..., perm] feeds the row-sorted qweight; None = identity
    bits: int
    group_size: int  # rows per group (K for one group)
    layer: build.CpuQuantLayer  # the C struct pointing at the tensors above (kept alive here)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def prepare_gptq_v1(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
    bias: torch.Tensor | None = None,
) -> CpuQuantWeight:  # fmt: skip
    """The kernel's view of one layer's GPTQ v1 buffers (shared, not copied, unless act-order
    needs the rows sorted). Raises Unsupported."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    group_size = infer_group_size(g_idx, groups)
    if bits not in KERNEL_BITS:
        raise Unsupported(f"{bits}-bit codes have no CPU kernel (CPU kernels: {', '.join(map(str, KERNEL_BITS))}-bit)")
    if n % 8:
        raise Unsupported(f"out_features={n} is not a multiple of 8")
    if any(t.device.type != "cpu" for t in (qweight, qzeros, scales, g_idx)):
        raise Unsupported("the buffers are not on the CPU")
    rows = k if group_size == -1 else group_size
    if k % rows or rows % (32 // bits):
        raise Unsupported(f"group_size={group_size} does not split in_features={k} into whole {bits}-bit words")
    perm = act_order_permutation(g_idx, groups, group_size)
    if perm is not None:  # dynamic act-order: sort rows by group once
        perm = perm.long()
        qweight = pack_along_rows(unpack_along_rows(qweight, bits, k)[perm], bits)
    qweight, qzeros, scales = (t.contiguous() for t in (qweight, qzeros, scales.to(torch.float16)))
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    layer = build.CpuQuantLayer(qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(),
                                n, k, bits, rows)  # fmt: skip
    return CpuQuantWeight(qweight, qzeros, scales, bias, perm, bits, rows, layer)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous float32 (itself when it already is)."""
    if x.dtype != torch.float32:
        x = x.float()
    return x if x.is_contiguous() else x.contiguous()


def quant_linear(x: torch.Tensor, weight: CpuQuantWeight) -> torch.Tensor:
    """x [..., K] @ W + bias -> [..., N] in x's dtype, computed in float32.

    Up to MAX_ROWS rows: the kernel. The hot path of every decoded token (hundreds of calls per
    token): one contiguity check, one output allocation, one C call with five arguments. More
    rows: W dequantized by the C routine into a float32 matrix for this call only, then F.linear
    (the values and layout of dequantize_gptq_v1, so this is the float model's arithmetic).
    """
    layer = weight.layer
    k, n = layer.k, layer.n
    shape = x.shape
    if shape[-1] != k or not x.is_cpu:
        raise ValueError(f"x ({tuple(shape)} on {x.device}) must be [..., {k}] on the CPU")
    m = x.numel() // k
    x2 = _rows(x)
    if weight.perm is not None:
        x2 = x2.index_select(-1, weight.perm)
    if m > MAX_ROWS:
        y = F.linear(x2, dequantize(weight), weight.bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    y = torch.empty((*shape[:-1], n), dtype=torch.float32)
    if _quant_linear_fn()(layer, x2.data_ptr(), y.data_ptr(), m, torch.get_num_threads()):
        raise RuntimeError(f"cq_cpu_quant_linear rejected its arguments (m={m}, n={n}, k={k}, bits={weight.bits}, group={weight.group_size})")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def dequantize(weight: CpuQuantWeight) -> torch.Tensor:
    """W as float32 [N, K] (rows of K in the prepared order: sorted by group under act-order)."""
    w = torch.empty(weight.layer.n, weight.layer.k, dtype=torch.float32)
    if build.load_cpu_library().cq_cpu_dequantize(weight.layer, w.data_ptr(), torch.get_num_threads()):
        raise RuntimeError(f"cq_cpu_dequantize rejected its arguments (n={weight.layer.n}, k={weight.layer.k}, bits={weight.bits})")
    return w


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] @ weight.T + bias for a float16 weight [N, K], computed in float32 and returned
    in x's dtype; None when x has more than MAX_ROWS rows or K is not a multiple of 8."""
    n, k = weight.shape
    if weight.dtype != torch.float16 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float16 [N, K] tensor, got {weight.dtype}")
    if x.shape[-1] != k or not x.is_cpu:
        raise ValueError(f"x ({tuple(x.shape)} on {x.device}) must be [..., {k}] on the CPU")
    m = x.numel() // k
    if m > MAX_ROWS or k % 8:
        return None
    x2 = _rows(x)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)
    code = build.load_cpu_library().cq_cpu_half_linear(
        weight.data_ptr(), None if bias is None else bias.data_ptr(), x2.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads()
    )
    if code != 0:
        raise RuntimeError(f"cq_cpu_half_linear rejected its arguments (m={m}, n={n}, k={k})")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@functools.cache
def _quant_linear_fn():
    return build.load_cpu_library().cq_cpu_quant_linear


# --- QuantLinear hook -------------------------------------------------------------------------

_fallbacks = build.Fallbacks(log, build.load_cpu_library)


def enabled() -> bool:
    """COMPRESSOR_CPU_KERNELS=0 turns the kernels off (QuantLinear then dequantizes + F.linear)."""
    return build.switched_on("COMPRESSOR_CPU_KERNELS")


def available() -> bool:
    """Whether the kernels run on this machine (builds the library on first call); logs why not, once."""
    if not enabled():
        return False
    reason = _fallbacks.library_reason()
    if reason:
        _fallbacks.note(f"CPU kernels unavailable, using dequantize + F.linear: {reason}")
    return not reason


_KEY_BUFFERS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def cpu_weight(module) -> CpuQuantWeight | None:
    """The module's weight as the kernel reads it, or None if unsupported. Prepared once and kept
    on the module; prepared again when any of its buffers is replaced or modified in place."""
    tensors = tuple(map(module._buffers.get, _KEY_BUFFERS))  # direct dict access: this runs for every call
    versions = tuple(-1 if t is None else t._version for t in tensors)
    cached = module.__dict__.get("_cpu_weight")
    if cached is not None and cached[1] == versions and all(a is b for a, b in zip(cached[0], tensors)):
        return cached[2]
    try:
        weight = prepare_gptq_v1(module.qweight, module.qzeros, module.scales, module.g_idx, module.bits, module.bias)
    except Unsupported as exc:
        _fallbacks.note(f"QuantLinear {module.in_features}->{module.out_features} {module.bits}-bit: {exc}; using dequantize + F.linear")
        weight = None
    module._cpu_weight = (tensors, versions, weight)
    return weight


def prepared_weight(module) -> CpuQuantWeight | None:
    """The weight `cpu_weight` prepared last for `module` (None if none), without preparing one."""
    cached = module.__dict__.get("_cpu_weight")
    return None if cached is None else cached[2]


def quant_linear_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """QuantLinear's CPU kernel: the output, or None to fall back to dequantize + F.linear."""
    if not available():
        return None
    fused = module.__dict__.get("_cpu_fused")
    if fused is not None:
        # Valid while the module holds the views fuse() installed (in-place changes to them reach
        # the fused tensors) and g_idx, which fixed the layout, is unchanged.
        if all(map(operator.is_, map(module._buffers.get, _KEY_BUFFERS), fused[2])) and _version(fused[2][3]) == fused[3]:
            return fused[0].forward(fused[1], x)
        del module._cpu_fused  # a buffer was replaced (.to(), load_state_dict, assignment): the layer stands alone again
    weight = cpu_weight(module)
    return None if weight is None else quant_linear(x, weight)


class FusedLinears:
    """Linears that read the same input (q/k/v; gate/up), multiplied in one kernel call.

    Their buffers are concatenated along N once; each member's buffers become views of the
    concatenation, so nothing is held twice. The first member called with an input computes
    every member's output and keeps the others' until they ask for them with the same input
    tensor (same object, same version): transformers calls q_proj, k_proj, v_proj back to back
    on one hidden state. Any other order or input just computes again, so results never depend
    on the call pattern. Saves 3 of the 7 kernel calls of a Llama block (each with its output
    allocation, ctypes call and thread start-up) and runs the kernel on wider N.
    """

    def __init__(self, modules: list, weight: CpuQuantWeight):
        self.weight = weight
        self.splits = [m.out_features for m in modules]
        self.offsets = [sum(self.splits[:i]) for i in range(len(modules))]
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output: torch.Tensor | None = None
        self._pending: set[int] = set()

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index in self._pending and self._input is x and _version(x) == self._version:
            self._pending.discard(index)
            out = self._output.narrow(-1, self.offsets[index], self.splits[index])
            if not self._pending:
                self._input = self._output = None
            return out
        y = quant_linear(x, self.weight)
        self._input, self._version, self._output = x, _version(x), y
        self._pending = set(range(len(self.splits))) - {index}
        return y.narrow(-1, self.offsets[index], self.splits[index])


def _version(x: torch.Tensor) -> int:
    """x's in-place modification counter (-1 for inference-mode tensors, which keep none)."""
    return -1 if x.is_inference() else x._version


def fuse(modules: list) -> FusedLinears | None:
    """Fuse CPU QuantLinears that read the same input (same K, bits, group layout and g_idx, all
    with or all without bias); None if they cannot be (logged at debug level)."""
    first = modules[0]
    compatible = all(
        m.in_features == first.in_features and m.bits == first.bits and m.qweight.device.type == "cpu"
        and (m.bias is None) == (first.bias is None) and m.scales.shape[0] == first.scales.shape[0]
        and torch.equal(m.g_idx, first.g_idx)
        for m in modules
    )  # fmt: skip
    if len(modules) < 2 or not compatible or not available():
        return None
    names = ["qweight", "qzeros", "scales"] + (["bias"] if first.bias is not None else [])
    fused = {name: torch.cat([getattr(m, name) for m in modules], dim=-1) for name in names}
    try:
        weight = prepare_gptq_v1(fused["qweight"], fused["qzeros"], fused["scales"], first.g_idx, first.bits, fused.get("bias"))
    except Unsupported as exc:
        log.debug("not fusing %d linears: %s", len(modules), exc)
        return None
    group = FusedLinears(modules, weight)
    total, offset = sum(group.splits), 0
    for index, m in enumerate(modules):  # members' buffers become views of the fused tensors
        m.g_idx = m.g_idx.clone()  # a fresh copy like the rest, not the caller's (possibly file-backed) tensor
        for name in names:
            columns = fused[name].shape[-1]  # N, or N*bits/32 for qzeros
            setattr(m, name, fused[name][..., offset * columns // total : (offset + m.out_features) * columns // total])
        m._cpu_fused = (group, index, tuple(map(m._buffers.get, _KEY_BUFFERS)), _version(m.g_idx))
        offset += m.out_features
    return group


def prepare_layers(layers: list) -> dict[str, int]:
    """Prepare these CPU QuantLinear layers for the kernels now (else on their first forward); counts by outcome."""
    counts = {"kernel": 0, "fallback": 0}
    layers = [m for m in layers if m.qweight.device.type == "cpu"]
    if not layers or not available():
        counts["fallback"] = len(layers)
        return counts
    for layer in layers:
        ready = "_cpu_fused" in layer.__dict__ or cpu_weight(layer) is not None  # fused members share the group's weight
        counts["kernel" if ready else "fallback"] += 1
    log.info("CPU kernels: %d linear layers read packed, %d on dequantize + F.linear", counts["kernel"], counts["fallback"])
    return counts
