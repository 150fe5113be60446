/* Matrix-vector products for a few rows (decoding).
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
 * - jetmoe_bf16_gemv: bf16 weights and activations, products summed in fp32 as vdpbf16ps sums them (pairs of
 *   exact products added into fp32 lanes, see simd.h), rounded once to bf16 (nearest even).
 * - jetmoe_f32_gemv: fp32 weights and activations, fused multiply-adds in fp32 lanes; the same value for a row
 *   whatever else shares the call.
 * - jetmoe_gemv: either of the two above, by the activations' dtype (the weights alike).
 * - jetmoe_int8_gemv: int8 weights with one scale per output row. Each activation row is first put on a 16-bit
 *   integer grid, xq = round(x / s) with s a power of two such that max|xq| <= 32767: elements within 2^8 of
 *   the row's largest are exact in bf16, the others are off by at most s / 2 (1/65536 of the largest). The
 *   products then run in integers (pairs of int16 products summed into int32 lanes), 2048 columns at a time,
 *   each partial sum moved into an fp32 accumulator before it can overflow. Rows holding inf or nan give nan.
 *
 * Written once in simd.h's vectors; every instruction-set level computes the same values.
 */
#include "simd.h"

#include <stdlib.h>

#define BLOCK_ROWS 4
#define CHUNK 2048 /* int8: columns per int32 partial sum; each lane adds 128 products of at most 32767 * 128 */

#define PREFETCH_BLOCKS 2 /* how far ahead the weights are fetched into L2 */
#define L1_AHEAD 16384    /* how many bytes ahead into L1, for blocks of at most this size (fetch_into_l1) */

/* A block's rows are read side by side, four streams a few KB apart, which the hardware prefetcher follows
 * poorly; the rows of a block are contiguous, so while the loop reads `step` bytes of each row at `offset`, the
 * same share of a later block is fetched front to back: memory sees one sequential stream
 * (docs/performance.md). Into L2 by default; one activation row goes through small blocks fast enough to use
 * lines fetched into L1 before they are evicted. Prefetches past the end are harmless. */
#define PREFETCH_AHEAD(DISTANCE, LOCALITY)                                                                             \
    const char *later = (const char *)block + (DISTANCE);                                                              \
    for (int64_t b = (BLOCK_ROWS * offset + 63) & ~(int64_t)63; b < BLOCK_ROWS * (offset + step); b += 64)             \
        __builtin_prefetch(later + b, 0, LOCALITY);

static inline void prefetch_ahead(const void *block, int64_t row_bytes, int64_t offset, int64_t step) {
    PREFETCH_AHEAD(PREFETCH_BLOCKS * BLOCK_ROWS * row_bytes, 2)
}

static inline void prefetch_ahead_l1(const void *block, int64_t offset, int64_t step) { PREFETCH_AHEAD(L1_AHEAD, 3) }

/* Whether a call fetches blocks of weight rows of `row_bytes` into L1: where every group has one activation row
 * (decoding one token: a dense layer, a token's experts). Batches keep L2 even for their one-row groups. */
static int fetch_into_l1(const int64_t *groups, int64_t n_groups, int64_t row_bytes) {
    for (int64_t g = 0; g < n_groups; g++)
        if (groups[3 * g + 2] - groups[3 * g + 1] != 1) return 0;
    return BLOCK_ROWS * row_bytes <= L1_AHEAD;
}

/* R activation rows (m .. m + R - 1) against a whole block of BLOCK_ROWS weight rows: R x BLOCK_ROWS independent
 * fp32 chains sharing each weight load (where MANY_REGISTERS hold them). Every chain sums over k in the same order
 * as a row alone, so the values do not depend on how rows are batched; rows in fours keep enough independent
 * chains to hide the latency of the dot product (docs/performance.md). */
#define DEFINE_BLOCK_ROWS(R)                                                                                           \
    static inline void block_rows##R(const uint16_t *block, int64_t cols, const uint16_t *x, int64_t m,                \
                                     int prefetching, uint16_t *y, int64_t rows, int64_t first) {                      \
        vf acc[R][BLOCK_ROWS];                                                                                         \
        for (int r = 0; r < R; r++)                                                                                    \
            for (int i = 0; i < BLOCK_ROWS; i++) acc[r][i] = v_zero();                                                 \
        for (int64_t k = 0; k < cols; k += 2 * LANES) {                                                                \
            bf16_pairs v[R];                                                                                           \
            for (int r = 0; r < R; r++) v[r] = bf16_pairs_load(x + (m + r) * cols + k);                                \
            if (prefetching) prefetch_ahead(block, cols * 2, k * 2, 4 * LANES);                                        \
            for (int i = 0; i < BLOCK_ROWS; i++) {                                                                     \
                bf16_pairs weights = bf16_pairs_load(block + i * cols + k);                                            \
                for (int r = 0; r < R; r++) acc[r][i] = v_dot_bf16(acc[r][i], weights, v[r]);                          \
            }                                                                                                          \
        }                                                                                                              \
        for (int r = 0; r < R; r++)                                                                                    \
            for (int i = 0; i < BLOCK_ROWS; i++)                                                                       \
                store_float(y, BF16, (m + r) * rows + first + i, v_sum(acc[r][i]));                                    \
    }
DEFINE_BLOCK_ROWS(4)
DEFINE_BLOCK_ROWS(2)

/* One activation row `a` against a block's `count` weight rows into acc, FETCH at each step: written out once
 * per prefetch so that the loop carries no test of which one (a batch's products are compute-bound with AVX2). */
#define BF16_ROW(FETCH)                                                                                                \
    for (int64_t k = 0; k < cols; k += 2 * LANES) {                                                                    \
        bf16_pairs av = bf16_pairs_load(a + k);                                                                        \
        FETCH;                                                                                                         \
        for (int i = 0; i < count; i++) acc[i] = v_dot_bf16(acc[i], bf16_pairs_load(block + i * cols + k), av);      \
    }

/* groups: n_groups triples (expert, first row, end row). cols: a multiple of 32. */
int jetmoe_bf16_gemv(const uint16_t *w, int64_t rows, int64_t cols, const uint16_t *x, const int64_t *groups,
                     int64_t n_groups, uint16_t *y, int threads) {
    const int64_t blocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
    const int into_l1 = fetch_into_l1(groups, n_groups, cols * 2);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t g = 0; g < n_groups; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            int64_t first = b * BLOCK_ROWS, count = rows - first < BLOCK_ROWS ? rows - first : BLOCK_ROWS;
            const uint16_t *block = w + (groups[3 * g] * rows + first) * cols;
            const int64_t m0 = groups[3 * g + 1], m_end = groups[3 * g + 2];
            int64_t m = m0;
            if (MANY_REGISTERS && count == BLOCK_ROWS) { /* a whole block: rows in fours, then a pair */
                for (; m + 4 <= m_end; m += 4) block_rows4(block, cols, x, m, m == m0, y, rows, first);
                for (; m + 2 <= m_end; m += 2) block_rows2(block, cols, x, m, m == m0, y, rows, first);
            }
            for (; m < m_end; m++) {
                const uint16_t *a = x + m * cols;
                vf acc[BLOCK_ROWS];
                for (int i = 0; i < BLOCK_ROWS; i++) acc[i] = v_zero();
                if (into_l1)
                    BF16_ROW(prefetch_ahead_l1(block, k * 2, 4 * LANES))
                else
                    BF16_ROW(if (m == m0) prefetch_ahead(block, cols * 2, k * 2, 4 * LANES))
                for (int i = 0; i < count; i++) store_float(y, BF16, m * rows + first + i, v_sum(acc[i]));
            }
        }
    }
    return 0;
}

/* fp32: the same blocks and row batching with fused multiply-adds (one rounding a product and sum), a vector of
 * columns a step, each (row, weight row) one chain of LANES lanes summed at the end. */
#define DEFINE_F32_BLOCK_ROWS(R)                                                                                       \
    static inline void f32_block_rows##R(const float *block, int64_t cols, const float *x, int64_t m,                  \
                                         int prefetching, float *y, int64_t rows, int64_t first) {                     \
        vf acc[R][BLOCK_ROWS];                                                                                         \
        for (int r = 0; r < R; r++)                                                                                    \
            for (int i = 0; i < BLOCK_ROWS; i++) acc[r][i] = v_zero();                                                 \
        for (int64_t k = 0; k < cols; k += LANES) {                                                                    \
            vf v[R];                                                                                                   \
            for (int r = 0; r < R; r++) v[r] = v_loadu(x + (m + r) * cols + k);                                        \
            if (prefetching) prefetch_ahead(block, cols * 4, k * 4, 4 * LANES);                                        \
            for (int i = 0; i < BLOCK_ROWS; i++) {                                                                     \
                vf weights = v_loadu(block + i * cols + k);                                                            \
                for (int r = 0; r < R; r++) acc[r][i] = v_fma(weights, v[r], acc[r][i]);                               \
            }                                                                                                          \
        }                                                                                                              \
        for (int r = 0; r < R; r++)                                                                                    \
            for (int i = 0; i < BLOCK_ROWS; i++) y[(m + r) * rows + first + i] = v_sum(acc[r][i]);                     \
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
                for (; MANY_REGISTERS && m + 4 <= m_end; m += 4)
                    f32_block_rows4(block, cols, x, m, m == m0, y, rows, first);
                for (; MANY_REGISTERS && m + 2 <= m_end; m += 2)
                    f32_block_rows2(block, cols, x, m, m == m0, y, rows, first);
                for (; m < m_end; m++) f32_block_rows1(block, cols, x, m, m == m0, y, rows, first);
            }
            for (; m < m_end; m++) { /* the last, partial block */
                for (int i = 0; i < count; i++) {
                    vf acc = v_zero();
                    for (int64_t k = 0; k < cols; k += LANES)
                        acc = v_fma(v_loadu(block + i * cols + k), v_loadu(x + m * cols + k), acc);
                    y[m * rows + first + i] = v_sum(acc);
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
 * bf16 rows (decoding) take a vector at a time: the same largest magnitude and the same roundings (x times a
 * power of two, rounded to nearest even as lrintf does), so the same grid as the scalar loop. */
static float quantize_row(const void *x, int dtype, int64_t offset, int64_t cols, int16_t *xq) {
    const int lanes = dtype == BF16 && cols % LANES == 0;
    float largest = 0.0f;
    if (lanes) {
        const uint16_t *row = (const uint16_t *)x + offset;
        vf peak = v_zero();
        int nan = 0;
        for (int64_t k = 0; k < cols; k += LANES) {
            vf v = v_load(row, BF16, k);
            nan |= v_any(v != v);
            peak = v_max(peak, v_abs(v));
        }
        largest = nan ? NAN : v_max_lane(peak);
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
        const vf scale = v_set(inverse);
        for (int64_t k = 0; k < cols; k += LANES) {
            vs rounded = __builtin_convertvector(v_round_int(v_load(row, BF16, k) * scale), vs);
            memcpy(xq + k, &rounded, sizeof rounded);
        }
    } else {
        for (int64_t k = 0; k < cols; k++) xq[k] = (int16_t)lrintf(load_float(x, dtype, offset + k) * inverse);
    }
    return ldexpf(1.0f, exponent);
}

/* R activation rows (m ..) against a whole block of int8 weight rows, each weight widened once for all R rows:
 * the same chains, partial sums and roundings per (row, weight row) as one row alone (the loop below). */
#define DEFINE_INT8_BLOCK_ROWS(R)                                                                                      \
    static inline void int8_block_rows##R(const int8_t *block, int64_t cols, const int16_t *xq,                        \
                                          const float *steps, int64_t m, int prefetching, const void *scale,           \
                                          int scale_dtype, int64_t scale_offset, void *y, int y_dtype,                 \
                                          int64_t rows, int64_t first) {                                               \
        vf total[R][BLOCK_ROWS];                                                                                       \
        for (int r = 0; r < R; r++)                                                                                    \
            for (int i = 0; i < BLOCK_ROWS; i++) total[r][i] = v_zero();                                               \
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {                                                                 \
            int64_t c1 = c0 + CHUNK < cols ? c0 + CHUNK : cols;                                                        \
            vi part[R][BLOCK_ROWS];                                                                                    \
            for (int r = 0; r < R; r++)                                                                                \
                for (int i = 0; i < BLOCK_ROWS; i++) part[r][i] = vi_set(0);                                           \
            for (int64_t k = c0; k < c1; k += 2 * LANES) {                                                             \
                vs2 v[R];                                                                                              \
                for (int r = 0; r < R; r++) v[r] = i16_pairs_load(xq + (m + r) * cols + k);                            \
                if (prefetching) prefetch_ahead(block, cols, k, 2 * LANES);                                            \
                for (int i = 0; i < BLOCK_ROWS; i++) {                                                                 \
                    vs2 weights = i16_pairs_widen(block + i * cols + k);                                               \
                    for (int r = 0; r < R; r++) part[r][i] = v_dot_i16(part[r][i], v[r], weights);                     \
                }                                                                                                      \
            }                                                                                                          \
            for (int r = 0; r < R; r++)                                                                                \
                for (int i = 0; i < BLOCK_ROWS; i++)                                                                   \
                    total[r][i] += __builtin_convertvector(part[r][i], vf);                                            \
        }                                                                                                              \
        for (int r = 0; r < R; r++)                                                                                    \
            for (int i = 0; i < BLOCK_ROWS; i++) {                                                                     \
                float dot = v_sum(total[r][i]) * steps[m + r];                                                         \
                store_float(y, y_dtype, (m + r) * rows + first + i,                                                    \
                            dot * load_float(scale, scale_dtype, scale_offset + i));                                   \
            }                                                                                                          \
    }
DEFINE_INT8_BLOCK_ROWS(4)
DEFINE_INT8_BLOCK_ROWS(2)

/* One activation row `a` (on the int16 grid) against a block's `count` rows, columns c0..c1-1, into part: as
 * BF16_ROW. */
#define INT8_ROW(FETCH)                                                                                                \
    for (int64_t k = c0; k < c1; k += 2 * LANES) {                                                                     \
        vs2 av = i16_pairs_load(a + k);                                                                                \
        FETCH;                                                                                                         \
        for (int i = 0; i < count; i++) part[i] = v_dot_i16(part[i], av, i16_pairs_widen(block + i * cols + k));      \
    }

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

    const int64_t blocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
    const int into_l1 = fetch_into_l1(groups, n_groups, cols);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t g = 0; g < n_groups; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            int64_t expert = groups[3 * g], first = b * BLOCK_ROWS;
            int64_t count = rows - first < BLOCK_ROWS ? rows - first : BLOCK_ROWS;
            const int8_t *block = q + (expert * rows + first) * cols;
            const int64_t m0 = groups[3 * g + 1], m_end = groups[3 * g + 2];
            int64_t m = m0;
            if (MANY_REGISTERS && count == BLOCK_ROWS) { /* a whole block: rows in fours, then a pair */
                for (; m + 4 <= m_end; m += 4)
                    int8_block_rows4(block, cols, xq, steps, m, m == m0, scale, scale_dtype, expert * rows + first, y,
                                     y_dtype, rows, first);
                for (; m + 2 <= m_end; m += 2)
                    int8_block_rows2(block, cols, xq, steps, m, m == m0, scale, scale_dtype, expert * rows + first, y,
                                     y_dtype, rows, first);
            }
            for (; m < m_end; m++) {
                const int16_t *a = xq + m * cols;
                vf total[BLOCK_ROWS];
                for (int i = 0; i < BLOCK_ROWS; i++) total[i] = v_zero();
                for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
                    int64_t c1 = c0 + CHUNK < cols ? c0 + CHUNK : cols;
                    vi part[BLOCK_ROWS];
                    for (int i = 0; i < BLOCK_ROWS; i++) part[i] = vi_set(0);
                    if (into_l1)
                        INT8_ROW(prefetch_ahead_l1(block, k, 2 * LANES))
                    else
                        INT8_ROW(if (m == m0) prefetch_ahead(block, cols, k, 2 * LANES))
                    for (int i = 0; i < count; i++) total[i] += __builtin_convertvector(part[i], vf);
                }
                for (int i = 0; i < count; i++) {
                    float dot = v_sum(total[i]) * steps[m];
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

/* A decoding product and the element-wise step that follows it, in one call, so the second step finds its code
 * and data still in cache after the product streamed its weights (docs/performance.md). Each is exactly
 * jetmoe_gemv into `y`, then the other kernel (elementwise.c) on `y`: the same values as the two calls. */
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

/* The instruction-set level this library was compiled for (native/build.py checks it). */
const char *jetmoe_level(void) { return JETMOE_LEVEL; }
