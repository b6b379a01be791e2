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
from compressor.packing import pack_gptq_v1

GPTQ_TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def gptq_quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    static_groups: bool,
    damp_percent: float,
    true_sequential: bool,
) -> dict:
    """The `quantization_config` block of config.json (also written as quantize_config.json)."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "true_sequential": true_sequential,
        "damp_percent": damp_percent,
        "static_groups": static_groups,
        "checkpoint_format": "gptq",
        "lm_head": False,
    }


def _storage_key(t: torch.Tensor) -> tuple:
    """Identifies one view of one storage: two state-dict entries with the same key are one tensor."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _ties_word_embeddings(model) -> bool:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text_config, "tie_word_embeddings", False))


def _plain_tensors(model, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The model's tensors that are written as they are (in fp16 if floating), shared ones once."""
    state = model.state_dict()
    for name in quantized:
        if f"{name}.weight" not in state:
            raise ValueError(f"quantized module {name!r} has no weight in the model's state dict")
    dropped = {f"{name}.weight" for name in quantized}
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
        if name in dropped:
            continue
        key = _storage_key(tensor)
        if key in seen:  # shared parameter (e.g. tied weights under another name): keep the first name
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float16)
    return tensor.to("cpu").contiguous()


def checkpoint_tensors(model, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by name, as it will be stored."""
    tensors = {name: _stored(t) for name, t in _plain_tensors(model, quantized).items()}
    for name, qw in quantized.items():
        for suffix, tensor in pack_gptq_v1(qw).items():
            tensors[f"{name}.{suffix}"] = tensor.cpu()
    return tensors


def expected_size_bytes(model, quantized: dict[str, QuantizedWeight]) -> int:
    """Bytes of tensor data the checkpoint holds ideally (no file headers), computed without packing."""
    total = 0
    for tensor in _plain_tensors(model, quantized).values():
        itemsize = 2 if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * itemsize
    for qw in quantized.values():
        n, k = qw.codes.shape
        groups = qw.scales.shape[0]
        total += k * n * qw.bits // 8  # qweight
        total += groups * n * qw.bits // 8  # qzeros
        total += groups * n * 2  # scales (fp16)
        total += k * 4  # g_idx (int32)
    return total


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


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def write_gptq_checkpoint(
    out_dir: Path,
    model,
    quantized: dict[str, QuantizedWeight],
    quantization_config: dict | None,
    tokenizer=None,
    max_shard_size: int = 2 * 10**9,
) -> list[Path]:
    """Write the checkpoint into the existing, empty `out_dir`; return the paths written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is not a directory")
    if any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty")

    tensors = checkpoint_tensors(model, quantized)
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        _write_json(out_dir / "model.safetensors.index.json", index)

    _write_json(out_dir / "config.json", _config_dict(model, quantization_config))
    if quantization_config is not None:
        _write_json(out_dir / "quantize_config.json", dict(quantization_config))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def write_dense_checkpoint(out_dir: Path, model, tokenizer=None, max_shard_size: int = 2 * 10**9) -> list[Path]:
    """A plain float16 checkpoint (after pruning without quantization): what `save_pretrained` writes."""
    return write_gptq_checkpoint(out_dir, model, {}, None, tokenizer, max_shard_size)
