"""Reading a GPTQ checkpoint directory (ours or AutoGPTQ/GPTQModel ones): what it declares, which
files hold its weights, its tensors in the v1 layout. The runtime loads through this module and the
converters (ONNX, GGUF, compressed-tensors) read through it, so neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compressor.errors import ArtifactError
from compressor.packing import SUPPORTED_BITS

def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def declared_quantization(path: Path) -> dict | None:
    """config.json's quantization_config, else quantize_config.json (AutoGPTQ's file, GPTQ only)."""
    config = read_json(path / "config.json")
    legacy_file = path / "quantize_config.json"
    legacy = read_json(legacy_file) if legacy_file.is_file() else None
    qc = config.get("quantization_config")
    if qc is None and legacy is not None:
        qc = {"quant_method": "gptq", **legacy}
    if not isinstance(qc, dict):
        return None
    qc = dict(qc)
    if legacy is not None:  # older config.json blocks leave the format to quantize_config.json
        for key in ("checkpoint_format", "format", "is_marlin_format"):
            if key not in qc and key in legacy:
                qc[key] = legacy[key]
    return qc


def is_gptq_artifact(path) -> bool:
    """Whether `path` is a directory that declares GPTQ quantization (any format or bit width)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    try:
        qc = declared_quantization(path)
    except ArtifactError:
        return False
    return qc is not None and qc.get("quant_method") == "gptq"


def gptq_config(path) -> dict:
    """The checkpoint's GPTQ quantization config, checked to be one this runtime executes."""
    path = Path(path)
    qc = declared_quantization(path)
    if qc is None or qc.get("quant_method") != "gptq":
        found = "no quantization_config" if qc is None else f"quant_method {qc.get('quant_method')!r}"
        raise ArtifactError(f"{path}: not a GPTQ checkpoint ({found}); expected quantization_config.quant_method 'gptq'")
    fmt = "marlin" if qc.get("is_marlin_format") else (qc.get("checkpoint_format") or qc.get("format") or "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ArtifactError(
            f"{path}: checkpoint_format {fmt!r} is not supported; GPTQ checkpoints load as 'gptq' (v1) or 'gptq_v2'"
        )
    qc["checkpoint_format"] = fmt
    if qc.get("bits") not in SUPPORTED_BITS:
        supported = ", ".join(map(str, SUPPORTED_BITS))
        raise ArtifactError(f"{path}: bits {qc.get('bits')!r} is not supported; GPTQ bits must be one of {supported}")
    return qc


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: the shards an index names, else every safetensors (or .bin)
    file. Every one is checked to lie inside `path` (no '..', no absolute name, no symbolic link out)."""
    from compressor.artifacts.directory import member_path

    path = Path(path)
    indexes = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.bin.index.json"))
    if indexes:
        index = member_path(path, indexes[0].name, str(path))
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ArtifactError(f"{index}: no weight_map")
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise ArtifactError(f"{index}: weight_map values must be file names")
        files = [member_path(path, name, f"{index}: weight_map") for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ArtifactError(f"{file}: shard named in {index.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin")
    if not files:
        raise ArtifactError(f"{path}: no weight files (*.safetensors or *.bin)")
    return [member_path(path, file.name, str(path)) for file in files]


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files`. safetensors maps the file: its tensors read the file's pages
    lazily (`load` copies what it keeps: `_copy_file_backed`)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                tensors.update(load_file(file))
            else:
                tensors.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as exc:  # corrupted headers, truncated files, pickles with code
            raise ArtifactError(f"{file}: unreadable weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return tensors


def as_gptq_v1(tensors: dict[str, torch.Tensor], qconfig: dict, where: str = "") -> dict[str, torch.Tensor]:
    """A gptq_v2 checkpoint's tensors in the v1 layout (qzeros = zero - 1) that every reader here
    uses; v1 tensors are returned as they are."""
    from compressor.packing import qzeros_v2_to_v1

    if qconfig.get("checkpoint_format") != "gptq_v2":
        return tensors
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        qweight = tensors.get(name[: -len("qzeros")] + "qweight")
        if qweight is None:
            raise ArtifactError(f"{where}{name} has no qweight beside it")
        try:
            tensors[name] = qzeros_v2_to_v1(tensors[name], qconfig["bits"], qweight.shape[1])
        except ValueError as exc:
            raise ArtifactError(f"{where}{name}: {exc}") from None
    return tensors


def read_gptq_tensors(path, qconfig: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the GPTQ checkpoint at `path` (`qconfig` from `gptq_config`), v2 read as v1."""
    path = Path(path)
    return as_gptq_v1(read_tensors(weight_files(path)), qconfig, f"{path}: ")


def plain_config(path: Path):
    """The artifact's config without its quantization_config: the plain architecture, whose
    quantized linears QuantLinear replaces."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{path}/config.json: {str(exc).splitlines()[0][:300]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


# What a converted artifact does not copy from its GPTQ source: the files it writes its own
# version of, and the GPTQ weights it re-expresses.
_NOT_COPIED = ("config.json", "quantize_config.json", "manifest.json")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def copy_side_files(source: Path, out_dir: Path) -> None:
    """Copy the GPTQ checkpoint's other files (tokenizer, generation config, report) into `out_dir`."""
    import shutil

    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, Path(out_dir) / path.name)
