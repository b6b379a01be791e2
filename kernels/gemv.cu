// y[M, N] = x[M, K] @ dequant(W)[K, N] + b for M <= 8 (decode): a weight-streaming GEMV.
//
// At M <= 8 the GEMM is a pass over the weights; the goal is the device's copy bandwidth, so:
//   * every lane fetches 16 bytes per load (one 512-byte tile per warp, see common.h) and keeps
//     kInFlight = 4 such loads outstanding, plus the next 4 prefetched while it computes;
//   * grid = (32-column tiles, K splits): a 4096 x 4096 layer has only 128 column tiles, so K is
//     split until there are a few blocks per SM (plan in compressor/kernels/ops.py), with the deterministic
//     fix-up from common.h; the 4 warps of a block take interleaved tiles of its K range so the
//     block reads consecutive 2 KB runs;
//   * the activations of the block's K range are staged in shared memory once (<= 16 KB) while
//     the first weight loads are in flight; a lane then reads the x pairs matching its weight
//     pairs (rows 8v + 2t, 8v + 2t + 1) as 32-bit words, conflict-free. With act-order the
//     weight rows are sorted by group at load and the staging gathers x[:, perm] on the fly
//     (scalar loads of a few KB that hit L2), so act-order costs no extra kernel or pass;
//   * fp16: codes become fp16 weights with LOP3 + one HSUB2/HFMA2 + one HMUL2 per two codes
//     (exact, common.h); products are summed in half2 over one tile (4 products per half at
//     4-bit, 2 at 8-bit) and then in fp32, which keeps the error near fp16 output rounding;
//   * bf16: weights and products in fp32.
// The lanes of a warp that share a column (same c = lane / 4) are summed with two shuffles,
// the 4 warps through shared memory.

#include <type_traits>

#include "common.h"

namespace cq {

constexpr int kInFlight = 4;          // tiles per lane per batch
constexpr int kGemvMaxSplitTiles = 32;  // K tiles per block at most (bounds the x staging buffer)

template <typename T, int BITS, int MR>
__global__ void __launch_bounds__(kThreads)
gemv_kernel(const T* __restrict__ x, const int* __restrict__ perm, const uint4* __restrict__ w, const uint4* __restrict__ sz, const T* __restrict__ bias,
            T* __restrict__ out, float* __restrict__ workspace, int* __restrict__ counters, int m, int n, int n_pad, int k,
            int group_tiles, int tiles_per_split) {
  using L = Layout<BITS>;
  constexpr int TK = L::kTileK;
  constexpr int P = L::kPairs;
  constexpr int kSpan = kGemvMaxSplitTiles * TK;
  using T2 = typename Pair<T>::type;
  __shared__ __align__(16) T xs[MR][kSpan];
  __shared__ float partial[kWarps][MR][kTileN];

  const int n_tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int n_tiles = n_pad / kTileN, k_tiles = k / TK;
  const int kt0 = split * tiles_per_split, kt1 = min(k_tiles, kt0 + tiles_per_split);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, c = lane / 4, t = lane % 4;
  const uint4* tiles = w + (size_t)n_tile * k_tiles * 32 + lane;  // tile kt of this column tile: tiles[32 * kt]

  uint4 q[kInFlight];
#pragma unroll
  for (int u = 0; u < kInFlight; ++u) {
    const int kt = kt0 + warp + kWarps * u;
    q[u] = kt < kt1 ? load_stream(tiles + (size_t)kt * 32) : make_uint4(0, 0, 0, 0);
  }

  // Stage x[:, kt0*TK : kt1*TK) (rows past m as zeros) while those loads are in flight.
  if (perm == nullptr) {
    const int vecs_per_row = (kt1 - kt0) * TK / 8;  // 8 elements per 16-byte vector
    for (int i = threadIdx.x; i < MR * vecs_per_row; i += kThreads) {
      const int r = i / vecs_per_row, v = i % vecs_per_row;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r < m) val = __ldg(reinterpret_cast<const uint4*>(x + (size_t)r * k + (size_t)kt0 * TK) + v);
      reinterpret_cast<uint4*>(&xs[r][0])[v] = val;
    }
  } else {
    const int span = (kt1 - kt0) * TK;
    for (int i = threadIdx.x; i < MR * span; i += kThreads) {
      const int r = i / span, e = i % span;
      xs[r][e] = r < m ? x[(size_t)r * k + __ldg(perm + kt0 * TK + e)] : from_float<T>(0.f);
    }
  }
  __syncthreads();

  float acc[MR][4];
#pragma unroll
  for (int r = 0; r < MR; ++r)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[r][j] = 0.f;

  for (int base = kt0 + warp; base < kt1; base += kWarps * kInFlight) {
    uint4 next[kInFlight];  // the following batch, in flight while this one is computed
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int kt = base + kWarps * (kInFlight + u);
      next[u] = kt < kt1 ? load_stream(tiles + (size_t)kt * 32) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int kt = base + kWarps * u;
      if (kt >= kt1) break;
      const uint4 s = __ldg(sz + ((size_t)(kt / group_tiles) * n_tiles + n_tile) * 8 + c);
      const uint32_t words[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
      const half* sh = reinterpret_cast<const half*>(&s);  // scales of columns 8j + c, then zeros
      const int x0 = (kt - kt0) * TK + 2 * t;
      if constexpr (std::is_same_v<T, half>) {
        half2 wp[4][P];
#pragma unroll
        for (int j = 0; j < 4; ++j) dequant_word_half<BITS>(words[j], sh[j], sh[4 + j], wp[j]);
#pragma unroll
        for (int r = 0; r < MR; ++r) {
          half2 xp[P];
#pragma unroll
          for (int v = 0; v < P; ++v) xp[v] = *reinterpret_cast<const half2*>(&xs[r][x0 + 8 * v]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            half2 part = __hmul2(wp[j][0], xp[0]);
#pragma unroll
            for (int v = 1; v < P; ++v) part = __hfma2(wp[j][v], xp[v], part);
            const float2 f = __half22float2(part);
            acc[r][j] += f.x + f.y;
          }
        }
      } else {
        float2 wp[4][P];
#pragma unroll
        for (int j = 0; j < 4; ++j) dequant_word_float<BITS>(words[j], __half2float(sh[j]), __half2float(sh[4 + j]), wp[j]);
#pragma unroll
        for (int r = 0; r < MR; ++r) {
#pragma unroll
          for (int v = 0; v < P; ++v) {
            const float2 xf = __bfloat1622float2(*reinterpret_cast<const T2*>(&xs[r][x0 + 8 * v]));
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[r][j] = fmaf(wp[j][v].y, xf.y, fmaf(wp[j][v].x, xf.x, acc[r][j]));
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) q[u] = next[u];
  }

  // Lanes 4c..4c+3 hold the same 4 columns over different rows of each tile.
#pragma unroll
  for (int r = 0; r < MR; ++r)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], 1);
      acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], 2);
      if (t == 0) partial[warp][r][8 * j + c] = acc[r][j];
    }
  __syncthreads();

  const int n0 = n_tile * kTileN;
  for (int i = threadIdx.x; i < MR * kTileN; i += kThreads) {
    const int r = i / kTileN, col = i % kTileN;
    if (r >= m) continue;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) sum += partial[wi][r][col];
    if (splits == 1) {
      if (n0 + col < n) {
        if (bias != nullptr) sum += to_float(bias[n0 + col]);
        out[(size_t)r * n + n0 + col] = from_float<T>(sum);
      }
    } else {
      workspace[((size_t)split * m + r) * n_pad + n0 + col] = sum;
    }
  }
  if (splits > 1 && arrive_last(counters + n_tile, splits))
    finish_tile(workspace, splits, m, n_pad, n, 0, m, n0, kTileN, bias, out);
}

template <typename T, int BITS>
cudaError_t launch_gemv(const void* x, const int* perm, const void* w, const void* sz, const void* bias, void* out, float* workspace, int* counters,
                        int m, int n, int n_pad, int k, int group_tiles, int splits, cudaStream_t stream) {
  constexpr int TK = Layout<BITS>::kTileK;
  const int k_tiles = k / TK;
  const int tiles_per_split = (k_tiles + splits - 1) / splits;
  if (tiles_per_split > kGemvMaxSplitTiles) return cudaErrorInvalidValue;
  splits = (k_tiles + tiles_per_split - 1) / tiles_per_split;  // no empty splits
  const dim3 grid(n_pad / kTileN, splits);
  const auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), perm, static_cast<const uint4*>(w), static_cast<const uint4*>(sz),
                                          static_cast<const T*>(bias), static_cast<T*>(out), workspace, counters, m, n, n_pad, k,
                                          group_tiles, tiles_per_split);
  };
  if (m <= 1) args(gemv_kernel<T, BITS, 1>);
  else if (m <= 2) args(gemv_kernel<T, BITS, 2>);
  else if (m <= 4) args(gemv_kernel<T, BITS, 4>);
  else if (m <= 8) args(gemv_kernel<T, BITS, 8>);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace cq

// dtype: 0 = fp16, 1 = bf16. Pointers are device pointers: x [m, k] contiguous, 16-byte aligned;
// perm (int32 [k], nullable): act-order, the kernel reads x[:, perm]; bias nullable; out [m, n];
// workspace holds splits * m * n_pad floats (unused when splits == 1), counters n_pad / 32 zeros
// (left zero on return). Returns a cudaError_t.
extern "C" int cq_gemv(const void* x, const int* perm, const void* w, const void* sz, const void* bias, void* out, float* workspace, int* counters,
                       int m, int n, int n_pad, int k, int bits, int group_tiles, int splits, int dtype, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (m < 1 || n_pad % cq::kTileN || splits < 1 || group_tiles < 1) return cudaErrorInvalidValue;
  if (bits == 4 && dtype == 0) return cq::launch_gemv<half, 4>(x, perm, w, sz, bias, out, workspace, counters, m, n, n_pad, k, group_tiles, splits, s);
  if (bits == 4 && dtype == 1) return cq::launch_gemv<__nv_bfloat16, 4>(x, perm, w, sz, bias, out, workspace, counters, m, n, n_pad, k, group_tiles, splits, s);
  if (bits == 8 && dtype == 0) return cq::launch_gemv<half, 8>(x, perm, w, sz, bias, out, workspace, counters, m, n, n_pad, k, group_tiles, splits, s);
  if (bits == 8 && dtype == 1) return cq::launch_gemv<__nv_bfloat16, 8>(x, perm, w, sz, bias, out, workspace, counters, m, n, n_pad, k, group_tiles, splits, s);
  return cudaErrorInvalidValue;
}

extern "C" const char* cq_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
