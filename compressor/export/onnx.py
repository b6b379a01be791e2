"""GPTQ v1 artifact -> ONNX decoder with past key/values, every quantized linear a `MatMulNBits`.

The graph is built node by node from the architecture (as onnxruntime-genai's model builder
does), not traced: tracing transformers' cache classes is fragile, and building it directly lets
each quantized linear carry the artifact's own codes, scales and zero points. The conversion is
exact: the weight `MatMulNBits` dequantizes, (code - zero) * scale in float32, equals
`dequantize_gptq_v1` of the stored tensors (tests check it bit for bit).

Graph (opset 23 plus com.microsoft MatMulNBits), per decoder block:
  RMSNormalization -> q/k/v MatMulNBits -> RotaryEmbedding -> Attention (GQA, past/present)
  -> o_proj -> residual -> RMSNormalization -> gate/up -> SiLU * up -> down -> residual.
Inputs/outputs follow onnxruntime-genai's names: input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value -> logits, present.{i}.key/value (caches [B, kv_heads, T, head_dim]).

Activations are float32 (CPU). Float matrices (embeddings, skipped linears, lm_head) are stored
as the artifact's float16 and cast once: onnxruntime folds the Cast into a float32 initializer
when the session is created, so the file stays small and decoding runs in float32.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.errors import ArtifactError, UserError
from compressor.artifacts.checkpoint import copy_side_files
from compressor.artifacts.directory import atomic_output_dir, write_manifest
from compressor.artifacts.formats import ONNX_CONFIG, ONNX_FILE
from compressor.artifacts.formats import require_onnx
from compressor.packing import unpack_along_rows, unpack_qzeros_v1

log = logging.getLogger(__name__)

OPSET = 23  # RMSNormalization, RotaryEmbedding and Attention (with past and GQA) are opset 23 ops
MS_DOMAIN = "com.microsoft"
MATMUL_NBITS_BITS = (2, 4, 8)  # what onnxruntime's MatMulNBits kernels execute
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq independent of the sequence length
EXTERNAL_DATA_ABOVE = 1_800_000_000  # protobuf cannot serialize 2 GB: larger models keep weights beside it
# Everything else in the GPTQ artifact (tokenizer, generation defaults, report) is copied as is.


# ------------------------------------------------------------------ GPTQ v1 -> MatMulNBits tensors
@dataclass
class NBitsWeight:
    """One linear in MatMulNBits form: y = x[..., perm] @ W^T (+ bias), W = (B - zero) * scale per block."""

    packed: np.ndarray  # uint8 [N, K/block_size, block_size*bits/8], codes along K, low bits first
    scales: np.ndarray  # float32 [N, K/block_size]
    zero_points: np.ndarray  # uint8 [N, ceil(blocks*bits/8)], packed like `packed`
    bits: int
    block_size: int
    in_features: int
    out_features: int
    perm: np.ndarray | None  # int64 [K]: input order the blocks need (act-order g_idx), None when identity

    @property
    def blocks(self) -> int:
        return self.in_features // self.block_size


def _pack_low_bits_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., L] values < 2^bits -> uint8 [..., ceil(L*bits/8)]: value j at bits [j*bits, (j+1)*bits)."""
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint8)
    out = np.zeros(grouped.shape[:-1], np.uint8)
    for j in range(per_byte):
        out |= grouped[..., j] << np.uint8(j * bits)
    return out


def _unpack_low_bits_first(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = np.uint8(2**bits - 1)
    parts = [(packed >> np.uint8(j * bits)) & mask for j in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)[..., :length]


def _block_size(g_idx: np.ndarray) -> int | None:
    """Largest power of two in [16, 128] whose aligned blocks each lie inside one group, else None."""
    k = g_idx.shape[0]
    for size in (128, 64, 32, 16):
        if k % size == 0 and (g_idx.reshape(-1, size) == g_idx[::size, None]).all():
            return size
    return None


def check_bits(bits: int, where: str = "") -> None:
    """The one bit-width rule of the ONNX export (recipe check, artifact conversion, each linear)."""
    if bits not in MATMUL_NBITS_BITS:
        raise UserError(f"{where}{bits}-bit weights cannot be exported to ONNX: MatMulNBits runs bits "
                        f"{', '.join(map(str, MATMUL_NBITS_BITS))}")  # fmt: skip


def gptq_to_nbits(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                  bits: int, name: str = "") -> NBitsWeight:  # fmt: skip
    """Re-express one GPTQ v1 linear exactly as MatMulNBits inputs (no re-quantization).

    MatMulNBits has one scale/zero per aligned block of K. When g_idx already maps aligned blocks to
    single groups (no act-order, or act-order with static groups), K keeps its order; otherwise
    (act-order groups) K is sorted by group and the activation is gathered in the same order.
    Groups wider than the block just repeat their scale and zero over several blocks.
    """
    where = f"{name}: " if name else ""
    check_bits(bits, where)
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // (k // groups)
    zeros = unpack_qzeros_v1(qzeros, bits, n).numpy()  # [G, N]
    if zeros.max() >= 2**bits:
        raise ArtifactError(f"{where}a zero point of {int(zeros.max())} does not fit {bits} bits (v1 stored zero 0 as 2^bits - 1)")
    g = g_idx.long().numpy()
    perm = None
    block = _block_size(g)
    if block is None:
        perm = np.argsort(g, kind="stable")
        g = g[perm]
        block = _block_size(g)
    if block is None:
        sizes = sorted(set(np.bincount(g).tolist()))
        raise UserError(f"{where}groups of {sizes} input rows (K={k}) cannot be cut into aligned MatMulNBits blocks "
                        "of 16..128 rows (a power of two) each inside one group")  # fmt: skip
    blocks = k // block
    block_group = g[::block]  # [blocks]
    if perm is None:
        # For 2/4/8 bits a GPTQ column is already a little-endian stream along K, first value in the
        # lowest bits: the bytes of each column's int32 words are MatMulNBits' blob, as they are.
        stream = np.ascontiguousarray(qweight.numpy().T).astype("<i4", copy=False).view(np.uint8)  # [N, K*bits/8]
        packed = stream.reshape(n, blocks, block * bits // 8)
    else:
        codes = unpack_along_rows(qweight, bits, k).numpy()[perm]  # [K, N] in block order
        packed = _pack_low_bits_first(codes.T.reshape(n, blocks, block).astype(np.uint8), bits)
    return NBitsWeight(
        packed=np.ascontiguousarray(packed),
        scales=np.ascontiguousarray(scales.float().numpy()[block_group].T),  # fp16 -> fp32 is exact
        zero_points=np.ascontiguousarray(_pack_low_bits_first(zeros[block_group].T.astype(np.uint8), bits)),
        bits=bits,
        block_size=block,
        in_features=k,
        out_features=n,
        perm=perm,
    )


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """float32 [N, K] weight MatMulNBits computes with (columns in the permuted order when `perm`)."""
    codes = _unpack_low_bits_first(w.packed, w.bits, w.block_size).astype(np.float32)  # [N, blocks, block]
    zeros = _unpack_low_bits_first(w.zero_points, w.bits, w.blocks).astype(np.float32)  # [N, blocks]
    weight = (codes - zeros[..., None]) * w.scales[..., None]
    return weight.reshape(w.out_features, w.in_features)


# --------------------------------------------------------------------------------- graph building
@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int
    tied: bool
    qk_norm: bool


def decoder_shape(config, where: str = "") -> DecoderShape:
    """The dimensions the graph needs; UserError for architectures or options it does not build."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{where}ONNX export supports model types {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type!r}")
    act = getattr(text, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}ONNX export supports hidden_act 'silu', not {act!r}")
    layer_types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    if any(t != "full_attention" for t in layer_types) or (model_type == "mistral" and window):
        raise UserError(f"{where}sliding-window attention is not supported by the ONNX export")
    if getattr(text, "partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{where}partial rotary embeddings are not supported by the ONNX export")
    rope_type = dict(getattr(text, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UserError(f"{where}rope_type {rope_type!r} is not supported by the ONNX export; supported: "
                        f"{', '.join(STATIC_ROPE_TYPES)}")  # fmt: skip
    heads = text.num_attention_heads
    return DecoderShape(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        eps=float(text.rms_norm_eps),
        max_positions=text.max_position_embeddings,
        tied=bool(getattr(text, "tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
    )


def rope_caches(config, head_dim: int, max_positions: int, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_dim/2] computed as transformers' rotary embedding computes them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = dict(getattr(text, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")  # a supported one: decoder_shape checked it
    if rope_type == "default":
        base = params.get("rope_theta", getattr(text, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text)
    freqs = torch.arange(max_positions)[:, None].float() * inv_freq.float()  # same op order as transformers
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self):
        from onnx import helper

        self.helper = helper
        self.nodes, self.initializers, self._count = [], [], 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs) -> str | list[str]:  # fmt: skip
        self._count += 1
        name = name or f"/{op_type}_{self._count}"
        names = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, names, name=name, domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names


class _DecoderBuilder:
    def __init__(self, config, tensors: dict[str, torch.Tensor], bits: int, accuracy_level: int, progress: bool):
        self.config, self.shape = config, decoder_shape(config)
        self.tensors, self.bits, self.accuracy_level = tensors, bits, accuracy_level
        self.g = _Graph()
        self.quantized: list[str] = []  # module names that became MatMulNBits
        self.float_linears: list[str] = []
        self.block_sizes: set[int] = set()
        self._gathers: dict[tuple[str, bytes], str] = {}  # (input, perm) -> permuted input, shared by q/k/v
        self.progress = progress

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ArtifactError(f"missing tensor {name}")
        return self.tensors[name]

    def float_const(self, name: str, dtype=np.float32) -> str:
        return self.g.const(name, self.tensor(name).float().numpy().astype(dtype))

    def float_matrix(self, name: str, transpose: bool) -> str:
        """A float16-stored matrix as float32 (Cast folded by onnxruntime at load)."""
        w = self.tensor(name).to(torch.float16)
        stored = self.g.const(name, (w.T if transpose else w).contiguous().numpy())
        return self.g.op("Cast", [stored], name=f"{name}/Cast", to=1)

    def linear(self, x: str, module: str) -> str:
        g = self.g
        bias = f"{module}.bias" if f"{module}.bias" in self.tensors else None
        if f"{module}.qweight" not in self.tensors:
            self.float_linears.append(module)
            y = g.op("MatMul", [x, self.float_matrix(f"{module}.weight", transpose=True)], name=f"{module}/MatMul")
            return g.op("Add", [y, self.float_const(bias)], name=f"{module}/Add") if bias else y
        w = gptq_to_nbits(self.tensor(f"{module}.qweight"), self.tensor(f"{module}.qzeros"), self.tensor(f"{module}.scales"),
                          self.tensors.get(f"{module}.g_idx"), self.bits, module)  # fmt: skip
        if w.perm is not None:  # act-order groups: feed the inputs in the order the blocks were cut
            key = (x, w.perm.tobytes())
            if key not in self._gathers:
                perm = g.const(f"{module}.perm", w.perm.astype(np.int64))
                self._gathers[key] = g.op("Gather", [x, perm], name=f"{module}/Gather", axis=-1)
            x = self._gathers[key]
        inputs = [x, g.const(f"{module}.B", w.packed), g.const(f"{module}.scales", w.scales),
                  g.const(f"{module}.zero_points", w.zero_points)]  # fmt: skip
        if bias:
            inputs += ["", self.float_const(bias)]  # input 4 (g_idx, deprecated) left out
        self.quantized.append(module)
        self.block_sizes.add(w.block_size)
        return g.op("MatMulNBits", inputs, name=module, domain=MS_DOMAIN, K=w.in_features, N=w.out_features,
                    bits=w.bits, block_size=w.block_size, accuracy_level=self.accuracy_level)  # fmt: skip

    def rms_norm(self, x: str, weight: str) -> str:
        return self.g.op("RMSNormalization", [x, self.float_const(weight)], name=weight.removesuffix(".weight"),
                         axis=-1, epsilon=self.shape.eps)  # fmt: skip

    def head_norm(self, x: str, weight: str, heads: int) -> str:
        """Qwen3's per-head RMSNorm of q/k: [B, S, heads*hd] -> [B, S, heads, hd] -> norm -> back."""
        g, hd = self.g, self.shape.head_dim
        split = g.op("Reshape", [x, g.const(f"{weight}/shape4", np.array([0, 0, heads, hd], np.int64))])
        normed = self.rms_norm(split, weight)
        return g.op("Reshape", [normed, g.const(f"{weight}/shape3", np.array([0, 0, heads * hd], np.int64))])

    def build(self):
        from onnx import TensorProto, helper

        s, g = self.shape, self.g
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", s.vocab])]
        cache = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
        present = ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
        for i in range(s.layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, cache))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, present))

        mask = self.attention_mask()
        cos, sin = rope_caches(self.config, s.head_dim, s.max_positions)
        cos, sin = g.const("rope.cos_cache", cos), g.const("rope.sin_cache", sin)

        embed = self.float_matrix("model.embed_tokens.weight", transpose=False)  # [V, H] fp32
        h = g.op("Gather", [embed, "input_ids"], name="model.embed_tokens", axis=0)
        layers = range(s.layers)
        if self.progress:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="ONNX export", unit="layer")
        for i in layers:
            p = f"model.layers.{i}"
            x = self.rms_norm(h, f"{p}.input_layernorm.weight")
            q, k, v = (self.linear(x, f"{p}.self_attn.{n}_proj") for n in "qkv")
            if s.qk_norm:
                q = self.head_norm(q, f"{p}.self_attn.q_norm.weight", s.heads)
                k = self.head_norm(k, f"{p}.self_attn.k_norm.weight", s.kv_heads)
            q = g.op("RotaryEmbedding", [q, cos, sin, "position_ids"], name=f"{p}.self_attn.q_rotary", num_heads=s.heads)
            k = g.op("RotaryEmbedding", [k, cos, sin, "position_ids"], name=f"{p}.self_attn.k_rotary", num_heads=s.kv_heads)
            attn, _, _ = g.op(
                "Attention", [q, k, v, mask, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
                name=f"{p}.self_attn", outputs=[f"{p}.self_attn/out", f"present.{i}.key", f"present.{i}.value"],
                q_num_heads=s.heads, kv_num_heads=s.kv_heads, scale=float(s.head_dim**-0.5),
            )  # fmt: skip
            h = g.op("Add", [h, self.linear(attn, f"{p}.self_attn.o_proj")], name=f"{p}/attn_residual")
            x = self.rms_norm(h, f"{p}.post_attention_layernorm.weight")
            gate = self.linear(x, f"{p}.mlp.gate_proj")
            up = self.linear(x, f"{p}.mlp.up_proj")
            silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}.mlp.act/Sigmoid")], name=f"{p}.mlp.act")
            down = self.linear(g.op("Mul", [silu, up], name=f"{p}.mlp/gate_times_up"), f"{p}.mlp.down_proj")
            h = g.op("Add", [h, down], name=f"{p}/mlp_residual")
        h = self.rms_norm(h, "model.norm.weight")
        self.logits(h, embed)
        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="compressor",
        )  # fmt: skip
        model.ir_version = 10  # what onnxruntime releases since 1.20 read
        return model

    def attention_mask(self) -> str:
        """bool [B, 1, S, T]: key t visible to query s iff attention_mask[b, t] and t <= past + s (causal)."""
        g = self.g
        one = g.const("mask/one", np.array(1, np.int64))
        zero = g.const("mask/zero", np.array(0, np.int64))
        total = g.op("Gather", [g.op("Shape", ["attention_mask"]), one], axis=0)  # T
        new = g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)  # S
        past = g.op("Sub", [total, new])
        key_pos = g.op("Range", [zero, total, one])  # [T]
        query_pos = g.op("Unsqueeze", [g.op("Range", [past, total, one]), one])  # [S, 1]
        causal = g.op("LessOrEqual", [key_pos, query_pos])  # [S, T]
        axes = g.const("mask/axes", np.array([1, 2], np.int64))
        padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=9), axes])  # [B, 1, 1, T]
        return g.op("And", [causal, padding], name="attention_mask/causal_and_padding")

    def logits(self, h: str, embed: str) -> None:
        """lm_head: the embedding matrix itself when tied (one initializer), else its own weight."""
        g, s = self.g, self.shape
        if "lm_head.qweight" in self.tensors:
            out = self.linear(h, "lm_head")
            g.op("Identity", [out], name="lm_head/out", outputs=["logits"])
            return
        weight = embed if s.tied or "lm_head.weight" not in self.tensors else self.float_matrix("lm_head.weight", False)
        self.float_linears.append("lm_head")
        flat = g.op("Reshape", [h, g.const("lm_head/flat", np.array([-1, s.hidden], np.int64))])
        y = g.op("Gemm", [flat, weight], name="lm_head", transB=1)  # x @ W^T without a transposed copy
        batch_seq = g.op("Slice", [g.op("Shape", [h]), g.const("lm_head/0", np.array([0], np.int64)),
                                   g.const("lm_head/2", np.array([2], np.int64))])  # fmt: skip
        shape = g.op("Concat", [batch_seq, g.const("lm_head/vocab", np.array([s.vocab], np.int64))], axis=0)
        g.op("Reshape", [y, shape], name="lm_head/unflatten", outputs=["logits"])


def build_decoder(config, tensors: dict[str, torch.Tensor], bits: int, accuracy_level: int = 0, progress: bool = False):
    """(onnx.ModelProto, builder) for a llama-like decoder holding `tensors` (a GPTQ v1 state dict)."""
    builder = _DecoderBuilder(config, tensors, bits, accuracy_level, progress)
    return builder.build(), builder


# ------------------------------------------------------------------------------------ artifacts
def _save(model, out_dir: Path) -> None:
    import onnx

    path = out_dir / ONNX_FILE
    external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_ABOVE
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{ONNX_FILE}.data" if external else None)  # fmt: skip
    onnx.checker.check_model(str(path), full_check=False)


def write_onnx_artifact(artifact: Path, out_dir: Path, accuracy_level: int = 0, progress: bool = True,
                        record_source: bool = True, extra: dict | None = None) -> dict:  # fmt: skip
    """Convert the GPTQ artifact `artifact` into the existing, empty `out_dir` (no manifest); return its onnx_config.

    onnx_config.json names the source artifact unless `record_source` is False (a temporary
    directory) and carries the `extra` fields.
    """
    from transformers import AutoConfig

    from compressor.artifacts.checkpoint import gptq_config, read_gptq_tensors

    artifact, out_dir = Path(artifact), Path(out_dir)
    require_onnx("onnx", "ONNX export")
    if accuracy_level not in (0, 4):
        raise UserError(f"accuracy_level: {accuracy_level} is not allowed: 0 (float32 compute) or 4 (int8 activations)")
    qconfig = gptq_config(artifact)
    check_bits(qconfig["bits"], f"{artifact}: ")  # before reading any weights
    config = AutoConfig.from_pretrained(artifact)
    decoder_shape(config, f"{artifact}: ")
    tensors = read_gptq_tensors(artifact, qconfig)
    model, builder = build_decoder(config, tensors, qconfig["bits"], accuracy_level, progress)
    leftover = sorted(set(tensors) - _used_tensors(model, tensors))
    if leftover:
        raise ArtifactError(f"{artifact}: tensors the llama-like graph does not use: {', '.join(leftover[:5])}")
    _save(model, out_dir)
    log.info("%s: %d linears as MatMulNBits (block sizes %s), %d float linears", out_dir / ONNX_FILE,
             len(builder.quantized), sorted(builder.block_sizes), len(builder.float_linears))  # fmt: skip

    config_json = json.loads((artifact / "config.json").read_text())
    config_json.pop("quantization_config", None)  # the directory is no GPTQ checkpoint; see onnx_config.json
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    copy_side_files(artifact, out_dir)
    s = builder.shape
    onnx_config = {
        "format": "onnx",
        "model": ONNX_FILE,
        "opset": OPSET,
        "dtype": "float32",
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab,
        "max_position_embeddings": s.max_positions,
        "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.{i}.key", "past_key_values.{i}.value"],
        "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
        "matmul_nbits": {
            "bits": qconfig["bits"],
            "block_sizes": sorted(builder.block_sizes),
            "accuracy_level": accuracy_level,
            "layers": len(builder.quantized),
        },
        "float_linears": builder.float_linears,
        "act_order_gathers": len(builder._gathers),
        "quantization_config": qconfig,
    }
    if record_source:
        onnx_config["source_artifact"] = str(artifact.resolve())
    onnx_config.update(extra or {})
    (out_dir / ONNX_CONFIG).write_text(json.dumps(onnx_config, indent=2) + "\n")
    return onnx_config


def _used_tensors(model, tensors: dict) -> set[str]:
    """Checkpoint tensors the graph consumed (GPTQ tensors count through their MatMulNBits node)."""
    names = {init.name for init in model.graph.initializer}
    used = {n for n in tensors if n in names}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            used |= {f"{node.name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    return used


def export_onnx(artifact, output, overwrite: bool = False, accuracy_level: int = 0, progress: bool = True) -> Path:
    """`compress export --format onnx`: the GPTQ artifact as an ONNX artifact directory, written atomically."""
    from compressor.export.gptq import check_conversion_source

    artifact, output = Path(artifact), Path(output)
    check_conversion_source(artifact, output)
    with atomic_output_dir(output, overwrite) as tmp:
        write_onnx_artifact(artifact, tmp, accuracy_level, progress)
        write_manifest(tmp)
    return output


def convert_checkpoint_dir(write_gptq, out_dir: Path, accuracy_level: int = 0, progress: bool = True) -> dict:
    """Pipeline helper: `write_gptq(tmp)` writes a GPTQ checkpoint, converted into `out_dir`; the GPTQ copy is deleted."""
    from compressor.export.gptq import via_gptq_checkpoint

    return via_gptq_checkpoint(write_gptq, out_dir, lambda tmp, weights: write_onnx_artifact(
        tmp, out_dir, accuracy_level, progress, record_source=False, extra={"gptq_weights_bytes": weights}), "onnx")  # fmt: skip


def onnx_bytes(directory: Path) -> int:
    """Bytes of the ONNX graph and its external data."""
    return sum(p.stat().st_size for p in Path(directory).glob(f"{ONNX_FILE}*") if p.is_file())
