// Shared pieces of the dequant-GEMM kernels: the repacked weight layout, int4/int8 -> fp16
// conversion without integer-to-float instructions, and the split-K fix-up.
//
// ---------------------------------------------------------------------------------------------
// Repacked layout ("tiles"), written at load time by compressor/kernels/repack.py (which has a pure-torch
// CPU reference of the same thing and an emulator of how the kernels read it).
//
// GPTQ v1 stores qweight as int32 [K*bits/32, N]: 32/bits codes of one column along K per
// word. Both kernels here instead want every lane of a warp to fetch 16 bytes (one LDG.128) that
// hold exactly the codes it needs in the order the tensor-core fragments use, so W (K x N, rows
// sorted by group when act-order is on, N padded to a multiple of 32) is cut into tiles of
// TILE_K x 32 (TILE_K = 32 for 4-bit, 16 for 8-bit; each tile is 32 lanes x 16 bytes = 512 B):
//
//   words[n_tile][k_tile][lane][j]      (int32; j = 0..3; n_tile-major so that a warp that owns
//                                        32 output columns streams one contiguous region over K)
//   lane = 4*c + t  (c = lane/4 = "groupID" in PTX's mma docs, t = lane%4 = "threadID_in_group")
//   word j of lane holds column  n = 32*n_tile + 8*j + c
//   code v of that word (bits [bits*v, bits*v+bits)) holds row
//       k = TILE_K*k_tile + 8*(v % P) + 2*t + v / P,     P = 16/bits (codes per half word)
//
// So code v and code v+P sit in the low and high 16-bit halves at the same position and belong
// to rows k and k+1. This is what makes a word directly usable:
//   4-bit: (w & 0x000f000f) | 0x64006400 is a half2 holding (1024 + q_k, 1024 + q_k+1) for
//          v = 0; (w & 0x00f000f0) | 0x64006400 gives 1024 + 16*q for v = 1; w >> 8 the same for
//          v = 2, 3. The pair for v covers rows (8v + 2t, 8v + 2t + 1): for v = 0, 1 that is the
//          B fragment {b0b1, b2b3} of mma.m16n8k16 for the first 16 rows of the tile (column c),
//          for v = 2, 3 the fragment for the second 16.
//   8-bit: (w & 0x00ff00ff) | 0x64006400 and ((w >> 8) & 0x00ff00ff) | 0x64006400 are the two
//          halves of the B fragment of one k16 step.
// The GEMV kernel reads the same tiles: a lane multiplies its pairs by the activation pairs at
// the same rows (adjacent in memory) and lanes with the same c are summed at the end.
//
// Scales and zero points: sz[group][n_tile][c][8] fp16 = {scale of columns 8j + c for j = 0..3,
// zero of the same 4 columns}, one 16-byte load per lane per tile. Zeros are GPTQ v1's stored
// value + 1 resolved at load (exact small integers in fp16), so symmetric and asymmetric
// checkpoints run the same code. A group spans `group_tiles` whole tiles (group size 32/64/128
// for 4-bit, also 16 for 8-bit; group size -1 = one group for all of K).
// ---------------------------------------------------------------------------------------------

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace cq {

constexpr int kWarps = 4;  // warps per block in both kernels
constexpr int kThreads = 32 * kWarps;
constexpr int kTileN = 32;

template <int BITS> struct Layout {
  static_assert(BITS == 4 || BITS == 8, "tile layout exists for 4- and 8-bit codes");
  static constexpr int kCodesPerWord = 32 / BITS;
  static constexpr int kPairs = kCodesPerWord / 2;  // P in the comment above
  static constexpr int kTileK = 4 * kCodesPerWord;  // 32 or 16 rows per tile
  static constexpr int kK16 = kTileK / 16;          // mma k-steps per tile
};

// The activation types: fp16 computes in half2 (exact dequant, products in fp16, fp32 sums per
// tile); bf16 dequantizes in fp32 (its 8-bit mantissa cannot hold 1024 + q, and the fp16 scale
// would round) and rounds each weight once, exactly like the reference dequantize_gptq_v1.
template <typename T> struct Pair;
template <> struct Pair<half> { using type = half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

__device__ __forceinline__ uint32_t as_u32(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 u32_as_half2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// The 1024 + q trick: OR-ing a code into the mantissa of fp16 1024.0 (0x6400, 10 mantissa bits
// with unit 1 at that exponent) yields 1024 + q exactly, one LOP3 for two codes; subtracting
// 1024 + zero (exact) leaves q - zero, and multiplying by the scale rounds once, so the fp16
// weight equals the reference's round_fp16((q - zero) * scale) bit for bit.
template <int BITS>
__device__ __forceinline__ void dequant_word_half(uint32_t w, half scale, half zero, half2 (&out)[Layout<BITS>::kPairs]) {
  const half2 s2 = __half2half2(scale);
  const half2 z1024 = __half2half2(__hadd(zero, __ushort_as_half(0x6400)));  // 1024 + zero
  if constexpr (BITS == 4) {
    // A code in bits 4..7 lands as 1024 + 16 q: one HFMA2 by 1/16 minus (64 + zero) is exact.
    const half2 z64 = __half2half2(__hadd(zero, __ushort_as_half(0x5400)));  // 64 + zero
    const half2 sixteenth = __half2half2(__ushort_as_half(0x2c00));          // 1/16
    const uint32_t hi = w >> 8;
    out[0] = __hmul2(__hsub2(u32_as_half2((w & 0x000f000fu) | 0x64006400u), z1024), s2);
    out[1] = __hmul2(__hfma2(u32_as_half2((w & 0x00f000f0u) | 0x64006400u), sixteenth, -z64), s2);
    out[2] = __hmul2(__hsub2(u32_as_half2((hi & 0x000f000fu) | 0x64006400u), z1024), s2);
    out[3] = __hmul2(__hfma2(u32_as_half2((hi & 0x00f000f0u) | 0x64006400u), sixteenth, -z64), s2);
  } else {
    out[0] = __hmul2(__hsub2(u32_as_half2((w & 0x00ff00ffu) | 0x64006400u), z1024), s2);
    out[1] = __hmul2(__hsub2(u32_as_half2(((w >> 8) & 0x00ff00ffu) | 0x64006400u), z1024), s2);
  }
}

// fp32 dequant (bf16 path): q from the mantissa of 2^23 (0x4b000000 | q = 8388608 + q), then
// (q - zero) * scale, exact in fp32 (<= 9 + 11 significant bits).
__device__ __forceinline__ float code_to_float(uint32_t q) { return __uint_as_float(0x4b000000u | q) - 8388608.0f; }

template <int BITS>
__device__ __forceinline__ void dequant_word_float(uint32_t w, float scale, float zero, float2 (&out)[Layout<BITS>::kPairs]) {
  constexpr int P = Layout<BITS>::kPairs;
  constexpr uint32_t mask = (1u << BITS) - 1u;
#pragma unroll
  for (int v = 0; v < P; ++v) {
    out[v].x = (code_to_float((w >> (BITS * v)) & mask) - zero) * scale;
    out[v].y = (code_to_float((w >> (BITS * (v + P))) & mask) - zero) * scale;
  }
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<half>(half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// 16-byte streaming load of weights: read once, so keep them out of L1 (".nc" read-only path,
// L1::no_allocate) and leave L1 to the activations and scales.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Split-K fix-up. A GEMV or small-M GEMM over a 4096-column weight has too few output tiles to
// fill 132 SMs, so K is split over `splits` blocks that each write an fp32 partial tile into
// `workspace[split][M][n_pad]`. The last block to finish a tile (found with an atomic counter
// per tile, which it resets to 0 for the next launch) sums the partials in split order, so the
// result does not depend on scheduling, adds the bias and writes the output.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ bool arrive_last(int* counter, int splits) {
  __shared__ int is_last;
  __threadfence();  // make this block's partials visible device-wide before counting it in
  __syncthreads();
  if (threadIdx.x == 0) {
    const int done = atomicAdd(counter, 1);
    is_last = done == splits - 1;
    if (is_last) *counter = 0;  // every other block of this tile has arrived
  }
  __syncthreads();
  if (is_last) __threadfence();
  return is_last;
}

// Sum the partials of rows [0, m_count) x columns [n0, n0 + width) and write out (+ bias).
template <typename T>
__device__ __forceinline__ void finish_tile(const float* workspace, int splits, int m, int n_pad, int n_valid, int m0, int m_count,
                                            int n0, int width, const T* bias, T* out) {
  for (int i = threadIdx.x; i < m_count * width; i += blockDim.x) {
    const int r = m0 + i / width, n = n0 + i % width;
    if (n >= n_valid) continue;
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += __ldcg(workspace + ((size_t)s * m + r) * n_pad + n);  // L2, not a stale L1
    if (bias != nullptr) acc += to_float(bias[n]);
    out[(size_t)r * n_valid + n] = from_float<T>(acc);
  }
}

}  // namespace cq
