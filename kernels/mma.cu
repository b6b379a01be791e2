// y[M, N] = x[M, K] @ dequant(W)[K, N] + b for M > 8: tensor cores (mma.sync.m16n8k16, fp32
// accumulation) on weights dequantized in registers.
//
//   * block = 4 warps = 128 output columns (warp w owns column tile 4 * blockIdx.x + w) by
//     BM = 16 * MT rows (MT = 1, 2, 4 by M; M > 64 adds blocks along y, whose repeated weight
//     reads mostly hit L2), with K split across blockIdx.z like the GEMV (common.h fix-up);
//   * K advances in stages of 128 rows: each lane issues its 16-byte weight loads for the stage
//     (4 tiles at 4-bit, 8 at 8-bit), then the block stages x[BM, 128] in shared memory while
//     they are in flight. A row of the stage buffer is 136 halves (272 B = 68 words), so the 32
//     lanes' A-fragment reads (row g, word t) fall in 32 distinct banks;
//   * a lane's 16-byte tile load already is the B operand of 4 n8 x (1 or 2) k16 mma steps
//     (common.h layout): no shared memory, no ldmatrix for weights. fp16 dequant is exact LOP3
//     + HSUB2/HFMA2 + HMUL2; bf16 goes through fp32 and rounds once (matches the reference);
//   * fragment layouts (PTX ISA, m16n8k16, g = lane / 4, t = lane % 4):
//       A regs: {row g, k 2t..2t+1}, {row g+8, k 2t..}, {row g, k 2t+8..}, {row g+8, k 2t+8..}
//       B regs: {k 2t..2t+1, col g}, {k 2t+8..2t+9, col g}
//       C/D:    {row g, col 2t}, {row g, col 2t+1}, {row g+8, col 2t}, {row g+8, col 2t+1}.

#include <type_traits>

#include "common.h"

namespace cq {

constexpr int kStageK = 128;           // rows of K per shared-memory stage
constexpr int kStageStride = kStageK + 8;  // halves per staged row (bank-conflict padding)

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The B operands of one tile for one lane: b[j][2h], b[j][2h+1] feed k16 step h of column block j.
template <typename T, int BITS>
__device__ __forceinline__ void tile_fragments(const uint4& q, const uint4& s, uint32_t (&b)[4][Layout<BITS>::kPairs]) {
  constexpr int P = Layout<BITS>::kPairs;
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  const half* sh = reinterpret_cast<const half*>(&s);  // scales of columns 8j + g, then zeros
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (std::is_same_v<T, half>) {
      half2 wp[P];
      dequant_word_half<BITS>(words[j], sh[j], sh[4 + j], wp);
#pragma unroll
      for (int v = 0; v < P; ++v) b[j][v] = as_u32(wp[v]);
    } else {
      float2 wp[P];
      dequant_word_float<BITS>(words[j], __half2float(sh[j]), __half2float(sh[4 + j]), wp);
#pragma unroll
      for (int v = 0; v < P; ++v) b[j][v] = as_u32(__float22bfloat162_rn(wp[v]));
    }
  }
}

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kThreads)
mma_kernel(const T* __restrict__ x, const int* __restrict__ perm, const uint4* __restrict__ w, const uint4* __restrict__ sz, const T* __restrict__ bias,
           T* __restrict__ out, float* __restrict__ workspace, int* __restrict__ counters, int m, int n, int n_pad, int k,
           int group_tiles, int tiles_per_split) {
  using L = Layout<BITS>;
  constexpr int TK = L::kTileK;
  constexpr int P = L::kPairs;
  constexpr int kStageTiles = kStageK / TK;
  constexpr int BM = 16 * MT;
  using T2 = typename Pair<T>::type;
  __shared__ __align__(16) T xs[BM][kStageStride];

  const int split = blockIdx.z, splits = gridDim.z;
  const int n_tiles = n_pad / kTileN, k_tiles = k / TK;
  const int kt0 = split * tiles_per_split, kt1 = min(k_tiles, kt0 + tiles_per_split);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int n_tile = blockIdx.x * kWarps + warp;
  const bool has_tile = n_tile < n_tiles;
  const int m0 = blockIdx.y * BM;
  const uint4* tiles = w + (size_t)(has_tile ? n_tile : 0) * k_tiles * 32 + lane;

  float acc[MT][4][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  for (int stage = kt0; stage < kt1; stage += kStageTiles) {
    const int stage_tiles = min(kStageTiles, kt1 - stage);
    uint4 q[kStageTiles];
#pragma unroll
    for (int s = 0; s < kStageTiles; ++s)
      q[s] = has_tile && s < stage_tiles ? load_stream(tiles + (size_t)(stage + s) * 32) : make_uint4(0, 0, 0, 0);

    // Stage x[m0 : m0 + BM, stage rows] (zeros past m and past the split's K range).
    if (perm == nullptr) {
      const int valid_vecs = stage_tiles * TK / 8;
      for (int i = threadIdx.x; i < BM * (kStageK / 8); i += kThreads) {
        const int r = i / (kStageK / 8), v = i % (kStageK / 8);
        uint4 val = make_uint4(0, 0, 0, 0);
        if (m0 + r < m && v < valid_vecs)
          val = __ldg(reinterpret_cast<const uint4*>(x + (size_t)(m0 + r) * k + (size_t)stage * TK) + v);
        *reinterpret_cast<uint4*>(&xs[r][8 * v]) = val;
      }
    } else {  // act-order: gather x[:, perm] while staging (see gemv.cu)
      const int valid = stage_tiles * TK;
      for (int i = threadIdx.x; i < BM * kStageK; i += kThreads) {
        const int r = i / kStageK, e = i % kStageK;
        xs[r][e] = m0 + r < m && e < valid ? x[(size_t)(m0 + r) * k + __ldg(perm + stage * TK + e)] : from_float<T>(0.f);
      }
    }
    __syncthreads();

    if (has_tile) {
#pragma unroll
      for (int s = 0; s < kStageTiles; ++s) {
        if (s >= stage_tiles) break;
        const uint4 scale_zero = __ldg(sz + ((size_t)((stage + s) / group_tiles) * n_tiles + n_tile) * 8 + g);
        uint32_t b[4][P];
        tile_fragments<T, BITS>(q[s], scale_zero, b);
#pragma unroll
        for (int h = 0; h < L::kK16; ++h) {
          const int col = s * TK + 16 * h + 2 * t;
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            const int row = 16 * i + g;
            const uint32_t a[4] = {
                *reinterpret_cast<const uint32_t*>(&xs[row][col]), *reinterpret_cast<const uint32_t*>(&xs[row + 8][col]),
                *reinterpret_cast<const uint32_t*>(&xs[row][col + 8]), *reinterpret_cast<const uint32_t*>(&xs[row + 8][col + 8])};
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_16816<T>(acc[i][j], a, b[j][2 * h], b[j][2 * h + 1]);
          }
        }
      }
    }
    __syncthreads();  // the next stage overwrites xs
  }

  if (has_tile) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int half_row = 0; half_row < 2; ++half_row) {
          const int r = m0 + 16 * i + g + 8 * half_row;
          const int col = n_tile * kTileN + 8 * j + 2 * t;  // even; n is a multiple of 8, so col + 1 < n too
          if (r >= m) continue;
          float2 v = make_float2(acc[i][j][2 * half_row], acc[i][j][2 * half_row + 1]);
          if (splits == 1) {
            if (col >= n) continue;
            if (bias != nullptr) {
              v.x += to_float(bias[col]);
              v.y += to_float(bias[col + 1]);
            }
            T2 o;
            o.x = from_float<T>(v.x);
            o.y = from_float<T>(v.y);
            *reinterpret_cast<T2*>(out + (size_t)r * n + col) = o;
          } else {
            *reinterpret_cast<float2*>(workspace + ((size_t)split * m + r) * n_pad + col) = v;
          }
        }
  }
  if (splits > 1 && arrive_last(counters + blockIdx.y * gridDim.x + blockIdx.x, splits))
    finish_tile(workspace, splits, m, n_pad, n, m0, min(BM, m - m0), blockIdx.x * kWarps * kTileN, kWarps * kTileN, bias, out);
}

template <typename T, int BITS>
cudaError_t launch_mma(const void* x, const int* perm, const void* w, const void* sz, const void* bias, void* out, float* workspace, int* counters,
                       int m, int n, int n_pad, int k, int group_tiles, int splits, cudaStream_t stream) {
  constexpr int TK = Layout<BITS>::kTileK;
  const int k_tiles = k / TK;
  const int tiles_per_split = (k_tiles + splits - 1) / splits;
  splits = (k_tiles + tiles_per_split - 1) / tiles_per_split;  // no empty splits
  const int n_blocks = (n_pad / kTileN + kWarps - 1) / kWarps;
  const auto run = [&](auto kernel, int bm) {
    const dim3 grid(n_blocks, (m + bm - 1) / bm, splits);
    kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), perm, static_cast<const uint4*>(w), static_cast<const uint4*>(sz),
                                          static_cast<const T*>(bias), static_cast<T*>(out), workspace, counters, m, n, n_pad, k,
                                          group_tiles, tiles_per_split);
  };
  if (m <= 16) run(mma_kernel<T, BITS, 1>, 16);
  else if (m <= 32) run(mma_kernel<T, BITS, 2>, 32);
  else run(mma_kernel<T, BITS, 4>, 64);
  return cudaGetLastError();
}

}  // namespace cq

// Same contract as cq_gemv, any m >= 1; counters holds ceil(n_pad / 128) * ceil(m / BM) zeros
// (BM = 16, 32 or 64 as above; ceil(n_pad / 128) * ceil(m / 16) always suffices).
extern "C" int cq_mma(const void* x, const int* perm, const void* w, const void* sz, const void* bias, void* out, float* workspace, int* counters,
                      int m, int n, int n_pad, int k, int bits, int group_tiles, int splits, int dtype, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (m < 1 || n_pad % cq::kTileN || n % 8 || splits < 1 || group_tiles < 1) return cudaErrorInvalidValue;
  if (bits == 4 && dtype == 0) return cq::launch_mma<half, 4>(x, perm, w, sz, bias, out, workspace, counters, m, n, n_pad, k, group_tiles, splits, s);
  if (bits == 4 && dtype == 1) return cq::launch_mma<__nv_bfloat16, 4>(x, perm, w, sz, bias, out, workspace, counters, m, n, n_pad, k, group_tiles, splits, s);
  if (bits == 8 && dtype == 0) return cq::launch_mma<half, 8>(x, perm, w, sz, bias, out, workspace, counters, m, n, n_pad, k, group_tiles, splits, s);
  if (bits == 8 && dtype == 1) return cq::launch_mma<__nv_bfloat16, 8>(x, perm, w, sz, bias, out, workspace, counters, m, n, n_pad, k, group_tiles, splits, s);
  return cudaErrorInvalidValue;
}
