"""The file names that say what kind of artifact a directory is, and the optional packages each
kind needs. Writers (compressor.export) and readers (compressor.runtime, the CLI, the Hub card)
share these names from here, below both of them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from compressor.errors import UserError

ONNX_FILE = "model.onnx"
ONNX_CONFIG = "onnx_config.json"  # what the runtime needs besides the graph (and provenance)
GGUF_FILE = "model.gguf"
GGUF_CONFIG = "gguf_config.json"  # what `compress info` and the model card read (and provenance)


def is_gguf_artifact(path) -> bool:
    """A directory that a recipe with `export.format: gguf` wrote (model.gguf + gguf_config.json)."""
    path = Path(path)
    return path.is_dir() and (path / GGUF_FILE).is_file() and (path / GGUF_CONFIG).is_file()


def require_onnx(module: str, purpose: str):
    """Import the optional `onnx` / `onnxruntime` package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the {module} package: pip install 'compressor[onnx]' "
                        "(onnx >= 1.18 and onnxruntime >= 1.23 for opset 23)") from None  # fmt: skip
