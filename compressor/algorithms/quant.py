"""Uniform integer quantization of weights: grids, rounding, and the quantized-weight record.

Conventions (those of the GPTQ v1 checkpoint format, see `compressor.export.gptq`):
- A weight is [N, K] as in `nn.Linear` (N outputs, K inputs); groups run along K.
- `code = clamp(round(w / scale) + zero, 0, 2^bits - 1)`, `w_hat = scale * (code - zero)`.
- Symmetric: zero = 2^(bits-1) for every group.
- Asymmetric: zero in [1, 2^bits - 1]. Zero 0 is excluded because GPTQ v1 stores `zero - 1`
  and cannot represent -1; the few groups whose minimum is >= 0 lose one step of range.
- Scales are rounded to float16 as soon as they are chosen, so the fake-quantized weight in
  memory is exactly the one the fp16 checkpoint reconstructs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def max_code(bits: int) -> int:
    return 2**bits - 1


def grid_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of `w` ([rows, cols] -> [rows], [rows]).

    From the row's range (min/max); with `mse`, the range is also shrunk in steps of 1% down to
    80% and each row keeps the shrink with the smallest sum |w - w_hat|^2.4 (GPTQ's grid search:
    clipping a few outliers buys finer steps for everything else).
    """
    w = w.float()
    wmin = w.min(dim=1).values.clamp(max=0)
    wmax = w.max(dim=1).values.clamp(min=0)
    scale, zero = _range_grid(wmin, wmax, bits, sym)
    if not mse:
        return scale, zero
    best = (fake_quantize(w, scale[:, None], zero[:, None], bits) - w).abs_().pow_(2.4).sum(1)
    for step in range(1, 21):
        s, z = _range_grid(wmin * (1 - step / 100), wmax * (1 - step / 100), bits, sym)
        err = (fake_quantize(w, s[:, None], z[:, None], bits) - w).abs_().pow_(2.4).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _range_grid(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = max_code(bits)
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        wmin, wmax = -amax, amax
    span = wmax - wmin
    span = torch.where(span == 0, torch.ones_like(span), span)  # an all-zero row: any scale works
    if sym:
        # GPTQ's convention (kept for compatibility): scale = 2*amax / maxq with zero 2^(bits-1),
        # so +amax lands half a step past the top code and is clipped by at most scale/2.
        scale = span / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = span / maxq
        zero = torch.round(-wmin / scale).clamp(1, maxq)
    scale = scale.half().float()  # what the checkpoint will store
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float16).tiny), scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes for `w` [rows, cols] with per-row `scale`, `zero` broadcast as [rows, 1]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


@dataclass
class QuantizedWeight:
    """One quantized linear weight in checkpoint terms (unpacked).

    codes:  uint8 [N, K]   integer codes in [0, 2^bits - 1]
    scales: float16 [G, N] one scale per group and output
    zeros:  uint8 [G, N]   zero points (the real zero, not the v1 "zero - 1")
    g_idx:  int32 [K]      group of each input column
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), self.zeros.to(device),
                               self.g_idx.to(device), self.bits, self.group_size, self.sym)  # fmt: skip

    def rows(self, rows: slice) -> "QuantizedWeight":
        """The record of output rows `rows` (for splitting a stacked q/k/v quantization)."""
        return QuantizedWeight(
            self.codes[rows].contiguous(), self.scales[:, rows].contiguous(), self.zeros[:, rows].contiguous(),
            self.g_idx.clone(), self.bits, self.group_size, self.sym,
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat [N, K] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])."""
        g = self.g_idx.long()
        scale = self.scales.to(dtype)[g].T  # [N, K]
        zero = self.zeros.to(dtype)[g].T
        return scale * (self.codes.to(dtype) - zero)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest baseline with the same grid and record as GPTQ."""
    n, k = weight.shape
    gs = k if group_size == -1 else group_size
    w = weight.float().reshape(n, k // gs, gs).permute(1, 0, 2).reshape(-1, gs)  # [G*N, gs]
    scale, zero = grid_params(w, bits, sym)
    codes = quantize_codes(w, scale[:, None], zero[:, None], bits)
    codes = codes.reshape(k // gs, n, gs).permute(1, 0, 2).reshape(n, k)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scale.reshape(k // gs, n).half(),
        zeros=zero.reshape(k // gs, n).to(torch.uint8),
        g_idx=(torch.arange(k, device=weight.device) // gs).to(torch.int32),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
