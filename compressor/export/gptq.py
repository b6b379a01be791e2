"""Writing a GPTQ v1 checkpoint directory that transformers, vLLM, TGI and GPTQModel load.

Quantized linears become `qweight/qzeros/scales/g_idx` (+ fp16 `bias`); every other floating
tensor is stored as float16, the dtype these loaders expect next to GPTQ weights. Tied
embeddings are written once: loaders re-tie `lm_head` from `config.tie_word_embeddings`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compressor.algorithms.quant import QuantizedWeight
from compressor.errors import UserError
from compressor.export.shards import ShardWriter
from compressor.export.shards import write_json as _write_json
from compressor.packing import pack_gptq_v1, pack_qzeros

GPTQ_TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def gptq_quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    static_groups: bool,
    damp_percent: float,
    true_sequential: bool,
    checkpoint_format: str = "gptq",
) -> dict:
    """The `quantization_config` block of config.json (also written as quantize_config.json).

    `desc_act` there tells loaders how to run the checkpoint, not how it was made: true means g_idx
    permutes the input rows at inference, which vLLM refuses ("desc_act=True is no longer
    supported"). Act-order with static groups (our default) leaves g_idx = k // group_size, so it is
    written as desc_act false, and the quantization-time act-order goes to our own `meta` entry.

    `checkpoint_format` "gptq" (v1: qzeros store zero - 1; what AutoGPTQ, transformers and vLLM
    read) or "gptq_v2" (the zero points as they are; GPTQModel's format, which GPTQModel.load
    requires for asymmetric checkpoints it did not write itself).
    """
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    from compressor import __version__

    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": permutes_g_idx(desc_act, static_groups, group_size),
        "sym": sym,
        "true_sequential": true_sequential,
        "damp_percent": damp_percent,
        "static_groups": static_groups,
        "checkpoint_format": checkpoint_format,
        "lm_head": False,
        "meta": {"quantizer": [f"compressor:{__version__}"], "act_order": desc_act},
    }


def permutes_g_idx(desc_act: bool, static_groups: bool, group_size: int) -> bool:
    """Whether GPTQ with these options writes a g_idx other than k // group_size: only act-order
    whose groups are formed in the permuted order (no static groups; one group is trivially in order)."""
    return desc_act and not static_groups and group_size != -1


def _storage_key(t: torch.Tensor) -> tuple:
    """Identifies one view of one storage: two state-dict entries with the same key are one tensor."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _ties_word_embeddings(model) -> bool:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text_config, "tie_word_embeddings", False))


def _checkpoint_state(model, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The state-dict entries the checkpoint stores, in state-dict order: the tied lm_head dropped,
    shared tensors once, each quantized module's `.weight` kept where `stored_tensors` replaces it."""
    state = model.state_dict()
    for name in quantized:
        if f"{name}.weight" not in state:
            raise ValueError(f"quantized module {name!r} has no weight in the model's state dict")
    quantized_weights = {f"{name}.weight" for name in quantized}
    dropped = set()
    if _ties_word_embeddings(model) and "lm_head.weight" in state:
        if "lm_head" in quantized:
            raise ValueError("lm_head is tied to the input embeddings and cannot be quantized on its own")
        if _storage_key(state["lm_head.weight"]) != _storage_key(model.get_input_embeddings().weight):
            # Loaders would re-tie it to the embeddings and silently run a different model.
            raise ValueError("config.tie_word_embeddings is true but lm_head.weight is not the input embedding tensor")
        dropped.add("lm_head.weight")  # re-tied by the loader

    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in state.items():
        if name in quantized_weights:  # packed instead: not a plain tensor that others could share
            kept[name] = tensor
            continue
        if name in dropped:
            continue
        key = _storage_key(tensor)
        if key in seen:  # shared parameter (e.g. tied weights under another name): keep the first name
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def _plain_tensors(model, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The model's tensors that are written as they are (in fp16 if floating), shared ones once."""
    quantized_weights = {f"{name}.weight" for name in quantized}
    return {n: t for n, t in _checkpoint_state(model, quantized).items() if n not in quantized_weights}


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float16)
    return tensor.to("cpu").contiguous()


def stored_tensors(state: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight],
                   checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:  # fmt: skip
    """What the checkpoint stores for some state-dict entries (names relative to the model), in
    order: `X.weight` of a module X in `quantized` becomes `X.qweight, X.qzeros, X.scales, X.g_idx`,
    every other tensor is stored as it is (floating ones in fp16). CPU, contiguous. gptq_v2
    stores the zero points themselves in qzeros (v1: zero - 1)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in quantized:
            packed_tensors = pack_gptq_v1(quantized[module])
            if checkpoint_format == "gptq_v2":
                packed_tensors["qzeros"] = pack_qzeros(quantized[module].zeros, quantized[module].bits, offset=0)
            for suffix, packed in packed_tensors.items():
                tensors[f"{module}.{suffix}"] = packed.to("cpu").contiguous()
        else:
            tensors[name] = _stored(tensor)
    return tensors


def checkpoint_tensors(model, quantized: dict[str, QuantizedWeight], checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by name, as it will be stored, in the order it is written."""
    return stored_tensors(_checkpoint_state(model, quantized), quantized, checkpoint_format)


def expected_size_bytes(model, quantized: dict[str, QuantizedWeight]) -> int:
    """Bytes of tensor data the checkpoint holds ideally (no file headers), computed without packing."""
    total = 0
    for tensor in _plain_tensors(model, quantized).values():
        itemsize = 2 if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * itemsize
    return total + sum(quantized_bytes(qw) for qw in quantized.values())


def quantized_bytes(qw: QuantizedWeight) -> int:
    """Bytes of one quantized linear's packed tensors, computed without packing."""
    n, k = qw.codes.shape
    groups = qw.scales.shape[0]
    return k * n * qw.bits // 8 + groups * n * qw.bits // 8 + groups * n * 2 + k * 4  # qweight, qzeros, scales (fp16), g_idx (int32)


def _config_dict(model, quantization_config: dict | None) -> dict:
    # to_json_string turns dtypes and special floats into JSON; use_diff=False gives to_dict().
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)  # e.g. a leftover "gguf" block from the source model
    if quantization_config is not None:
        config["quantization_config"] = dict(quantization_config)
    config["dtype"] = "float16"
    config["torch_dtype"] = "float16"  # the key older transformers and vLLM versions read
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    return config


def write_gptq_checkpoint(
    out_dir: Path,
    model,
    quantized: dict[str, QuantizedWeight],
    quantization_config: dict | None,
    tokenizer=None,
    max_shard_size: int = 2 * 10**9,
) -> list[Path]:
    """Write the checkpoint into the existing, empty `out_dir`; return the paths written."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is not a directory")
    if any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty")

    with ShardWriter(out_dir, max_shard_size) as writer:
        # One entry at a time, so that only about one shard of stored (fp16, packed) copies is held.
        checkpoint_format = (quantization_config or {}).get("checkpoint_format", "gptq")
        for name, tensor in _checkpoint_state(model, quantized).items():
            for stored_name, stored in stored_tensors({name: tensor}, quantized, checkpoint_format).items():
                writer.add(stored_name, stored)

    write_checkpoint_files(out_dir, model, quantization_config, tokenizer)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def write_checkpoint_files(out_dir: Path, model, quantization_config: dict | None, tokenizer=None, generation_config_dir: Path | None = None) -> None:
    """Everything of the checkpoint but its tensors: config.json (+ quantize_config.json),
    generation_config.json, the tokenizer. `generation_config_dir`: read the generation config from
    the source model's directory (a model built from its config only has a default one)."""
    _write_json(out_dir / "config.json", _config_dict(model, quantization_config))
    if quantization_config is not None:
        _write_json(out_dir / "quantize_config.json", dict(quantization_config))
    generation_config = getattr(model, "generation_config", None)
    if generation_config_dir is not None and (Path(generation_config_dir) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_pretrained(generation_config_dir)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def write_dense_checkpoint(out_dir: Path, model, tokenizer=None, max_shard_size: int = 2 * 10**9) -> list[Path]:
    """A plain float16 checkpoint (after pruning without quantization): what `save_pretrained` writes."""
    return write_gptq_checkpoint(out_dir, model, {}, None, tokenizer, max_shard_size)


def check_conversion_source(artifact: Path, output: Path) -> None:
    """`compress export`'s checks on the GPTQ artifact it converts (one-line UserErrors), ending with
    the manifest: a directory, declaring GPTQ, not the output, every listed file intact."""
    from compressor.artifacts.checkpoint import is_gptq_artifact
    from compressor.artifacts.directory import verify_manifest

    if not artifact.is_dir():
        raise UserError(f"{artifact}: not a directory; expected a GPTQ artifact directory")
    if not is_gptq_artifact(artifact):
        raise UserError(f"{artifact}: not a GPTQ artifact (config.json declares no GPTQ quantization_config)")
    if output.resolve() == artifact.resolve():
        raise UserError(f"--output: {output} is the input artifact; choose another directory")
    verify_manifest(artifact)


def via_gptq_checkpoint(write_gptq, out_dir: Path, convert, tag: str) -> dict:
    """For the converted formats: `write_gptq(tmp)` writes the exact GPTQ checkpoint into a
    temporary sibling of `out_dir`, `convert(tmp, gptq_weights_bytes)` turns it into `out_dir` and
    returns its facts; the GPTQ copy is deleted. The facts gain `gptq_weights_bytes`, the size the
    report compares against (converters that record it in their own config get it too)."""
    import tempfile

    # Named after `out_dir` (`.NAME.tmp-PID-HEX.gptq-for-...` beside an atomic output directory), so
    # that a killed run's copy is removed with its temporary directory by the next run to that output.
    prefix = f".{Path(out_dir).name.lstrip('.')}.gptq-for-{tag}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=Path(out_dir).parent) as tmp:
        write_gptq(Path(tmp))
        weights = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        return {**convert(Path(tmp), weights), "gptq_weights_bytes": weights}
