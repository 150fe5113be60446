/* Matrix-vector products for a few rows (decoding), on x86-64 CPUs with AVX-512 (VNNI and BF16).
 *
 * The kernels compute y[m, r] = sum_k x[m, k] * W_e[r, k] for the rows m of groups: a group (e, first, end)
 * multiplies rows first..end-1 of x by expert e's weight W_e (W is [E, rows, cols], one expert for a dense
 * layer). Each output element is one row of x against one weight row, whatever the grouping: a token gets the
 * same value bit for bit whether its rows go through a dense layer, a group or a slot of its own.
 *
 * Reading the weights is the whole cost: a decoding step streams every weight it uses once, and these loops
 * do few enough instructions per byte that two cores read at memory speed. Work is split over `threads`
 * OpenMP threads (the caller passes PyTorch's intra-op thread count; with PyTorch's Linux wheels this is the
 * same OpenMP runtime, so the two share one pool) in blocks of 4 weight rows; every row of a group reuses a
 * block while it sits in L1, so a weight is read once for all the rows that use it.
 *
 * - jetmoe_bf16_gemv: bf16 weights and activations, products summed in fp32 (vdpbf16ps: pairs of exact
 *   products added into fp32 lanes; denormal inputs count as zero), rounded once to bf16 (nearest even).
 * - jetmoe_f32_gemv: fp32 weights and activations, fused multiply-adds in fp32 lanes. As fast as MKL's one-row
 *   fp32 product here or faster ([32000, 1024]: 4.3 vs 4.5 ms a row, 8 rows 5.6 vs 14.8 ms through F.linear;
 *   benchmarks/gemv_bandwidth.py), and the same value for a row whatever else shares the call.
 * - jetmoe_gemv: either of the two above, by the activations' dtype (the weights alike).
 * - jetmoe_int8_gemv: int8 weights with one scale per output row. Each activation row is first put on a 16-bit
 *   integer grid, xq = round(x / s) with s a power of two such that max|xq| <= 32767: elements within 2^8 of
 *   the row's largest are exact in bf16, the others are off by at most s / 2 (1/65536 of the largest). The
 *   products then run in integers (vpdpwssd: pairs of int16 products summed into int32 lanes), 2048 columns
 *   at a time, each partial sum moved into an fp32 accumulator before it can overflow. Rows holding inf or
 *   nan give nan.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define BLOCK_ROWS 4
#define CHUNK 2048 /* int8: columns per int32 partial sum; each lane adds 128 products of at most 32767 * 128 */

static inline float load_float(const void *p, int dtype, int64_t i) {
    if (dtype == F32) return ((const float *)p)[i];
    if (dtype == BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return _cvtsh_ss(((const uint16_t *)p)[i]);
}

static inline void store_float(void *p, int dtype, int64_t i, float f) {
    if (dtype == F32) {
        ((float *)p)[i] = f;
    } else if (dtype == BF16) {
        __m128bh b = _mm_cvtneps_pbh(_mm_set1_ps(f)); /* round to nearest even, as PyTorch's conversion */
        uint16_t bits;
        memcpy(&bits, &b, sizeof bits);
        ((uint16_t *)p)[i] = bits;
    } else {
        ((uint16_t *)p)[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    }
}

/* Prefetching the next block's line at the same column keeps more reads in flight than the hardware
 * prefetcher alone (10-30% at these sizes on Sapphire Rapids). Prefetches past the end are harmless.
 *
 * Streaming the weights through the caches evicts the cores' L2 (2 MiB each): the operator that runs after a
 * product of 4 MB or more pays ~100 us to fetch its code and data again (a 7 us index_put took 105 us, a 24 us
 * SDPA call 124 us), ~4 ms of a 25 ms batch-1 step of the "small" config. Keeping the weights out of L2 cost
 * more than that here: _MM_HINT_NTA prefetches (L1 only) read at 8 GB/s instead of 21; cldemote or clflushopt
 * of each block after use cut the penalty to ~20 us but slowed the products by 40% (step 25 -> 28 ms). */
static inline void prefetch_next_block(const void *block, int64_t row_bytes, int64_t offset) {
    for (int i = 0; i < BLOCK_ROWS; i++)
        _mm_prefetch((const char *)block + (BLOCK_ROWS + i) * row_bytes + offset, _MM_HINT_T0);
}

/* R activation rows (m .. m + R - 1) against a whole block of BLOCK_ROWS weight rows: R x BLOCK_ROWS independent
 * fp32 chains sharing each weight load. Every chain sums over k in the same order as a row alone, so the values
 * do not depend on how rows are batched. One row at a time, the four chains of a block wait on the latency of
 * vdpbf16ps: a [32000, 2048] product took 2.8 ms for one row and 9.7 ms for eight; with rows in fours 6.3 ms
 * (and 5.5 -> 3.1 ms for four rows). */
#define DEFINE_BLOCK_ROWS(R)                                                                                       \
    static inline void block_rows##R(const uint16_t *block, int64_t cols, const uint16_t *x, int64_t m,        \
                                     int prefetch, uint16_t *y, int64_t rows, int64_t first) {                   \
        __m512 acc[R][BLOCK_ROWS];                                                                                 \
        for (int r = 0; r < R; r++)                                                                                \
            for (int i = 0; i < BLOCK_ROWS; i++) acc[r][i] = _mm512_setzero_ps();                                  \
        for (int64_t k = 0; k < cols; k += 32) {                                                                   \
            __m512bh v[R];                                                                                         \
            for (int r = 0; r < R; r++) v[r] = (__m512bh)_mm512_loadu_si512(x + (m + r) * cols + k);              \
            if (prefetch) prefetch_next_block(block, cols * 2, k * 2);                                             \
            for (int i = 0; i < BLOCK_ROWS; i++) {                                                                 \
                __m512bh weights = (__m512bh)_mm512_loadu_si512(block + i * cols + k);                             \
                for (int r = 0; r < R; r++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], weights, v[r]);                \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < R; r++)                                                                                \
            for (int i = 0; i < BLOCK_ROWS; i++)                                                                   \
                store_float(y, BF16, (m + r) * rows + first + i, _mm512_reduce_add_ps(acc[r][i]));                 \
    }
DEFINE_BLOCK_ROWS(4)
DEFINE_BLOCK_ROWS(2)

/* groups: n_groups triples (expert, first row, end row). cols: a multiple of 32. */
int jetmoe_bf16_gemv(const uint16_t *w, int64_t rows, int64_t cols, const uint16_t *x, const int64_t *groups,
                     int64_t n_groups, uint16_t *y, int threads) {
    int64_t blocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t g = 0; g < n_groups; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            int64_t first = b * BLOCK_ROWS, count = rows - first < BLOCK_ROWS ? rows - first : BLOCK_ROWS;
            const uint16_t *block = w + (groups[3 * g] * rows + first) * cols;
            const int64_t m0 = groups[3 * g + 1], m_end = groups[3 * g + 2];
            int64_t m = m0;
            if (count == BLOCK_ROWS) { /* a whole block: rows in fours, then a pair */
                for (; m + 4 <= m_end; m += 4) block_rows4(block, cols, x, m, m == m0, y, rows, first);
                for (; m + 2 <= m_end; m += 2) block_rows2(block, cols, x, m, m == m0, y, rows, first);
            }
            for (; m < m_end; m++) {
                const uint16_t *a = x + m * cols;
                __m512 acc[BLOCK_ROWS];
                for (int i = 0; i < BLOCK_ROWS; i++) acc[i] = _mm512_setzero_ps();
                for (int64_t k = 0; k < cols; k += 32) {
                    __m512bh av = (__m512bh)_mm512_loadu_si512(a + k);
                    if (m == m0) prefetch_next_block(block, cols * 2, k * 2);
                    for (int i = 0; i < count; i++)
                        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(block + i * cols + k), av);
                }
                for (int i = 0; i < count; i++)
                    store_float(y, BF16, m * rows + first + i, _mm512_reduce_add_ps(acc[i]));
            }
        }
    }
    return 0;
}

/* fp32: the same blocks and row batching with fused multiply-adds (one rounding a product and sum), 16 columns a
 * step, each (row, weight row) one chain of 16 lanes summed at the end. */
#define DEFINE_F32_BLOCK_ROWS(R)                                                                                   \
    static inline void f32_block_rows##R(const float *block, int64_t cols, const float *x, int64_t m,            \
                                         int prefetch, float *y, int64_t rows, int64_t first) {                   \
        __m512 acc[R][BLOCK_ROWS];                                                                                 \
        for (int r = 0; r < R; r++)                                                                                \
            for (int i = 0; i < BLOCK_ROWS; i++) acc[r][i] = _mm512_setzero_ps();                                  \
        for (int64_t k = 0; k < cols; k += 16) {                                                                   \
            __m512 v[R];                                                                                           \
            for (int r = 0; r < R; r++) v[r] = _mm512_loadu_ps(x + (m + r) * cols + k);                           \
            if (prefetch) prefetch_next_block(block, cols * 4, k * 4);                                             \
            for (int i = 0; i < BLOCK_ROWS; i++) {                                                                 \
                __m512 weights = _mm512_loadu_ps(block + i * cols + k);                                            \
                for (int r = 0; r < R; r++) acc[r][i] = _mm512_fmadd_ps(weights, v[r], acc[r][i]);                 \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < R; r++)                                                                                \
            for (int i = 0; i < BLOCK_ROWS; i++) y[(m + r) * rows + first + i] = _mm512_reduce_add_ps(acc[r][i]);  \
    }
DEFINE_F32_BLOCK_ROWS(4)
DEFINE_F32_BLOCK_ROWS(2)
DEFINE_F32_BLOCK_ROWS(1)

/* groups as jetmoe_bf16_gemv; cols: a multiple of 16. */
int jetmoe_f32_gemv(const float *w, int64_t rows, int64_t cols, const float *x, const int64_t *groups,
                    int64_t n_groups, float *y, int threads) {
    int64_t blocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t g = 0; g < n_groups; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            int64_t first = b * BLOCK_ROWS, count = rows - first < BLOCK_ROWS ? rows - first : BLOCK_ROWS;
            const float *block = w + (groups[3 * g] * rows + first) * cols;
            const int64_t m0 = groups[3 * g + 1], m_end = groups[3 * g + 2];
            int64_t m = m0;
            if (count == BLOCK_ROWS) {
                for (; m + 4 <= m_end; m += 4) f32_block_rows4(block, cols, x, m, m == m0, y, rows, first);
                for (; m + 2 <= m_end; m += 2) f32_block_rows2(block, cols, x, m, m == m0, y, rows, first);
                for (; m < m_end; m++) f32_block_rows1(block, cols, x, m, m == m0, y, rows, first);
            }
            for (; m < m_end; m++) { /* the last, partial block */
                for (int i = 0; i < count; i++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t k = 0; k < cols; k += 16)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(block + i * cols + k), _mm512_loadu_ps(x + m * cols + k),
                                              acc);
                    y[m * rows + first + i] = _mm512_reduce_add_ps(acc);
                }
            }
        }
    }
    return 0;
}

/* The product in the activations' dtype (BF16 or F32; the weights alike). */
int jetmoe_gemv(const void *w, int64_t rows, int64_t cols, const void *x, const int64_t *groups, int64_t n_groups,
                void *y, int dtype, int threads) {
    if (dtype == F32) return jetmoe_f32_gemv(w, rows, cols, x, groups, n_groups, y, threads);
    if (dtype == BF16) return jetmoe_bf16_gemv(w, rows, cols, x, groups, n_groups, y, threads);
    return -3;
}

/* One activation row onto the int16 grid; returns its step s (0 for an all-zero row, nan/inf if it holds one).
 * bf16 rows (decoding) take 16 lanes at a time: the same largest magnitude and the same roundings (x times a
 * power of two, rounded to nearest even as lrintf does), so the same grid; a scalar loop cost ~8 us a row of
 * 1024, ~0.5 ms of a batch-1 int8 step of the "small" config. */
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static float quantize_row(const void *x, int dtype, int64_t offset, int64_t cols, int16_t *xq) {
    const int lanes = dtype == BF16 && cols % 16 == 0;
    float largest = 0.0f;
    if (lanes) {
        const uint16_t *row = (const uint16_t *)x + offset;
        __m512 peak = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t k = 0; k < cols; k += 16) {
            __m512 v = bf16x16(row + k);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            peak = _mm512_max_ps(peak, _mm512_abs_ps(v));
        }
        largest = nan ? NAN : _mm512_reduce_max_ps(peak);
    } else {
        for (int64_t k = 0; k < cols; k++) {
            float v = fabsf(load_float(x, dtype, offset + k));
            if (v > largest || v != v) largest = v;
        }
    }
    if (largest == 0.0f || !isfinite(largest)) {
        memset(xq, 0, cols * sizeof *xq);
        return largest;
    }
    int exponent;
    frexpf(largest / 32767.0f, &exponent); /* largest / 2^exponent < 32767 */
    float inverse = ldexpf(1.0f, -exponent);
    if (lanes) {
        const uint16_t *row = (const uint16_t *)x + offset;
        const __m512 scale = _mm512_set1_ps(inverse);
        for (int64_t k = 0; k < cols; k += 16) {
            __m512i rounded = _mm512_cvt_roundps_epi32(_mm512_mul_ps(bf16x16(row + k), scale),
                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_storeu_si256((__m256i *)(xq + k), _mm512_cvtepi32_epi16(rounded));
        }
    } else {
        for (int64_t k = 0; k < cols; k++) xq[k] = (int16_t)lrintf(load_float(x, dtype, offset + k) * inverse);
    }
    return ldexpf(1.0f, exponent);
}

static inline __m512i widen(const int8_t *p) { /* 32 int8 -> 32 int16 */
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}

/* R activation rows (m ..) against a whole block of int8 weight rows, each weight widened once for all R rows:
 * the same chains, partial sums and roundings per (row, weight row) as one row alone (the loop below). */
#define DEFINE_INT8_BLOCK_ROWS(R)                                                                                  \
    static inline void int8_block_rows##R(const int8_t *block, int64_t cols, const int16_t *xq,                  \
                                          const float *steps, int64_t m, int prefetch, const void *scale,         \
                                          int scale_dtype, int64_t scale_offset, void *y, int y_dtype,            \
                                          int64_t rows, int64_t first) {                                          \
        __m512 total[R][BLOCK_ROWS];                                                                               \
        for (int r = 0; r < R; r++)                                                                                \
            for (int i = 0; i < BLOCK_ROWS; i++) total[r][i] = _mm512_setzero_ps();                                \
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {                                                             \
            int64_t c1 = c0 + CHUNK < cols ? c0 + CHUNK : cols;                                                    \
            __m512i part[R][BLOCK_ROWS];                                                                           \
            for (int r = 0; r < R; r++)                                                                            \
                for (int i = 0; i < BLOCK_ROWS; i++) part[r][i] = _mm512_setzero_si512();                          \
            for (int64_t k = c0; k < c1; k += 32) {                                                                \
                __m512i v[R];                                                                                      \
                for (int r = 0; r < R; r++) v[r] = _mm512_loadu_si512(xq + (m + r) * cols + k);                   \
                if (prefetch) prefetch_next_block(block, cols, k);                                                 \
                for (int i = 0; i < BLOCK_ROWS; i++) {                                                             \
                    __m512i weights = widen(block + i * cols + k);                                                 \
                    for (int r = 0; r < R; r++) part[r][i] = _mm512_dpwssd_epi32(part[r][i], v[r], weights);       \
                }                                                                                                  \
            }                                                                                                      \
            for (int r = 0; r < R; r++)                                                                            \
                for (int i = 0; i < BLOCK_ROWS; i++)                                                               \
                    total[r][i] = _mm512_add_ps(total[r][i], _mm512_cvtepi32_ps(part[r][i]));                      \
        }                                                                                                          \
        for (int r = 0; r < R; r++)                                                                                \
            for (int i = 0; i < BLOCK_ROWS; i++) {                                                                 \
                float dot = _mm512_reduce_add_ps(total[r][i]) * steps[m + r];                                      \
                store_float(y, y_dtype, (m + r) * rows + first + i,                                                \
                            dot * load_float(scale, scale_dtype, scale_offset + i));                               \
            }                                                                                                      \
    }
DEFINE_INT8_BLOCK_ROWS(4)
DEFINE_INT8_BLOCK_ROWS(2)

/* q: int8 [E, rows, cols], scale [E, rows]. Returns 0, or -1 when out of memory. */
int jetmoe_int8_gemv(const int8_t *q, const void *scale, int scale_dtype, int64_t rows, int64_t cols,
                     const void *x, int x_dtype, int64_t m_rows, const int64_t *groups, int64_t n_groups, void *y,
                     int y_dtype, int threads) {
    int16_t *xq = malloc((size_t)(m_rows * cols) * sizeof(int16_t));
    float *steps = malloc((size_t)m_rows * sizeof(float));
    if (!xq || !steps) {
        free(xq);
        free(steps);
        return -1;
    }
    for (int64_t m = 0; m < m_rows; m++) steps[m] = quantize_row(x, x_dtype, m * cols, cols, xq + m * cols);

    int64_t blocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t g = 0; g < n_groups; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            int64_t expert = groups[3 * g], first = b * BLOCK_ROWS;
            int64_t count = rows - first < BLOCK_ROWS ? rows - first : BLOCK_ROWS;
            const int8_t *block = q + (expert * rows + first) * cols;
            const int64_t m0 = groups[3 * g + 1], m_end = groups[3 * g + 2];
            int64_t m = m0;
            if (count == BLOCK_ROWS) { /* a whole block: rows in fours, then a pair */
                for (; m + 4 <= m_end; m += 4)
                    int8_block_rows4(block, cols, xq, steps, m, m == m0, scale, scale_dtype, expert * rows + first, y,
                                     y_dtype, rows, first);
                for (; m + 2 <= m_end; m += 2)
                    int8_block_rows2(block, cols, xq, steps, m, m == m0, scale, scale_dtype, expert * rows + first, y,
                                     y_dtype, rows, first);
            }
            for (; m < m_end; m++) {
                const int16_t *a = xq + m * cols;
                __m512 total[BLOCK_ROWS];
                for (int i = 0; i < BLOCK_ROWS; i++) total[i] = _mm512_setzero_ps();
                for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
                    int64_t c1 = c0 + CHUNK < cols ? c0 + CHUNK : cols;
                    __m512i part[BLOCK_ROWS];
                    for (int i = 0; i < BLOCK_ROWS; i++) part[i] = _mm512_setzero_si512();
                    for (int64_t k = c0; k < c1; k += 32) {
                        __m512i av = _mm512_loadu_si512(a + k);
                        if (m == m0) prefetch_next_block(block, cols, k);
                        for (int i = 0; i < count; i++)
                            part[i] = _mm512_dpwssd_epi32(part[i], av, widen(block + i * cols + k));
                    }
                    for (int i = 0; i < count; i++) total[i] = _mm512_add_ps(total[i], _mm512_cvtepi32_ps(part[i]));
                }
                for (int i = 0; i < count; i++) {
                    float dot = _mm512_reduce_add_ps(total[i]) * steps[m];
                    store_float(y, y_dtype, m * rows + first + i,
                                dot * load_float(scale, scale_dtype, expert * rows + first + i));
                }
            }
        }
    }
    free(xq);
    free(steps);
    return 0;
}

/* A decoding product and the element-wise step that follows it, in one call. Run as separate operators,
 * the second one started right after the product had streamed its weights through the caches and paid ~80 us
 * to fetch its code and data again (a SiLU GLU of two rows: 6 us warm, 85 us after a [2816, 1024] product);
 * here it follows in the same call. Each is exactly jetmoe_gemv into `y`, then the other kernel
 * (elementwise.c) on `y`: the same values as the two calls. bf16 or fp32 throughout. */
int jetmoe_silu_mul(const void *h, void *out, int64_t rows, int64_t inner, int dtype, int threads);
int jetmoe_combine(const void *y, const int64_t *rows, const void *gates, const void *bias, void *out,
                   int64_t tokens, int64_t k, int64_t hidden, int dtype, int threads);

/* y = x W_e^T [m_rows, rows] (rows = 2I), out = silu(y[:, :I]) * y[:, I:] [m_rows, I]. */
int jetmoe_gemv_silu_mul(const void *w, int64_t rows, int64_t cols, const void *x, const int64_t *groups,
                         int64_t n_groups, void *y, int64_t m_rows, void *out, int dtype, int threads) {
    int status = jetmoe_gemv(w, rows, cols, x, groups, n_groups, y, dtype, threads);
    return status ? status : jetmoe_silu_mul(y, out, m_rows, rows / 2, dtype, threads);
}

/* y = x W_e^T [tokens * k, rows] in slot order, out[n] = sum_j y[n * k + j] * gates[n, j] + bias [tokens, rows]. */
int jetmoe_gemv_combine(const void *w, int64_t rows, int64_t cols, const void *x, const int64_t *groups,
                        int64_t n_groups, void *y, const void *gates, const void *bias, int64_t tokens, int64_t k,
                        void *out, int dtype, int threads) {
    int status = jetmoe_gemv(w, rows, cols, x, groups, n_groups, y, dtype, threads);
    return status ? status : jetmoe_combine(y, NULL, gates, bias, out, tokens, k, rows, dtype, threads);
}
