"""CPU kernels (kernels/cpu_gemm.c, driven by compressor.kernels.cpu) and the runtime built on them.

Where the kernels run (x86-64 with AVX2/FMA/F16C and a C compiler; otherwise skipped with the
reason): `quant_linear` against a float64 dequantize reference over bit widths, sym/asym, group
sizes, static and permuted g_idx, odd shapes (the 8-column tail), row counts up to and past
MAX_ROWS, bias, float32 and bfloat16 activations; a row's output independent of its batch and of
the thread count; the QuantLinear hook's fallbacks (logged once), its off switch and its cache;
`half_linear` and Float16Linear; the library's build cache and a -Wall -Wextra -Werror compile;
`runtime.load` of a tiny artifact keeping float16 embeddings (logits and greedy tokens against the
cache_dequantized float model, memory held). Always run: Float16Embedding. Slow (the real
SmolLM2): RSS growth of load + one forward, measured in a fresh interpreter.

Tolerances are relative to max |reference| (see `tolerance`); row limits come from cpu.MAX_ROWS.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from compressor.kernels import build, cpu
from compressor.kernels.repack import Unsupported
from torch import nn

from compressor import runtime
from compressor.algorithms.quant import QuantizedWeight
from compressor.packing import dequantize_gptq_v1, pack_gptq_v1, unpack_along_rows
from compressor.runtime import QuantLinear
from compressor.runtime import half_weights
from compressor.runtime.half_weights import Float16Embedding, Float16Linear
from compressor.runtime.quant_linear import _KERNELS
from conftest import write_tiny_gptq_artifact
from test_kernels import gptq_tensors

UNAVAILABLE = build.cpu_supported() or (None if build.find_cc() else "no C compiler found (set CC, or install gcc or clang)")
needs_kernels = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"the CPU kernels cannot run here: {UNAVAILABLE}")
needs_cc = pytest.mark.skipif(
    build.find_cc() is None or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="needs a C compiler targeting x86-64 (the kernels are AVX2 code)",
)

# The kernel sums x*q and x per group in float32 and subtracts zero * sum(x) once per group. A
# float32 GEMM is within ~5e-7 of max |y| of the float64 reference on these shapes; the kernel's
# cancellation grows with the group's rows (measured over seeds: ~1e-6 at 32 rows, ~2.1e-6 at 64,
# ~2.4e-6 at 128, ~5.3e-6 for one group of 576), hence a bound in sqrt(rows per group).
FLOAT32_TOLERANCE = 2e-6  # plain float32 dot products (half_linear, the dequantize fallback)


def tolerance(group_rows: int) -> float:
    """Bound on max |y - reference| / max |reference| for float32 kernel outputs."""
    return max(FLOAT32_TOLERANCE, 5e-7 * math.sqrt(group_rows))


ROW_COUNTS = (1, 2, 3, 4, 5, 7, 16, 33, 64)


@pytest.fixture(autouse=True)
def fresh_hook_state(monkeypatch):
    """The QuantLinear CPU hook registered (another test module may have removed it) and the
    log-once memory empty, so each test sees its own messages."""
    monkeypatch.setitem(_KERNELS, "cpu", cpu.quant_linear_forward)
    monkeypatch.setattr(cpu._fallbacks, "logged", set())
    monkeypatch.delenv("COMPRESSOR_CPU_KERNELS", raising=False)


def reference(t: dict, bits: int, x: torch.Tensor, bias: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in float64, W (`weight`, if given) dequantized from the stored (unsorted) GPTQ tensors."""
    if weight is None:
        weight = dequantize_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float64)
    y = x.double() @ weight.T
    return y + t["bias"].double() if bias else y


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def prepare(t: dict, bits: int, bias: bool) -> cpu.CpuQuantWeight:
    return cpu.prepare_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, t["bias"] if bias else None)


def check_bfloat16(y: torch.Tensor, expected: torch.Tensor, group_rows: int) -> None:
    """y (bfloat16) is the float64 `expected` rounded to bfloat16, up to the float32 kernel's error:
    elementwise |y - expected| <= 2^-8 |expected| (one rounding) + twice the float32 bound."""
    assert y.dtype == torch.bfloat16
    scale = float(expected.abs().max())
    error = (y.double() - expected).abs()
    bound = 2.0**-8 * expected.abs() + 2 * tolerance(group_rows) * scale
    assert (error <= bound).all(), f"worst excess {float((error - bound).max()):.3e} over the bfloat16 bound"
    assert float((y == expected.to(torch.bfloat16)).double().mean()) > 0.99  # nearly all exactly the rounded reference


def ragged_group_tensors(n: int, k: int, bits: int, group_size: int, seed: int) -> dict:
    """GPTQ v1 tensors of random codes where the last group is short (group_size does not divide k),
    which rtn_quantize cannot produce."""
    gen = torch.Generator().manual_seed(seed)
    groups = math.ceil(k / group_size)
    qw = QuantizedWeight(
        codes=torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8),
        scales=(torch.rand(groups, n, generator=gen) * 0.1 + 0.01).half(),
        zeros=torch.randint(1, 2**bits, (groups, n), generator=gen).to(torch.uint8),
        g_idx=(torch.arange(k) // group_size).to(torch.int32),
        bits=bits,
        group_size=group_size,
        sym=False,
    )
    return pack_gptq_v1(qw)


# --- quant_linear against the dequantize reference --------------------------------------------

LAYOUTS = [
    (bits, gs, sym, act)
    for bits in (4, 8)
    for gs in (32, 64, 128, -1)
    for sym in (True, False)
    for act in (False, True)
    if not (act and gs == -1)  # one group: any g_idx order is the trivial one
]
# N % 16 == 8 everywhere: the last 16-column block is the 8-column tail
SHAPES = {32: ((8, 64), (24, 192), (72, 576), (200, 192)), 64: ((8, 64), (24, 192), (72, 576), (200, 192)),
          128: ((8, 128), (24, 384), (72, 640), (200, 256)), -1: ((8, 64), (24, 192), (72, 576), (200, 192))}  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("bits,group_size,sym,act_order", LAYOUTS)
def test_quant_linear_matches_the_dequantize_reference(bits, group_size, sym, act_order):
    for index, (n, k) in enumerate(SHAPES[group_size]):
        seed = bits * 1000 + group_size * 10 + sym * 2 + act_order + index * 7
        t = gptq_tensors(n, k, bits, group_size, sym, act_order, seed=seed, bias=True)
        weights = {bias: prepare(t, bits, bias) for bias in (False, True)}
        assert (weights[True].perm is not None) == (act_order and t["scales"].shape[0] > 1)  # a one-group g_idx is trivial
        dense = dequantize_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float64)
        gen = torch.Generator().manual_seed(seed)
        for m in ROW_COUNTS:
            bias = m % 2 == 1
            shape = (4, m // 4, k) if m == 64 else (m, k)  # 64 rows also as a batched [B, T, K] input
            x = torch.randn(shape, generator=gen)  # fresh per call: a stale output buffer cannot pass
            y = cpu.quant_linear(x, weights[bias])
            assert y is not None and y.dtype == torch.float32 and y.shape == shape[:-1] + (n,)
            error = max_relative_error(y, reference(t, bits, x, bias, dense))
            assert error <= tolerance(weights[bias].group_size), f"n={n} k={k} m={m} bias={bias}: relative error {error:.2e}"


@needs_kernels
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, True), (4, -1, False), (8, 64, True), (8, 128, False)])
def test_bfloat16_activations_give_bfloat16_outputs(bits, group_size, act_order):
    n, k = (72, 384) if group_size == 128 else (200, 192)
    t = gptq_tensors(n, k, bits, group_size, False, act_order, seed=11 + bits, bias=True)
    gen = torch.Generator().manual_seed(5)
    for bias in (False, True):
        weight = prepare(t, bits, bias)
        for shape in ((1, k), (5, k), (2, 7, k), (33, k)):
            x = torch.randn(shape, generator=gen).to(torch.bfloat16)
            y = cpu.quant_linear(x, weight)
            assert y.shape == shape[:-1] + (n,)
            check_bfloat16(y, reference(t, bits, x, bias), weight.group_size)  # reference from the bf16-rounded x


@needs_kernels
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1)])
def test_every_tile_shape(bits, group_size):
    """Full 16-column blocks only, with the 8-column tail, and both; rows in pairs and odd."""
    gen = torch.Generator().manual_seed(3)
    for n in (8, 16, 24, 48, 72, 200):
        for k in (64, 192, 576):
            t = gptq_tensors(n, k, bits, group_size, False, True, seed=n + k, bias=True)
            weight = prepare(t, bits, True)
            dense = dequantize_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, torch.float64)
            for m in (1, 2, 5, 33):
                x = torch.randn(m, k, generator=gen)
                error = max_relative_error(cpu.quant_linear(x, weight), reference(t, bits, x, True, dense))
                assert error <= tolerance(weight.group_size), f"n={n} k={k} m={m}: relative error {error:.2e}"


@needs_kernels
def test_row_limit_and_input_checks():
    n, k = 24, 64
    t = gptq_tensors(n, k, 4, 32, False, True, seed=1, bias=True)
    weight = prepare(t, 4, True)
    x = torch.randn(cpu.MAX_ROWS, k)
    y = cpu.quant_linear(x, weight)  # exactly MAX_ROWS: still the kernel
    assert y is not None and max_relative_error(y, reference(t, 4, x, True)) <= tolerance(32)
    for long in (torch.randn(cpu.MAX_ROWS + 1, k), torch.randn(1, cpu.MAX_ROWS + 1, k)):  # rows over all leading dims
        # past MAX_ROWS: W dequantized in C for the call, then F.linear: the float model's values
        assert max_relative_error(cpu.quant_linear(long, weight), reference(t, 4, long, True)) <= FLOAT32_TOLERANCE
    wide = torch.randn(k, 3)  # a transposed (non-contiguous) input
    error = max_relative_error(cpu.quant_linear(wide.T, weight), reference(t, 4, wide.T, True))
    assert error <= tolerance(32)
    with pytest.raises(ValueError, match=r"must be \[\.\.\., 64\]"):
        cpu.quant_linear(torch.randn(2, 32), weight)


@needs_kernels
def test_a_rows_output_does_not_depend_on_its_batch_or_the_thread_count():
    """What lets served (batched) and generate() outputs agree: bit-identical per row."""
    t = gptq_tensors(200, 192, 4, 64, False, True, seed=2, bias=True)
    weight = prepare(t, 4, True)
    x = torch.randn(7, 192, generator=torch.Generator().manual_seed(0))
    batched = cpu.quant_linear(x, weight)
    for i in range(7):
        assert torch.equal(cpu.quant_linear(x[i : i + 1], weight)[0], batched[i]), f"row {i}"
    assert torch.equal(cpu.quant_linear(x[1:4], weight), batched[1:4])  # rows paired differently
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu.quant_linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, batched)


@needs_kernels
def test_permuted_g_idx_gets_a_row_sorted_copy():
    bits, group_size, n, k = 4, 32, 72, 192
    t = gptq_tensors(n, k, bits, group_size, False, True, seed=4, bias=True)
    assert not torch.equal(t["g_idx"], torch.arange(k, dtype=torch.int32) // group_size)  # really permuted
    weight = prepare(t, bits, True)
    assert weight.perm is not None and weight.group_size == group_size
    assert torch.equal(t["g_idx"][weight.perm], torch.arange(k, dtype=torch.int32) // group_size)  # groups contiguous
    assert torch.equal(unpack_along_rows(weight.qweight, bits, k), unpack_along_rows(t["qweight"], bits, k)[weight.perm])
    assert weight.qweight.data_ptr() != t["qweight"].data_ptr()
    x = torch.randn(3, k)
    assert max_relative_error(cpu.quant_linear(x, weight), reference(t, bits, x, True)) <= tolerance(group_size)

    static = gptq_tensors(n, k, bits, group_size, False, False, seed=4)  # trivial g_idx: the buffers as they are
    weight = prepare(static, bits, False)
    assert weight.perm is None
    for name in ("qweight", "qzeros", "scales"):
        assert getattr(weight, name).data_ptr() == static[name].data_ptr(), f"{name} was copied"


# --- the QuantLinear hook -----------------------------------------------------------------------


def quant_module(n, k, bits, group_size, act_order=False, bias=True, seed=0) -> QuantLinear:
    return QuantLinear.from_tensors(gptq_tensors(n, k, bits, group_size, False, act_order, seed, bias), bits)


def module_reference(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    t = {name: getattr(module, name) for name in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    return reference(t, module.bits, x, module.bias is not None)


UNSUPPORTED = [
    pytest.param(lambda seed: gptq_tensors(64, 96, 2, 32, False, False, seed), 2, "2-bit codes have no CPU kernel", id="2-bit"),
    pytest.param(lambda seed: gptq_tensors(64, 96, 3, 32, False, True, seed), 3, "3-bit codes have no CPU kernel", id="3-bit"),
    pytest.param(lambda seed: gptq_tensors(36, 64, 8, 32, False, False, seed, True), 8, "out_features=36 is not a multiple of 8",
                 id="n%8"),
    pytest.param(lambda seed: ragged_group_tensors(64, 96, 4, 64, seed), 4, "group_size=64 does not split in_features=96",
                 id="ragged-group"),
    pytest.param(lambda seed: gptq_tensors(64, 64, 4, 4, False, False, seed), 4, "group_size=4 does not split in_features=64",
                 id="group<word"),
]  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("make,bits,reason", UNSUPPORTED)
def test_unsupported_layers_fall_back_and_log_once(make, bits, reason, caplog):
    first, second = (QuantLinear.from_tensors(make(seed), bits) for seed in (0, 1))  # same shape, other values
    x = torch.randn(3, first.in_features)
    with pytest.raises(Unsupported, match=reason):
        prepare(make(0), bits, False)
    with caplog.at_level(logging.DEBUG, logger="compressor.kernels.cpu"):
        for module in (first, second):
            assert cpu.quant_linear_forward(module, x) is None
            assert cpu.prepared_weight(module) is None
            y = module(x)  # the hook declines: dequantize + F.linear
            assert max_relative_error(y, module_reference(module, x)) <= FLOAT32_TOLERANCE
            assert module._dequantized is None  # the fallback keeps no float weight
    records = [r for r in caplog.records if r.name == "compressor.kernels.cpu"]
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and reason in messages[0] and "using dequantize + F.linear" in messages[0], messages
    assert records[0].levelno == logging.WARNING


@needs_kernels
def test_each_reason_is_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="compressor.kernels.cpu"):
        for _ in range(2):
            for bits in (2, 3):
                module = quant_module(64, 96, bits, 32, seed=bits)
                assert cpu.quant_linear_forward(module, torch.randn(1, 96)) is None
    messages = [r.getMessage() for r in caplog.records if r.name == "compressor.kernels.cpu"]
    assert len(messages) == 2 and "2-bit" in messages[0] and "3-bit" in messages[1], messages


@needs_kernels
def test_long_inputs_run_on_a_dequantized_weight():
    """Past MAX_ROWS the C dequantization + F.linear: for static groups bitwise the float model's
    F.linear (same values, same layout), for act-order the same up to summation order."""
    x = torch.randn(cpu.MAX_ROWS + 1, 64)
    for act_order in (False, True):
        module = quant_module(24, 64, 4, 32, act_order=act_order)
        out = cpu.quant_linear_forward(module, x)
        expected = F.linear(x, dequantize_gptq_v1(module.qweight, module.qzeros, module.scales, module.g_idx, 4, torch.float32),
                            None if module.bias is None else module.bias.float())  # fmt: skip
        if act_order:
            assert max_relative_error(out, expected) <= FLOAT32_TOLERANCE
        else:
            assert torch.equal(out, expected)


@needs_kernels
@pytest.mark.parametrize("value", ["0", "false", "off", "no"])
def test_kernels_can_be_switched_off(monkeypatch, value):
    module = quant_module(72, 128, 4, 32, act_order=True)
    x = torch.randn(2, 128)
    assert cpu.available() and cpu.quant_linear_forward(module, x) is not None
    monkeypatch.setenv("COMPRESSOR_CPU_KERNELS", value)
    assert not cpu.enabled() and not cpu.available()
    assert cpu.quant_linear_forward(module, x) is None
    assert max_relative_error(module(x), module_reference(module, x)) <= FLOAT32_TOLERANCE
    head = Float16Linear(torch.randn(40, 64), None, torch.float32)
    calls = []
    monkeypatch.setattr(cpu, "half_linear", lambda *args: calls.append(args))
    head(torch.randn(2, 64))
    assert calls == []  # Float16Linear does not ask the kernel either


@needs_kernels
def test_prepared_weight_is_cached_until_the_buffers_change():
    module = quant_module(72, 192, 4, 64, act_order=True, bias=False, seed=3)
    x = torch.randn(3, 192)
    first = cpu.cpu_weight(module)
    assert first is not None and cpu.cpu_weight(module) is first
    y = module(x)
    assert cpu.prepared_weight(module) is first and module._dequantized is None  # the forward ran on the kernel
    assert torch.equal(y, cpu.quant_linear(x, first))
    assert max_relative_error(y, module_reference(module, x)) <= tolerance(64)

    module.qweight = module.qweight.clone()  # replaced (what .to() does)
    second = cpu.cpu_weight(module)
    assert second is not first and torch.equal(module(x), y)

    module.qweight.bitwise_xor_(0x11111111)  # in place: every code changes, and the kernel reads a sorted copy (act-order)
    changed = module(x)
    assert cpu.prepared_weight(module) is not second
    assert max_relative_error(changed, module_reference(module, x)) <= tolerance(64) and not torch.allclose(changed, y)

    before = cpu.prepared_weight(module)
    module.scales.mul_(2)  # in place: the version counter moves
    doubled = module(x)
    assert cpu.prepared_weight(module) is not before
    assert torch.equal(doubled, 2 * changed)  # power-of-two scales: exact

    before = cpu.prepared_weight(module)
    module.g_idx = module.g_idx.clone()
    assert cpu.cpu_weight(module) is not before and torch.equal(module(x), doubled)


@needs_kernels
def test_bias_changes_reach_the_kernel():
    module = quant_module(24, 64, 8, 32, bias=True, seed=5)
    x = torch.randn(2, 64)
    y, old = module(x), module.bias.float()
    module.bias.add_(1)  # the kernel holds a float32 copy: it must be made again
    shifted = module(x)
    assert max_relative_error(shifted, module_reference(module, x)) <= tolerance(32)
    torch.testing.assert_close(shifted - y, (module.bias.float() - old).expand_as(y), rtol=0, atol=1e-5)
    module.bias = module.bias.clone() * 0
    assert max_relative_error(module(x), module_reference(module, x)) <= tolerance(32)


# --- float16 weights: half_linear, Float16Linear, Float16Embedding --------------------------------


def half_reference(x, weight, bias=None):
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


@needs_kernels
def test_half_linear_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    for n, k in ((1, 8), (5, 64), (13, 136), (130, 200), (4, 576)):  # n % 4: the narrow last tile
        weight = torch.randn(n, k, generator=gen).half()
        for m in (1, 2, 3, 7, 64):
            bias = torch.randn(n, generator=gen) if m % 2 else None
            shape = (4, 16, k) if m == 64 else (m, k)
            x = torch.randn(shape, generator=gen)
            y = cpu.half_linear(x, weight, bias)
            assert y is not None and y.dtype == torch.float32 and y.shape == shape[:-1] + (n,)
            error = max_relative_error(y, half_reference(x, weight, bias))
            assert error <= FLOAT32_TOLERANCE, f"n={n} k={k} m={m}: relative error {error:.2e}"
    x = torch.randn(3, 200, generator=gen).to(torch.bfloat16)
    weight, bias = torch.randn(13, 200, generator=gen).half(), torch.randn(13, generator=gen)
    check_bfloat16(cpu.half_linear(x, weight, bias), half_reference(x, weight, bias), 1)


@needs_kernels
def test_half_linear_declines_and_refuses():
    weight = torch.randn(8, 12).half()
    assert cpu.half_linear(torch.randn(2, 12), weight) is None  # K % 8 != 0
    weight = torch.randn(8, 16).half()
    assert cpu.half_linear(torch.randn(cpu.MAX_ROWS + 1, 16), weight) is None
    assert cpu.half_linear(torch.randn(cpu.MAX_ROWS, 16), weight) is not None
    with pytest.raises(ValueError, match="float16"):
        cpu.half_linear(torch.randn(2, 16), weight.float())
    with pytest.raises(ValueError, match="contiguous"):
        cpu.half_linear(torch.randn(2, 8), torch.randn(8, 16).half()[:, :8])
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        cpu.half_linear(torch.randn(2, 8), weight)


@needs_kernels
def test_float16_linear_uses_the_kernel_then_chunked_gemm(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(37, 64, generator=gen), torch.randn(37, generator=gen)
    layer = Float16Linear(weight, bias, torch.float32)
    assert layer.weight.dtype == torch.float16 and layer.bias.dtype == torch.float32 and not list(layer.parameters())
    results = []
    half_linear = cpu.half_linear
    monkeypatch.setattr(cpu, "half_linear", lambda *args: results.append(half_linear(*args)) or results[-1])
    monkeypatch.setattr(half_weights, "_CHUNK_ELEMENTS", 10 * 64)  # 10 rows of W per chunk: 4 chunks, the last of 7
    for m in (3, cpu.MAX_ROWS, cpu.MAX_ROWS + 1):
        x = torch.randn(1, m, 64, generator=gen)
        y = layer(x)
        assert y.shape == (1, m, 37) and y.dtype == torch.float32
        assert max_relative_error(y, half_reference(x, layer.weight, bias)) <= FLOAT32_TOLERANCE, m
        assert (results[-1] is None) == (m > cpu.MAX_ROWS)
    odd = Float16Linear(torch.randn(37, 60, generator=gen), None, torch.float32)  # K % 8: the GEMM path at any M
    x = torch.randn(2, 60, generator=gen)
    assert max_relative_error(odd(x), half_reference(x, odd.weight)) <= FLOAT32_TOLERANCE
    assert results[-1] is None


def test_float16_embedding_returns_the_model_dtype():
    weight = torch.randn(50, 16)
    for dtype in (torch.float32, torch.bfloat16):
        embedding = Float16Embedding(weight, dtype, padding_idx=0)
        assert embedding.weight.dtype == torch.float16 and not list(embedding.parameters())
        ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
        out = embedding(ids)
        assert out.dtype == dtype and out.shape == (2, 3, 16)
        assert torch.equal(out, weight.half()[ids].to(dtype))


# --- the library ---------------------------------------------------------------------------------


@needs_kernels
def test_library_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_KERNEL_CACHE", str(tmp_path))
    library = build.build_cpu_library()
    assert library.is_file() and library.parent.parent == tmp_path and library.name == build.CPU_LIBRARY_NAME
    stamp = library.stat().st_mtime_ns
    assert build.build_cpu_library() == library and library.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not list(tmp_path.rglob("*.tmp"))
    lib = ctypes.CDLL(str(library))
    assert hasattr(lib, "cq_cpu_quant_linear") and hasattr(lib, "cq_cpu_half_linear")


@needs_cc
def test_c_source_compiles_without_warnings(tmp_path):
    assert sorted(build.CPU_SOURCES) == sorted(p.name for p in build.KERNEL_DIR.glob("*.c"))
    cmd = [build.find_cc(), *build.CPU_FLAGS, "-Wall", "-Wextra", "-Werror",
           *(str(build.KERNEL_DIR / s) for s in build.CPU_SOURCES), "-o", str(tmp_path / "lib.so")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]


# --- runtime.load on CPU -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, smollm2_tokenizer):
    return write_tiny_gptq_artifact(tmp_path_factory.mktemp("cpu-kernels") / "tiny-w4g32", smollm2_tokenizer)


@needs_kernels
def test_load_keeps_float16_embeddings_and_matches_the_float_model(tiny_artifact):
    model = runtime.load(tiny_artifact)
    float_model = runtime.load(tiny_artifact, cache_dequantized=True)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, Float16Embedding) and isinstance(head, Float16Linear)
    assert embedding.weight.dtype == torch.float16 and head.weight is embedding.weight  # tied: one tensor
    assert next(model.parameters()).dtype == torch.float32
    float_embedding = float_model.get_input_embeddings()
    assert type(float_embedding) is nn.Embedding and float_embedding.weight.dtype == torch.float32
    assert float_model.get_output_embeddings().weight is float_embedding.weight
    assert torch.equal(embedding.weight.float(), float_embedding.weight)  # the artifact's values, unchanged
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all("_cpu_fused" in m.__dict__ or cpu.prepared_weight(m) is not None for m in layers)

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in ((2, 12), (2, cpu.MAX_ROWS // 2 + 20)):  # kernels; past MAX_ROWS rows: the fallbacks
            ids = torch.randint(3, 49152, shape, generator=gen)
            logits, expected = model(ids).logits, float_model(ids).logits
            assert logits.dtype == torch.float32
            assert max_relative_error(logits, expected) <= 2e-5, shape  # measured 4e-6: the kernels sum in another order
        prompt = torch.randint(3, 49152, (1, 6), generator=gen)
        tokens = model.generate(prompt, max_new_tokens=10, do_sample=False)
        assert torch.equal(tokens, float_model.generate(prompt, max_new_tokens=10, do_sample=False))
    assert all(m._dequantized is None for m in layers)  # nothing float kept by the default load

    default, cached = runtime.memory_bytes(model), runtime.memory_bytes(float_model)
    dequantized = sum(m.in_features * m.out_features * 4 for m in layers)
    assert default["total"] < cached["total"]
    assert cached["total"] - default["total"] >= embedding.weight.numel() * 2 + dequantized  # fp32 embedding + float W
    for estimate, held in ((runtime.memory_estimate(tiny_artifact), default),
                           (runtime.memory_estimate(tiny_artifact, cache_dequantized=True), cached)):  # fmt: skip
        assert estimate["packed"] == held["packed"]
        assert abs(estimate["float"] - held["float"]) <= 1024  # the estimate misses RoPE's inv_freq buffers


@needs_kernels
def test_load_without_kernels_keeps_float32_embeddings(tiny_artifact, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CPU_KERNELS", "0")
    model = runtime.load(tiny_artifact)
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert model.get_input_embeddings().weight.dtype == torch.float32


@needs_kernels
def test_fused_layers_follow_their_buffers(tiny_artifact):
    """runtime.load runs q/k/v (and gate/up) as one kernel call; each member still answers for its own buffers."""
    model = runtime.load(tiny_artifact)
    attention = model.get_submodule("model.layers.0.self_attn")
    q_proj, k_proj = attention.q_proj, attention.k_proj
    assert "_cpu_fused" in q_proj.__dict__ and "_cpu_fused" in k_proj.__dict__
    x = torch.randn(1, 3, q_proj.in_features)
    y = q_proj(x)
    assert max_relative_error(y, module_reference(q_proj, x)) <= tolerance(32)
    assert max_relative_error(k_proj(x), module_reference(k_proj, x)) <= tolerance(32)  # the output q_proj's call kept
    q_proj.scales.mul_(2)  # in place on the fused storage
    assert torch.equal(q_proj(x), 2 * y)
    q_proj.qweight = q_proj.qweight.clone()  # replaced: q_proj stands alone again
    assert torch.equal(q_proj(x), 2 * y) and "_cpu_fused" not in q_proj.__dict__
    assert max_relative_error(k_proj(x), module_reference(k_proj, x)) <= tolerance(32)


@needs_kernels
def test_fused_layer_with_replaced_scales_uses_them(tiny_artifact):
    model = runtime.load(tiny_artifact)
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(1, 3, q_proj.in_features)
    q_proj.scales = q_proj.scales * 2  # a new tensor, qweight untouched
    assert max_relative_error(q_proj(x), module_reference(q_proj, x)) <= tolerance(32)


# --- the real SmolLM2 (slow) -------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import psutil, torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # imports are not the model's memory
    from compressor import runtime
    from compressor.kernels import build, cpu
    build.load_cpu_library()
    process = psutil.Process()
    before = process.memory_info().rss
    model = runtime.load(sys.argv[1])
    loaded = process.memory_info().rss
    with torch.inference_mode():
        model(torch.arange(1, 17)[None])
    after = process.memory_info().rss
    print(json.dumps({"before": before, "loaded": loaded - before, "growth": after - before,
                      "held": runtime.memory_bytes(model)["total"], "available": cpu.available()}))
    """
)


@pytest.mark.slow
@needs_kernels
def test_smollm2_load_and_forward_stay_near_the_artifact_size(tmp_path, smollm2_tokenizer):
    """Built like tests/test_onnx.py's SmolLM2 artifact (RTN, 4-bit, group 64, sym: the shipped recipe's layout)."""
    from compressor.algorithms.quant import rtn_quantize
    from compressor.export.gptq import gptq_quantization_config, write_gptq_checkpoint
    from compressor.models import load_model, resolve_source

    model = load_model(resolve_source("smollm2-135m"), torch.float32)
    quantized = {
        name: rtn_quantize(module.weight.detach(), 4, 64, sym=True)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    }
    artifact = tmp_path / "smollm2-w4g64"
    artifact.mkdir()
    write_gptq_checkpoint(artifact, model, quantized, gptq_quantization_config(4, 64, True, False, True, 0.01, True), smollm2_tokenizer)
    del model, quantized
    weights = sum(p.stat().st_size for p in artifact.glob("*.safetensors"))

    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(artifact)], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        pytest.fail(f"the measuring interpreter failed:\n{result.stderr[-4000:]}")
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"safetensors {weights / 1e6:.1f} MB; RSS +{rss['loaded'] / 1e6:.1f} MB after load, +{rss['growth'] / 1e6:.1f} MB "
          f"after one forward ({rss['growth'] / weights:.2f}x); memory_bytes {rss['held'] / 1e6:.1f} MB")  # fmt: skip
    if not rss["available"]:
        pytest.fail("the CPU kernels were not available in the measuring interpreter")
    assert rss["growth"] < 1.3 * weights


def test_hooks_still_run_on_quant_linear():
    """QuantLinear skips nn.Module's hook dispatch only while no hook is registered."""
    module = quant_module(24, 64, 4, 32, act_order=False)
    x = torch.randn(2, 64)
    seen = []
    handle = module.register_forward_hook(lambda m, inputs, output: seen.append(output.shape))
    module(x)
    handle.remove()
    module(x)
    assert seen == [torch.Size([2, 24])]
    global_handle = torch.nn.modules.module.register_module_forward_hook(lambda m, inputs, output: seen.append("global"))
    try:
        module(x)
    finally:
        global_handle.remove()
    assert seen[-1] == "global"
