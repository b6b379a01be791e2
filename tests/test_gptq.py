"""GPTQ and the quantization grid as pure functions on random tensors.

The calibration inputs are correlated (X = Z @ M with a random mixing matrix M), which is what
gives GPTQ's error feedback something to exploit; H = 2 X^T X / n as the engine builds it.
"""

from __future__ import annotations

import logging

import pytest
import torch

from compressor.algorithms.gptq import (
    HessianNotPositiveDefinite,
    gptq_quantize,
    output_error,
    rtn_quantize_result,
)
from compressor.algorithms.quant import fake_quantize, grid_params, max_code, rtn_quantize

N, K, GS = 48, 128, 32


def correlated_hessian(k: int = K, seed: int = 0, samples: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(samples, k, generator=g) @ mixing
    return 2 * x.T @ x / samples


def random_weight(n: int = N, k: int = K, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def H():
    return correlated_hessian()


@pytest.fixture(scope="module")
def W():
    return random_weight()


def check_record(result, weight, bits, group_size):
    """The invariants every result must satisfy."""
    q = result.quantized
    n, k = weight.shape
    groups = 1 if group_size == -1 else k // group_size
    assert q.codes.shape == (n, k) and q.scales.shape == (groups, n) and q.zeros.shape == (groups, n)
    assert q.g_idx.shape == (k,) and q.g_idx.dtype == torch.int32
    assert (q.bits, q.group_size) == (bits, group_size)
    assert int(q.codes.max()) <= max_code(bits) and int(q.codes.min()) >= 0
    assert torch.equal(result.weight, q.dequantize())  # the model holds exactly what gets stored
    assert torch.isfinite(result.weight).all()


# ------------------------------------------------------------------------ GPTQ vs RTN
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_gptq_beats_rtn(W, H, bits, sym):
    rtn = rtn_quantize_result(W, H, bits=bits, group_size=GS, sym=sym)
    assert rtn.relative_error == pytest.approx(output_error(W, rtn.weight, H))
    for options in ({}, {"act_order": True, "static_groups": True, "mse": True}):
        gptq = gptq_quantize(W, H, bits=bits, group_size=GS, sym=sym, **options)
        check_record(gptq, W, bits, GS)
        assert gptq.relative_error == pytest.approx(output_error(W, gptq.weight, H), rel=1e-6)
        assert gptq.relative_error < 0.9 * rtn.relative_error, options
        assert gptq.damp_percent == 0.01  # a positive definite H needs no escalation
    # more bits, less error (a sanity check on the error measure itself)
    assert rtn.relative_error < {2: 0.5, 3: 0.1, 4: 0.03, 8: 1e-3}[bits]


def test_codes_span_the_grid(W, H):
    for bits in (2, 3, 4):
        result = gptq_quantize(W, H, bits=bits, group_size=GS, sym=False)
        assert int(result.quantized.codes.max()) == max_code(bits)  # asym uses the top code...
        assert int(result.quantized.codes.min()) == 0  # ...and the bottom one
        sym = gptq_quantize(W, H, bits=bits, group_size=GS, sym=True).quantized
        assert (sym.zeros == 2 ** (bits - 1)).all()


def test_block_size_does_not_change_the_result(W, H):
    """Lazy batch updates are an implementation detail: the block size does not change the codes.

    (Only for block sizes that a group never straddles mid-block: when a group starts inside a
    block and runs past it, its grid is taken from columns that still lack that block's updates.)
    """
    ref = gptq_quantize(W, H, bits=4, group_size=GS, sym=False, block_size=128)
    for block_size in (16, 32, 64):
        other = gptq_quantize(W, H, bits=4, group_size=GS, sym=False, block_size=block_size)
        mismatch = (other.quantized.codes != ref.quantized.codes).float().mean().item()
        assert mismatch < 1e-3, block_size  # float summation order may flip a rare tie
        assert other.relative_error == pytest.approx(ref.relative_error, rel=1e-3)


# -------------------------------------------------------------------------- act-order
def test_act_order_dynamic_groups_permute_g_idx(W, H):
    result = gptq_quantize(W, H, bits=4, group_size=GS, sym=False, act_order=True, static_groups=False)
    check_record(result, W, 4, GS)
    g_idx = result.quantized.g_idx.long()
    assert torch.equal(torch.bincount(g_idx, minlength=K // GS), torch.full((K // GS,), GS))
    assert not torch.equal(g_idx, torch.arange(K) // GS), "act-order groups follow the Hessian, not k // gs"
    # the groups are runs of the order of decreasing H_ii
    order = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(g_idx[order], torch.arange(K) // GS)
    # `weight` is in the original column order: dequantizing through g_idx gives it back
    assert torch.equal(result.quantized.dequantize(), result.weight)
    assert output_error(W, result.weight, H) == pytest.approx(result.relative_error, rel=1e-6)
    plain = gptq_quantize(W, H, bits=4, group_size=GS, sym=False)
    assert result.relative_error < 0.9 * rtn_quantize_result(W, H, bits=4, group_size=GS, sym=False).relative_error
    assert not torch.equal(plain.weight, result.weight)


def test_act_order_static_groups_keep_g_idx_linear(W, H):
    result = gptq_quantize(W, H, bits=4, group_size=GS, sym=True, act_order=True, static_groups=True)
    check_record(result, W, 4, GS)
    assert torch.equal(result.quantized.g_idx, (torch.arange(K) // GS).to(torch.int32))
    # the grids were fixed from the unquantized weight, group by group in the original order
    for g in range(K // GS):
        scale, zero = grid_params(W[:, g * GS : (g + 1) * GS], 4, True)
        assert torch.equal(result.quantized.scales[g].float(), scale)
        assert torch.equal(result.quantized.zeros[g].float(), zero)


@pytest.mark.parametrize("act_order, static_groups, group_size", [(a, s, g) for a in (False, True) for s in (False, True) for g in (GS, -1) if not (s and g == -1)])
def test_config_desc_act_says_whether_g_idx_is_permuted(W, H, act_order, static_groups, group_size):
    """The exported config's desc_act (what vLLM refuses when true) is exactly 'g_idx is not k // gs'."""
    from compressor.export.gptq import gptq_quantization_config, permutes_g_idx

    result = gptq_quantize(W, H, bits=4, group_size=group_size, sym=True, act_order=act_order, static_groups=static_groups)
    gs = K if group_size == -1 else group_size
    permuted = not torch.equal(result.quantized.g_idx.long(), torch.arange(K) // gs)
    assert permutes_g_idx(act_order, static_groups, group_size) == permuted
    config = gptq_quantization_config(4, group_size, True, act_order, static_groups, 0.01, True)
    assert config["desc_act"] == permuted and config["meta"]["act_order"] == act_order


def test_group_size_minus_one_is_one_group(W, H):
    for act_order in (False, True):
        result = gptq_quantize(W, H, bits=4, group_size=-1, sym=False, act_order=act_order)
        check_record(result, W, 4, -1)
        assert torch.equal(result.quantized.g_idx, torch.zeros(K, dtype=torch.int32))
        assert result.relative_error < rtn_quantize_result(W, H, bits=4, group_size=-1, sym=False).relative_error


def test_group_size_must_divide_the_width(W, H):
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(W, H, bits=4, group_size=48)


# ------------------------------------------------------------------------ dead inputs
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_dead_inputs_quantize_to_zero(act_order, sym):
    dead = torch.tensor([3, 40, 41, 100] + list(range(64, 96)))  # scattered, and one whole group
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1024, K, generator=g) @ (torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K))
    x[:, dead] = 0  # these inputs never fire
    H = 2 * x.T @ x / x.shape[0]
    assert (H[dead] == 0).all() and (H[:, dead] == 0).all()
    W = random_weight()
    result = gptq_quantize(W, H, bits=4, group_size=GS, sym=sym, act_order=act_order, static_groups=False)
    check_record(result, W, 4, GS)
    assert torch.isfinite(result.quantized.scales.float()).all()
    assert (result.weight[:, dead] == 0).all()
    assert (result.quantized.dequantize()[:, dead] == 0).all()
    alive = torch.ones(K, dtype=torch.bool)
    alive[dead] = False
    assert (result.weight[:, alive] != 0).any()
    assert result.relative_error < 0.05  # the dead columns cost nothing on these inputs


# -------------------------------------------------------------------------- damping
def indefinite_hessian(negative: float) -> torch.Tensor:
    """Eigenvalues 1 (K-1 times) and -negative: mean(diag H) ~ 1, so damp d fixes it iff d > negative."""
    q, _ = torch.linalg.qr(torch.randn(K, K, generator=torch.Generator().manual_seed(7)))
    eig = torch.ones(K)
    eig[0] = -negative
    return (q * eig) @ q.T


def test_damping_escalates_and_logs(W, caplog):
    H = indefinite_hessian(0.03)
    with caplog.at_level(logging.WARNING, logger="compressor.algorithms.gptq"):
        result = gptq_quantize(W, H, bits=4, group_size=GS, damp_percent=0.01, max_damp_percent=1.0)
    assert result.damp_percent == pytest.approx(0.04)  # 0.01 -> 0.02 -> 0.04, the first that works
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not positive definite" in r.getMessage()]
    assert len(warnings) == 2
    check_record(result, W, 4, GS)


def test_damping_gives_up_at_the_maximum(W):
    H = indefinite_hessian(0.03)
    with pytest.raises(HessianNotPositiveDefinite, match="max_damp_percent"):
        gptq_quantize(W, H, bits=4, group_size=GS, damp_percent=0.01, max_damp_percent=0.02)


def test_positive_definite_hessian_keeps_its_damping(W, H, caplog):
    with caplog.at_level(logging.WARNING, logger="compressor.algorithms.gptq"):
        result = gptq_quantize(W, H, bits=4, group_size=GS, damp_percent=0.05)
    assert result.damp_percent == 0.05
    assert not [r for r in caplog.records if "positive definite" in r.getMessage()]


# ------------------------------------------------------------------------------- grid
def heavy_tailed_weight(n: int = N, k: int = K, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(2.0).sample((n, k))


def test_mse_grid_helps_heavy_tailed_weights(H):
    W = heavy_tailed_weight()
    for sym in (True, False):
        plain = gptq_quantize(W, H, bits=4, group_size=GS, sym=sym, mse=False)
        searched = gptq_quantize(W, H, bits=4, group_size=GS, sym=sym, mse=True)
        check_record(searched, W, 4, GS)
        assert searched.relative_error < plain.relative_error, sym


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_mse_grid_never_increases_the_row_error(bits, sym):
    w = heavy_tailed_weight(256, GS, seed=bits)

    def row_error(scale, zero):
        return (fake_quantize(w, scale[:, None], zero[:, None], bits) - w).abs().pow(2.4).sum(1)

    minmax = row_error(*grid_params(w, bits, sym, mse=False))
    searched = row_error(*grid_params(w, bits, sym, mse=True))
    assert (searched <= minmax).all()
    if bits <= 4:
        assert (searched < minmax).any()  # and it does find better ranges on heavy tails


def test_asym_zero_points_are_never_zero(H):
    """GPTQ v1 stores zero - 1, so a zero point of 0 could not be stored."""
    W = random_weight()
    W[:8] = W[:8].abs() + 0.1  # rows whose minimum is > 0
    W[8:16] = -W[8:16].abs() - 0.1  # rows whose maximum is < 0
    for bits in (2, 3, 4, 8):
        scale, zero = grid_params(W, bits, sym=False)
        assert (zero >= 1).all() and (zero <= max_code(bits)).all()
        for mse in (False, True):
            result = gptq_quantize(W, H, bits=bits, group_size=GS, sym=False, mse=mse)
            assert int(result.quantized.zeros.min()) >= 1, (bits, mse)
            check_record(result, W, bits, GS)
        assert int(rtn_quantize(W, bits, GS, sym=False).zeros.min()) >= 1
    # a positive row still round-trips closely: it loses at most one step of range
    r = rtn_quantize(W[:8], 8, -1, sym=False)
    assert (r.dequantize() - W[:8]).abs().max() < 0.02 * W[:8].abs().max()


def test_all_zero_weight_quantizes_to_zero(H):
    W = torch.zeros(N, K)
    for sym in (True, False):
        result = gptq_quantize(W, H, bits=4, group_size=GS, sym=sym)
        check_record(result, W, 4, GS)
        assert (result.weight == 0).all() and torch.isfinite(result.quantized.scales.float()).all()


def test_inverse_hessian_factor_is_the_three_step_reference_bitwise_and_column_major():
    """The in-place factorization (one buffer) gives torch's cholesky -> cholesky_inverse ->
    upper cholesky bit for bit, in the same column-major layout: the column loop's matmuls round
    differently on another layout, which changed artifacts (and perplexity) before it was kept."""
    from compressor.algorithms.gptq import inverse_hessian_cholesky

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 192, generator=gen) * torch.rand(192, generator=gen)
    hessian = x.T @ x * (2 / 300)
    damped = hessian.clone()
    damped.diagonal().add_(0.01 * torch.mean(torch.diag(hessian)))
    lower, _ = torch.linalg.cholesky_ex(damped)
    expected, _ = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    factor, damp = inverse_hessian_cholesky(hessian, 0.01, 1.0)
    assert damp == 0.01 and torch.equal(factor, expected) and factor.stride() == expected.stride()
