"""Magnitude, Wanda and SparseGPT pruning: exact sparsity, N:M layouts, and output error.

Sparsity and N:M are checked by counting in the tests themselves (not only through `check_nm`).
SparseGPT's update machinery is pinned against `gptq_quantize` (with sparsity 0 and an RTN
quantizer hook the two must agree bit for bit), its mask choice against Wanda's on a diagonal
Hessian (where the two scores coincide), and its purpose by output error on correlated inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from compressor.algorithms.gptq import gptq_quantize, output_error
from compressor.algorithms.pruning import (
    PruneResult,
    check_nm,
    magnitude_prune,
    parse_pattern,
    sparsegpt_prune,
    wanda_prune,
)
from compressor.algorithms.quant import fake_quantize, grid_params

METHODS = ["magnitude", "wanda", "sparsegpt"]


def prune(method: str, weight, hessian, **kwargs) -> PruneResult:
    if method == "magnitude":
        return magnitude_prune(weight, **kwargs)
    if method == "wanda":
        return wanda_prune(weight, hessian, **kwargs)
    # 72 = 4 * 15 + 12: a partial block, and per-block round(s * 15) would not add up to round(s * 72)
    return sparsegpt_prune(weight, hessian, block_size=15, **kwargs)


def correlated_layer(n_out: int = 64, k: int = 128, seed: int = 0):
    """W and H = 2/n X^T X with X = randn @ mixing (correlated inputs) and 6 high-variance inputs."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(4096, k, generator=g) @ mixing
    x[:, :6] *= 8
    return torch.randn(n_out, k, generator=g), 2 / x.shape[0] * x.T @ x


def uncorrelated_layer(n_out: int = 64, k: int = 72, seed: int = 0, norm_spread: float = 1.5):
    """Independent inputs whose norms vary by a log-normal factor (e^1.5 ~ 4.5x per sigma)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, k, generator=g) * torch.exp(norm_spread * torch.randn(k, generator=g))
    return torch.randn(n_out, k, generator=g), 2 / x.shape[0] * x.T @ x


# --- unstructured: exact per-row sparsity ----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity, zeros_per_row", [(0.0, 0), (0.3, 22), (0.5, 36), (0.9, 65)])  # K = 72
def test_unstructured_sparsity_is_exact_in_every_row(method, sparsity, zeros_per_row):
    weight, hessian = correlated_layer(n_out=48, k=72)
    original = weight.clone()
    result = prune(method, weight, hessian, sparsity=sparsity)

    assert torch.equal(weight, original)  # the input is not modified
    assert result.weight.dtype == torch.float32 and result.mask.dtype == torch.bool
    assert result.weight.shape == result.mask.shape == weight.shape
    assert ((~result.mask).sum(dim=1) == zeros_per_row).all()
    assert ((result.weight == 0).sum(dim=1) == zeros_per_row).all()  # random W has no zeros of its own
    assert torch.all(result.weight[~result.mask] == 0)
    assert result.sparsity == pytest.approx(zeros_per_row / 72)
    if sparsity == 0.0:
        assert torch.equal(result.weight, weight)
    if method == "magnitude":
        assert math.isnan(result.relative_error)
    else:
        assert result.relative_error == pytest.approx(output_error(weight, result.weight, hessian))


def test_rounding_of_the_per_row_count():
    weight = torch.randn(4, 7)
    assert ((magnitude_prune(weight, sparsity=0.5).mask.sum(dim=1)) == 3).all()  # 3.5 zeros -> 4
    assert ((magnitude_prune(weight, sparsity=0.2).mask.sum(dim=1)) == 6).all()  # 1.4 zeros -> 1


# --- N:M ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), "2:4", (1, 4)])
def test_nm_holds_in_every_group_of_every_row(method, pattern):
    n, m = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    weight, hessian = correlated_layer(n_out=48, k=72)
    kwargs = {"block_size": 30} if method == "sparsegpt" else {}  # 30 is not a multiple of m
    result = (
        sparsegpt_prune(weight, hessian, pattern=pattern, **kwargs)
        if method == "sparsegpt"
        else prune(method, weight, hessian, pattern=pattern)
    )
    kept_per_group = result.mask.reshape(48, 72 // m, m).sum(dim=2)
    assert (kept_per_group == n).all()
    nonzero_per_group = (result.weight != 0).reshape(48, 72 // m, m).sum(dim=2)
    assert (nonzero_per_group == n).all()
    assert torch.all(result.weight[~result.mask] == 0)
    assert check_nm(result.mask, n, m) and check_nm(result.weight != 0, n, m)
    assert result.sparsity == pytest.approx(1 - n / m)


def test_check_nm_detects_violations():
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1], [0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert check_nm(mask, 2, 4)
    assert check_nm(mask, 4, 8)
    assert not check_nm(mask, 1, 4)
    mask[1, 0] = True  # 3 kept in row 1's first group
    assert not check_nm(mask, 2, 4)
    assert check_nm(mask, 4, 8)
    assert not check_nm(torch.zeros(2, 6, dtype=torch.bool), 2, 4)  # K = 6 is not a multiple of 4


# --- what each method keeps --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.6}, {"pattern": (2, 4)}])
def test_magnitude_and_wanda_keep_the_highest_scores_unchanged(kwargs):
    weight, hessian = uncorrelated_layer()
    for result, score in [
        (magnitude_prune(weight, **kwargs), weight.abs()),
        (wanda_prune(weight, hessian, **kwargs), weight.abs() * torch.diag(hessian).sqrt()),
    ]:
        assert torch.equal(result.weight[result.mask], weight[result.mask])
        # Within each comparison unit (a row, or a group of 4), every kept score >= every pruned one.
        unit = 72 if "sparsity" in kwargs else 4
        s = score.reshape(64, -1, unit)
        kept = result.mask.reshape(64, -1, unit)
        lowest_kept = s.masked_fill(~kept, math.inf).amin(dim=2)
        highest_pruned = s.masked_fill(kept, -math.inf).amax(dim=2)
        assert (lowest_kept >= highest_pruned).all()


def test_wanda_weighs_magnitude_by_input_norm():
    weight = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    hessian = torch.diag(torch.tensor([100.0, 1.0]))  # input 0 is 10x louder
    assert magnitude_prune(weight, sparsity=0.5).mask.tolist() == [[False, True], [True, False]]
    assert wanda_prune(weight, hessian, sparsity=0.5).mask.tolist() == [[True, False], [True, False]]


@pytest.mark.parametrize("kwargs, block_size", [({"sparsity": 0.5}, 72), ({"pattern": (2, 4)}, 16)])
def test_sparsegpt_on_a_diagonal_hessian_is_wanda(kwargs, block_size):
    # With independent inputs OBS cannot compensate (the update rows are 0) and w^2 / [H^-1]_jj =
    # w^2 H_jj ranks as Wanda does; undamped, with one block for the unstructured case.
    weight, hessian = uncorrelated_layer()
    hessian = torch.diag(torch.diag(hessian))
    sparse = sparsegpt_prune(weight, hessian, block_size=block_size, damp_percent=0.0, **kwargs)
    wanda = wanda_prune(weight, hessian, **kwargs)
    assert torch.equal(sparse.mask, wanda.mask)
    assert torch.equal(sparse.weight, wanda.weight)


def test_sparsegpt_updates_the_kept_weights_on_correlated_inputs():
    weight, hessian = correlated_layer()
    result = sparsegpt_prune(weight, hessian, sparsity=0.5)
    changed = (result.weight != weight) & result.mask
    assert changed.sum() > 0.9 * result.mask.sum()  # nearly every kept weight absorbed some error


# --- output error --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"pattern": (2, 4)}])
def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs(kwargs):
    weight, hessian = correlated_layer()
    magnitude = output_error(weight, magnitude_prune(weight, **kwargs).weight, hessian)
    wanda = wanda_prune(weight, hessian, **kwargs).relative_error
    sparse = sparsegpt_prune(weight, hessian, **kwargs).relative_error
    # Measured: 50%: 0.076 / 0.022 / 0.019; 2:4: 0.121 / 0.099 / 0.039.
    assert sparse < 0.95 * wanda and sparse < 0.5 * magnitude


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"pattern": (2, 4)}])
def test_wanda_beats_magnitude_when_input_norms_vary(kwargs):
    weight, hessian = uncorrelated_layer(k=128)
    magnitude = output_error(weight, magnitude_prune(weight, **kwargs).weight, hessian)
    wanda = wanda_prune(weight, hessian, **kwargs).relative_error
    assert wanda < 0.2 * magnitude  # measured ~100x apart


# --- dead inputs ---------------------------------------------------------------------------------


def dead_input_layer(dead: list[int], k: int = 64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k**0.5)
    x[:, dead] = 0
    return torch.randn(32, k, generator=g), 2 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dead_inputs_are_pruned_first_and_produce_no_nan(method):
    dead = [3, 10, 40, 41, 63]
    weight, hessian = dead_input_layer(dead)
    run = wanda_prune if method == "wanda" else sparsegpt_prune
    result = run(weight, hessian, sparsity=0.5)
    assert torch.isfinite(result.weight).all() and math.isfinite(result.relative_error)
    assert ((~result.mask).sum(dim=1) == 32).all()
    assert not result.mask[:, dead].any()

    # Fewer zeros per row (3) than dead inputs (5): only dead inputs go, which costs nothing, and
    # nothing else moves (a dead input is decoupled from the others, so OBS spreads no error).
    result = run(weight, hessian, sparsity=3 / 64)
    alive = torch.ones(64, dtype=torch.bool)
    alive[dead] = False
    assert result.mask[:, alive].all() and ((~result.mask).sum(dim=1) == 3).all()
    assert torch.equal(result.weight[result.mask], weight[result.mask])
    assert result.relative_error == 0


def test_sparsegpt_with_an_all_zero_hessian():
    weight = torch.randn(8, 16)
    for kwargs in [{"sparsity": 0.5}, {"pattern": (2, 4)}]:
        result = sparsegpt_prune(weight, torch.zeros(16, 16), **kwargs)
        assert torch.isfinite(result.weight).all() and result.sparsity == 0.5
        assert torch.equal(result.weight[result.mask], weight[result.mask])


# --- joint pruning + quantization ----------------------------------------------------------------


def test_sparsegpt_with_quantizer_and_no_pruning_is_gptq():
    weight, hessian = correlated_layer(k=96)
    scale, zero = grid_params(weight, 4, sym=True)  # GPTQ's grid for group_size=-1 without act-order
    result = sparsegpt_prune(weight, hessian, sparsity=0.0, block_size=32,
                             quantizer=lambda w, col: fake_quantize(w, scale, zero, 4))  # fmt: skip
    gptq = gptq_quantize(weight, hessian, bits=4, group_size=-1, sym=True, block_size=32)
    assert torch.equal(result.weight, gptq.weight)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"pattern": (2, 4)}])
def test_joint_sparsegpt_and_quantizer(kwargs):
    weight, hessian = correlated_layer()
    scale = weight.abs().amax(dim=1) / 7  # symmetric 4-bit RTN, one scale per output row

    def rtn(w):  # one scale per output row: w is a column [N] or the whole weight [N, K]
        s = scale if w.dim() == 1 else scale[:, None]
        return torch.clamp(torch.round(w / s), -8, 7) * s

    seen = []

    def quantizer(w_col, col):
        seen.append((col, w_col.clone()))
        return rtn(w_col) + 0.5 * scale  # off by half a step on zeros too: the hook must re-zero them

    def on_grid(w_col, col):
        seen.append((col, w_col.clone()))
        return rtn(w_col)

    result = sparsegpt_prune(weight, hessian, quantizer=quantizer, **kwargs)
    assert [col for col, _ in seen] == list(range(128))
    assert all(torch.all(w[~result.mask[:, col]] == 0) for col, w in seen)  # the hook sees pruned zeros
    assert torch.all(result.weight[~result.mask] == 0)
    assert result.sparsity == 0.5

    seen.clear()
    joint = sparsegpt_prune(weight, hessian, quantizer=on_grid, **kwargs)
    assert torch.all(joint.weight[~joint.mask] == 0)
    steps = joint.weight / scale[:, None]
    assert torch.equal(rtn(joint.weight), joint.weight)  # every value is on the grid
    assert steps.abs().max() <= 8 and (steps[joint.mask] != 0).float().mean() > 0.9
    # Rounding inside the pass lets later columns absorb the rounding error too.
    pruned_then_rounded = rtn(sparsegpt_prune(weight, hessian, **kwargs).weight)
    assert joint.relative_error < 0.95 * output_error(weight, pruned_then_rounded, hessian)


# --- arguments -----------------------------------------------------------------------------------


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    assert parse_pattern(" 1 : 4 ") == (1, 4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("2:4:8", "expected 'n:m'"),
        ("24", "expected 'n:m'"),
        ("a:4", "must be integers"),
        ("2.5:4", "must be integers"),
        ("4:4", "1 <= n < m"),
        ("4:2", "1 <= n < m"),
        ("0:4", "1 <= n < m"),
    ],
)
def test_parse_pattern_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(text)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of sparsity"),
        ({"sparsity": 0.5, "pattern": (2, 4)}, "exactly one of sparsity"),
        ({"sparsity": 1.0}, r"sparsity must be a fraction in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be a fraction in \[0, 1\)"),
        ({"sparsity": float("nan")}, r"sparsity must be a fraction in \[0, 1\)"),
        ({"sparsity": "0.5"}, r"sparsity must be a fraction in \[0, 1\)"),
        ({"pattern": (4, 4)}, "1 <= n < m"),
        ({"pattern": (2.0, 4)}, "two integers"),
        ({"pattern": "2-4"}, "expected 'n:m'"),
        ({"pattern": (2, 3)}, "multiple of 3, got 8"),
    ],
)
def test_bad_arguments(method, kwargs, message):
    weight, hessian = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match=message):
        prune(method, weight, hessian, **kwargs)


def test_bad_shapes_and_block_size():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"Hessian must be \[8, 8\]"):
        wanda_prune(weight, torch.eye(6), sparsity=0.5)
    with pytest.raises(ValueError, match=r"Hessian must be \[8, 8\]"):
        sparsegpt_prune(weight, torch.eye(6), sparsity=0.5)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        sparsegpt_prune(weight, torch.eye(8), sparsity=0.5, block_size=0)
    with pytest.raises(ValueError, match="2-D"):
        magnitude_prune(torch.randn(8), sparsity=0.5)
