"""CUDA dequant-GEMM kernels (compressor.kernels).

Always run: the load-time repack against dequantize_gptq_v1 through an emulator that reads the
tile layout the way the kernels do; the fp16/fp32 bit tricks the kernels use; the split plans;
the QuantLinear hook's caching and fallbacks. Where nvcc exists: every .cu compiles for sm_80 and
sm_90 with warnings as errors, and the shared library builds and exports its launchers. With a
GPU: kernel outputs against an fp32 reference on fresh random inputs and poisoned outputs.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compressor.kernels import build, ops
from compressor.kernels.repack import (
    PackedLinear,
    Unsupported,
    dequantize_packed,
    emulate_linear,
    repack_gptq_v1,
    tile_k,
)

from compressor.algorithms.quant import rtn_quantize
from compressor.packing import pack_gptq_v1
from compressor.runtime import QuantLinear, dequantize_gptq_v1
from compressor.runtime.quant_linear import _KERNELS

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU with compute capability >= 8.0")
needs_nvcc = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found")


def gptq_tensors(n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool, seed: int, bias: bool = False) -> dict:
    """GPTQ v1 tensors of a random [n, k] weight (act-order: groups over a random column order)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    if act_order:
        perm = torch.randperm(k, generator=gen)
        qw = rtn_quantize(weight[:, perm], bits, group_size, sym)
        inverse = torch.argsort(perm)
        qw.codes, qw.g_idx = qw.codes[:, inverse].contiguous(), qw.g_idx[inverse].contiguous()
    else:
        qw = rtn_quantize(weight, bits, group_size, sym)
    return pack_gptq_v1(qw, torch.randn(n, generator=gen) if bias else None)


def reference_weight(t: dict, bits: int, dtype=torch.float32) -> torch.Tensor:
    """[N, K], from the GPTQ tensors in their stored (unsorted) order."""
    return dequantize_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, dtype)


def repack(t: dict, bits: int) -> PackedLinear:
    return repack_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)


# --- repack + emulator (CPU, always) ---------------------------------------------------------

LAYOUT_CASES = [
    (bits, gs, sym, act)
    for bits in (4, 8)
    for gs in (32, 64, 128, -1)
    for sym in (True, False)
    for act in (False, True)
]


@pytest.mark.parametrize("bits,group_size,sym,act_order", LAYOUT_CASES)
def test_repacked_layout_dequantizes_exactly(bits, group_size, sym, act_order):
    n, k = 200, 384  # n pads to 224 (7 column tiles); k = 3 groups of 128, 12 of 32
    t = gptq_tensors(n, k, bits, group_size, sym, act_order, seed=bits * 100 + group_size)
    packed = repack(t, bits)
    assert packed.words.shape == (224 // 32, k // tile_k(bits), 32, 4) and packed.words.dtype == torch.int32
    assert (packed.perm is not None) == (act_order and group_size != -1)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        expected = reference_weight(t, bits, dtype).T  # [K, N]
        if packed.perm is not None:
            expected = expected[packed.perm.long()]
        assert torch.equal(dequantize_packed(packed, dtype), expected)


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, True)])
def test_emulated_kernel_matches_dequantize_then_matmul(bits, act_order):
    n, k = 136, 256
    t = gptq_tensors(n, k, bits, 64, sym=False, act_order=act_order, seed=7, bias=True)
    x = torch.randn(5, 3, k, dtype=torch.float64).float()
    expected = F.linear(x.double(), reference_weight(t, bits).double(), t["bias"].double()).float()
    actual = emulate_linear(x, repack(t, bits), t["bias"])
    assert actual.shape == (5, 3, n)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def test_unsupported_layers_are_refused_with_a_reason():
    for bits in (2, 3):
        with pytest.raises(Unsupported, match=f"{bits}-bit codes have no kernel"):
            repack(gptq_tensors(64, 96, bits, 32, True, False, seed=0), bits)
    with pytest.raises(Unsupported, match="group_size=16"):
        repack(gptq_tensors(64, 128, 4, 16, True, False, seed=0), 4)
    with pytest.raises(Unsupported, match="in_features=48"):
        repack(gptq_tensors(64, 48, 4, -1, True, False, seed=0), 4)
    t = gptq_tensors(64, 128, 4, 32, True, False, seed=0)
    t["g_idx"] = torch.tensor([0] * 32 + [1] * 40 + [2] * 24 + [3] * 32, dtype=torch.int32)  # unequal groups
    with pytest.raises(Unsupported, match="g_idx does not split"):
        repack(t, 4)


def _half(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def test_fp16_magic_number_conversion_is_exact():
    """The arithmetic of common.h's dequant_word_half, replayed in numpy fp16 for every code and zero."""
    codes = np.arange(256, dtype=np.uint32)
    for bits, zero_range in ((4, range(1, 17)), (8, range(1, 257))):
        q = codes[: 2**bits]
        low = ((q & 0xF if bits == 4 else q) | 0x6400).astype(np.uint16).view(np.float16)  # (w & mask) | 0x6400
        high = (((q << 4) & 0xF0) | 0x6400).astype(np.uint16).view(np.float16)  # code in bits 4..7 (4-bit only)
        scale = np.float16(0.0137)
        for zero in zero_range:
            z = np.float16(zero)
            expected = ((q.astype(np.float32) - zero) * np.float32(scale)).astype(np.float16)
            z1024 = np.float16(z + np.float16(_half(0x6400)))
            got_low = (low - z1024) * scale
            assert np.array_equal(got_low.astype(np.float16), expected)
            if bits == 4:
                z64 = np.float16(z + np.float16(_half(0x5400)))
                # HFMA2 rounds once; float64 fma of exact fp16 inputs then one cast is that rounding
                fused = (high.astype(np.float64) * _half(0x2C00) - np.float64(z64)).astype(np.float16)
                assert np.array_equal((fused * scale).astype(np.float16), expected)
    floats = (np.uint32(0x4B000000) | codes).view(np.float32) - np.float32(8388608.0)  # code_to_float
    assert np.array_equal(floats, codes.astype(np.float32))


def test_split_plans_cover_k_and_fill_the_device():
    for n_tiles, k_tiles in ((128, 128), (344, 128), (128, 344), (128, 448), (6, 18), (1, 4)):
        splits = ops.gemv_splits(n_tiles, k_tiles, sm_count=132)
        per_split = -(-k_tiles // splits)
        assert 1 <= splits <= k_tiles and per_split <= 32 and splits * per_split >= k_tiles
        assert n_tiles * splits >= 4 * 132 or per_split <= 4
    for n_blocks, k_tiles, stage in ((32, 128, 4), (86, 344, 4), (2, 18, 4), (32, 256, 8)):
        splits = ops.mma_splits(n_blocks, 1, k_tiles, sm_count=132, stage_tiles=stage)
        assert 1 <= splits and -(-k_tiles // splits) >= min(stage, k_tiles)
        assert n_blocks * splits >= 2 * 132 or -(-k_tiles // splits) <= stage
    assert ops.gemv_splits(128, 128, 132) > 1  # 4096 x 4096 is split


# --- the QuantLinear hook (CPU parts) --------------------------------------------------------


def quant_linear(n, k, bits, group_size, act_order=False, bias=True, seed=0) -> QuantLinear:
    return QuantLinear.from_tensors(gptq_tensors(n, k, bits, group_size, False, act_order, seed, bias), bits)


def test_cuda_hook_is_registered_without_building_anything():
    code = (
        "import compressor.runtime, compressor.kernels.ops, compressor.kernels.build as b;"
        "from compressor.runtime.quant_linear import _KERNELS;"
        "assert 'cuda' in _KERNELS; assert b.load_library.cache_info().currsize == 0; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert "cuda" in _KERNELS


def test_packed_weight_is_cached_until_the_buffers_change(caplog):
    module = quant_linear(64, 128, 4, 32, act_order=True)
    packed = ops.packed_weight(module)
    assert packed is not None and ops.packed_weight(module) is packed
    x = torch.randn(3, 128)
    torch.testing.assert_close(emulate_linear(x, packed, module.bias.float()), module(x), rtol=1e-5, atol=1e-4)
    module.scales.mul_(2)  # in place: the version counter moves
    assert ops.packed_weight(module) is not packed
    module.qweight = module.qweight.clone()  # a new buffer (what .to() does)
    assert ops.packed_weight(module).words.data_ptr() != packed.words.data_ptr()

    three_bit = quant_linear(64, 96, 3, 32)
    with caplog.at_level(logging.WARNING, logger="compressor.kernels.ops"):
        assert ops.packed_weight(three_bit) is None
        ops.packed_weight(quant_linear(64, 96, 3, 32, seed=1))  # same reason: not logged twice
    assert sum("3-bit codes have no kernel" in r.message for r in caplog.records) == 1


def test_disabled_kernels_and_float32_inputs_fall_back(monkeypatch):
    module = quant_linear(64, 128, 4, 32)
    monkeypatch.setenv("COMPRESSOR_CUDA_KERNELS", "0")
    assert ops.quant_linear_forward(module, torch.randn(2, 128, dtype=torch.float16)) is None
    monkeypatch.delenv("COMPRESSOR_CUDA_KERNELS")
    assert ops.quant_linear_forward(module, torch.randn(2, 128)) is None  # fp32 activations


# --- nvcc (wherever nvcc is present) ---------------------------------------------------------


def _compile(source: str, tmp_path) -> subprocess.CompletedProcess:
    nvcc = build.find_nvcc()
    cmd = build.nvcc_command(
        nvcc, [str(build.KERNEL_DIR / source)], str(tmp_path / (source + ".o")), ("80", "90"), shared=False,
        extra=("-Werror", "all-warnings", "-Xptxas", "-Werror"),
    )  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


@needs_nvcc
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    sources = build.SOURCES
    assert sorted(sources) == sorted(p.name for p in build.KERNEL_DIR.glob("*.cu"))  # no .cu left out of the build
    with ThreadPoolExecutor(len(sources)) as pool:
        results = list(pool.map(lambda s: _compile(s, tmp_path), sources))
    for source, result in zip(sources, results):
        assert result.returncode == 0, f"{source}:\n{result.stderr[-4000:]}"
        assert "error" not in result.stderr.lower(), result.stderr[-4000:]


@needs_nvcc
def test_library_builds_once_and_exports_the_launchers(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("COMPRESSOR_CUDA_ARCHS", "80")  # one arch keeps this quick; the test above covers 90
    library = build.build_library()
    assert library.is_file() and library.parent.parent == tmp_path
    stamp = library.stat().st_mtime_ns
    assert build.build_library() == library and library.stat().st_mtime_ns == stamp  # cached, not rebuilt
    lib = ctypes.CDLL(str(library))  # loading needs no GPU: the CUDA runtime initializes lazily
    for name in ("cq_gemv", "cq_mma", "cq_error_string"):
        assert hasattr(lib, name)
    lib.cq_error_string.restype = ctypes.c_char_p
    lib.cq_error_string.argtypes = [ctypes.c_int]
    assert lib.cq_error_string(1)  # cudaErrorInvalidValue has a message
    assert not list(tmp_path.rglob("*.tmp"))


# --- GPU correctness (skipped without a GPU) -------------------------------------------------

GPU_SHAPES = [(264, 1024), (4104, 128)]  # split-K over a few column tiles; many tiles, no split
GPU_CASES = [
    (bits, gs, sym, act)
    for bits in (4, 8)
    for gs in (32, 64, 128, -1)
    for sym in (True, False)
    for act in (False, True)
    if not (act and gs == -1)
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@needs_gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size,sym,act_order", GPU_CASES)
def test_kernel_matches_fp32_reference(bits, group_size, sym, act_order, dtype, n, k):
    seed = hash((bits, group_size, sym, act_order, n)) % 2**31
    t = gptq_tensors(n, k, bits, group_size, sym, act_order, seed=seed, bias=True)
    packed = repack({name: v.cuda() for name, v in t.items()}, bits)
    weight = reference_weight(t, bits).cuda().T  # fp32 [K, N] in the stored order: independent of the repack
    tolerance = 1e-3 if dtype == torch.float16 else 8e-3  # bf16 output rounding alone is ~1e-3
    for m in (1, 3, 8, 16, 33, 128):  # GEMV at M <= 8, tensor cores above, 128 = two 64-row blocks
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m)).to("cuda", dtype)  # fresh inputs
        bias = t["bias"].to("cuda", dtype) if m % 2 else None
        expected = x.float() @ weight + (0 if bias is None else bias.float())
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")  # poisoned: every element must be written
        for _ in range(2):  # the second call reuses the split-K counters the first left at zero
            y = ops.linear(x, packed, bias, out=out)
            torch.cuda.synchronize()
            assert y.data_ptr() == out.data_ptr()
            assert torch.isfinite(y).all(), f"m={m}: NaN/inf in the output"
            error = relative_error(y, expected)
            assert error <= tolerance, f"m={m}: relative error {error:.2e} > {tolerance:.0e}"
            out.fill_(float("nan"))


@needs_gpu
@pytest.mark.parametrize("bits,act_order", [(4, True), (8, False)])
def test_gpu_repack_equals_cpu_reference(bits, act_order):
    t = gptq_tensors(200, 512, bits, 128, False, act_order, seed=3)
    cpu, gpu = repack(t, bits), repack({name: v.cuda() for name, v in t.items()}, bits)
    assert gpu.device.type == "cuda"
    for field in ("words", "scale_zero", "perm"):
        a, b = getattr(cpu, field), getattr(gpu, field)
        assert (a is None and b is None) or torch.equal(a, b.cpu())
    assert (cpu.bits, cpu.in_features, cpu.out_features, cpu.group_tiles) == (gpu.bits, gpu.in_features, gpu.out_features, gpu.group_tiles)


@needs_gpu
def test_quant_linear_on_cuda_runs_the_kernels_and_falls_back_for_3_bit():
    for bits, expect_kernel in ((4, True), (8, True), (3, False)):
        module = quant_linear(160, 192, bits, 32, act_order=True).cuda()
        x = torch.randn(2, 5, 192, device="cuda", dtype=torch.float16)
        expected = x.float() @ module.dequantized_weight(torch.float32).T + module.bias.float()
        module._dequantized = None
        y = module(x)
        assert y.shape == (2, 5, 160) and torch.isfinite(y).all()
        assert relative_error(y, expected) <= 1e-3
        assert (getattr(module, "_cuda_packed", (None, None))[1] is not None) == expect_kernel
        assert (module._dequantized is None) == expect_kernel  # the kernel path keeps no fp16 weight


@needs_gpu
def test_long_prefill_uses_an_uncached_dequantized_weight():
    module = quant_linear(64, 128, 4, 32).cuda()
    x = torch.randn(ops.KERNEL_MAX_M + 1, 128, device="cuda", dtype=torch.float16)
    expected = x.float() @ module.dequantized_weight(torch.float32).T + module.bias.float()
    module._dequantized = None
    y = module(x)
    assert relative_error(y, expected) <= 1e-3 and module._dequantized is None


@needs_gpu
def test_runtime_load_on_cuda_uses_the_kernels(tmp_path, monkeypatch):
    from conftest import make_tiny_llama

    from compressor import runtime
    from compressor.export.gptq import gptq_quantization_config, write_gptq_checkpoint

    model = make_tiny_llama()
    quantized = {}
    for name, linear in model.named_modules():
        if isinstance(linear, torch.nn.Linear) and ".layers." in name:
            quantized[name] = rtn_quantize(linear.weight, 4, 32, False)
    path = tmp_path / "ckpt"
    path.mkdir()
    write_gptq_checkpoint(path, model, quantized, gptq_quantization_config(4, 32, False, False, False, 0.01, True))
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()

    loaded = runtime.load(path, device="cuda")
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(getattr(m, "_cuda_packed", (None, None))[1] is not None for m in layers)
    logits = loaded(ids).logits.float()
    monkeypatch.setenv("COMPRESSOR_CUDA_KERNELS", "0")
    fallback = runtime.load(path, device="cuda")(ids).logits.float()
    assert relative_error(logits, fallback) <= 1e-2  # fp16 end to end through 2 layers
