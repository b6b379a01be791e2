"""Pruning as pure functions over one weight and (for Wanda and SparseGPT) its input Hessian.

W is [N, K] as in `nn.Linear` (N outputs, K inputs); H = 2/n * X^T X over the layer's n
calibration inputs ([K, K] float32). Two kinds of sparsity, chosen by exactly one argument:

- `sparsity=s` (unstructured), s in [0, 1): every output row loses exactly
  z = round(s * K) weights (halves round up; e.g. s=0.5, K=7 -> 4). Weights compete only within
  their row, so every row is equally sparse; Wanda found per-row comparison better for LLMs
  than one threshold over the whole matrix.
- `pattern=(n, m)` or "n:m" (semi-structured): along K, each aligned group of m consecutive
  inputs (columns j*m .. j*m+m-1) keeps its n highest-scoring weights and zeroes the other
  m - n, so each group holds at most n nonzeros. "2:4" keeps 2 of every 4 (the layout sparse
  tensor cores run), "4:8" keeps 4 of every 8. K must be a multiple of m.

The scores:
- magnitude: |W_ij|. Kept weights are unchanged.
- Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2. We only have H, but ||X_j||^2 = n/2 * H_jj and
  the factor n/2 is the same for every input, so |W_ij| * sqrt(H_jj) ranks identically.
  Kept weights are unchanged.
- SparseGPT (Frantar & Alistarh, 2023): the OBS saliency w^2 / [H^-1]_jj, and the kept weights
  are updated to absorb the pruned ones' error. It is GPTQ's loop with "round" replaced by
  "zero if pruned" (see `compressor.algorithms.gptq`):
  - U = upper Cholesky factor of the damped H^-1 (`inverse_hessian_cholesky`). When columns go
    left to right, U_ii^2 is [H^-1]_ii given the columns before i are already fixed, and the row
    U[i, i:] / U_ii is the OBS update spreading column i's error over the columns ahead. The
    score is therefore w^2 / U_ii^2, on the weights as updated so far.
  - Adaptive mask: the mask of a block of `block_size` columns is chosen when the loop reaches
    that block, from the updated weights. Unstructured: row r prunes its c(i2) - c(i1) lowest
    scores in block [i1, i2), with c(j) = round(s * j) - quotas proportional to the block's
    width that add up to exactly z per row. (The reference code uses one threshold per block for
    the whole matrix; per-row quotas keep every row at the target, as the other two methods do.)
    N:M: each group of m is chosen when the loop reaches its first column (block_size is rounded
    down to a multiple of m so groups never straddle blocks).
  - Lazy batch updates and damping exactly as in GPTQ.
  - `quantizer(w_col, col) -> w_col_hat`: joint sparsification + quantization in one pass. After
    column `col` is pruned (pruned entries set to 0) it is passed to the quantizer; the result's
    pruned entries are forced back to exactly 0, and the combined error of pruning and rounding
    is what gets spread ahead. With sparsity=0 this is GPTQ.
- Dead inputs (H_jj = 0: the input was always 0) score 0 for Wanda and SparseGPT, so they are
  pruned first (free on the calibration data). SparseGPT sets H_jj = 1 so the factor exists; such
  an input is decoupled from the others, so no update touches it and, if kept, it is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from compressor.algorithms.gptq import inverse_hessian_cholesky, relative_error, row_output_errors

@dataclass
class PruneResult:
    weight: torch.Tensor  # [N, K] float32, exactly 0 wherever mask is False
    mask: torch.Tensor  # [N, K] bool, True = kept
    relative_error: float  # output_error(W, weight, H) on the calibration data; nan without a Hessian
    sparsity: float  # fraction of entries of `weight` that are 0 (above the target if W had zeros)
    row_errors: tuple[torch.Tensor, torch.Tensor] | None = None  # gptq.row_output_errors; None without a Hessian

    def rows_error(self, rows: slice) -> float:
        """relative_error of some output rows (one linear of a stacked group)."""
        return float("nan") if self.row_errors is None else relative_error(*(t[rows] for t in self.row_errors))


def parse_pattern(text: str) -> tuple[int, int]:
    """Parse "n:m" (e.g. "2:4" -> (2, 4)): keep at most n of every m consecutive inputs."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"bad N:M pattern {text!r}: expected 'n:m' such as '2:4'")
    try:
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"bad N:M pattern {text!r}: n and m must be integers, as in '2:4'") from None
    return _check_pattern((n, m))


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True iff every aligned group of m entries along K of every row has at most n True.

    `mask` is [N, K] bool (True = kept); for a weight pass `weight != 0`. False if K % m != 0.
    """
    _check_pattern((n, m))
    if mask.dim() != 2 or mask.shape[1] % m:
        return False
    kept = mask.bool().reshape(mask.shape[0], -1, m).sum(dim=2)
    return bool((kept <= n).all())


def magnitude_prune(
    weight: torch.Tensor, sparsity: float | None = None, pattern: tuple[int, int] | str | None = None
) -> PruneResult:
    sparsity, nm = _resolve(weight, sparsity, pattern)
    W = weight.detach().float()
    keep = _select(W.abs(), sparsity, nm)
    return _result(weight, W.masked_fill(~keep, 0), keep, None)


def wanda_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: tuple[int, int] | str | None = None,
) -> PruneResult:
    sparsity, nm = _resolve(weight, sparsity, pattern)
    _check_hessian(hessian, weight.shape[1])
    W = weight.detach().float()
    input_norm = torch.diag(hessian.detach().float()).clamp(min=0).sqrt()  # ||X_j|| up to sqrt(n/2)
    keep = _select(W.abs() * input_norm, sparsity, nm)
    return _result(weight, W.masked_fill(~keep, 0), keep, hessian)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: tuple[int, int] | str | None = None,
    block_size: int = 128,
    damp_percent: float = 0.01,
    max_damp_percent: float = 1.0,
    quantizer: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> PruneResult:
    sparsity, nm = _resolve(weight, sparsity, pattern)
    rows, k = weight.shape
    _check_hessian(hessian, k)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if nm is not None:
        block_size = max(nm[1], block_size // nm[1] * nm[1])

    hessian = hessian.detach().float()
    dead = torch.diag(hessian) == 0
    U, _ = inverse_hessian_cholesky(hessian, damp_percent, max_damp_percent)  # dead inputs get H_ii = 1 in it
    saliency = torch.diag(U).pow(-2).masked_fill(dead, 0)  # score = w^2 * saliency; dead inputs are free

    # Transposed (column j of W is row j of Wt), as in GPTQ: the per-column work runs on
    # contiguous memory, and the arithmetic is GPTQ's exactly (tests pin the two together).
    Wt = weight.detach().float().T.contiguous()
    keep_t = torch.ones(k, rows, dtype=torch.bool)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2]  # a view: each column is overwritten with its final value once processed
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if nm is None:
            quota = _zeros_upto(sparsity, i2) - _zeros_upto(sparsity, i1)
            keep_t[i1:i2] = _prune_lowest(W1.T.square() * saliency[i1:i2], quota).T
        for i in range(i2 - i1):
            col = i1 + i
            if nm is not None and col % nm[1] == 0:
                group = slice(col, col + nm[1])
                keep_t[group] = _keep_highest_nm(W1[i : i + nm[1]].T.square() * saliency[group], *nm).T
            w = W1[i]
            pruned = ~keep_t[col]
            q = w.masked_fill(pruned, 0)
            if quantizer is not None:
                q = quantizer(q, col).float().masked_fill(pruned, 0)
            err = (w - q).div_(U1[i, i])
            W1[i] = q
            Err1[i] = err
            W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)  # spread the error (rank-1)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)  # lazy update of the columns ahead
    del U, U1  # U1 is a view: it would keep the K x K factor alive
    return _result(weight, Wt.T.contiguous(), keep_t.T.contiguous(), hessian)


def _check_pattern(pattern) -> tuple[int, int]:
    if (
        not isinstance(pattern, (tuple, list))
        or len(pattern) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in pattern)
    ):
        raise ValueError(f"N:M pattern must be two integers (n, m) such as (2, 4), got {pattern!r}")
    n, m = pattern
    if not 1 <= n < m:
        raise ValueError(f"bad N:M pattern {n}:{m}: need 1 <= n < m (keep n of every m inputs)")
    return n, m


def _resolve(weight, sparsity, pattern) -> tuple[float | None, tuple[int, int] | None]:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity (unstructured) or pattern (N:M)")
    if pattern is not None:
        n, m = parse_pattern(pattern) if isinstance(pattern, str) else _check_pattern(pattern)
        if weight.shape[1] % m:
            raise ValueError(
                f"N:M pattern {n}:{m} needs the input width to be a multiple of {m}, got {weight.shape[1]}"
            )
        return None, (n, m)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    return float(sparsity), None


def _check_hessian(hessian: torch.Tensor, k: int) -> None:
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"Hessian must be [{k}, {k}] for a weight with {k} inputs, got {tuple(hessian.shape)}")


def _zeros_upto(sparsity: float, j: int) -> int:
    """Zeros per row among the first j columns: round(sparsity * j), halves up."""
    return math.floor(sparsity * j + 0.5)


def _prune_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask dropping the `count` lowest scores of every row."""
    keep = torch.ones_like(score, dtype=torch.bool)
    return keep.scatter_(1, score.topk(count, dim=1, largest=False).indices, False)


def _keep_highest_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the n highest scores of each aligned group of m along dim 1."""
    groups = score.reshape(score.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    return keep.scatter_(2, groups.topk(n, dim=2).indices, True).reshape(score.shape)


def _select(score: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None) -> torch.Tensor:
    if nm is not None:
        return _keep_highest_nm(score, *nm)
    return _prune_lowest(score, _zeros_upto(sparsity, score.shape[1]))


def _result(weight: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor | None) -> PruneResult:
    rows = row_output_errors(weight, pruned, hessian.detach().float()) if hessian is not None else None
    err = relative_error(*rows) if rows is not None else float("nan")
    return PruneResult(pruned, keep, err, float((pruned == 0).float().mean()), rows)
