"""Load-time repack of GPTQ v1 tensors into the kernels' tile layout, and a CPU emulator of the kernels.

The artifact on disk stays GPTQ v1; the runtime repacks each layer once, on whatever device its
tensors are on (pure torch ops: on a CUDA tensor this *is* the GPU repack, on CPU it is the
reference the tests check). The layout is documented in kernels/common.h:

    words[n_tile, k_tile, lane, j]   int32, lane = 4c + t, column n = 32 n_tile + 8 j + c,
                                     code v at bits [bits v, bits v + bits) is row
                                     k = TILE_K k_tile + 8 (v % P) + 2 t + v // P,  P = 16 / bits
    scale_zero[group, n_tile, c, 0:4]  fp16 scales of columns 8 j + c, [4:8] their zero points

`dequantize_packed` / `emulate_linear` read that layout back with the kernels' index arithmetic
(written independently of `repack_gptq_v1`, as a scatter rather than a gather), so a CPU test
that they reproduce `dequantize_gptq_v1` exactly checks the layout both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compressor.packing import infer_group_size, unpack_along_rows, unpack_qzeros_v1

TILE_N = 32
KERNEL_BITS = (4, 8)


def tile_k(bits: int) -> int:
    """Rows of K per tile: a lane's 4 words hold 4 columns x (32 / bits) codes."""
    return 4 * (32 // bits)


class Unsupported(ValueError):
    """This layer cannot run on the kernels (the reason says why); it falls back to dequantize + cuBLAS."""


@dataclass(frozen=True)
class PackedLinear:
    """One linear layer in the kernels' layout (see module docstring); the bias stays with the module."""

    words: torch.Tensor  # int32 [n_tiles, k_tiles, 32, 4]
    scale_zero: torch.Tensor  # fp16 [groups, n_tiles, 8, 8]
    perm: torch.Tensor | None  # int32 [K]: act-order, x[:, perm] feeds the row-sorted weight; None = identity
    bits: int
    in_features: int  # K
    out_features: int  # N
    group_tiles: int  # tiles per quantization group (k_tiles for group size -1)

    @property
    def n_pad(self) -> int:
        return self.words.shape[0] * TILE_N

    @property
    def device(self) -> torch.device:
        return self.words.device


def check_supported(bits: int, in_features: int, out_features: int, group_size: int) -> None:
    """Raise Unsupported unless the kernels handle this shape (group_size -1 = one group)."""
    if bits not in KERNEL_BITS:
        raise Unsupported(f"{bits}-bit codes have no kernel (kernels: {', '.join(map(str, KERNEL_BITS))}-bit)")
    tk = tile_k(bits)
    if in_features % tk:
        raise Unsupported(f"in_features={in_features} is not a multiple of {tk} ({bits}-bit tile rows)")
    if out_features % 8:
        raise Unsupported(f"out_features={out_features} is not a multiple of 8")
    if group_size != -1 and group_size % tk:
        raise Unsupported(f"group_size={group_size} is not a multiple of {tk} ({bits}-bit tile rows)")


def act_order_permutation(g_idx: torch.Tensor, groups: int, group_size: int) -> torch.Tensor | None:
    """The row order (int32) that makes every group contiguous (None when it already is), checked to give equal groups."""
    k = g_idx.numel()
    g = g_idx.long()
    expected = torch.zeros(k, dtype=torch.long, device=g.device) if group_size == -1 else torch.arange(k, device=g.device) // group_size
    if torch.equal(g, expected):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], expected):
        raise Unsupported(f"g_idx does not split K={k} into {groups} groups of {group_size} rows")
    return perm.to(torch.int32)


def repack_gptq_v1(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> PackedLinear:
    """GPTQ v1 buffers (on any device) -> PackedLinear on the same device. Raises Unsupported."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    groups = scales.shape[0]
    group_size = infer_group_size(g_idx, groups)
    check_supported(bits, k, n, group_size)
    tk, codes_per_word = tile_k(bits), 32 // bits
    pairs = codes_per_word // 2
    perm = act_order_permutation(g_idx, groups, group_size)

    q = unpack_along_rows(qweight, bits, k).to(torch.uint8)  # [K, N]
    zeros = unpack_qzeros_v1(qzeros, bits, n)  # [G, N]
    if perm is not None:
        q = q[perm.long()]
    n_pad = -(-n // TILE_N) * TILE_N
    q = F.pad(q, (0, n_pad - n))
    k_tiles, n_tiles = k // tk, n_pad // TILE_N

    # rows of the tile held by code v of lane t: 8 (v % P) + 2 t + v // P
    t = torch.arange(4, device=q.device)[:, None]
    v = torch.arange(codes_per_word, device=q.device)[None, :]
    rows = 8 * (v % pairs) + 2 * t + v // pairs  # [4, V]
    tiles = q.view(k_tiles, tk, n_tiles, 4, 8)[:, rows]  # [kt, t, v, nt, j, c]
    tiles = tiles.permute(3, 0, 5, 1, 4, 2)  # [nt, kt, c, t, j, v]
    words = torch.zeros(tiles.shape[:-1], dtype=torch.int32, device=q.device)
    for code in range(codes_per_word):  # int32 shifts wrap: the top code lands in the sign bit
        words |= tiles[..., code].to(torch.int32) << (bits * code)

    def by_lane(per_column: torch.Tensor) -> torch.Tensor:  # [G, N] -> [G, nt, c, j]
        padded = F.pad(per_column.to(torch.float16), (0, n_pad - n))
        return padded.view(groups, n_tiles, 4, 8).transpose(2, 3)

    scale_zero = torch.cat([by_lane(scales), by_lane(zeros)], dim=3).contiguous()
    return PackedLinear(
        words=words.reshape(n_tiles, k_tiles, 32, 4).contiguous(),
        scale_zero=scale_zero,
        perm=perm,
        bits=bits,
        in_features=k,
        out_features=n,
        group_tiles=k_tiles if group_size == -1 else group_size // tk,
    )


def dequantize_packed(packed: PackedLinear, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] in the kernels' row order (sorted by group), read back the way the kernels address it."""
    bits, tk = packed.bits, tile_k(packed.bits)
    codes_per_word = 32 // bits
    pairs = codes_per_word // 2
    n_tiles, k_tiles = packed.words.shape[:2]
    dev = packed.device
    nt = torch.arange(n_tiles, device=dev).view(-1, 1, 1, 1)
    kt = torch.arange(k_tiles, device=dev).view(1, -1, 1, 1)
    lane = torch.arange(32, device=dev).view(1, 1, -1, 1)
    j = torch.arange(4, device=dev).view(1, 1, 1, -1)
    c, t = lane // 4, lane % 4
    col = (TILE_N * nt + 8 * j + c).expand(packed.words.shape)
    codes = torch.empty(k_tiles * tk, packed.n_pad, dtype=torch.int32, device=dev)
    for v in range(codes_per_word):
        row = (tk * kt + 8 * (v % pairs) + 2 * t + v // pairs).expand(packed.words.shape)
        codes[row, col] = (packed.words >> (bits * v)) & (2**bits - 1)
    group = torch.arange(k_tiles * tk, device=dev) // (tk * packed.group_tiles)  # [K]
    column = torch.arange(packed.n_pad, device=dev)
    sz = packed.scale_zero.float()[group]  # [K, nt, c, 8]
    tile_of, c_of, j_of = column // TILE_N, column % 8, (column % TILE_N) // 8
    scale = sz[:, tile_of, c_of, j_of]
    zero = sz[:, tile_of, c_of, 4 + j_of]
    w = (codes.float() - zero) * scale  # exact in fp32; one rounding to dtype, as dequantize_gptq_v1
    return w[:, : packed.out_features].to(dtype)


def emulate_linear(x: torch.Tensor, packed: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernels compute, in fp32: x[..., perm] @ W (+ bias), returned in x's dtype."""
    xs = x if packed.perm is None else x.index_select(-1, packed.perm.to(x.device, torch.long))
    w = dequantize_packed(packed, x.dtype).float()
    y = xs.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
