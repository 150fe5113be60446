/* int8 weight x float activation products for a few rows, on x86-64 CPUs with AVX-512 VNNI.
 *
 * y[m, r] = scale[r] * sum_k x[m, k] * q[r, k]     q int8 [rows, cols], x [M, cols], y [M, rows]
 *
 * Each activation row is put on a 16-bit integer grid first: xq = round(x / s) with s a power of two chosen
 * so that max|xq| <= 32767 (elements within 2^8 of the row's largest are exact in bf16; the others are off by
 * at most s / 2, 1/65536 of the largest). The products then run in integers (vpdpwssd: pairs of int16
 * products summed into int32 lanes), 2048 columns at a time, each partial sum moved into an fp32 accumulator
 * before it can overflow. Reading the int8 weights is the whole cost: the instructions per byte are few
 * enough that two cores read at memory speed, where converting each weight to float first did not.
 *
 * Threads: OpenMP over blocks of 4 weight rows (the same OpenMP runtime as PyTorch's, whose thread count it
 * follows). Every activation row reuses a block while it is in L1, so the weights are read once for all M rows.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define BLOCK_ROWS 4
#define CHUNK 2048 /* columns per int32 partial sum: each lane adds 128 products of at most 32767 * 128 (< 2^31) */

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

/* One activation row onto the int16 grid; returns its step s (0 for an all-zero row). */
static float quantize_row(const void *x, int dtype, int64_t offset, int64_t cols, int16_t *xq) {
    float largest = 0.0f;
    for (int64_t k = 0; k < cols; k++) {
        float v = fabsf(load_float(x, dtype, offset + k));
        if (v > largest || v != v) largest = v;
    }
    if (largest == 0.0f || !isfinite(largest)) {
        memset(xq, 0, cols * sizeof *xq);
        return largest == 0.0f ? 0.0f : largest; /* inf/nan: propagated through the scale below */
    }
    int exponent;
    frexpf(largest / 32767.0f, &exponent); /* largest / 2^exponent <= 32767 */
    float step = ldexpf(1.0f, exponent), inverse = ldexpf(1.0f, -exponent);
    for (int64_t k = 0; k < cols; k++) xq[k] = (int16_t)lrintf(load_float(x, dtype, offset + k) * inverse);
    return step;
}

static inline __m512i widen(const int8_t *p) { /* 32 int8 -> 32 int16 */
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}

/* cols: a multiple of 32. Returns 0, or -1 when out of memory. */
int jetmoe_int8_gemv(const int8_t *q, const void *scale, int scale_dtype, int64_t rows, int64_t cols,
                     const void *x, int x_dtype, int64_t m_rows, void *y, int y_dtype) {
    int16_t *xq = aligned_alloc(64, (size_t)((m_rows * cols * sizeof(int16_t) + 63) / 64 * 64));
    float *steps = malloc((size_t)m_rows * sizeof(float));
    if (!xq || !steps) {
        free(xq);
        free(steps);
        return -1;
    }
    for (int64_t m = 0; m < m_rows; m++) steps[m] = quantize_row(x, x_dtype, m * cols, cols, xq + m * cols);

    int64_t blocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * BLOCK_ROWS, count = rows - first < BLOCK_ROWS ? rows - first : BLOCK_ROWS;
        const int8_t *block = q + first * cols;
        for (int64_t m = 0; m < m_rows; m++) {
            const int16_t *a = xq + m * cols;
            __m512 total[BLOCK_ROWS];
            for (int i = 0; i < BLOCK_ROWS; i++) total[i] = _mm512_setzero_ps();
            for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
                int64_t c1 = c0 + CHUNK < cols ? c0 + CHUNK : cols;
                __m512i part[BLOCK_ROWS];
                for (int i = 0; i < BLOCK_ROWS; i++) part[i] = _mm512_setzero_si512();
                for (int64_t k = c0; k < c1; k += 32) {
                    __m512i av = _mm512_loadu_si512(a + k);
                    if (m == 0) /* the next block's line at this column: keeps the memory system busy */
                        for (int i = 0; i < BLOCK_ROWS; i++)
                            _mm_prefetch((const char *)(block + (BLOCK_ROWS + i) * cols + k), _MM_HINT_T0);
                    for (int i = 0; i < count; i++)
                        part[i] = _mm512_dpwssd_epi32(part[i], av, widen(block + i * cols + k));
                }
                for (int i = 0; i < count; i++) total[i] = _mm512_add_ps(total[i], _mm512_cvtepi32_ps(part[i]));
            }
            for (int i = 0; i < count; i++) {
                float dot = _mm512_reduce_add_ps(total[i]) * steps[m];
                store_float(y, y_dtype, m * rows + first + i, dot * load_float(scale, scale_dtype, first + i));
            }
        }
    }
    free(xq);
    free(steps);
    return 0;
}
