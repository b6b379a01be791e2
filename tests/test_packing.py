"""Bit packing and the GPTQ v1 layout, checked against plain-Python bit arithmetic.

The reference functions below walk the bit stream one bit at a time over the int32 words, the
format's definition, and share nothing with `compressor.packing`.
"""

from __future__ import annotations

import pytest
import torch

from compressor.algorithms.quant import QuantizedWeight, rtn_quantize
from compressor.packing import pack_along_rows, pack_gptq_v1, unpack_along_rows, unpack_gptq_v1


def reference_unpack(packed: torch.Tensor, bits: int, rows: int) -> list[list[int]]:
    """values[r][c]: bit b of value r in column c is stream bit r*bits + b of that column."""
    words = [[int(x) & 0xFFFFFFFF for x in row] for row in packed.tolist()]  # as unsigned 32-bit
    cols = len(words[0])
    values = [[0] * cols for _ in range(rows)]
    for c in range(cols):
        for r in range(rows):
            for b in range(bits):
                position = r * bits + b
                bit = (words[position // 32][c] >> (position % 32)) & 1
                values[r][c] |= bit << b
    return values


def reference_pack(values: list[list[int]], bits: int) -> list[list[int]]:
    """int32 words (as Python ints in [-2^31, 2^31)) from values[r][c], bit by bit."""
    rows, cols = len(values), len(values[0])
    n_words = rows * bits // 32
    words = [[0] * cols for _ in range(n_words)]
    for c in range(cols):
        for r in range(rows):
            for b in range(bits):
                position = r * bits + b
                if (values[r][c] >> b) & 1:
                    words[position // 32][c] |= 1 << (position % 32)
    return [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]


def random_codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32)
    codes[0, 0], codes[-1, -1] = 2**bits - 1, 0  # make sure the extremes (and bit 31) occur
    codes[:, 1] = 2**bits - 1  # an all-ones column sets the sign bit of every word
    return codes.to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_bitwise_reference(bits):
    codes = random_codes(96, 7, bits, seed=bits)
    packed = pack_along_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (96 * bits // 32, 7)
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    assert reference_unpack(packed, bits, 96) == codes.tolist()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = random_codes(256, 33, bits, seed=10 + bits)
    unpacked = unpack_along_rows(pack_along_rows(codes, bits), bits, rows=256)
    assert unpacked.shape == (256, 33)
    assert unpacked.dtype in (torch.int16, torch.int32)
    assert torch.equal(unpacked.to(torch.uint8), codes)


def test_known_words_4bit():
    values = torch.arange(8, dtype=torch.uint8)[:, None]  # one column 0, 1, ..., 7
    assert pack_along_rows(values, 4).tolist() == [[0x76543210]]
    values = torch.tensor([[0xF] * 8], dtype=torch.uint8).T
    assert pack_along_rows(values, 4).tolist() == [[-1]]


def test_known_words_3bit_straddle_word_boundaries():
    # Column 0: v[0]=7, v[10]=5 (0b101), v[21]=6 (0b110), v[31]=4 (0b100), the rest 0.
    # v[10] takes stream bits 30..32: bit 30 of word 0 and bit 0 of word 1 are set, bit 31 not.
    # v[21] takes bits 63..65: bit 31 of word 1 is 0, bits 0 and 1 of word 2 are set.
    # v[31] takes bits 93..95: only bit 31 of word 2, the sign bit.
    column = [0] * 32
    column[0], column[10], column[21], column[31] = 7, 5, 6, 4
    values = torch.tensor([column, [7] * 32], dtype=torch.uint8).T  # column 1: all ones
    packed = pack_along_rows(values, 3)
    word0 = 0x40000007
    word1 = 0x00000001
    word2 = 0x80000003 - (1 << 32)  # as int32
    assert packed.tolist() == [[word0, -1], [word1, -1], [word2, -1]]
    assert unpack_along_rows(packed, 3).T.tolist() == [column, [7] * 32]


def test_pack_rejects_bad_shapes_bits_and_values():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_along_rows(torch.zeros(12, 4, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_along_rows(torch.zeros(48, 4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_along_rows(torch.zeros(32, 4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_along_rows(torch.full((8, 1), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        pack_along_rows(torch.full((4, 1), 256, dtype=torch.int32), 8)
    pack_along_rows(torch.full((4, 1), 255, dtype=torch.uint8), 8)  # the top code itself is fine
    with pytest.raises(ValueError, match="3 words"):
        unpack_along_rows(torch.zeros(4, 2, dtype=torch.int32), 3)


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits, word", [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_qzeros_store_zero_minus_one(bits, word):
    qw = rtn_quantize(_weight(64, 128, seed=1), bits, 32, sym=True)
    assert (qw.zeros == 2 ** (bits - 1)).all()
    qzeros = pack_gptq_v1(qw)["qzeros"]
    assert qzeros.shape == (4, 64 * bits // 32)
    assert (qzeros == word).all()


def test_asymmetric_qzeros_pack_along_outputs():
    qw = rtn_quantize(_weight(64, 64, seed=2), 4, 32, sym=False)
    qzeros = pack_gptq_v1(qw)["qzeros"]
    stored = (qw.zeros.int() - 1).tolist()  # [G][N]
    for g in range(2):
        # row g of qzeros is the bit stream of the group's N stored zeros
        assert reference_unpack(qzeros[g][:, None], 4, 64) == [[z] for z in stored[g]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v1_shapes_and_dtypes(bits):
    n, k = 96, 128
    qw = rtn_quantize(_weight(n, k, seed=3), bits, 32, sym=False)
    bias = torch.randn(n)
    tensors = pack_gptq_v1(qw, bias=bias)
    assert set(tensors) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (k * bits // 32, n)
    assert tensors["qzeros"].dtype == torch.int32 and tensors["qzeros"].shape == (4, n * bits // 32)
    assert tensors["qzeros"].is_contiguous()
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (4, n)
    assert tensors["g_idx"].dtype == torch.int32 and tensors["g_idx"].tolist() == [i // 32 for i in range(k)]
    assert tensors["bias"].dtype == torch.float16 and torch.equal(tensors["bias"], bias.half())
    # qweight column n is the bit stream of that output's codes along K
    assert reference_unpack(tensors["qweight"], bits, k) == qw.codes.T.tolist()


def test_zero_point_zero_is_rejected():
    qw = rtn_quantize(_weight(32, 32, seed=4), 4, 32, sym=False)
    qw.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zero - 1"):
        pack_gptq_v1(qw)


def act_order(qw: QuantizedWeight, seed: int) -> QuantizedWeight:
    """The same record with columns visited in a random order, as GPTQ's desc_act produces."""
    perm = torch.randperm(qw.in_features, generator=torch.Generator().manual_seed(seed))
    return QuantizedWeight(
        codes=qw.codes[:, perm].contiguous(),
        scales=qw.scales,
        zeros=qw.zeros,
        g_idx=qw.g_idx[perm].contiguous(),
        bits=qw.bits,
        group_size=qw.group_size,
        sym=qw.sym,
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("permuted", [False, True])
def test_unpack_gptq_v1_inverts_pack(bits, sym, permuted):
    qw = rtn_quantize(_weight(64, 256, seed=5), bits, 64, sym=sym)
    if permuted:
        qw = act_order(qw, seed=bits)
        assert not torch.equal(qw.g_idx, torch.arange(256, dtype=torch.int32) // 64)
    t = pack_gptq_v1(qw)
    back = unpack_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(back.dequantize(torch.float16), qw.dequantize(torch.float16))
    assert torch.equal(back.codes, qw.codes) and back.codes.dtype == torch.uint8
    assert torch.equal(back.zeros, qw.zeros) and back.zeros.dtype == torch.uint8
    assert torch.equal(back.g_idx, qw.g_idx)
    assert (back.bits, back.group_size, back.sym) == (bits, 64, sym)


def test_unpack_gptq_v1_single_group_and_explicit_sym():
    qw = rtn_quantize(_weight(32, 64, seed=6), 4, -1, sym=False)
    t = pack_gptq_v1(qw)
    back = unpack_gptq_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, sym=True)
    assert back.group_size == -1 and back.sym is True  # told, not inferred
    assert torch.equal(back.dequantize(), qw.dequantize())
