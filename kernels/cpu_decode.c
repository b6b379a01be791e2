// The small operations between the matmuls of a Llama-family decode step, on the CPU.
//
// Why in C: a decoded token of SmolLM2-135M runs 30 blocks; done with torch ops, each block is
// ~50 small ops (norm, rotary embedding, cache write, attention, activation, residual adds) at
// 2-16 microseconds each, about 8 ms per token: more than the 4-bit matmuls themselves (5.7 ms,
// benchmarks/cpu_runtime.py --breakdown). Here each step is one call over all rows of the batch,
// so a block costs four of these calls plus its four matmul calls (cpu_gemm.c).
//
// Everything is float32, row-major, with explicit row strides (in floats) so that the callers
// can hand over column ranges of one buffer (q, k and v are column ranges of the fused qkv
// matmul's output) without copies. Each function is written against the formula transformers'
// Llama modules use, so its results match them to float32 rounding; every row is computed on its
// own, in a fixed order, so a row's result never depends on what else is in the batch (served
// and `compress generate` outputs agree).
//
// The KV cache is compressor/serve/kv_cache.py's slot cache: per layer K and V of shape
// [slots, kv_heads, capacity, head_dim], contiguous; the token at position p of the sequence in
// slot s lives at [s, :, p, :]. A query at position p attends to keys 0..p of its own slot
// (the causal mask), so positions are all the attention needs to know.
// ---------------------------------------------------------------------------------------------

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define CQ_OK 0
#define CQ_BAD_ARGUMENT 1
#define CQ_OUT_OF_MEMORY 2

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float* a, const float* b, int64_t n) {  // n % 8 == 0
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    if (i < n) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    return hsum8(_mm256_add_ps(acc0, acc1));
}

// e^x for 8 lanes (Cephes' expf: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r,
// n added to the exponent bits; relative error ~2e-7, i.e. 1-2 ulp). libm's expf is scalar and
// took most of a batch-32 step's silu and softmax time. Inputs are clamped to +-88.3 (no inf/NaN
// out of finite inputs; below -87.3 the result is 0 or denormal-small, as e^x is).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: n * hi is exact
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n as float bits; n in [-128, 128]: split in two factors so 2^-127..2^-126 and 2^128 stay representable
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i half = _mm256_srai_epi32(ni, 1);
    __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}

static inline float exp1(float x) {  // the same function for one value (loop tails)
    return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)));
}

// y = weight * (x * rsqrt(mean(x^2) + eps)) for one row, in that order (LlamaRMSNorm). y may be x.
static void rms_norm_row(const float* x, const float* weight, float* y, int64_t dim, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float sum = hsum8(acc);
    for (; i < dim; i++) sum += x[i] * x[i];
    float inv = 1.0f / sqrtf(sum / (float)dim + eps);
    for (i = 0; i < dim; i++) y[i] = weight[i] * (x[i] * inv);
}

// h[r] += delta[r] (when delta is not NULL), then y[r] = rms_norm(h[r]) * weight, for every row:
// a block's residual add fused with the norm that reads its result. delta rows are `dim` apart.
int cq_cpu_add_rms_norm(float* h, const float* delta, const float* weight, float* y, int64_t rows, int64_t dim,
                        int64_t h_stride, int64_t y_stride, float eps) {
    if (!h || !weight || !y || rows < 0 || dim <= 0 || h_stride < dim || y_stride < dim) return CQ_BAD_ARGUMENT;
    for (int64_t r = 0; r < rows; r++) {
        float* hr = h + r * h_stride;
        if (delta) {
            const float* dr = delta + r * dim;
            for (int64_t i = 0; i < dim; i++) hr[i] += dr[i];
        }
        rms_norm_row(hr, weight, y + r * y_stride, dim, eps);
    }
    return CQ_OK;
}

// Rotary embedding of one head in place, rotate-half convention (transformers' apply_rotary_pos_emb):
// out[i] = x[i] cos[i] - x[i+d/2] sin[i], out[i+d/2] = x[i+d/2] cos[i+d/2] + x[i] sin[i+d/2].
static void rope_head(float* x, const float* cos, const float* sin, int64_t head_dim) {
    int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + (-b) * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// For each row (one new token: its slot and position), on the fused qkv output
// [rows, (heads + 2 kv_heads) * head_dim] (row stride qkv_stride):
//   q heads, k heads: per-head RMS norm when q_norm/k_norm are given (Qwen3), then the rotary
//   embedding with that row's cos/sin [rows, head_dim]; q is updated in place;
//   k and v are written to the cache at [slot, kv_head, position, :].
int cq_cpu_rope_store(float* qkv, int64_t qkv_stride, int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim,
                      const float* cos, const float* sin, const float* q_norm, const float* k_norm, float eps,
                      float* k_cache, float* v_cache, const int64_t* slots, const int64_t* positions,
                      int64_t slots_total, int64_t capacity) {
    if (!qkv || !cos || !sin || !k_cache || !v_cache || !slots || !positions || rows < 0 || heads <= 0 || kv_heads <= 0 ||
        head_dim <= 0 || head_dim % 2 || heads % kv_heads || qkv_stride < (heads + 2 * kv_heads) * head_dim)
        return CQ_BAD_ARGUMENT;
    for (int64_t r = 0; r < rows; r++) {
        if (slots[r] < 0 || slots[r] >= slots_total || positions[r] < 0 || positions[r] >= capacity) return CQ_BAD_ARGUMENT;
    }
    for (int64_t r = 0; r < rows; r++) {
        float* q = qkv + r * qkv_stride;
        float* k = q + heads * head_dim;
        const float* v = k + kv_heads * head_dim;
        const float* c = cos + r * head_dim;
        const float* s = sin + r * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float* qh = q + h * head_dim;
            if (q_norm) rms_norm_row(qh, q_norm, qh, head_dim, eps);
            rope_head(qh, c, s, head_dim);
        }
        for (int64_t h = 0; h < kv_heads; h++) {
            float* kh = k + h * head_dim;
            if (k_norm) rms_norm_row(kh, k_norm, kh, head_dim, eps);
            rope_head(kh, c, s, head_dim);
            int64_t at = ((slots[r] * kv_heads + h) * capacity + positions[r]) * head_dim;
            for (int64_t i = 0; i < head_dim; i++) {
                k_cache[at + i] = kh[i];
                v_cache[at + i] = v[h * head_dim + i];
            }
        }
    }
    return CQ_OK;
}

// Attention of each row's query heads over keys 0..position of its slot (grouped-query: query
// head h reads kv head h / (heads / kv_heads)): softmax(scale * q k^T) v, in float32 with the
// maximum subtracted, as sdpa computes it. q rows are q_stride apart ([heads * head_dim] used);
// out is [rows, heads * head_dim]. Threads take (row, head) pairs; each thread keeps one buffer
// of scores.
int cq_cpu_attention(const float* q, int64_t q_stride, int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim,
                     const float* k_cache, const float* v_cache, const int64_t* slots, const int64_t* positions,
                     int64_t slots_total, int64_t capacity, float scale, float* out, int threads) {
    if (!q || !k_cache || !v_cache || !slots || !positions || !out || rows < 0 || heads <= 0 || kv_heads <= 0 ||
        head_dim <= 0 || head_dim % 8 || heads % kv_heads || q_stride < heads * head_dim)
        return CQ_BAD_ARGUMENT;
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (slots[r] < 0 || slots[r] >= slots_total || positions[r] < 0 || positions[r] >= capacity) return CQ_BAD_ARGUMENT;
        if (positions[r] + 1 > longest) longest = positions[r] + 1;
    }
    int64_t group = heads / kv_heads, tasks = rows * heads;
    int64_t work = 0;  // multiply-adds, to keep small steps on one thread (starting threads costs more)
    for (int64_t r = 0; r < rows; r++) work += (positions[r] + 1) * heads * head_dim * 2;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && work > (1 << 16))
    {
        float* scores = malloc((size_t)longest * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!scores) continue;
            int64_t r = t / heads, h = t % heads, len = positions[r] + 1;
            const float* qh = q + r * q_stride + h * head_dim;
            size_t base = (size_t)((slots[r] * kv_heads + h / group) * capacity) * head_dim;
            const float* keys = k_cache + base;
            const float* values = v_cache + base;
            float top = -INFINITY;
            for (int64_t j = 0; j < len; j++) {
                float s = scale * dot(qh, keys + j * head_dim, head_dim);
                scores[j] = s;
                if (s > top) top = s;
            }
            __m256 sums = _mm256_setzero_ps(), shift = _mm256_set1_ps(top);
            int64_t j = 0;
            for (; j + 8 <= len; j += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), shift));
                _mm256_storeu_ps(scores + j, e);
                sums = _mm256_add_ps(sums, e);
            }
            float total = hsum8(sums);
            for (; j < len; j++) {
                scores[j] = exp1(scores[j] - top);
                total += scores[j];
            }
            float* o = out + r * heads * head_dim + h * head_dim;  // accumulates in place (L1), one pass over V
            for (int64_t i = 0; i < head_dim; i += 8) _mm256_storeu_ps(o + i, _mm256_setzero_ps());
            for (int64_t j = 0; j < len; j++) {
                __m256 p = _mm256_set1_ps(scores[j]);
                const float* vj = values + j * head_dim;
                for (int64_t i = 0; i < head_dim; i += 8)
                    _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(o + i)));
            }
            __m256 inv = _mm256_set1_ps(1.0f / total);
            for (int64_t i = 0; i < head_dim; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(o + i), inv));
        }
        free(scores);
    }
    return failed ? CQ_OUT_OF_MEMORY : CQ_OK;
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, n + i]: the gated MLP's activation on the fused
// gate/up matmul's output [rows, 2n]; silu(x) = x / (1 + exp(-x)).
int cq_cpu_silu_mul(const float* gate_up, int64_t rows, int64_t n, float* out) {
    if (!gate_up || !out || rows < 0 || n <= 0) return CQ_BAD_ARGUMENT;
    for (int64_t r = 0; r < rows; r++) {
        const float* g = gate_up + r * 2 * n;
        const float* u = g + n;
        float* o = out + r * n;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
        for (; i < n; i++) o[i] = g[i] / (1.0f + exp1(-g[i])) * u[i];
    }
    return CQ_OK;
}
