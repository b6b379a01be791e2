"""What `compress info` says about an installation, a recipe or an artifact.

`describe(path)` returns the lines to print and the warnings to show; the CLI only prints them.
An artifact is verified against its manifest first (ArtifactError, one line, on any mismatch).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import UserError


@dataclass
class Description:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def describe(path: str | None) -> Description:
    if path is None:
        return describe_installation()
    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return describe_recipe(p)
    if (p.is_file() and p.suffix == ".gguf") or p.is_dir():
        return describe_artifact(p, path)
    raise UserError(f"{path}: no such artifact directory or recipe file")


def describe_installation() -> Description:
    import torch

    from compressor import __version__
    from compressor.architectures import ARCHITECTURES
    from compressor.models import EMBEDDED_MODELS, resolve_source

    out = Description([f"compressor {__version__}, torch {torch.__version__}, python {platform.python_version()}",
                       f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}; "
                       f"cpu threads: {torch.get_num_threads()}"])  # fmt: skip
    for name in EMBEDDED_MODELS:
        try:
            src = resolve_source(name)
            out.lines.append(f"embedded model {name}: {Path(src.path) / src.gguf_file}")
        except UserError as exc:
            out.lines.append(f"embedded model {name}: unavailable ({exc})")
    out.lines.append(f"architectures: {', '.join(sorted(ARCHITECTURES))}")
    return out


def describe_recipe(path: Path) -> Description:
    """The recipe with every default filled in (as the artifact's recipe.yaml will hold it)."""
    import yaml

    from compressor.recipe import load_recipe

    return Description([yaml.safe_dump(load_recipe(path).model_dump(mode="json"), sort_keys=False).rstrip()])


def _verified_text(verified: int | None) -> str:
    return "none (not verified)" if verified is None else f"verified ({verified} files)"


def describe_artifact(p: Path, shown: str) -> Description:
    from compressor.artifacts.directory import check_manifest, not_verified
    from compressor.artifacts.formats import GGUF_FILE, is_gguf_artifact

    out = Description()
    verified = check_manifest(p) if p.is_dir() else None  # before anything is read from it
    if p.is_dir() and verified is None:
        out.warnings.append(not_verified(p))
    gguf_file = p if p.is_file() else p / GGUF_FILE if is_gguf_artifact(p) else None
    if gguf_file is not None:
        from compressor.export.gguf import describe_gguf

        out.lines.append(f"{shown}: {describe_gguf(gguf_file)}")
        if p.is_dir():
            out.lines.append(f"manifest: {_verified_text(verified)}")
        return out
    if not (p / "config.json").is_file():
        raise UserError(f"{shown}: no config.json; not a model or artifact directory")
    out.lines.append(f"{shown}: {_what(p)}")
    out.lines += _memory(p)
    files = sorted(f for f in p.rglob("*") if f.is_file())
    out.lines.append(f"files: {len(files)}, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB; manifest: {_verified_text(verified)}")
    from compressor.report import read_report

    report = read_report(p)
    if report is not None and report.perplexity.dense and report.perplexity.compressed:
        out.lines.append(f"perplexity: dense {report.perplexity.dense['perplexity']:.4f}, "
                         f"compressed {report.perplexity.compressed['perplexity']:.4f}")  # fmt: skip
    return out


def _what(p: Path) -> str:
    """One line: the kind of artifact and its quantization or sparsity."""
    from compressor import runtime
    from compressor.artifacts.checkpoint import read_json
    from compressor.artifacts.formats import ONNX_CONFIG
    from compressor.runtime.onnx import is_onnx_artifact

    if is_onnx_artifact(p):
        oc = read_json(p / ONNX_CONFIG)
        nb = oc.get("matmul_nbits", {})
        return (f"ONNX artifact (opset {oc.get('opset')}), {nb.get('layers')} MatMulNBits linears, "
                f"bits={nb.get('bits')}, block_size={nb.get('block_sizes')}, accuracy_level={nb.get('accuracy_level')}")  # fmt: skip
    if runtime.is_gptq_artifact(p):
        qc = runtime.gptq_config(p)
        quantized_in_act_order = (qc.get("meta") or {}).get("act_order") is True and not qc.get("desc_act")
        keys = ("bits", "group_size", "sym", "desc_act") + (("checkpoint_format",) if qc.get("checkpoint_format") != "gptq" else ())
        return ("GPTQ artifact, " + ", ".join(f"{k}={qc[k]}" for k in keys if k in qc)
                + (" (quantized in act-order with static groups: g_idx in order)" if quantized_in_act_order else ""))  # fmt: skip
    config = read_json(p / "config.json")
    sparsity = config.get("compressor_sparsity")
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors":
        weights = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
        kind = (f"{config.get('model_type', '?')} compressed-tensors artifact ({qc.get('format')}, {weights.get('num_bits')}-bit, "
                f"group size {weights.get('group_size')}, {'symmetric' if weights.get('symmetric') else 'asymmetric'})")  # fmt: skip
    else:
        kind = f"dense {config.get('model_type', '?')} checkpoint"
    return (f"{kind}, {config.get('num_hidden_layers', '?')} layers"
            + (f", {sparsity['structure']} sparsity {sparsity['global_sparsity']:.3f}" if sparsity else ""))  # fmt: skip


def _memory(p: Path) -> list[str]:
    """For a GPTQ artifact: what `runtime.load` holds on this machine's CPU (from the headers)."""
    from compressor import runtime
    from compressor.runtime.onnx import is_onnx_artifact

    if is_onnx_artifact(p) or not runtime.is_gptq_artifact(p):
        return []
    held = runtime.memory_estimate(p)
    return [f"runtime memory (CPU, {str(runtime.default_dtype('cpu')).removeprefix('torch.')}): {held['total'] / 1e6:.1f} MB "
            f"(packed linears {held['packed'] / 1e6:.1f} MB, float tensors {held['float'] / 1e6:.1f} MB)"]  # fmt: skip
