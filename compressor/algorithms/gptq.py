"""GPTQ (Frantar et al., 2022) as a pure function over one weight and its input Hessian.

Given W [N, K] and H = 2/n * sum x x^T over the layer's calibration inputs, GPTQ quantizes the
columns of W one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian, which minimises ||W X - Q X||^2 column by column.

The tricks, each briefly:
- Cholesky of H^-1 (upper): the rows of U = chol(H^-1)^T are exactly the update vectors the
  sequential OBS step needs, so no matrix is re-inverted inside the loop.
- Lazy batch updates: columns are processed in blocks of `block_size`; inside a block the error
  is propagated column by column, to the rest of the matrix once per block (one matmul).
- The loop works on W transposed (a column of W is a contiguous row): every per-column operation
  then reads contiguous memory instead of one float per cache line.
- Memory: `prepare_hessian` builds the permuted, damped H straight into the one K x K buffer that
  LAPACK factors in place, leaving H untouched; after it, H is needed only for the output error,
  so a caller may set it aside during the loop (compressor/quantize.py does for wide layers).
  The model's weight is rebuilt from the codes at the end rather than kept alongside them.
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
    hessian: torch.Tensor, damp_percent: float, max_damp_percent: float, perm: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag)*I)^-1, escalating damp until it exists.

    `perm`: factor P H P^T (the columns in processing order) instead, built straight into the
    one work buffer. Dead inputs (H_ii = 0) get H_ii = 1 in it. `hessian` itself is not changed:
    the caller still needs it for the output error, so a layer costs two K x K buffers, not five."""
    k = hessian.shape[0]
    diagonal = torch.diag(hessian).clone()
    dead = diagonal == 0
    diagonal[dead] = 1
    if perm is not None:
        diagonal = diagonal[perm]
    mean_diag = torch.mean(diagonal)
    damp = damp_percent
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    work = torch.empty_strided((k, k), (1, k), dtype=torch.float32, device=hessian.device)
    rows = max(1, (32 << 20) // (4 * k))  # rows gathered per step: ~32 MB of temporaries
    while True:
        # LAPACK works in place and torch's out= lets it; column-major as LAPACK wants, so torch
        # makes no copies. H is symmetric, so writing P H P^T's rows into the transpose of the
        # column-major buffer fills it with P H P^T.
        rows_view = work.T
        for r in range(0, k, rows):
            if perm is None:
                rows_view[r : r + rows] = hessian[r : r + rows]
            else:
                rows_view[r : r + rows] = hessian.index_select(0, perm[r : r + rows]).index_select(1, perm)
        work.diagonal().copy_(diagonal).add_(damp * mean_diag)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info == 0:
            torch.cholesky_inverse(work.tril_(), out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info == 0:
                return work, damp
        if damp * 2 > max_damp_percent + 1e-12:
            raise HessianNotPositiveDefinite(
                f"Hessian is not positive definite even with damp_percent={damp:g}; "
                "raise max_damp_percent or use more calibration samples"
            )
        log.warning("Hessian not positive definite at damp_percent=%g; retrying with %g", damp, damp * 2)
        damp *= 2


@dataclass
class PreparedHessian:
    """What GPTQ's column loop needs from H: the processing order and the inverse's factor.
    Once it exists, H itself is needed only for the output error at the end (so a caller short of
    memory can put H aside while the loop runs: compressor/quantize.py does, for wide layers)."""

    perm: torch.Tensor  # processing position -> input column (act-order, else identity)
    dead: torch.Tensor  # [K] bool: inputs that were always 0
    factor: torch.Tensor  # upper Cholesky factor of the damped, permuted H^-1 (K x K)
    damp_percent: float  # damping actually used (after escalation)


def prepare_hessian(hessian: torch.Tensor, *, act_order: bool = False, damp_percent: float = 0.01,
                    max_damp_percent: float = 1.0) -> PreparedHessian:  # fmt: skip
    hessian = hessian.detach().float()
    diagonal = torch.diag(hessian)
    dead = diagonal == 0
    perm = torch.argsort(diagonal.masked_fill(dead, 1), descending=True) if act_order else torch.arange(len(diagonal), device=hessian.device)
    factor, damp = inverse_hessian_cholesky(hessian, damp_percent, max_damp_percent, perm if act_order else None)
    return PreparedHessian(perm, dead, factor, damp)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
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
    prepared: PreparedHessian | None = None,
) -> QuantizeResult:
    """GPTQ of `weight` [N, K] on its input Hessian [K, K]. With `prepared` (from `prepare_hessian`
    with the same act_order and damping), `hessian` is used only for the output error; None skips
    that (relative_error nan, row_errors None: the caller computes them with `row_output_errors`)."""
    n, k = weight.shape
    gs = k if group_size == -1 else group_size
    if k % gs:
        raise ValueError(f"group_size {group_size} does not divide the input width {k}")
    if prepared is None:
        if hessian is None:
            raise ValueError("gptq_quantize needs the Hessian or a prepared one")
        prepared = prepare_hessian(hessian, act_order=act_order, damp_percent=damp_percent, max_damp_percent=max_damp_percent)
    perm, dead, Hinv, damp_used = prepared.perm, prepared.dead, prepared.factor, prepared.damp_percent
    del prepared
    dev = weight.device

    num_groups = k // gs
    scales = torch.zeros(num_groups, n, device=dev)
    zeros = torch.zeros(num_groups, n, device=dev)
    if static_groups:  # every group's grid from the unquantized weight (dead inputs as 0)
        for g in range(num_groups):
            columns = slice(g * gs, (g + 1) * gs)
            scales[g], zeros[g] = grid_params(weight[:, columns].detach().float().masked_fill(dead[columns], 0), bits, sym, mse)

    # Columns in processing order, transposed: column j of W is row j of Wt, so the loop's
    # per-column work (round, error, rank-1 update) runs on contiguous memory, not on the
    # strided columns of [N, K].
    Wt = weight.detach().float().T.index_select(0, perm)
    Wt[dead[perm]] = 0  # a dead input never influences the output: quantize it as 0
    kept_t = mask.T.index_select(0, perm) if mask is not None else None

    maxq = max_code(bits)
    codes_t = torch.zeros(k, n, dtype=torch.uint8, device=dev)  # small integers: exact, a quarter of float32
    # Group of each position in processing order: its original column's group when static,
    # else consecutive runs of gs in processing order.
    group_of_position = perm // gs if static_groups else torch.arange(k, device=dev) // gs

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2].clone()
        codes1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static_groups and col % gs == 0:
                # The grid comes from the weights as updated so far: columns inside this block
                # from W1; columns past it from W plus the updates this block still owes them
                # (so the result does not depend on block_size).
                ahead = W1[i : i + gs]
                if i + gs > i2 - i1:
                    beyond = Wt[i2 : col + gs] - Hinv[i1:col, i2 : col + gs].T @ Err1[:i]
                    ahead = torch.cat([ahead, beyond])
                g = col // gs
                scales[g], zeros[g] = grid_params(ahead.T.contiguous(), bits, sym, mse)
            if col == 0 or group_of_position[col] != group_of_position[col - 1]:
                scale, zero = scales[int(group_of_position[col])], zeros[int(group_of_position[col])]
            w = W1[i]
            q = torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)
            if kept_t is not None:
                q = torch.where(kept_t[col], q, zero)  # pruned stays exactly 0; its error spreads
            codes1[i] = q
            w_hat = (q - zero).mul_(scale)
            err = (w - w_hat).div_(Hinv1[i, i])
            Err1[i] = err
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)  # spread the error (rank-1)
        codes_t[i1:i2] = codes1
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # lazy update of the columns ahead
    del Wt, Hinv, Hinv1, W1, codes1, Err1  # Hinv1 is a view: it would keep the K x K factor alive

    inverse = torch.argsort(perm)
    codes = codes_t.index_select(0, inverse).T.contiguous()
    del codes_t
    g_idx = group_of_position[inverse].to(torch.int32)
    # The weight the model holds is exactly what the loop rounded to: (q - zero) * scale, per
    # column with its group's float32 grid (rebuilt from the codes, so no [N, K] copy was kept).
    Q = torch.empty(n, k, device=dev)
    step = max(1, (16 << 20) // (4 * n))
    for c in range(0, k, step):
        groups = g_idx[c : c + step].long()
        Q[:, c : c + step] = (codes[:, c : c + step].float() - zeros[groups].T).mul_(scales[groups].T)
    quantized = QuantizedWeight(
        codes=codes,
        scales=scales.half(),
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
    if hessian is None:
        return QuantizeResult(Q, quantized, float("nan"), damp_used)
    rows = row_output_errors(weight, Q, hessian.detach().float())
    return QuantizeResult(Q, quantized, relative_error(*rows), damp_used, rows)


def rtn_quantize_result(weight: torch.Tensor, hessian: torch.Tensor | None, *, bits: int, group_size: int, sym: bool) -> QuantizeResult:
    """Round-to-nearest with the same result record, so reports compare like with like."""
    quantized = rtn_quantize(weight, bits, group_size, sym)
    w_hat = quantized.dequantize()
    if hessian is None:
        return QuantizeResult(w_hat, quantized, float("nan"), 0.0)
    rows = row_output_errors(weight, w_hat, hessian.float())
    return QuantizeResult(w_hat, quantized, relative_error(*rows), 0.0, rows)
