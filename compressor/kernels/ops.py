"""Torch-facing entry points: y = x @ dequant(W) + b on CUDA, and the QuantLinear hook.

`linear` picks the kernel by M (rows of x after flattening the leading dims): the GEMV for
M <= GEMV_MAX_M, the tensor-core kernel above, and for M > KERNEL_MAX_M (long prefills, where a
cuBLAS GEMM on a freshly dequantized weight should win and the dequant is a small share; the
threshold is a guess until measured) it returns None so the caller dequantizes. `quant_linear_forward` is what QuantLinear runs for CUDA
inputs: it repacks the layer once (cached on the module, keyed by its buffers), and returns None
(the caller's dequantize + F.linear, i.e. fp16 cuBLAS) for anything the kernels do not cover,
logging each reason once.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch
from compressor.kernels import build
from compressor.packing import dequantize_gptq_v1
from compressor.kernels.repack import (
    TILE_N,
    PackedLinear,
    Unsupported,
    repack_gptq_v1,
    tile_k,
)

log = logging.getLogger(__name__)

GEMV_MAX_M = 8
KERNEL_MAX_M = 1024
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_MMA_BLOCK_N = 4 * TILE_N  # columns per tensor-core block (4 warps)
_MMA_MIN_BLOCK_M = 16
_GEMV_MAX_SPLIT_TILES = 32  # kGemvMaxSplitTiles in gemv.cu


def gemv_splits(n_tiles: int, k_tiles: int, sm_count: int) -> int:
    """K splits for the GEMV: the largest K range per block (<= 32 tiles, at most 16 tiles of
    shorter ranges tried) that still gives ~4 blocks per SM, so loads stay in flight everywhere."""
    target = 4 * sm_count
    for tiles in (_GEMV_MAX_SPLIT_TILES, 16, 8, 4):
        splits = -(-k_tiles // tiles)
        if n_tiles * splits >= target:
            return splits
    return -(-k_tiles // 4)


def mma_splits(n_blocks: int, m_blocks: int, k_tiles: int, sm_count: int, stage_tiles: int) -> int:
    """K splits for the tensor-core kernel: ~2 blocks per SM, never less than one stage per split."""
    target = 2 * sm_count
    tiles = max(stage_tiles, 64)
    while tiles > stage_tiles and n_blocks * m_blocks * -(-k_tiles // tiles) < target:
        tiles //= 2
    return -(-k_tiles // max(tiles, stage_tiles))


def _mma_block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


_counter_lock = threading.Lock()
_counters: dict[tuple[int, int], torch.Tensor] = {}


def _split_counters(device: torch.device, stream: int, size: int) -> torch.Tensor:
    """Zeroed int32 tile counters for the split-K fix-up, one buffer per (device, stream).

    The kernels leave them zero, so they are allocated once; per stream because two launches in
    flight on different streams must not count into the same tile.
    """
    key = (device.index, stream)
    with _counter_lock:
        buf = _counters.get(key)
        if buf is None or buf.numel() < size:
            buf = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
            _counters[key] = buf
    return buf


@functools.cache
def _device_info(index: int) -> tuple[tuple[int, int], int, str]:
    """(compute capability, SM count, name) of CUDA device `index`, looked up once."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count, props.name


def _sm_count(device: torch.device) -> int:
    return _device_info(_index(device))[1]


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def linear(
    x: torch.Tensor, packed: PackedLinear, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x [..., K] (fp16/bf16, CUDA) @ W + bias -> [..., N] (into `out`, contiguous [M, N], when given);
    None when M > KERNEL_MAX_M (the caller dequantizes)."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x has {x.shape[-1]} features; the layer takes {packed.in_features}")
    # The kernels dereference every pointer on x's GPU: a weight or bias elsewhere (or a short bias) is an illegal access.
    if x.device.type != "cuda" or packed.device != x.device:
        raise ValueError(f"x ({x.device}) and the packed weight ({packed.device}) must be on the same CUDA device")
    if bias is not None and (bias.device != x.device or bias.numel() != packed.out_features):
        raise ValueError(f"bias must have {packed.out_features} elements on {x.device}, got {bias.numel()} on {bias.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features)
    m, n, k = x2.shape[0], packed.out_features, packed.in_features
    if m > KERNEL_MAX_M:
        return None
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device or out.data_ptr() % 16:
        raise ValueError(f"out must be a contiguous, 16-byte aligned {x.dtype} [{m}, {n}] tensor on {x.device}")
    if m == 0:
        return out.view(*lead, n)
    x2 = x2.contiguous()
    if x2.data_ptr() % 16:  # the kernels read x in 16-byte vectors
        x2 = x2.clone()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()

    lib = build.load_library()
    n_tiles, k_tiles = packed.n_pad // TILE_N, k // tile_k(packed.bits)
    sm = _sm_count(x.device)
    if m <= GEMV_MAX_M:
        launcher = lib.cq_gemv
        splits = gemv_splits(n_tiles, k_tiles, sm)
        counters_needed = n_tiles
    else:
        launcher = lib.cq_mma
        n_blocks, m_blocks = -(-packed.n_pad // _MMA_BLOCK_N), -(-m // _mma_block_m(m))
        splits = mma_splits(n_blocks, m_blocks, k_tiles, sm, stage_tiles=128 // tile_k(packed.bits))
        counters_needed = n_blocks * -(-m // _MMA_MIN_BLOCK_M)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    workspace = torch.empty(splits * m * packed.n_pad if splits > 1 else 1, dtype=torch.float32, device=x.device)
    counters = _split_counters(x.device, stream, counters_needed)
    with torch.cuda.device(x.device):
        code = launcher(
            x2.data_ptr(), None if packed.perm is None else packed.perm.data_ptr(), packed.words.data_ptr(), packed.scale_zero.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), workspace.data_ptr(), counters.data_ptr(),
            m, n, packed.n_pad, k, packed.bits, packed.group_tiles, splits, _DTYPES[x.dtype], stream,
        )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"{launcher.__name__} failed: {lib.cq_error_string(code).decode()} (m={m}, n={n}, k={k}, bits={packed.bits})")
    return out.view(*lead, n)


# --- QuantLinear hook -------------------------------------------------------------------------

_fallbacks = build.Fallbacks(log, build.load_library)


def enabled() -> bool:
    """COMPRESSOR_CUDA_KERNELS=0 turns the kernels off (QuantLinear then dequantizes + cuBLAS)."""
    return build.switched_on("COMPRESSOR_CUDA_KERNELS")


def library_available(device: torch.device) -> bool:
    """Whether the kernels can run on `device` (builds the library on first call); logs why not, once."""
    (major, minor), _, name = _device_info(_index(device))
    if major < 8:
        _fallbacks.note(f"CUDA kernels need compute capability >= 8.0 ({name} is {major}.{minor}); using dequantize + cuBLAS")
        return False
    reason = _fallbacks.library_reason()
    if reason:
        _fallbacks.note(f"CUDA kernels unavailable, using dequantize + cuBLAS: {reason}")
    return not reason


def _buffer_key(module) -> tuple:
    return tuple((t.data_ptr(), t._version, t.device) for t in (module.qweight, module.qzeros, module.scales, module.g_idx))


def packed_weight(module) -> PackedLinear | None:
    """The module's weight in the kernels' layout (repacked on its device once), or None if unsupported."""
    key = _buffer_key(module)
    cached = getattr(module, "_cuda_packed", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        packed = repack_gptq_v1(module.qweight, module.qzeros, module.scales, module.g_idx, module.bits)
    except Unsupported as exc:
        _fallbacks.note(f"QuantLinear {module.in_features}->{module.out_features} {module.bits}-bit: {exc}; using dequantize + cuBLAS")
        packed = None
    module._cuda_packed = (key, packed)
    return packed


def quant_linear_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """QuantLinear's CUDA kernel: the output, or None to fall back to dequantize + F.linear."""
    if not enabled():
        return None
    if x.dtype not in _DTYPES:
        _fallbacks.note(f"CUDA kernels take float16/bfloat16 activations, got {x.dtype}; using dequantize + cuBLAS")
        return None
    if not library_available(x.device):
        return None
    packed = packed_weight(module)
    if packed is None:
        return None
    out = linear(x, packed, module.bias)
    if out is None:  # a long prefill: cuBLAS on a dequantized weight that is not kept (memory stays 4-bit)
        weight = dequantize_gptq_v1(module.qweight, module.qzeros, module.scales, module.g_idx, module.bits, x.dtype)
        out = torch.nn.functional.linear(x, weight, None if module.bias is None else module.bias.to(x.dtype))
    return out


def prepare_layers(layers: list) -> dict[str, int]:
    """Repack these CUDA QuantLinear layers now (else on their first forward); counts by outcome."""
    counts = {"kernel": 0, "fallback": 0}
    layers = [m for m in layers if m.qweight.device.type == "cuda"]
    if not layers or not enabled() or not library_available(layers[0].qweight.device):
        counts["fallback"] = len(layers)
        return counts
    for layer in layers:
        counts["kernel" if packed_weight(layer) is not None else "fallback"] += 1
    log.info("CUDA kernels: %d linear layers repacked, %d on dequantize + cuBLAS", counts["kernel"], counts["fallback"])
    return counts
