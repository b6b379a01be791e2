"""The engine's model interface for an ONNX artifact (`compress serve --backend onnx`).

`OnnxModel` is the onnxruntime counterpart of engine.py's `_Model`: `hidden(rows)` runs one
session step for rows (slot, new tokens, position of the first new token) and `head` is the
identity, because the graph already ends in the lm_head (its "hidden states" are logits).

The slot cache mirrors kv_cache.py: per layer, K and V of [slots, kv_heads, capacity, head_dim]
in numpy, a sequence's token at position p at [slot, :, p]. The graph takes one past of
[B, kv_heads, P, head_dim] for the whole batch, so a step gathers every row's first P = max(start)
entries; row i's entries start_i..P-1 (not its own: stale or another length) get attention_mask 0.
The new tokens follow at indices P..P+S-1 (right-padded to S), with explicit position_ids
start_i + j so RoPE sees each row's true positions. The graph masks key t for query s iff
attention_mask[b, t] == 0 or t > P + s, so these holes are honoured key by key; padding queries
still see their row's real keys (never a fully masked row) and their logits are discarded.
After the step, row i's new K/V (present[i, :, P:P+n_i]) go back into its slot at start_i.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from compressor.runtime.onnx import OnnxCausalLM

__all__ = ["OnnxModel", "OnnxSlotCache", "serving_config"]


def serving_config(model: OnnxCausalLM) -> SimpleNamespace:
    """What the engine reads from a transformers config, for an ONNX artifact (its onnx_config.json shape)."""
    oc = model.onnx_config
    return SimpleNamespace(
        num_hidden_layers=model.layers,
        num_key_value_heads=model.kv_heads,
        num_attention_heads=model.config.get("num_attention_heads"),
        hidden_size=model.config.get("hidden_size"),
        head_dim=model.head_dim,
        vocab_size=int(oc["vocab_size"]),
        max_position_embeddings=model.max_position_embeddings,
    )


class OnnxSlotCache:
    """K/V for `slots` sequences of up to `capacity` tokens, per layer, as float32 numpy arrays."""

    def __init__(self, model: OnnxCausalLM, slots: int, capacity: int):
        shape = (slots, model.kv_heads, capacity, model.head_dim)
        # zeros, not empty: masked entries still enter softmax(QK^T)V as 0 * V, and 0 * NaN is NaN
        self.keys = [np.zeros(shape, np.float32) for _ in range(model.layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(model.layers)]
        self.slots, self.capacity = slots, capacity

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))


class OnnxModel:
    """An `OnnxCausalLM` with a slot cache, called by the engine like `_Model`."""

    def __init__(self, model: OnnxCausalLM, slots: int, capacity: int):
        self.model = model
        self.cache = OnnxSlotCache(model, slots, capacity)

    def head(self, logits: torch.Tensor) -> torch.Tensor:
        return logits  # the graph's output already is the logits

    def hidden(self, rows: list[tuple[int, list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, S, vocab] for rows (slot, new tokens, position of the first), and the valid mask."""
        batch = len(rows)
        width = max(len(tokens) for _, tokens, _ in rows)
        past_len = max(start for _, _, start in rows)
        slots = np.array([slot for slot, _, _ in rows])
        ids = np.zeros((batch, width), np.int64)
        positions = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, past_len + width), np.int64)
        valid = np.zeros((batch, width), bool)
        for i, (_, tokens, start) in enumerate(rows):
            n = len(tokens)
            ids[i, :n] = tokens
            # padding repeats the last real position: any in-range value works, its outputs are dropped
            positions[i] = start + np.minimum(np.arange(width), n - 1)
            mask[i, :start] = 1
            mask[i, past_len : past_len + n] = 1
            valid[i, :n] = True
        past = {}
        for layer, (k, v) in enumerate(zip(self.cache.keys, self.cache.values)):
            past[f"past_key_values.{layer}.key"] = k[slots, :, :past_len]
            past[f"past_key_values.{layer}.value"] = v[slots, :, :past_len]
        step = self.model.forward(ids, past, mask, positions)
        for layer, (k, v) in enumerate(zip(self.cache.keys, self.cache.values)):
            new_k = step.past[f"past_key_values.{layer}.key"]
            new_v = step.past[f"past_key_values.{layer}.value"]
            for i, (slot, tokens, start) in enumerate(rows):
                n = len(tokens)
                k[slot, :, start : start + n] = new_k[i, :, past_len : past_len + n]
                v[slot, :, start : start + n] = new_v[i, :, past_len : past_len + n]
        return torch.from_numpy(step.logits), torch.from_numpy(valid)
