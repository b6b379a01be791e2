"""Bit packing of integer codes into int32 words, and the GPTQ v1 tensor layout built on it.

A packed column is a little-endian bit stream: value r of the column occupies stream bits
[r*bits, (r+1)*bits), least significant bit first, and int32 word w holds stream bits
[32w, 32w+32). For 2/4/8 bits a word holds whole values; 3-bit values straddle words, so the
pattern repeats every 32 values (3 words). This is AutoGPTQ's layout, which every GPTQ loader
(transformers, vLLM, TGI, GPTQModel) reads.

The loops below run over the positions of one packing period (at most 32), never over elements.
"""

from __future__ import annotations

import math

import torch

from compressor.algorithms.quant import QuantizedWeight

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _period(bits: int) -> tuple[int, int]:
    """(values, words) after which the packing pattern repeats: 4-bit (8, 1), 3-bit (32, 3)."""
    common = math.gcd(32, bits)
    return 32 // common, bits // common


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `values` [R, C] (ints in [0, 2^bits)) into int32 [R*bits/32, C], each column a bit stream."""
    _check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    if rows * bits % 32:
        period_values, _ = _period(bits)
        raise ValueError(f"{bits}-bit packing needs the row count to be a multiple of {period_values}, got {rows}")
    if values.numel():
        low, high = (int(x) for x in torch.aminmax(values))
        if low < 0 or high >= 2**bits:
            raise ValueError(f"values must lie in [0, {2**bits - 1}] for {bits}-bit packing, got [{low}, {high}]")

    period_values, period_words = _period(bits)
    # int32 shifts wrap in two's complement, so a value shifted into bit 31 lands as the sign bit.
    v = values.to(torch.int32).reshape(rows // period_values, period_values, cols)
    words: list[torch.Tensor | None] = [None] * period_words  # word w of every period, [R/period, C]

    def add(word: int, part: torch.Tensor) -> None:
        if words[word] is None:
            words[word] = part
        else:
            words[word] |= part

    for j in range(period_values):
        word, shift = divmod(j * bits, 32)
        add(word, v[:, j] << shift)  # bits shifted past 31 are dropped ...
        spill = shift + bits - 32
        if spill > 0:  # ... and continue at the bottom of the next word
            add(word + 1, v[:, j] >> (bits - spill))
    return torch.stack(words, dim=1).reshape(rows * bits // 32, cols)


def unpack_along_rows(packed: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of `pack_along_rows`: int32 [W, C] -> int32 [rows, C] (all W*32/bits rows by default)."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"expected a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    words, cols = packed.shape
    period_values, period_words = _period(bits)
    if words % period_words:
        raise ValueError(f"{bits}-bit packed data needs a multiple of {period_words} words per column, got {words}")
    capacity = words * 32 // bits
    rows = capacity if rows is None else rows
    if not 0 <= rows <= capacity:
        raise ValueError(f"{words} words of {bits}-bit values hold {capacity} rows, asked for {rows}")

    mask = 2**bits - 1
    p = packed.reshape(words // period_words, period_words, cols)
    values = torch.empty(words // period_words, period_values, cols, dtype=torch.int32, device=packed.device)
    for j in range(period_values):
        word, shift = divmod(j * bits, 32)
        value = p[:, word] >> shift  # arithmetic shift: the top `shift` bits are copies of the sign
        spill = shift + bits - 32
        if spill > 0:  # keep the genuine low part, take the high part from the next word
            kept = bits - spill
            value = (value & ((1 << kept) - 1)) | (p[:, word + 1] << kept)
        values[:, j] = value & mask
    return values.reshape(capacity, cols)[:rows]



def unpack_qzeros_v1(qzeros: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """int32 [G, N] zero points from GPTQ v1's qzeros [G, N*bits/32], which store zero - 1."""
    return unpack_along_rows(qzeros.T.contiguous(), bits, columns).T + 1


def pack_qzeros(zeros: torch.Tensor, bits: int, offset: int = 1) -> torch.Tensor:
    """qzeros [G, N*bits/32] of zero points [G, N], storing zero - offset: 1 in GPTQ v1, 0 in
    GPTQModel's gptq_v2 (which can therefore hold a zero point of 0)."""
    return pack_along_rows((zeros.to(torch.int32) - offset).T.contiguous(), bits).T.contiguous()


def qzeros_v1_to_v2(qzeros: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """GPTQ v1 qzeros (zero - 1) as gptq_v2 qzeros (the zero point itself); exact for v1's zeros
    1..2^bits - 1, which is every zero point our exporter writes."""
    zeros = unpack_qzeros_v1(qzeros, bits, columns)
    if zeros.max() >= 2**bits:
        raise ValueError(f"a v1 zero point of {int(zeros.max())} (a stored zero of 0) has no {bits}-bit gptq_v2 form")
    return pack_qzeros(zeros, bits, offset=0)


def qzeros_v2_to_v1(qzeros: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """gptq_v2 qzeros as GPTQ v1 qzeros, the layout every reader in compressor uses. A zero point
    of 0 has no v1 form (v1 would store -1): ValueError."""
    zeros = unpack_along_rows(qzeros.T.contiguous(), bits, columns).T
    if zeros.numel() and zeros.min() == 0:
        raise ValueError("a zero point of 0 cannot be held in GPTQ v1's layout (it stores zero - 1)")
    return pack_qzeros(zeros, bits, offset=1)


def dequantize_gptq_v1(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W [N, K] (nn.Linear layout) = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack_along_rows(qweight, bits, k)  # [K, N]
    zeros = unpack_qzeros_v1(qzeros, bits, n)  # [G, N]
    g = g_idx.long()
    # In float32 the product of a small integer and an fp16 scale is exact, so the one rounding is
    # the cast to `dtype`: the same result as computing in fp16 directly, and no double rounding
    # for bf16 (whose cast of the fp16 scale alone would already round).
    w = (q - zeros[g]).to(torch.float32) * scales.to(torch.float32)[g]  # [K, N]
    # Contiguous [N, K], the layout of nn.Linear.weight: F.linear then takes the same GEMM path as
    # the float model, so the artifact reproduces the in-memory model bit for bit. (A transposed
    # view picks another kernel whose rounding differs ~1e-5 per layer, and SmolLM2's outlier
    # activations amplify that to ~1e-3 in the logits.)
    return w.to(dtype).T.contiguous()


def pack_gptq_v1(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one linear layer: qweight, qzeros, scales, g_idx (and bias)."""
    n, k = qw.codes.shape
    groups = qw.scales.shape[0]
    if qw.scales.shape != (groups, n) or qw.zeros.shape != (groups, n) or qw.g_idx.shape != (k,):
        raise ValueError(
            f"inconsistent QuantizedWeight: codes {tuple(qw.codes.shape)}, scales {tuple(qw.scales.shape)}, "
            f"zeros {tuple(qw.zeros.shape)}, g_idx {tuple(qw.g_idx.shape)}"
        )
    if (qw.zeros == 0).any():
        raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1); use zeros in [1, 2^bits - 1]")
    tensors = {
        # [N, K] codes -> [K, N] so each output column is one bit stream along K.
        "qweight": pack_along_rows(qw.codes.T.contiguous(), qw.bits),
        # Zeros pack along N: transpose so N runs down the rows, pack, transpose back to [G, N*bits/32].
        "qzeros": pack_qzeros(qw.zeros, qw.bits, offset=1),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16).contiguous()
    return tensors


def infer_group_size(g_idx: torch.Tensor, groups: int) -> int:
    """Group size from g_idx: every group but the last has `group_size` members, in any order."""
    if groups == 1:
        return -1
    return int((g_idx == 0).sum())


def unpack_gptq_v1(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    sym: bool | None = None,
) -> QuantizedWeight:
    """Inverse of `pack_gptq_v1` (bias aside). `sym` is inferred from the zeros when not given."""
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape != (groups, n) or qzeros.shape != (groups, n * bits // 32) or g_idx.shape != (k,):
        raise ValueError(
            f"inconsistent GPTQ tensors for {bits}-bit: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}"
        )
    codes = unpack_along_rows(qweight, bits, k).T
    zeros = unpack_qzeros_v1(qzeros, bits, n)
    if zeros.max() > 255:
        # An 8-bit v1 file that stored a zero of 0 as 255 reads back as 256; the record holds uint8.
        raise ValueError("a stored zero point of 2^bits - 1 decodes to 256, which QuantizedWeight cannot hold")
    if sym is None:
        sym = bool((zeros == 2 ** (bits - 1)).all())
    return QuantizedWeight(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.uint8).contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=infer_group_size(g_idx, groups),
        sym=sym,
    )
