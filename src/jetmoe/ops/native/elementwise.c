/* Fused element-wise kernels of a JetMoE layer, fp32 or bf16, on x86-64 CPUs with AVX-512 (BF16).
 *
 * PyTorch runs each of these as a chain of element-wise operators (an RMSNorm is eight of them: to fp32, pow,
 * mean, add, rsqrt, mul, to bf16, mul), each a pass over memory and, while decoding, ~15 us of dispatch. Each
 * kernel here is one pass that rounds where PyTorch's chain rounds: a bf16 result is rounded to bf16 (nearest
 * even) at every point where the chain stores a bf16 tensor, from the same fp32 values. What can still differ:
 * - rms_norm: the order of the fp32 sum of squares (PyTorch's reduction order is its own), so 1/rms(x) may
 *   differ in the last bit, and a bf16 output then rarely by one unit of its last place;
 * - silu: exp() is a polynomial here (Cephes' expf, within 1-2 units in the last place of fp32), so
 *   silu/sigmoid may differ in the last fp32 bit, and a bf16 output rarely by one unit.
 * rotary and combine do the chain's multiplications and additions exactly: their results are bit for bit
 * PyTorch's.
 *
 * Shapes are checked by the Python wrappers (ops/native/elementwise.py); the feature dimensions are multiples
 * of 16 (one AVX-512 register of fp32) and contiguous. Rows are split over `threads` OpenMP threads when
 * there is enough work to pay for waking them.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { F32 = 0, BF16 = 1 };
#define PARALLEL_MIN_ELEMENTS 32768 /* below this a single thread finishes before a second one wakes up */

static inline int64_t element_size(int dtype) { return dtype == F32 ? 4 : 2; }

static inline __m512 load16(const void *base, int dtype, int64_t i) {
    if (dtype == F32) return _mm512_loadu_ps((const float *)base + i);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* v as the chain would store it: rounded to bf16 (nearest even) and read back; fp32 unchanged. */
static inline __m512 round_to(__m512 v, int dtype) {
    if (dtype == F32) return v;
    __m256bh b = _mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)b), 16));
}

static inline void store16(void *base, int dtype, int64_t i, __m512 v) {
    if (dtype == F32) {
        _mm512_storeu_ps((float *)base + i, v);
    } else {
        __m256bh b = _mm512_cvtneps_pbh(v);
        _mm256_storeu_si256((__m256i *)((uint16_t *)base + i), (__m256i)b);
    }
}

/* exp(x), Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* overflows to inf, underflows to 0 */
}

static inline __m512 sigmoid16(__m512 x) {
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* silu(x) = x / (1 + exp(-x)), PyTorch's formula (not x * sigmoid(x), which rounds differently) */
static inline __m512 silu16(__m512 x) {
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* ---- RMSNorm: y = w * round(x * r), r = 1 / sqrt(mean(x^2) + eps) in fp32 ------------------------------ */

static float inverse_rms(const void *row, int dtype, int64_t cols, float eps) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
        __m512 a = load16(row, dtype, c), b = load16(row, dtype, c + 16);
        acc0 = _mm512_add_ps(acc0, _mm512_mul_ps(a, a)); /* x^2 rounded to fp32 first, as pow(2) stores it */
        acc1 = _mm512_add_ps(acc1, _mm512_mul_ps(b, b));
    }
    for (; c < cols; c += 16) {
        __m512 a = load16(row, dtype, c);
        acc0 = _mm512_add_ps(acc0, _mm512_mul_ps(a, a));
    }
    float mean = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) / (float)cols;
    return 1.0f / sqrtf(mean + eps);
}

int jetmoe_rms_norm(const void *x, const void *weight, void *out, float *inv_rms, int64_t rows, int64_t cols,
                    float eps, int dtype, int threads) {
    const int64_t size = element_size(dtype);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + r * cols * size;
        char *out_row = (char *)out + r * cols * size;
        float scale = inverse_rms(row, dtype, cols, eps);
        if (inv_rms) inv_rms[r] = scale;
        __m512 s = _mm512_set1_ps(scale);
        for (int64_t c = 0; c < cols; c += 16) {
            __m512 normalized = round_to(_mm512_mul_ps(load16(row, dtype, c), s), dtype);
            store16(out_row, dtype, c, _mm512_mul_ps(load16(weight, dtype, c), normalized));
        }
    }
    return 0;
}

/* Gradients of the norm, as the hand-written backward in modeling/norm_rotary.py computes them:
 *   n = x * r (fp32), gn = round(g * w), dot = mean(gn * n)
 *   grad_x = round(r * (gn - n * dot)),   grad_w = sum over rows of g * round(n) (fp32, into grad_weight).
 * grad_x or grad_weight may be NULL (not needed). */
int jetmoe_rms_norm_backward(const void *x, const void *weight, const float *inv_rms, const void *grad,
                             void *grad_x, float *grad_weight, int64_t rows, int64_t cols, int dtype, int threads) {
    const int64_t size = element_size(dtype);
    if (rows * cols < PARALLEL_MIN_ELEMENTS) threads = 1;
    float *partial = NULL;
    if (grad_weight) {
        partial = calloc((size_t)threads * (size_t)cols, sizeof(float));
        if (!partial) return 1;
    }
#pragma omp parallel num_threads(threads)
    {
        int thread = 0, team = 1;
#ifdef _OPENMP
        thread = omp_get_thread_num();
        team = omp_get_num_threads();
#endif
        float *mine = partial ? partial + (int64_t)thread * cols : NULL;
        int64_t first = rows * thread / team, end = rows * (thread + 1) / team;
        for (int64_t r = first; r < end; r++) {
            const char *row = (const char *)x + r * cols * size;
            const char *grad_row = (const char *)grad + r * cols * size;
            __m512 s = _mm512_set1_ps(inv_rms[r]);
            if (mine) {
                for (int64_t c = 0; c < cols; c += 16) {
                    __m512 normalized = round_to(_mm512_mul_ps(load16(row, dtype, c), s), dtype);
                    __m512 acc = _mm512_loadu_ps(mine + c);
                    _mm512_storeu_ps(mine + c, _mm512_add_ps(acc, _mm512_mul_ps(load16(grad_row, dtype, c), normalized)));
                }
            }
            if (!grad_x) continue;
            __m512 dot = _mm512_setzero_ps();
            for (int64_t c = 0; c < cols; c += 16) {
                __m512 gn = round_to(_mm512_mul_ps(load16(grad_row, dtype, c), load16(weight, dtype, c)), dtype);
                dot = _mm512_add_ps(dot, _mm512_mul_ps(gn, _mm512_mul_ps(load16(row, dtype, c), s)));
            }
            __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / (float)cols);
            char *out_row = (char *)grad_x + r * cols * size;
            for (int64_t c = 0; c < cols; c += 16) {
                __m512 gn = round_to(_mm512_mul_ps(load16(grad_row, dtype, c), load16(weight, dtype, c)), dtype);
                __m512 normalized = _mm512_mul_ps(load16(row, dtype, c), s);
                store16(out_row, dtype, c, _mm512_mul_ps(s, _mm512_sub_ps(gn, _mm512_mul_ps(normalized, mean))));
            }
        }
    }
    if (grad_weight) {
        for (int64_t c = 0; c < cols; c++) {
            float total = 0.0f;
            for (int t = 0; t < threads; t++) total += partial[(int64_t)t * cols + c];
            grad_weight[c] = total;
        }
        free(partial);
    }
    return 0;
}

/* ---- SiLU GLU: y = round(silu(g)) * u for h = [g | u] (each row: `inner` gate columns, then `inner` up) ---- */

int jetmoe_silu_mul(const void *h, void *out, int64_t rows, int64_t inner, int dtype, int threads) {
    const int64_t size = element_size(dtype);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inner >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *gate = (const char *)h + r * 2 * inner * size, *up = gate + inner * size;
        char *out_row = (char *)out + r * inner * size;
        for (int64_t c = 0; c < inner; c += 16) {
            __m512 g = load16(gate, dtype, c);
            __m512 activated = round_to(silu16(g), dtype);
            store16(out_row, dtype, c, _mm512_mul_ps(activated, load16(up, dtype, c)));
        }
    }
    return 0;
}

/* grad_h = [grad_g | grad_u]: grad_u = round(dy * round(silu(g))), grad_g = round(round(dy * u) * silu'(g)),
 * silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g), as PyTorch's silu_backward. */
int jetmoe_silu_mul_backward(const void *h, const void *grad, void *grad_h, int64_t rows, int64_t inner, int dtype,
                             int threads) {
    const int64_t size = element_size(dtype);
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inner >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *gate = (const char *)h + r * 2 * inner * size, *up = gate + inner * size;
        const char *grad_row = (const char *)grad + r * inner * size;
        char *grad_gate = (char *)grad_h + r * 2 * inner * size, *grad_up = grad_gate + inner * size;
        for (int64_t c = 0; c < inner; c += 16) {
            __m512 g = load16(gate, dtype, c), dy = load16(grad_row, dtype, c);
            __m512 s = sigmoid16(g);
            __m512 activated = round_to(silu16(g), dtype);
            store16(grad_up, dtype, c, _mm512_mul_ps(dy, activated));
            __m512 grad_activated = round_to(_mm512_mul_ps(dy, load16(up, dtype, c)), dtype);
            __m512 slope = _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_mul_ps(g, _mm512_sub_ps(one, s))));
            store16(grad_gate, dtype, c, _mm512_mul_ps(grad_activated, slope));
        }
    }
    return 0;
}

/* ---- Rotary embedding: y = round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1] ----
 * x is [B, T, H, D] with element strides (sb, st, sh) and contiguous rows of D; cos and sin are contiguous
 * [B or 1, T, D] (cos_sb = T * D, or 0 to broadcast one table over the batch); out is contiguous [B, T, H, D].
 * `inverse` computes the gradient instead: dx = round(round(dy * cos) + rotate_half^T(round(dy * sin))),
 * rotate_half^T(y) = [y2, -y1]: the sum autograd forms from the same chain. */
static inline __m512 rotary_part(const char *x, const char *cos, const char *sin, int64_t c, int64_t half,
                                 int dtype, int inverse) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 direct = round_to(_mm512_mul_ps(load16(x, dtype, c), load16(cos, dtype, c)), dtype);
    __m512 rotated;
    if (!inverse) {
        __m512 partner = c < half ? _mm512_sub_ps(zero, load16(x, dtype, c + half)) : load16(x, dtype, c - half);
        rotated = round_to(_mm512_mul_ps(partner, load16(sin, dtype, c)), dtype);
    } else {
        rotated = c < half ? round_to(_mm512_mul_ps(load16(x, dtype, c + half), load16(sin, dtype, c + half)), dtype)
                           : _mm512_sub_ps(zero, round_to(_mm512_mul_ps(load16(x, dtype, c - half),
                                                                        load16(sin, dtype, c - half)), dtype));
    }
    return _mm512_add_ps(direct, rotated);
}

int jetmoe_rotary(const void *x, int64_t sb, int64_t st, int64_t sh, const void *cos, const void *sin, int64_t cos_sb,
                  void *out, int64_t batch, int64_t length, int64_t heads, int64_t dim, int inverse, int dtype,
                  int threads) {
    const int64_t size = element_size(dtype), half = dim / 2;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static) \
    if (batch * length * heads * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < length; t++) {
            const char *cos_row = (const char *)cos + (b * cos_sb + t * dim) * size;
            const char *sin_row = (const char *)sin + (b * cos_sb + t * dim) * size;
            for (int64_t h = 0; h < heads; h++) {
                const char *x_row = (const char *)x + (b * sb + t * st + h * sh) * size;
                char *out_row = (char *)out + (((b * length) + t) * heads + h) * dim * size;
                for (int64_t c = 0; c < dim; c += 16)
                    store16(out_row, dtype, c, rotary_part(x_row, cos_row, sin_row, c, half, dtype, inverse));
            }
        }
    }
    return 0;
}

/* ---- Combine a token's expert outputs: out[n] = round(round(sum_j round(y[row(n, j)] * g[n, j])) + bias) ----
 * y holds the N * k expert output rows, slot n * k + j at row rows[n * k + j] (rows NULL: slot order); the
 * gates g [N, k] and bias [H] are in y's dtype. The slot sum is in fp32 in slot order (for k = 2 exactly
 * PyTorch's single rounded add). */
int jetmoe_combine(const void *y, const int64_t *rows, const void *gates, const void *bias, void *out,
                   int64_t tokens, int64_t k, int64_t hidden, int dtype, int threads) {
    const int64_t size = element_size(dtype);
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * k * hidden >= PARALLEL_MIN_ELEMENTS)
    for (int64_t n = 0; n < tokens; n++) {
        char *out_row = (char *)out + n * hidden * size;
        for (int64_t c = 0; c < hidden; c += 16) {
            __m512 total = _mm512_setzero_ps();
            for (int64_t j = 0; j < k; j++) {
                int64_t slot = n * k + j, row = rows ? rows[slot] : slot;
                __m512 gate = _mm512_set1_ps(dtype == F32 ? ((const float *)gates)[slot] : 0.0f);
                if (dtype != F32) {
                    uint32_t bits = (uint32_t)((const uint16_t *)gates)[slot] << 16;
                    float value;
                    memcpy(&value, &bits, sizeof value);
                    gate = _mm512_set1_ps(value);
                }
                __m512 product = round_to(_mm512_mul_ps(load16((const char *)y + row * hidden * size, dtype, c), gate), dtype);
                total = j == 0 ? product : _mm512_add_ps(total, product);
            }
            store16(out_row, dtype, c, _mm512_add_ps(round_to(total, dtype), load16(bias, dtype, c)));
        }
    }
    return 0;
}
