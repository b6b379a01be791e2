"""GGUF export: a GPTQ artifact as one llama.cpp file (Ollama, LM Studio), its quantized linears
re-expressed bit for bit, never re-quantized.

ggml's weight blocks hold 32 consecutive inputs of one output row: the rows of W [N, K] are cut
along K, the axis GPTQ's groups run along. Three block types hold GPTQ weights exactly:

    Q4_0  fp16 d, 16 bytes of nibbles             w = d * (q - 8)    our symmetric 4-bit (zero point 8)
    Q8_0  fp16 d, 32 int8                         w = d * q          our symmetric 8-bit, q = code - 128
    Q4_1  fp16 d, fp16 m, 16 bytes of nibbles     w = d * q + m      our asymmetric 4-bit, m = fp16(-d * zero)

A group of g inputs (g a multiple of 32) becomes g / 32 blocks that repeat its scale. In a 4-bit
block, byte j holds q[j] in its low nibble and q[j + 16] in its high one. Q4_0 and Q8_0 are exact;
Q4_1 rounds once: m is the float16 of -d * zero (a product that is exact in float32).

What cannot be represented is refused with one line naming the recipe option to change: bit widths
other than 4 and 8, asymmetric 8-bit (no ggml type holds an 8-bit zero point), groups that are not
a multiple of 32, and a permuted g_idx (act-order without static groups: a block cannot reorder
its inputs).

Everything else: 1-D tensors (norms, biases) in float32, as llama.cpp requires; the rest float16.
llama.cpp's llama graph rotates interleaved pairs where transformers rotates halves, so for the
architectures whose table entry says so (llama, mistral) the q/k rows are permuted the way
llama.cpp's own converter does it; qwen2/qwen3 rotate halves in both. The tokenizer (byte-level
BPE: vocabulary, merges, special tokens, chat template) goes into the file's metadata. Tensors are
streamed into the file one at a time: the writer holds one converted tensor, not the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.algorithms.quant import QuantizedWeight
from compressor.artifacts.directory import remove_stale_temporaries, temporary_sibling
from compressor.artifacts.formats import GGUF_CONFIG, GGUF_FILE
from compressor.errors import ArtifactError, UserError
from compressor.packing import unpack_gptq_v1

BLOCK = 32  # inputs per ggml block, for the three types used here
GGUF_BITS = (4, 8)

# tokenizer.json's pre_tokenizer -> llama.cpp's name for the same pre-tokenization
# (tokenizer.ggml.pre). llama.cpp refuses names it does not know, and a wrong one silently splits
# text differently, so only these are written.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip

# token types in tokenizer.ggml.token_type (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@dataclass
class GgufWeight:
    """One linear as ggml blocks: `data` is uint8 [N, K / 32 * bytes per block]."""

    data: np.ndarray
    qtype: object  # gguf.GGMLQuantizationType


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def _check_exportable(bits: int, sym: bool, group_size: int, permuted_g_idx: bool, where: str = "") -> None:
    """One-line refusal for what no ggml block type holds (the recipe option to change is named)."""
    if bits not in GGUF_BITS:
        raise UserError(f"{where}{bits}-bit weights cannot be written as GGUF: Q4_0/Q4_1 hold 4 bits, Q8_0 8 bits; "
                        "set quantize.bits to 4 or 8")  # fmt: skip
    if bits == 8 and not sym:
        raise UserError(f"{where}asymmetric 8-bit weights cannot be written as GGUF (Q8_0 has no zero point); set quantize.sym: true")
    if group_size != -1 and group_size % BLOCK:
        raise UserError(f"{where}group_size {group_size} cannot be written as GGUF: ggml blocks hold 32 inputs, so the "
                        "group size must be a multiple of 32 (e.g. quantize.group_size: 32 or 64)")  # fmt: skip
    if permuted_g_idx:
        raise UserError(f"{where}a permuted g_idx (act-order with groups formed in act-order) cannot be written as GGUF: "
                        "set quantize.static_groups: true (or desc_act: false)")  # fmt: skip


def check_recipe_exportable(bits: int, sym: bool, group_size: int, desc_act: bool, static_groups: bool, where: str = "") -> None:
    """The recipe-time check (no weights needed)."""
    from compressor.export.gptq import permutes_g_idx

    _check_exportable(bits, sym, group_size, permutes_g_idx(desc_act, static_groups, group_size), where)


def gguf_weight(qw: QuantizedWeight, where: str = "") -> GgufWeight:
    """`qw` as Q4_0 (symmetric 4-bit), Q8_0 (symmetric 8-bit) or Q4_1 (asymmetric 4-bit) blocks."""
    gguf = _gguf()
    n, k = qw.codes.shape
    groups = qw.scales.shape[0]
    gs = k // groups
    permuted = not torch.equal(qw.g_idx.long(), torch.arange(k) // gs)
    zero_point = 2 ** (qw.bits - 1)
    sym = bool((qw.zeros == zero_point).all())
    _check_exportable(qw.bits, sym, gs if groups > 1 else -1, permuted, where)
    if k % BLOCK:
        raise UserError(f"{where}input width {k} is not a multiple of 32: GGUF blocks cannot hold it")
    blocks, per_group = k // BLOCK, gs // BLOCK
    codes = qw.codes.numpy().reshape(n, blocks, BLOCK)
    scales = qw.scales.to(torch.float16).T.numpy()  # [N, G]
    d = np.repeat(scales, per_group, axis=1).view(np.uint8).reshape(n, blocks, 2)  # little-endian fp16
    if qw.bits == 8:
        qs = (codes.astype(np.int16) - zero_point).astype(np.int8).view(np.uint8)
        parts, qtype = [d, qs], gguf.GGMLQuantizationType.Q8_0
    else:
        qs = codes[..., :16] | (codes[..., 16:] << 4)
        if sym:
            parts, qtype = [d, qs], gguf.GGMLQuantizationType.Q4_0
        else:
            # -d * zero is exact in float32 (11-bit mantissa times a 4-bit integer): one rounding to fp16.
            m = (-(qw.scales.float() * qw.zeros.float())).to(torch.float16).T.numpy()
            m = np.repeat(m, per_group, axis=1).view(np.uint8).reshape(n, blocks, 2)
            parts, qtype = [d, m, qs], gguf.GGMLQuantizationType.Q4_1
    data = np.concatenate(parts, axis=2).reshape(n, -1)
    return GgufWeight(np.ascontiguousarray(data), qtype)


def rope_pair_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that turns transformers' rotate-half q/k projection into llama.cpp's interleaved
    pairs: within each head, rows (i, i + d/2) become neighbours (2i, 2i + 1)."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


# ----------------------------------------------------------------------------- tokenizer
def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or None when it has none."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}.get(regex)
    return None


def _add_tokenizer(writer, artifact: Path, vocab_size: int) -> None:
    gguf = _gguf()
    path = artifact / "tokenizer.json"
    if not path.is_file():
        raise ArtifactError(f"{artifact}: no tokenizer.json; GGUF export writes the tokenizer into the file")
    try:
        tok = json.loads(path.read_text())
        model = tok["model"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: unreadable tokenizer ({type(exc).__name__}: {exc})") from None
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{path}: GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2/3, SmolLM2); this one is "
                        f"{model.get('type')}{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}")  # fmt: skip
    pre = _pre_tokenizer_name(tok.get("pre_tokenizer"))
    if pre is None:
        raise UserError(f"{path}: its pre_tokenizer is not one whose llama.cpp name is known here "
                        "(gpt-2, smollm, llama-bpe, qwen2); GGUF export refuses rather than split text differently")  # fmt: skip
    tokens: list[str | None] = [None] * vocab_size
    types = [_NORMAL] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = _CONTROL if added.get("special") else _USER_DEFINED
    for i, text in enumerate(tokens):
        if text is None:  # the embedding has rows the tokenizer never produces
            tokens[i], types[i] = f"[PAD{i}]", _UNUSED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/unk/pad ids, add_bos/eos flags and the chat template, read by gguf's own helper
    gguf.SpecialVocab(artifact, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


# ----------------------------------------------------------------------------- model
def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ArtifactError("config.json has no rope_theta")
    return float(theta), params


def _add_hyperparameters(writer, config, name: str) -> None:
    gguf = _gguf()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    # Always written: readers that default head_dim (transformers' Qwen3Config: 128) need it even
    # when it is hidden_size / heads.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise UserError(f"rope_scaling type {rope_type!r} is not written to GGUF yet (default and linear are)")


def _tensor_name_map(config, arch_name: str):
    gguf = _gguf()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def _plan(artifact: Path, config, tensors: dict[str, torch.Tensor], round_to_nearest: bool = False):
    """(gguf name, hf module name, source tensor name(s), kind) for every tensor, in file order,
    without converting anything. kind: 'quantized' (GPTQ tensors), 'rtn' (a float block linear to
    round to nearest), 'f32' or 'f16'."""
    from compressor.architectures import architecture_of

    architecture = architecture_of(config)
    names = _tensor_name_map(config, architecture.gguf_arch)
    plan, used = [], set()
    for name in tensors:
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            target = names.get_name(module + ".weight", try_suffixes=(".weight",))
            parts = [f"{module}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx") if f"{module}.{s}" in tensors]
            plan.append((target, module, parts, "quantized"))
            used.update(parts)
    block_linears = {f"{architecture.blocks}.{i}.{rel}.weight" for i in range(config.num_hidden_layers)
                     for group in architecture.linear_groups for rel in group}  # fmt: skip
    for name, tensor in tensors.items():
        if name in used:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        kind = "f32" if tensor.dim() == 1 else "rtn" if round_to_nearest and name in block_linears else "f16"
        plan.append((target, name.rpartition(".")[0], [name], kind))
    unknown = [p[2][0] for p in plan if p[0] is None]
    if unknown:
        raise ArtifactError(f"{artifact}: tensors with no GGUF name for {architecture.gguf_arch}: {', '.join(unknown[:5])}")
    return sorted(plan, key=lambda p: _file_order(p[0])), architecture


def _file_order(name: str) -> tuple:
    """token_embd, then the blocks in order, then output_norm/output (llama.cpp's own order)."""
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        return (1, int(index), rest)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def _heads_for(module: str, config, permute: bool) -> int | None:
    """Heads whose rotary rows are permuted for `module`, or None (no permutation)."""
    if not permute:
        return None
    if module.endswith("q_proj"):
        return config.num_attention_heads
    if module.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _convert(tensors, entry, config, bits: int | None, permute: bool, rtn_type: str | None = None) -> tuple[np.ndarray, object]:
    """The bytes of one planned tensor and its ggml type."""
    gguf = _gguf()
    target, module, parts, kind = entry
    heads = _heads_for(module, config, permute)
    if kind == "quantized":
        t = {p.rpartition(".")[2]: tensors[p] for p in parts}
        k = t["qweight"].shape[0] * 32 // bits
        groups = t["scales"].shape[0]
        g_idx = t.get("g_idx", torch.arange(k, dtype=torch.int32) // (k // groups))
        try:
            qw = unpack_gptq_v1(t["qweight"], t["qzeros"], t["scales"], g_idx, bits)
        except ValueError as exc:
            raise ArtifactError(f"{module}: {exc}") from None
        weight = gguf_weight(qw, f"{module}: ")
        data, qtype = weight.data, weight.qtype
    elif kind == "rtn":  # the baseline: gguf's own round-to-nearest quantizer (llama-quantize without an imatrix)
        qtype = gguf.GGMLQuantizationType[rtn_type]
        data = gguf.quants.quantize(tensors[parts[0]].to(torch.float32).numpy(), qtype)
    elif kind == "f32":
        data, qtype = tensors[parts[0]].to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32
    else:
        data, qtype = tensors[parts[0]].to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
    if heads is not None:  # q/k weight rows (and bias entries) into llama.cpp's rotary pair order
        data = data[rope_pair_rows(data.shape[0], heads)]
    return np.ascontiguousarray(data), qtype


def write_gguf(artifact: Path, out_file: Path, progress: bool = True, name: str | None = None,
               round_to_nearest: str | None = None) -> dict:  # fmt: skip
    """Convert the GPTQ artifact directory `artifact` into the GGUF file `out_file` (written in place:
    callers write to a temporary path and rename). Returns facts about the file.

    A dense checkpoint directory (no quantization_config) is written with float16 linears, or with
    `round_to_nearest` ("Q4_0", "Q4_1", "Q8_0") its block linears are quantized by the gguf package's
    round-to-nearest quantizer: what llama.cpp users get without GPTQ (benchmarks/gguf_quality.py)."""
    gguf = _gguf()
    from tqdm import tqdm
    from transformers import AutoConfig

    from compressor.artifacts.checkpoint import gptq_config, is_gptq_artifact, read_gptq_tensors, read_tensors, weight_files

    artifact = Path(artifact)
    bits, qconfig = None, None
    if is_gptq_artifact(artifact):
        qconfig = gptq_config(artifact)
        bits = qconfig["bits"]
        # g_idx is checked per linear (older artifacts say desc_act true over an in-order g_idx)
        _check_exportable(bits, bool(qconfig.get("sym", True)), qconfig.get("group_size", -1), False, f"{artifact}: ")
    if round_to_nearest not in (None, "Q4_0", "Q4_1", "Q8_0"):
        raise UserError(f"round_to_nearest: {round_to_nearest!r} is not allowed: Q4_0, Q4_1 or Q8_0")
    config = _text_config(AutoConfig.from_pretrained(artifact))
    tensors = read_gptq_tensors(artifact, qconfig) if qconfig else read_tensors(weight_files(artifact))
    plan, architecture = _plan(artifact, config, tensors, round_to_nearest=round_to_nearest is not None and bits is None)

    # The header lists every tensor's type and size before any data, so each linear's ggml type is
    # read first from its zero points alone (cheap); the blocks are built later, one tensor at a time.
    types = {entry[0]: _quantized_type(tensors, entry, bits) for entry in plan if entry[3] == "quantized"}
    types.update({entry[0]: gguf.GGMLQuantizationType[round_to_nearest] for entry in plan if entry[3] == "rtn"})

    writer = gguf.GGUFWriter(None, architecture.gguf_arch)
    _add_hyperparameters(writer, config, name or artifact.name)
    counts: dict[str, int] = {}
    for entry in plan:
        target, _, parts, kind = entry
        if kind in ("quantized", "rtn"):
            qtype = types[target]
            first = tensors[parts[0]]
            k, n = (first.shape[0] * 32 // bits, first.shape[1]) if kind == "quantized" else (first.shape[1], first.shape[0])
            block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
            shape, nbytes = (n, k // BLOCK * block_bytes), n * (k // BLOCK) * block_bytes
            writer.add_tensor_info(target, shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        else:
            t = tensors[parts[0]]
            dtype = np.dtype(np.float32 if kind == "f32" else np.float16)
            writer.add_tensor_info(target, tuple(t.shape), dtype, t.numel() * dtype.itemsize)
    main_type = max(counts, key=counts.get) if counts else "F16"
    file_types = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types.get(main_type, gguf.LlamaFileType.MOSTLY_F16))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, artifact, config.vocab_size)

    writer.write_header_to_file(Path(out_file))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for entry in tqdm(plan, desc="gguf", unit="tensor", disable=not progress):
        data, qtype = _convert(tensors, entry, config, bits, architecture.gguf_permute_qk, round_to_nearest)
        if entry[0] in types and qtype != types[entry[0]]:
            raise AssertionError(f"{entry[0]}: {qtype.name} blocks, but the header says {types[entry[0]].name}")
        writer.write_tensor_data(data)
    writer.close()
    return {
        "format": "gguf",
        "file": Path(out_file).name,
        "architecture": architecture.gguf_arch,
        "tensor_types": counts,
        "quantized_linears": sum(counts.values()),
        "gguf_bytes": Path(out_file).stat().st_size,
        "quantization_config": qconfig,
    }


def _quantized_type(tensors, entry, bits: int):
    """Q8_0, Q4_0 or Q4_1 for one planned linear, from its zero points alone (what `gguf_weight` picks)."""
    gguf = _gguf()
    from compressor.packing import unpack_qzeros_v1

    _, module, parts, _ = entry
    t = {p.rpartition(".")[2]: tensors[p] for p in parts}
    k, groups = t["qweight"].shape[0] * 32 // bits, t["scales"].shape[0]
    zeros = unpack_qzeros_v1(t["qzeros"], bits, t["qweight"].shape[1])
    sym = bool((zeros == 2 ** (bits - 1)).all())
    gs = k // groups
    permuted = "g_idx" in t and not torch.equal(t["g_idx"].long(), torch.arange(k) // gs)
    # everything `gguf_weight` refuses, refused here before the file is started
    _check_exportable(bits, sym, gs if groups > 1 else -1, permuted, f"{module}: ")
    if k % BLOCK:
        raise UserError(f"{module}: input width {k} is not a multiple of 32: GGUF blocks cannot hold it")
    if bits == 8:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.Q4_0 if sym else gguf.GGMLQuantizationType.Q4_1


def export_gguf(artifact, output, overwrite: bool = False, progress: bool = True) -> dict:
    """`compress export --format gguf`: the GPTQ artifact as one .gguf file, written through a
    temporary sibling and renamed into place (never half-written; an old file survives a failure)."""
    from compressor.export.gptq import check_conversion_source

    artifact, output = Path(artifact), Path(output)
    if output.suffix != ".gguf":
        raise UserError(f"--output: {output} should be a file name ending in .gguf")
    if output.is_dir():
        raise UserError(f"--output: {output} is a directory; give a file name ending in .gguf")
    if output.exists() and not overwrite:
        raise UserError(f"--output: {output} already exists; pass --overwrite to replace it")
    check_conversion_source(artifact, output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)  # a killed export's half-written file
    tmp = temporary_sibling(output)
    try:
        facts = write_gguf(artifact, tmp, progress, name=output.stem)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return facts


def write_gguf_artifact(gptq_dir: Path, out_dir: Path, name: str, progress: bool = True, extra: dict | None = None) -> dict:
    """An artifact directory holding model.gguf (+ gguf_config.json): what a recipe with
    `export.format: gguf` writes, from the GPTQ checkpoint in `gptq_dir`."""
    out_dir = Path(out_dir)
    facts = write_gguf(gptq_dir, out_dir / GGUF_FILE, progress, name=name)
    facts.update(extra or {})
    (out_dir / GGUF_CONFIG).write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def convert_checkpoint_dir(write_gptq, out_dir: Path, name: str, progress: bool = True) -> dict:
    """Pipeline helper: `write_gptq(tmp)` writes a GPTQ checkpoint, converted into `out_dir`; the GPTQ copy is deleted."""
    from compressor.export.gptq import via_gptq_checkpoint

    return via_gptq_checkpoint(write_gptq, out_dir, lambda tmp, weights: write_gguf_artifact(
        tmp, out_dir, name, progress, extra={"gptq_weights_bytes": weights}), "gguf")  # fmt: skip


def describe_gguf(path: Path) -> str:
    """One line about a GGUF file (what `compress info` prints): architecture, blocks, tensor types."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        blocks = reader.fields[f"{arch}.block_count"].contents()
    except Exception as exc:  # truncated or not a GGUF file
        raise ArtifactError(f"{path}: unreadable GGUF ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    listed = ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
    return f"GGUF file ({arch}, {blocks} blocks, {len(reader.tensors)} tensors: {listed}; {Path(path).stat().st_size / 1e6:.1f} MB)"
