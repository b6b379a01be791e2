// CPU matmuls that read weights in their stored form: GPTQ v1 packed codes, or float16.
//
// Why our own: on an AVX2 CPU (no AVX512-BF16/AMX) torch's packed-int4 matmul
// (_weight_int4pack_mm_for_cpu) needs bfloat16 activations to be fast (with float32 ones it is
// 4-7x slower than dense), its layout is CPU-specific (a repack), and at M = 1 these kernels are
// 1.25-2x faster than it (benchmarks/cpu_runtime.py --kernels). A batch-1 decode step is a stream of matrix-vector products whose weights come from DRAM once per
// token: the speed limit is memory bandwidth, and 4-bit codes are 1/8 of the float32 bytes. These
// kernels decode the codes in registers and accumulate in float32, reading each weight byte once.
//
// ---------------------------------------------------------------------------------------------
// Quantized weights: the GPTQ v1 buffers exactly as they are on disk (nothing is repacked).
//
//   qweight int32 [K*bits/32, N]: word (r, n) holds codes of column n for rows
//           k = r*P .. r*P + P-1 (P = 32/bits codes per word, least significant bits first).
//   qzeros  int32 [G, N*bits/32]: the zero point of (group g, column n) minus one, packed along N
//           the same way ("v1": stored value + 1 is the zero).
//   scales  fp16  [G, N].
//   W[k, n] = scales[g, n] * (q[k, n] - zero[g, n]), g = k / group_size (groups are contiguous:
//           checkpoints with a permuted g_idx are row-sorted by the caller first).
//
// Row r of qweight for 8 adjacent columns n0..n0+7 is 32 contiguous bytes: one AVX2 load gives
// 8 lanes, lane c holding the P codes of column n0+c. Code j is used in place: masking the word
// with (2^bits - 1) << bits*j gives q * 2^(bits*j) per lane, exact as a float, and the matching
// activation is pre-scaled by 2^-(bits*j) once per call (exact: a power of two), so a code costs
// an AND and a convert per 8 weights plus one FMA per activation row; the top code is shifted
// down instead, since in place it would be the sign bit.
//
//   y[m, n] = sum_g scales[g, n] * (sum_{k in g} x[m, k] q[k, n]  -  zero[g, n] sum_{k in g} x[m, k])
//
// The inner sums are float32 FMAs over exact small integers; zero and scale are applied once per
// group. (The subtraction of two sums cancels: relative error ~1e-6 of the output against a
// float64 reference, the level of any float32 GEMM's summation order.)
//
// A block is 16 columns (two vectors: a whole 64-byte line of each qweight row) and rows of x go
// in pairs, so a decoded code vector feeds two FMAs; the block's weight strip (K*bits/2 bytes)
// stays in L1/L2 across the pairs. Rows of qweight are N words apart, so the next rows are
// prefetched explicitly (hardware prefetchers stop at page boundaries). Threads split N (OpenMP;
// the shared object links libgomp.so.1 by soname, which resolves to the copy torch has already
// loaded, so both share one thread pool).
//
// Float16 weights (lm_head / tied embeddings, stored fp16 in the artifact): [N, K] row-major
// (nn.Linear layout); 4 output columns at a time, F16C converts 8 weights per instruction, dot
// products along K accumulate in float32 and are reduced horizontally at the end.
// ---------------------------------------------------------------------------------------------

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define CQ_OK 0
#define CQ_BAD_ARGUMENT 1
#define CQ_OUT_OF_MEMORY 2
#ifndef CQ_PREFETCH_ROWS
#define CQ_PREFETCH_ROWS 16
#endif

static inline __m256 load_scales8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// Zero points of columns n0..n0+7 in group g (v1: stored + 1), as floats.
static inline __m256 load_zeros8(const int32_t* qzeros_row, int n0, int bits) {
    __m256i words, shifts;
    if (bits == 4) {  // one word holds the 8 zeros, nibble c for column n0 + c
        words = _mm256_set1_epi32(qzeros_row[n0 / 8]);
        shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    } else {  // 8-bit: two words, byte c % 4 of word c / 4
        int32_t w0 = qzeros_row[n0 / 4], w1 = qzeros_row[n0 / 4 + 1];
        words = _mm256_setr_epi32(w0, w0, w0, w0, w1, w1, w1, w1);
        shifts = _mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24);
    }
    __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    __m256i z = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(words, shifts), mask), _mm256_set1_epi32(1));
    return _mm256_cvtepi32_ps(z);
}

// One block of 8*NB columns (NB = 2: a whole 64-byte line of each qweight row) for MT rows of
// the prepared activations (see cq_cpu_quant_linear). MT, NB and BITS are compile-time constants
// after inlining, so the loops over them unroll and the accumulators stay in registers.
static inline __attribute__((always_inline)) void quant_tile(
    const float* xs, const float* xsum, int64_t k, int64_t groups, const int32_t* qweight, const int32_t* qzeros,
    const uint16_t* scales, const float* bias, float* y, int64_t ldy, int64_t n, int group_size, int n0, int64_t m0,
    const int MT, const int NB, const int BITS) {
    const int P = 32 / BITS;
    const int64_t words_per_group = group_size / P, zero_words = n * BITS / 32;
    __m256i masks[8];
    for (int j = 0; j < P - 1; j++) masks[j] = _mm256_set1_epi32(((1 << BITS) - 1) << (BITS * j));
    // FMA latency is ~4-5 cycles: one accumulator per row and vector would serialize the P FMAs
    // of a word, so each gets A = 2 independent chains (code j feeds chain j % 2). A is the same
    // for every tile shape, so a row's sums happen in the same order whatever M is and whichever
    // rows share its tile: a request's output does not depend on what it is batched with.
    const int A = 2;
    __m256 out[2][2];
    for (int i = 0; i < MT; i++)
        for (int v = 0; v < NB; v++) out[i][v] = bias ? _mm256_loadu_ps(bias + n0 + 8 * v) : _mm256_setzero_ps();
    const int32_t* wp = qweight + n0;
    for (int64_t g = 0; g < groups; g++) {
        __m256 acc[2][2][2];
        for (int i = 0; i < MT; i++)
            for (int a = 0; a < A; a++)
                for (int v = 0; v < NB; v++) acc[i][a][v] = _mm256_setzero_ps();
        const float* xp = xs + m0 * k + g * group_size;
        for (int64_t r = 0; r < words_per_group; r++, wp += n, xp += P) {
            // Rows are n words apart: the hardware prefetchers stop at page boundaries, so fetch ahead.
            _mm_prefetch((const char*)(wp + CQ_PREFETCH_ROWS * n), _MM_HINT_T0);
            __m256i w[2];
            for (int v = 0; v < NB; v++) w[v] = _mm256_loadu_si256((const __m256i*)(wp + 8 * v));
            for (int j = 0; j < P; j++) {
                for (int v = 0; v < NB; v++) {
                    // Code j in place: q * 2^(BITS*j), exact in float32 (the activation was scaled
                    // by 2^-(BITS*j) to match); the top code is shifted down (in place it would be the sign bit).
                    const __m256i codes = j == P - 1 ? _mm256_srli_epi32(w[v], BITS * j) : _mm256_and_si256(w[v], masks[j]);
                    const __m256 c = _mm256_cvtepi32_ps(codes);
                    for (int i = 0; i < MT; i++)
                        acc[i][j % A][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(xp + i * k + j), c, acc[i][j % A][v]);
                }
            }
        }
        // sum_k x (q - z) = sum_k x q - z sum_k x, scaled once per group.
        for (int v = 0; v < NB; v++) {
            const __m256 zero = load_zeros8(qzeros + g * zero_words, n0 + 8 * v, BITS);
            const __m256 s = load_scales8(scales + g * n + n0 + 8 * v);
            for (int i = 0; i < MT; i++) {
                __m256 total = acc[i][0][v];
                for (int a = 1; a < A; a++) total = _mm256_add_ps(total, acc[i][a][v]);
                const __m256 dot = _mm256_fnmadd_ps(zero, _mm256_broadcast_ss(xsum + (m0 + i) * groups + g), total);
                out[i][v] = _mm256_fmadd_ps(s, dot, out[i][v]);
            }
        }
    }
    for (int i = 0; i < MT; i++)
        for (int v = 0; v < NB; v++) _mm256_storeu_ps(y + (m0 + i) * ldy + n0 + 8 * v, out[i][v]);
}

#define QUANT_TILE(MT, NB, BITS) quant_tile(xs, xsum, k, groups, qweight, qzeros, scales, bias, y, ldy, n, group_size, n0, m0, MT, NB, BITS)
#define QUANT_TILE_ROWS(NB, BITS)                   \
    if (mt == 2) {                                  \
        QUANT_TILE(2, NB, BITS);                    \
    } else {                                        \
        QUANT_TILE(1, NB, BITS);                    \
    }

// Per-call scratch: the scaled activations and their per-group sums (grown, never shrunk).
static _Thread_local float* scratch = NULL;
static _Thread_local size_t scratch_floats = 0;

static float* scratch_for(size_t floats) {
    if (floats > scratch_floats) {
        free(scratch);
        scratch = (float*)aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
        scratch_floats = scratch ? floats : 0;
    }
    return scratch;
}

// One quantized layer: the GPTQ v1 buffers (see the top of the file) and its shape. Built once per
// layer by the caller, so a call passes one pointer instead of eight arguments.
typedef struct {
    const int32_t* qweight;
    const int32_t* qzeros;
    const uint16_t* scales;
    const float* bias;  // float32 [n] or NULL
    int64_t n, k;
    int32_t bits, group_size;  // group_size = k for one group
} cq_quant_layer;

// y[m, n] = x[m, :] @ W[:, n] + bias[n]; x float32 [m, k] and y float32 [m, n], both contiguous.
// Needs n % 8 == 0, group_size dividing k and a multiple of 32/bits.
int cq_cpu_quant_linear(const cq_quant_layer* layer, const float* x, float* y, int64_t m, int threads) {
    const int32_t *qweight = layer->qweight, *qzeros = layer->qzeros;
    const uint16_t* scales = layer->scales;
    const float* bias = layer->bias;
    const int64_t n = layer->n, k = layer->k, ldx = k, ldy = n;
    const int bits = layer->bits, group_size = layer->group_size;
    if ((bits != 4 && bits != 8) || n % 8 || group_size <= 0 || k % group_size || group_size % (32 / bits) || m < 0 ||
        threads < 1)
        return CQ_BAD_ARGUMENT;
    const int P = 32 / bits;
    const int64_t groups = k / group_size;
    // Prepare once per call: x[k] * 2^-(bits * (k % P)) (exact power-of-two scaling, so the codes
    // can be used in place without a shift) and sum_k x per group (for the zero points).
    float* xs = scratch_for((size_t)(m * k + m * groups));
    if (!xs) return CQ_OUT_OF_MEMORY;
    float* xsum = xs + m * k;
    float factors[8];
    for (int j = 0; j < P - 1; j++) factors[j] = 1.0f / (float)(1u << (bits * j));  // at most 2^-24: exact
    for (int64_t i = 0; i < m; i++) {
        for (int64_t g = 0; g < groups; g++) {
            float total = 0.0f;
            for (int64_t kk = g * group_size; kk < (g + 1) * group_size; kk++) {
                const float v = x[i * ldx + kk];
                total += v;
                xs[i * k + kk] = (kk % P == P - 1) ? v : v * factors[kk % P];  // the top code is shifted down
            }
            xsum[i * groups + g] = total;
        }
    }
    const int blocks = (int)((n + 15) / 16);  // 16 columns each; the last has 8 when n % 16 == 8
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        const int n0 = b * 16;
        const int full = n0 + 16 <= n;
        for (int64_t m0 = 0; m0 < m; m0 += 2) {  // rows in pairs: 2 rows x 2 chains x 2 vectors = 8 accumulators
            const int mt = m - m0 < 2 ? (int)(m - m0) : 2;
            if (bits == 4) {
                if (full) { QUANT_TILE_ROWS(2, 4) } else { QUANT_TILE_ROWS(1, 4) }
            } else {
                if (full) { QUANT_TILE_ROWS(2, 8) } else { QUANT_TILE_ROWS(1, 8) }
            }
        }
    }
    return CQ_OK;
}

// W as float32 [n, k] (nn.Linear layout): w[c, kk] = scales[g, c] * (q[kk, c] - zero[g, c]), the
// exact values dequantize_gptq_v1 gives (a small integer times an fp16 scale is exact in float32),
// for F.linear when a call has more rows than the kernels are worth running for. Threads split
// blocks of 16 columns, each reading a 64-byte line of every qweight row once.
int cq_cpu_dequantize(const cq_quant_layer* layer, float* w, int threads) {
    const int64_t n = layer->n, k = layer->k;
    const int bits = layer->bits, group_size = layer->group_size;
    if ((bits != 4 && bits != 8) || n % 8 || group_size <= 0 || k % group_size || group_size % (32 / bits) || threads < 1)
        return CQ_BAD_ARGUMENT;
    const int P = 32 / bits;
    const int64_t words = k / P, zero_words = n * bits / 32;
    const int32_t mask = (1 << bits) - 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < n; n0 += 16) {
        const int64_t width = n - n0 < 16 ? n - n0 : 16;
        for (int64_t r = 0; r < words; r++) {
            const int64_t g = r * P / group_size;
            const int32_t* row = layer->qweight + r * n + n0;
            for (int64_t c = 0; c < width; c++) {
                const int64_t col = n0 + c;
                const int32_t zword = layer->qzeros[g * zero_words + col * bits / 32];
                const int32_t zero = ((zword >> (bits * (col % P))) & mask) + 1;
                const float scale = _cvtsh_ss(layer->scales[g * n + col]);
                float* out = w + col * k + r * P;
                for (int j = 0; j < P; j++) out[j] = (float)((int32_t)(((uint32_t)row[c] >> (bits * j)) & (uint32_t)mask) - zero) * scale;
            }
        }
    }
    return CQ_OK;
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 4 output columns (rows n0..n0+3 of w) x MT rows of x.
static inline __attribute__((always_inline)) void half_tile(const float* x, int64_t ldx, const uint16_t* w, const float* bias,
                                                            float* y, int64_t ldy, int64_t k, int64_t n0, int64_t m0,
                                                            int NT, const int MT) {
    __m256 acc[4][2];
    for (int c = 0; c < NT; c++)
        for (int i = 0; i < MT; i++) acc[c][i] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < k; kk += 8) {
        __m256 xv[2];
        for (int i = 0; i < MT; i++) xv[i] = _mm256_loadu_ps(x + (m0 + i) * ldx + kk);
        for (int c = 0; c < NT; c++) {
            const __m256 wv = load_scales8(w + (n0 + c) * k + kk);
            for (int i = 0; i < MT; i++) acc[c][i] = _mm256_fmadd_ps(xv[i], wv, acc[c][i]);
        }
    }
    for (int c = 0; c < NT; c++)
        for (int i = 0; i < MT; i++) y[(m0 + i) * ldy + n0 + c] = hsum8(acc[c][i]) + (bias ? bias[n0 + c] : 0.0f);
}

// y[m, n] = x[m, :] @ w[n, :] + bias[n] with w float16 [n, k] (nn.Linear layout), x float32 [m, k]
// and y float32 [m, n] contiguous, bias float32 or NULL. Needs k % 8 == 0.
int cq_cpu_half_linear(const uint16_t* w, const float* bias, const float* x, float* y, int64_t m, int64_t n, int64_t k,
                       int threads) {
    const int64_t ldx = k, ldy = n;
    if (k % 8 || m < 0 || n < 0 || threads < 1) return CQ_BAD_ARGUMENT;
    const int64_t blocks = (n + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * 4;
        const int nt = n - n0 < 4 ? (int)(n - n0) : 4;
        for (int64_t m0 = 0; m0 < m; m0 += 2) {
            if (m - m0 >= 2) {
                if (nt == 4) half_tile(x, ldx, w, bias, y, ldy, k, n0, m0, 4, 2);
                else half_tile(x, ldx, w, bias, y, ldy, k, n0, m0, nt, 2);
            } else {
                if (nt == 4) half_tile(x, ldx, w, bias, y, ldy, k, n0, m0, 4, 1);
                else half_tile(x, ldx, w, bias, y, ldy, k, n0, m0, nt, 1);
            }
        }
    }
    return CQ_OK;
}
