"""GPTQ (Frantar et al., 2022) as a pure function over one weight and its input Hessian.

Given W [N, K] and H = 2/n * sum x x^T over the layer's calibration inputs, GPTQ quantizes the
columns of W one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian, which minimises ||W X - Q X||^2 column by column.

The tricks, each briefly:
- Cholesky of H^-1 (upper): the rows of U = chol(H^-1)^T are exactly the update vectors the
  sequential OBS step needs, so no matrix is re-inverted inside the loop.
- Lazy batch updates: columns are processed in blocks of `block_size`; inside a block the error
  is propagated column by column, to the rest of the matrix once per block (one matmul).
- Damping: H += damp * mean(diag H) * I. If H is still not positive definite, damping doubles
  (and is logged) up to `max_damp_percent`.
- Dead inputs (a zero diagonal: the input column was always 0) get H_ii = 1 and W[:, i] = 0;
  they never influence the output.
- Act-order (desc_act): columns go in order of decreasing H_ii, so the most salient inputs are
  quantized while the most freedom remains to absorb their error. Groups are then formed in that
  order and `g_idx` maps each original input row to its group. `static_groups` instead fixes
  every group's grid from the unquantized weight first, so g_idx stays k // group_size.
- `mask` (after pruning): entries outside it are quantized to their zero point, i.e. exactly 0,
  and their (pre-update) value counts as error to spread, as SparseGPT does; so a pruned model
  stays exactly as sparse after GPTQ and packing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compressor.algorithms.quant import QuantizedWeight, grid_params, max_code, rtn_quantize

log = logging.getLogger(__name__)


class HessianNotPositiveDefinite(RuntimeError):
    pass


@dataclass
class QuantizeResult:
    weight: torch.Tensor  # [N, K] float32, the dequantized weight to use in the model
    quantized: QuantizedWeight
    relative_error: float  # tr(dW H dW^T) / tr(W H W^T): relative output error on the calibration data
    damp_percent: float  # damping actually used (after escalation)
    row_errors: tuple[torch.Tensor, torch.Tensor] | None = None  # per output row: (dW H dW^T, W H W^T) diagonals

    def rows_error(self, rows: slice) -> float:
        """relative_error of some output rows (one linear of a stacked group), without recomputing."""
        return relative_error(*(t[rows] for t in self.row_errors))


def row_output_errors(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: ||(W_hat - W) x||^2 and ||W x||^2 summed over the calibration inputs,
    through the Hessian. Two [N, K] x [K, K] products: as costly as GPTQ on a wide layer, so
    callers compute them once per stacked group and slice rows."""
    num = torch.empty(weight.shape[0], device=weight.device)
    den = torch.empty_like(num)
    step = max(1, (64 << 20) // (4 * weight.shape[1]))  # rows per chunk: ~64 MB of float32 temporaries each
    for r in range(0, weight.shape[0], step):
        w = weight[r : r + step].float()
        delta = weight_hat[r : r + step].float() - w
        num[r : r + step] = ((delta @ hessian) * delta).sum(dim=1)
        den[r : r + step] = ((w @ hessian) * w).sum(dim=1)
    return num, den


def relative_error(num_rows: torch.Tensor, den_rows: torch.Tensor) -> float:
    num, den = num_rows.sum(), den_rows.sum()
    return float(num / den) if den > 0 else float(num)


def output_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W_hat X||^2 / ||W X||^2 on the calibration inputs, through the Hessian."""
    return relative_error(*row_output_errors(weight, weight_hat, hessian))


def inverse_hessian_cholesky(
    hessian: torch.Tensor, damp_percent: float, max_damp_percent: float
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag)*I)^-1, escalating damp until it exists."""
    mean_diag = torch.mean(torch.diag(hessian))
    damp = damp_percent
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    while True:
        # One K x K buffer for the three steps (LAPACK works in place; torch's out= lets it): for
        # a 14336-wide down projection each copy is 0.8 GB, and the steps used to hold four.
        # Column-major, as LAPACK and torch's own results are: torch then works in it without copies,
        # and the factor has the layout the column loop's matmuls were tuned (and tested bitwise) on.
        work = torch.empty_strided(hessian.shape, (1, hessian.shape[0]), dtype=hessian.dtype, device=hessian.device)
        work.copy_(hessian)
        work.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info == 0:
            torch.cholesky_inverse(work.tril_(), out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info == 0:
                return work, damp
        del work
        if damp * 2 > max_damp_percent + 1e-12:
            raise HessianNotPositiveDefinite(
                f"Hessian is not positive definite even with damp_percent={damp:g}; "
                "raise max_damp_percent or use more calibration samples"
            )
        log.warning("Hessian not positive definite at damp_percent=%g; retrying with %g", damp, damp * 2)
        damp *= 2


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp_percent: float = 0.01,
    max_damp_percent: float = 1.0,
    mse: bool = False,
    mask: torch.Tensor | None = None,
) -> QuantizeResult:
    n, k = weight.shape
    gs = k if group_size == -1 else group_size
    if k % gs:
        raise ValueError(f"group_size {group_size} does not divide the input width {k}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0

    num_groups = k // gs
    dev = W.device
    scales = torch.zeros(num_groups, n, device=dev)
    zeros = torch.zeros(num_groups, n, device=dev)
    if static_groups:
        for g in range(num_groups):
            scales[g], zeros[g] = grid_params(W[:, g * gs : (g + 1) * gs], bits, sym, mse)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=dev)
    W = W[:, perm]
    kept = mask[:, perm] if mask is not None else None
    H = H.index_select(0, perm).index_select(1, perm)
    Hinv, damp_used = inverse_hessian_cholesky(H, damp_percent, max_damp_percent)
    del H  # only its inverse's factor is used from here

    maxq = max_code(bits)
    Q = torch.zeros_like(W)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=dev)  # small integers: exact, a quarter of float32
    # Group of each position in processing order: its original column's group when static,
    # else consecutive runs of gs in processing order.
    group_of_position = perm // gs if static_groups else torch.arange(k, device=dev) // gs

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        codes1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static_groups and col % gs == 0:
                # The grid comes from the weights as updated so far: columns inside this block
                # from W1; columns past it from W plus the updates this block still owes them
                # (so the result does not depend on block_size).
                ahead = W1[:, i : i + gs]
                if i + gs > i2 - i1:
                    beyond = W[:, i2 : col + gs] - Err1[:, :i] @ Hinv[i1:col, i2 : col + gs]
                    ahead = torch.cat([ahead, beyond], dim=1)
                g = col // gs
                scales[g], zeros[g] = grid_params(ahead, bits, sym, mse)
            if col == 0 or group_of_position[col] != group_of_position[col - 1]:
                scale, zero = scales[int(group_of_position[col])], zeros[int(group_of_position[col])]
            w = W1[:, i]
            q = torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)
            if kept is not None:
                q = torch.where(kept[:, col], q, zero)  # pruned stays exactly 0; its error spreads
            codes1[:, i] = q
            w_hat = (q - zero).mul_(scale)
            Q1[:, i] = w_hat
            err = (w - w_hat).div_(Hinv1[i, i])
            Err1[:, i] = err
            W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1)  # spread the error (rank-1)
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = codes1.to(torch.uint8)
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # lazy update of the columns ahead

    inverse = torch.argsort(perm)
    Q = Q[:, inverse]
    codes = codes[:, inverse]
    g_idx = group_of_position[inverse].to(torch.int32)
    quantized = QuantizedWeight(
        codes=codes,
        scales=scales.half(),
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
    rows = row_output_errors(weight, Q, hessian.float())
    return QuantizeResult(Q, quantized, relative_error(*rows), damp_used, rows)


def rtn_quantize_result(weight: torch.Tensor, hessian: torch.Tensor | None, *, bits: int, group_size: int, sym: bool) -> QuantizeResult:
    """Round-to-nearest with the same result record, so reports compare like with like."""
    quantized = rtn_quantize(weight, bits, group_size, sym)
    w_hat = quantized.dequantize()
    if hessian is None:
        return QuantizeResult(w_hat, quantized, float("nan"), 0.0)
    rows = row_output_errors(weight, w_hat, hessian.float())
    return QuantizeResult(w_hat, quantized, relative_error(*rows), 0.0, rows)
