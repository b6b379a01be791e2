"""The engine's serving backends: how a loaded model is driven, chosen once per model.

A backend tells the engine what it needs and nothing more:

    kind        "torch" or "onnx" (a draft must run on the same kind as the served model)
    label       what the server logs ("device cpu", "onnxruntime CPUExecutionProvider")
    config      the transformers-like config the engine sizes its KV cache from
    device      where logits land and sampling runs
    dtype       what the KV cache holds
    eos_ids()   the model's own end-of-sequence ids (the tokenizer's are added by the engine)
    new_cache(slots, capacity, dtype, device)
                -> a ServingModel: `hidden(rows)` runs one step for rows (slot, new tokens,
                   position of the first new token) against its slot cache, `head(hidden)` gives
                   logits, `cache.nbytes` its size

`backend_for(model)` picks the backend; engine.py never asks what kind of model it holds.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch

from compressor.runtime.onnx import OnnxCausalLM
from compressor.serve.cpu_step import CpuStep
from compressor.serve.kv_cache import SlotKVCache, attention_mask
from compressor.serve.onnx_backend import OnnxModel, serving_config


class ServingModel(Protocol):
    cache: object

    def hidden(self, rows: list[tuple[int, list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TorchServingModel:
    """A causal LM split into what the engine calls: the decoder stack and the output head."""

    model: torch.nn.Module
    cache: SlotKVCache

    def __post_init__(self):
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.x renamed it
        self.attn = self.model.config._attn_implementation
        self.cpu_step = CpuStep.build(self.model, self.cache)  # None: every forward is transformers'

    def hidden(self, rows: list[tuple[int, list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states [B, S, H] for rows (slot, new tokens, position of the first), and the valid mask."""
        if self.cpu_step is not None:
            return self._hidden_on_cpu_step(rows)
        width = max(len(tokens) for _, tokens, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (_, tokens, start) in enumerate(rows):
            n = len(tokens)
            ids[i, :n] = torch.tensor(tokens)
            positions[i, :n] = torch.arange(start, start + n)
            valid[i, :n] = True
        device = self.cache.device
        ids, positions, valid = ids.to(device), positions.to(device), valid.to(device)
        self.cache.plan(torch.tensor([slot for slot, _, _ in rows]), positions, valid)
        mask = attention_mask(positions, valid, self.cache.step.kv_len, self.attn, self.cache.dtype)
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self.cache_kw: self.cache})
        return out.last_hidden_state, valid


    def _hidden_on_cpu_step(self, rows: list[tuple[int, list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden` by the CPU step: every new token is one row of the step (its slot, its position)."""
        lengths = [len(tokens) for _, tokens, _ in rows]
        ids = torch.tensor([t for _, tokens, _ in rows for t in tokens])
        positions = torch.tensor([start + i for _, tokens, start in rows for i in range(len(tokens))])
        slots = torch.tensor([slot for slot, tokens, _ in rows for _ in tokens])
        flat = self.cpu_step(ids, positions, slots)
        width = max(lengths)
        if width == 1:
            return flat[:, None], torch.ones(len(rows), 1, dtype=torch.bool)
        hidden = flat.new_zeros(len(rows), width, flat.shape[-1])
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, chunk in enumerate(flat.split(lengths)):
            hidden[i, : len(chunk)] = chunk
            valid[i, : len(chunk)] = True
        return hidden, valid


class TorchBackend:
    """A transformers causal LM (dense, or a GPTQ artifact with QuantLinear) driven by torch."""

    kind = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.label = f"device {self.device}"

    @property
    def config(self):
        return self.model.config

    def eos_ids(self):
        return getattr(self.model.generation_config, "eos_token_id", None)

    def new_cache(self, slots: int, capacity: int, dtype: torch.dtype, device) -> TorchServingModel:
        if self.model.config._attn_implementation not in ("sdpa", "eager"):
            self.model.set_attn_implementation("sdpa")  # our 4-D masks are for sdpa/eager
        return TorchServingModel(self.model, SlotKVCache(self.model.config, slots, capacity, dtype, device))


class OnnxBackend:
    """An ONNX artifact run by onnxruntime (`compress serve --backend onnx`)."""

    kind = "onnx"

    def __init__(self, model: OnnxCausalLM):
        self.model = model
        # onnxruntime hands back numpy arrays on the host: the engine samples on the CPU in float32
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.label = f"onnxruntime {model.session.get_providers()[0]}"
        self.config = serving_config(model)

    def eos_ids(self):
        return self.model.eos_token_ids()

    def new_cache(self, slots: int, capacity: int, dtype: torch.dtype, device) -> OnnxModel:
        return OnnxModel(self.model, slots, capacity)


def backend_for(model) -> TorchBackend | OnnxBackend:
    return OnnxBackend(model) if isinstance(model, OnnxCausalLM) else TorchBackend(model)


__all__ = ["OnnxBackend", "ServingModel", "TorchBackend", "TorchServingModel", "backend_for"]
