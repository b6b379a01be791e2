"""A slot-based KV cache that lets sequences of different lengths decode in one batch.

Each layer owns K and V of shape [slots, kv_heads, capacity, head_dim], allocated once. A
running sequence holds one slot; its token at position p lives at [slot, :, p]. Before every
forward the engine calls `plan` with, per batch row, the slot, the positions of the row's new
tokens and which of them are real (rows are padded to the longest). Attention then calls
`update` per layer: the real tokens' K/V are written at their own positions and the rows' K/V
up to the longest length come back; the 4-D mask from `attention_mask` hides everything past
each query's own position (and so every stale entry of a reused slot).

Nothing is ever erased: a sequence's length is the engine's bookkeeping, so rolling back
rejected speculative tokens or freeing a slot costs nothing.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def kv_dims(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of a transformers config (older configs leave both implicit)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kv_heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token costs across all layers."""
    kv_heads, head_dim = kv_dims(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class _Step:
    """Where one forward's tokens go: rows -> slots, and (slot, position) of each real token."""

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, kv_len: int):
        self.slots = slots  # [B] slot of each row
        self.kv_len = kv_len  # keys returned per row: the longest row's length after this step
        rows, cols = valid.nonzero(as_tuple=True)
        self.rows, self.cols = rows, cols
        self.write_slots = slots[rows]
        self.write_positions = positions[rows, cols]
        first = int(slots[0])
        contiguous = bool((slots == torch.arange(first, first + len(slots), device=slots.device)).all())
        self.slot_range = (first, len(slots)) if contiguous else None  # a view instead of a gather


class SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, cache: SlotKVCache, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.cache, self.keys, self.values = cache, keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self.cache.step
        # [B, H, S, D] -> the real tokens [N, H, D], stored at (slot, :, position)
        new_k = key_states.transpose(1, 2)[step.rows, step.cols]
        new_v = value_states.transpose(1, 2)[step.rows, step.cols]
        self.keys[step.write_slots, :, step.write_positions] = new_k.to(self.keys.dtype)
        self.values[step.write_slots, :, step.write_positions] = new_v.to(self.values.dtype)
        if step.slot_range is not None:
            first, n = step.slot_range
            return self.keys[first : first + n, :, : step.kv_len], self.values[first : first + n, :, : step.kv_len]
        return self.keys[step.slots, :, : step.kv_len], self.values[step.slots, :, : step.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.step.kv_len, 0

    def get_seq_length(self) -> int:
        return self.cache.step.kv_len if self.cache.step is not None else 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotKVCache(Cache):
    """K/V for `slots` sequences of up to `capacity` tokens each, for every layer of `config`."""

    def __init__(self, config, slots: int, capacity: int, dtype: torch.dtype, device):
        kv_heads, head_dim = kv_dims(config)
        shape = (slots, kv_heads, capacity, head_dim)
        # zeros, not empty: masked entries still enter softmax(QK^T)V as 0 * V, and 0 * NaN is NaN
        layers = [
            SlotLayer(self, torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.slots, self.capacity, self.dtype, self.device = slots, capacity, dtype, torch.device(device)
        self.step: _Step | None = None

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    def plan(self, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Set where the next forward's tokens go: row i of the batch is slot `slots[i]`."""
        kv_len = int(positions[valid].max()) + 1
        self.step = _Step(slots.to(self.device), positions.to(self.device), valid.to(self.device), kv_len)


def attention_mask(positions: torch.Tensor, valid: torch.Tensor, kv_len: int, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S, kv_len] mask: the query at position p sees keys 0..p of its own row.

    Padding queries see key 0 only (their outputs are discarded; a fully masked row would
    make NaN). sdpa takes a bool mask (True = attend), eager an additive float one.
    """
    pos = torch.where(valid, positions, torch.zeros_like(positions))
    keys = torch.arange(kv_len, device=positions.device)
    allowed = keys[None, None, None, :] <= pos[:, None, :, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill_(~allowed, torch.finfo(dtype).min)
