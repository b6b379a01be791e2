"""Embedding and output layers that keep the artifact's float16 weights in a float32 model on CPU.

A GPTQ artifact stores its unquantized tensors in float16; the biggest are the token embeddings
and lm_head (tied in SmolLM2: 49152 x 576, as many bytes as all its packed linears). Upcast to
float32 they would double the model's memory and, for lm_head, the bytes read per decoded token.
These modules hold the float16 tensor as it is (so values are exactly the artifact's) and compute
in the model's float32: the embedding looks rows up and converts them; the output layer runs the
CPU kernel (float32 accumulation) for up to MAX_ROWS rows and, for long prefills, a float32 GEMM
on float16 row chunks converted for the call.

The weights are buffers, not parameters, so `next(model.parameters()).dtype` (what callers use
for "the model's dtype") stays float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CHUNK_ELEMENTS = 1 << 22  # float32 elements converted at a time on the GEMM path (16 MB)


class Float16Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float16).contiguous())
        self.dtype, self.padding_idx = dtype, padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, storage=float16, compute={self.dtype}"


class Float16Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.dtype = dtype
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compressor.kernels import cpu

        if x.device.type == "cpu" and cpu.available():
            out = cpu.half_linear(x, self.weight, self.bias)
            if out is not None:
                return out
        out = x.new_empty(*x.shape[:-1], self.out_features)
        rows = max(1, _CHUNK_ELEMENTS // self.in_features)
        for i in range(0, self.out_features, rows):
            out[..., i : i + rows] = F.linear(x, self.weight[i : i + rows].to(x.dtype))
        return out if self.bias is None else out.add_(self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage=float16, compute={self.dtype}"
