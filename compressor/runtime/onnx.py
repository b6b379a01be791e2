"""Run an ONNX artifact (`compress export --format onnx`) with onnxruntime.

`OnnxCausalLM` wraps one InferenceSession: `forward` is one step (prompt or new tokens, with
the key/value cache from the previous step), `logits` a whole-sequence pass, `generate` the
greedy (or temperature-sampled) loop. Decoding feeds each step's present key/values back as the
next step's past, so every token after the prompt costs one single-token pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import ArtifactError, UserError
from compressor.artifacts.directory import member_path, verify_for_loading
from compressor.artifacts.formats import ONNX_CONFIG, ONNX_FILE
from compressor.artifacts.formats import require_onnx

__all__ = ["OnnxCausalLM", "Step", "is_onnx_artifact", "load"]


def is_onnx_artifact(path) -> bool:
    """Whether `path` is a directory holding an ONNX artifact written by `compress export --format onnx`."""
    path = Path(path)
    return (path / ONNX_FILE).is_file() and (path / ONNX_CONFIG).is_file()


@dataclass
class Step:
    logits: np.ndarray  # float32 [B, S, vocab]
    past: dict[str, np.ndarray]  # the cache after this step, to pass to the next one
    attention_mask: np.ndarray  # int64 [B, T]: the mask covering `past`


def _providers(device: str) -> list[str]:
    ort = require_onnx("onnxruntime", "running an ONNX artifact")

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError("device: cuda needs onnxruntime-gpu (pip install 'compressor[onnx-gpu]'); "
                            f"this onnxruntime has {', '.join(available)}")  # fmt: skip
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
    raise UserError(f"device: {device!r} is not allowed: auto, cpu or cuda")


@dataclass
class _Scored:
    logits: object  # torch.Tensor [B, S, vocab]


class OnnxCausalLM:
    def __init__(self, path, device: str = "cpu", threads: int | None = None, verify: bool = True):
        ort = require_onnx("onnxruntime", "running an ONNX artifact")

        path = Path(path)
        if not is_onnx_artifact(path):
            raise ArtifactError(f"{path}: not an ONNX artifact (expected {ONNX_FILE} and {ONNX_CONFIG})")
        if verify:
            verify_for_loading(path)  # a "not verified" warning without a manifest
        for name in (ONNX_FILE, f"{ONNX_FILE}.data"):  # no symbolic link out of the artifact (onnxruntime
            member_path(path, name, str(path))  # refuses '..' and absolute external data locations itself)
        try:
            self.onnx_config = json.loads((path / ONNX_CONFIG).read_text())
            self.config = json.loads((path / "config.json").read_text())
            self.layers = int(self.onnx_config["num_hidden_layers"])
            self.kv_heads = int(self.onnx_config["num_key_value_heads"])
            self.head_dim = int(self.onnx_config["head_dim"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}/{ONNX_CONFIG}: unreadable ({type(exc).__name__}: {exc})") from None
        self.path = path
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path / ONNX_FILE), options, providers=_providers(device))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors (corrupted file, unsupported op)
            raise ArtifactError(f"{path / ONNX_FILE}: onnxruntime cannot load it ({str(exc).splitlines()[0][:300]})") from None
        # outputs are logits, then present.{i}.key/value: named as the past inputs they feed next
        self._past_names = [o.name.replace("present.", "past_key_values.", 1) for o in self.session.get_outputs()[1:]]
        self.generation_config = {}
        if (path / "generation_config.json").is_file():
            self.generation_config = json.loads((path / "generation_config.json").read_text())

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{kv}": empty for i in range(self.layers) for kv in ("key", "value")}

    def forward(self, input_ids, past: dict | None = None, attention_mask=None, position_ids=None) -> Step:
        """One pass over `input_ids` [B, S] after the cached tokens in `past` (None: a fresh prompt)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        batch, new = ids.shape
        past = past if past is not None else self.empty_past(batch)
        cached = next(iter(past.values())).shape[2]
        if attention_mask is None:
            attention_mask = np.ones((batch, cached + new), np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if position_ids is None:  # count only the attended tokens, as transformers does with padding
            position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)[:, cached:]
        feeds = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": np.asarray(position_ids, np.int64), **past}
        outputs = self.session.run(None, feeds)
        present = dict(zip(self._past_names, outputs[1:]))
        return Step(outputs[0], present, attention_mask)

    def logits(self, input_ids) -> np.ndarray:
        """float32 [B, S, vocab] for whole sequences (no cache)."""
        return self.forward(input_ids).logits

    def __call__(self, input_ids, **_ignored):
        """transformers-style scoring call (what `evaluation.perplexity` makes): `.logits` as a torch tensor."""
        import torch

        ids = input_ids.cpu().numpy() if hasattr(input_ids, "cpu") else input_ids
        return _Scored(torch.from_numpy(self.logits(ids)))

    @property
    def max_position_embeddings(self) -> int | None:
        return self.onnx_config.get("max_position_embeddings") or self.config.get("max_position_embeddings")

    def eos_token_ids(self) -> set[int]:
        eos = self.generation_config.get("eos_token_id", self.config.get("eos_token_id"))
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 eos_token_id: int | list[int] | None = None, stop_at_eos: bool = True) -> np.ndarray:  # fmt: skip
        """Prompt + up to `max_new_tokens` tokens, int64 [1, S + new]: greedy unless `temperature` > 0.

        Like transformers' generate, it stops after an end-of-sequence token (the generation
        config's unless `eos_token_id` is given) unless `stop_at_eos` is False.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise UserError(f"input_ids: shape {ids.shape} is not allowed: generate takes one sequence [1, S]")
        eos = set() if not stop_at_eos else self.eos_token_ids() if eos_token_id is None else (
            set(eos_token_id) if isinstance(eos_token_id, list) else {eos_token_id})  # fmt: skip
        rng = np.random.default_rng(seed)
        tokens = [ids]
        step = self.forward(ids)
        for _ in range(max_new_tokens):
            scores = step.logits[:, -1]
            if temperature > 0:
                z = scores.astype(np.float64) / temperature
                p = np.exp(z - z.max(axis=-1, keepdims=True))
                token = np.array([[rng.choice(p.shape[-1], p=p[0] / p[0].sum())]], np.int64)
            else:
                token = scores.argmax(axis=-1)[:, None].astype(np.int64)
            tokens.append(token)
            if int(token[0, 0]) in eos or len(tokens) == max_new_tokens + 1:
                break
            mask = np.concatenate([step.attention_mask, np.ones((1, 1), np.int64)], axis=1)
            step = self.forward(token, step.past, mask)
        return np.concatenate(tokens, axis=1)


def load(path, device: str = "cpu", threads: int | None = None, verify: bool = True) -> OnnxCausalLM:
    """An `OnnxCausalLM` for the ONNX artifact at `path` (the manifest checked first; without one,
    a "not verified" warning)."""
    return OnnxCausalLM(path, device, threads, verify)
