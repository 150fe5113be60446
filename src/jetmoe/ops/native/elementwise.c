/* Fused element-wise kernels of a JetMoE layer, fp32 or bf16, on x86-64 CPUs with AVX-512 (BF16).
 *
 * PyTorch runs each of these as a chain of element-wise operators (an RMSNorm is eight of them: to fp32, pow,
 * mean, add, rsqrt, mul, to bf16, mul), each a pass over memory and, while decoding, ~15 us of dispatch. Each
 * kernel here is one pass that computes what the chain computes, bit for bit: every value the chain stores in
 * bf16 is rounded to bf16 (nearest even) from the same fp32 value, and where the chain's own order of
 * operations decides the fp32 result, the kernel follows it:
 * - rms_norm sums the squares, and combine's backward the gate gradients, in the order of PyTorch's CPU sum
 *   (see ordered_sum);
 * - silu uses PyTorch's vector exp (SLEEF's expf_u10, see exp16) with the same fused multiply-adds; PyTorch
 *   computes a row's last (width mod 32) elements with the C library's scalar exp instead, so callers give
 *   this kernel widths that are multiples of 32 (ops/fused.py);
 * - rotary and combine multiply and add as the chain does.
 * The backward kernels of rms_norm (a hand-written formula with sums of its own) are within roundings of the
 * PyTorch formula, not bit for bit. tests/ops/test_fused.py checks all of this against the chains.
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

static inline float load1(const void *base, int dtype, int64_t i) {
    if (dtype == F32) return ((const float *)base)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
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

/* exp(x) as PyTorch computes it on AVX-512 CPUs (SLEEF's expf_u10, which its vectorised exp calls): x = q ln2 + s
 * with ln2 in two parts, a degree-6 polynomial in s with fused multiply-adds, times 2^q in two steps; 0 below
 * -104, inf above 100. The same operations in the same order give the same fp32 value, bit for bit. */
static inline __m512 exp16(__m512 x) {
    __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(1.442695040888963407359924681001892137f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 qf = _mm512_cvtepi32_ps(q);
    __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-0.693145751953125f), x);
    s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.428606765330187045e-06f), s);
    __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    __m512i half = _mm512_srai_epi32(q, 1); /* 2^q as 2^(q/2) * 2^(q - q/2): no overflow of the exponent field */
    __m512 scale1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(half, _mm512_set1_epi32(0x7f)), 23));
    __m512 scale2 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(q, half), _mm512_set1_epi32(0x7f)), 23));
    u = _mm512_mul_ps(_mm512_mul_ps(u, scale1), scale2);
    u = _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), _mm512_setzero_ps());
    return _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), x, _CMP_LT_OQ), _mm512_set1_ps(INFINITY));
}

/* One value of exp16 (the router's gates, decode.c). */
float jetmoe_exp(float x) { return _mm512_cvtss_f32(exp16(_mm512_set1_ps(x))); }

float jetmoe_exp_shifted(float *x, int64_t n, float shift) {
    __m512 total = _mm512_setzero_ps(), s = _mm512_set1_ps(shift);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 e = _mm512_maskz_mov_ps(lanes, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), s)));
        _mm512_mask_storeu_ps(x + i, lanes, e);
        total = _mm512_add_ps(total, e);
    }
    return _mm512_reduce_add_ps(total);
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

static inline __m256 load8(const void *base, int dtype, int64_t i) {
    if (dtype == F32) return _mm256_loadu_ps((const float *)base + i);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline __m256 round8_to(__m256 v, int dtype) {
    if (dtype == F32) return v;
    __m128bh b = _mm256_cvtneps_pbh(v);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)b), 16));
}

/* Vector `vector` (8 elements) of the terms a * b (a * a where b is NULL), each as the chain stores it: in
 * fp32 for the norm's squares (it squares fp32 copies), rounded to `product_dtype` for products of tensors. */
static inline __m256 term8(const void *a, const void *b, int dtype, int product_dtype, int64_t vector) {
    __m256 x = load8(a, dtype, vector * 8);
    return round8_to(_mm256_mul_ps(x, b ? load8(b, dtype, vector * 8) : x), product_dtype);
}

/* sum(a * b) over a row in PyTorch's order, so that a sum the chain reduces is PyTorch's bit for bit. Its CPU
 * sum of a contiguous row (ATen's cascade sum, fp32 accumulation): vectors of 8 dealt round-robin to 4
 * accumulators, each summed in a cascade of 4 levels (level l takes 2^p blocks of level l - 1,
 * p = max(4, ceil(log2(rounds)) / 4)); the levels are then added into the first, a leftover vector into the
 * first accumulator, the 4 accumulators in order, and the 8 lanes one by one. (cols is a multiple of 16
 * here: no single leftover elements.) */
static float ordered_sum(const void *a, const void *b, int dtype, int product_dtype, int64_t cols) {
    enum { ILP = 4, LEVELS = 4 };
    const int64_t vectors = cols / 8, rounds = vectors / ILP;
    int64_t log2_rounds = 0;
    while (((int64_t)1 << log2_rounds) < rounds) log2_rounds++;
    const int64_t power = log2_rounds / LEVELS > 4 ? log2_rounds / LEVELS : 4, step = (int64_t)1 << power;
    __m256 acc[LEVELS][ILP];
    for (int l = 0; l < LEVELS; l++)
        for (int k = 0; k < ILP; k++) acc[l][k] = _mm256_setzero_ps();
    int64_t i = 0;
    while (i + step <= rounds) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < ILP; k++)
                acc[0][k] = _mm256_add_ps(acc[0][k], term8(a, b, dtype, product_dtype, i * ILP + k));
        for (int l = 1; l < LEVELS; l++) {
            for (int k = 0; k < ILP; k++) {
                acc[l][k] = _mm256_add_ps(acc[l][k], acc[l - 1][k]);
                acc[l - 1][k] = _mm256_setzero_ps();
            }
            if (i & ((step - 1) << (l * power))) break;
        }
    }
    for (; i < rounds; i++)
        for (int k = 0; k < ILP; k++)
            acc[0][k] = _mm256_add_ps(acc[0][k], term8(a, b, dtype, product_dtype, i * ILP + k));
    for (int l = 1; l < LEVELS; l++)
        for (int k = 0; k < ILP; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[l][k]);
    for (int64_t v = rounds * ILP; v < vectors; v++)
        acc[0][0] = _mm256_add_ps(acc[0][0], term8(a, b, dtype, product_dtype, v));
    __m256 sum = acc[0][0];
    for (int k = 1; k < ILP; k++) sum = _mm256_add_ps(sum, acc[0][k]);
    float lanes[8], total = 0.0f;
    _mm256_storeu_ps(lanes, sum);
    for (int k = 0; k < 8; k++) total += lanes[k];
    return total;
}

/* 1 / sqrt(mean(x^2) + eps): the mean is the sum divided by the count, as PyTorch's mean. */
static float inverse_rms(const void *row, int dtype, int64_t cols, float eps) {
    return 1.0f / sqrtf(ordered_sum(row, NULL, dtype, F32, cols) / (float)cols + eps);
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
                    __m512 term = _mm512_mul_ps(load16(grad_row, dtype, c), normalized);
                    _mm512_storeu_ps(mine + c, _mm512_add_ps(acc, term));
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
            __m512 slope = _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one);
            store16(grad_gate, dtype, c, _mm512_mul_ps(_mm512_mul_ps(grad_activated, s), slope));
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
                __m512 gate = _mm512_set1_ps(load1(gates, dtype, slot));
                const char *y_row = (const char *)y + row * hidden * size;
                __m512 product = round_to(_mm512_mul_ps(load16(y_row, dtype, c), gate), dtype);
                total = j == 0 ? product : _mm512_add_ps(total, product);
            }
            store16(out_row, dtype, c, _mm512_add_ps(round_to(total, dtype), load16(bias, dtype, c)));
        }
    }
    return 0;
}

/* Gradients of combine (no bias: its gradient is a plain sum over tokens, left to PyTorch), as autograd forms
 * them through the chain: grad_y[row(n, j)] = round(dy[n] * g[n, j]), and grad_gates[n, j] = round(sum_h
 * round(dy[n, h] * y[row(n, j), h])) summed in PyTorch's order. grad_gates may be NULL (not needed). */
int jetmoe_combine_backward(const void *y, const int64_t *rows, const void *gates, const void *grad, void *grad_y,
                            void *grad_gates, int64_t tokens, int64_t k, int64_t hidden, int dtype, int threads) {
    const int64_t size = element_size(dtype);
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * k * hidden >= PARALLEL_MIN_ELEMENTS)
    for (int64_t n = 0; n < tokens; n++) {
        const char *grad_row = (const char *)grad + n * hidden * size;
        for (int64_t j = 0; j < k; j++) {
            int64_t slot = n * k + j, row = rows ? rows[slot] : slot;
            char *grad_y_row = (char *)grad_y + row * hidden * size;
            __m512 g = _mm512_set1_ps(load1(gates, dtype, slot));
            for (int64_t c = 0; c < hidden; c += 16)
                store16(grad_y_row, dtype, c, _mm512_mul_ps(load16(grad_row, dtype, c), g));
            if (!grad_gates) continue;
            float total = ordered_sum(grad_row, (const char *)y + row * hidden * size, dtype, dtype, hidden);
            if (dtype == F32) {
                ((float *)grad_gates)[slot] = total;
            } else {
                __m128bh b = _mm_cvtneps_pbh(_mm_set1_ps(total));
                uint16_t bits;
                memcpy(&bits, &b, sizeof bits);
                ((uint16_t *)grad_gates)[slot] = bits;
            }
        }
    }
    return 0;
}

/* ---- Cross-entropy over a vocabulary: per-row log-sum-exp, and the gradient softmax - one-hot ---------------
 * Rows of `vocab` logits (a multiple of 16) in fp32 or bf16, `row_stride` elements apart. The log-sum-exp is
 * max-shifted and summed in fp32 (its own order: within fp32 roundings of torch.logsumexp). */
int jetmoe_logsumexp_rows(const void *x, int64_t row_stride, float *lse, int64_t rows, int64_t vocab, int dtype,
                          int threads) {
    const int64_t size = element_size(dtype);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * vocab >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + r * row_stride * size;
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t c = 0; c < vocab; c += 16) top = _mm512_max_ps(top, load16(row, dtype, c));
        float peak = _mm512_reduce_max_ps(top);
        if (!isfinite(peak)) { /* all -inf, or inf / nan present: what logsumexp gives for them */
            float naive = 0.0f;
            for (int64_t c = 0; c < vocab; c++) naive += expf(load1(row, dtype, c));
            lse[r] = isnan(peak) ? NAN : (peak == INFINITY ? INFINITY : logf(naive));
            continue;
        }
        __m512 shift = _mm512_set1_ps(peak), acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 32 <= vocab; c += 32) {
            acc0 = _mm512_add_ps(acc0, exp16(_mm512_sub_ps(load16(row, dtype, c), shift)));
            acc1 = _mm512_add_ps(acc1, exp16(_mm512_sub_ps(load16(row, dtype, c + 16), shift)));
        }
        for (; c < vocab; c += 16) acc0 = _mm512_add_ps(acc0, exp16(_mm512_sub_ps(load16(row, dtype, c), shift)));
        lse[r] = peak + logf(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)));
    }
    return 0;
}

/* grad[r, v] = (exp(x[r, v] - lse[r]) - (v == target[r])) * scale[r], rounded to dtype; grad is contiguous. */
int jetmoe_cross_entropy_backward(const void *x, int64_t row_stride, const float *lse, const int64_t *targets,
                                  const float *scale, void *grad, int64_t rows, int64_t vocab, int dtype, int threads) {
    const int64_t size = element_size(dtype);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * vocab >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + r * row_stride * size;
        char *grad_row = (char *)grad + r * vocab * size;
        __m512 shift = _mm512_set1_ps(lse[r]), s = _mm512_set1_ps(scale[r]);
        int64_t target = targets[r];
        for (int64_t c = 0; c < vocab; c += 16) {
            __m512 p = exp16(_mm512_sub_ps(load16(row, dtype, c), shift));
            if (target >= c && target < c + 16)
                p = _mm512_mask_sub_ps(p, (__mmask16)(1u << (target - c)), p, _mm512_set1_ps(1.0f));
            store16(grad_row, dtype, c, _mm512_mul_ps(p, s));
        }
    }
    return 0;
}

/* ---- Causal attention backward: probabilities and score gradients recomputed from the scores --------------
 * scores: `blocks` blocks of `rows` rows of `keys` scores (q . k, unscaled), fp32 or bf16, contiguous; row r of a
 * block is query position r % q_len, the last q_len of `keys` positions, so it sees keys 0 .. r % q_len + keys -
 * q_len. lse: the forward's log-sum-exp of the scaled scores per row (fp32). A key a row cannot see gets 0.
 *   probs[r, j]       = exp(scale * scores[r, j] - lse[r])
 *   grad_scores[r, j] = probs[r, j] * (grad_probs[r, j] - delta[r]) * scale,  delta[r] = sum(grad_out * out)[r]
 * grad_scores may be grad_probs (in place). The tail of a row (keys mod 16) is handled with masked loads. */
static inline __m512 load16_masked(const void *base, int dtype, int64_t i, __mmask16 lanes) {
    if (dtype == F32) return _mm512_maskz_loadu_ps(lanes, (const float *)base + i);
    __m256i half = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)base + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static inline void store16_masked(void *base, int dtype, int64_t i, __m512 v, __mmask16 lanes) {
    if (dtype == F32) {
        _mm512_mask_storeu_ps((float *)base + i, lanes, v);
    } else {
        __m256bh b = _mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16((uint16_t *)base + i, lanes, (__m256i)b);
    }
}

static inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1));
}

static void causal_attention_rows(const void *scores, const void *grad_probs, const float *lse, const float *delta,
                                  void *out, int64_t blocks, int64_t rows, int64_t q_len, int64_t keys, float scale,
                                  int dtype, int threads) {
    const int64_t size = element_size(dtype), total = blocks * rows;
#pragma omp parallel for num_threads(threads) schedule(static) if (total * keys >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < total; r++) {
        const int64_t visible = (r % rows) % q_len + keys - q_len + 1, offset = r * keys * size;
        const char *s_row = (const char *)scores + offset;
        const char *g_row = grad_probs ? (const char *)grad_probs + offset : NULL;
        char *o_row = (char *)out + offset;
        const __m512 shift = _mm512_set1_ps(lse[r]), k = _mm512_set1_ps(scale);
        const __m512 d = _mm512_set1_ps(delta ? delta[r] : 0.0f);
        for (int64_t c = 0; c < keys; c += 16) {
            const __mmask16 lanes = first_lanes(keys - c), seen = first_lanes(visible - c);
            __m512 v = _mm512_setzero_ps();
            if (seen) {
                __m512 p = exp16(_mm512_fmsub_ps(load16_masked(s_row, dtype, c, seen), k, shift));
                if (g_row) {
                    __m512 centred = _mm512_sub_ps(load16_masked(g_row, dtype, c, seen), d);
                    p = _mm512_mul_ps(_mm512_mul_ps(p, centred), k);
                }
                v = _mm512_maskz_mov_ps(seen, p);
            }
            store16_masked(o_row, dtype, c, v, lanes);
        }
    }
}

int jetmoe_causal_attention_probs(const void *scores, const float *lse, void *probs, int64_t blocks, int64_t rows,
                                  int64_t q_len, int64_t keys, float scale, int dtype, int threads) {
    causal_attention_rows(scores, NULL, lse, NULL, probs, blocks, rows, q_len, keys, scale, dtype, threads);
    return 0;
}

int jetmoe_causal_attention_score_grad(const void *scores, const void *grad_probs, const float *lse,
                                       const float *delta, void *grad_scores, int64_t blocks, int64_t rows,
                                       int64_t q_len, int64_t keys, float scale, int dtype, int threads) {
    causal_attention_rows(scores, grad_probs, lse, delta, grad_scores, blocks, rows, q_len, keys, scale, dtype,
                          threads);
    return 0;
}

/* ---- Transpose of 16-bit rows with zero padding: dst[c, r] = src[r, c] for r < rows, 0 for rows <= r < padded --
 * src: `rows` rows of `cols` elements, `src_stride` elements apart; dst: `cols` rows of `padded` elements,
 * `dst_stride` apart. A bit copy (bf16 or fp16 alike). PyTorch's strided copy moved bf16 at ~1.5 GB/s here;
 * blocks of 32 x 32 transposed in registers (the unpack butterfly within 128-bit lanes, then a 4 x 4 transpose
 * of the lanes) run at memory speed. Column blocks are split over the threads (each writes its own dst rows). */
static inline void transpose_block32(const uint16_t *src, int64_t src_stride, uint16_t *dst, int64_t dst_stride) {
    __m512i w[4][8]; /* w[g][j], lane L: column 8L + j of rows 8g .. 8g + 7 */
    for (int g = 0; g < 4; g++) {
        __m512i x[8], u[8], v[8];
        for (int i = 0; i < 8; i++) x[i] = _mm512_loadu_si512(src + (8 * g + i) * src_stride);
        for (int i = 0; i < 4; i++) {
            u[2 * i] = _mm512_unpacklo_epi16(x[2 * i], x[2 * i + 1]);
            u[2 * i + 1] = _mm512_unpackhi_epi16(x[2 * i], x[2 * i + 1]);
        }
        for (int h = 0; h < 2; h++) {
            v[4 * h + 0] = _mm512_unpacklo_epi32(u[4 * h + 0], u[4 * h + 2]);
            v[4 * h + 1] = _mm512_unpackhi_epi32(u[4 * h + 0], u[4 * h + 2]);
            v[4 * h + 2] = _mm512_unpacklo_epi32(u[4 * h + 1], u[4 * h + 3]);
            v[4 * h + 3] = _mm512_unpackhi_epi32(u[4 * h + 1], u[4 * h + 3]);
        }
        for (int i = 0; i < 4; i++) {
            w[g][2 * i] = _mm512_unpacklo_epi64(v[i], v[4 + i]);
            w[g][2 * i + 1] = _mm512_unpackhi_epi64(v[i], v[4 + i]);
        }
    }
    for (int j = 0; j < 8; j++) { /* lane L of the four groups -> one 32-row column: a 4 x 4 transpose of lanes */
        __m512i ab_lo = _mm512_shuffle_i32x4(w[0][j], w[1][j], 0x44);
        __m512i ab_hi = _mm512_shuffle_i32x4(w[0][j], w[1][j], 0xEE);
        __m512i cd_lo = _mm512_shuffle_i32x4(w[2][j], w[3][j], 0x44);
        __m512i cd_hi = _mm512_shuffle_i32x4(w[2][j], w[3][j], 0xEE);
        _mm512_storeu_si512(dst + (0 + j) * dst_stride, _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88));
        _mm512_storeu_si512(dst + (8 + j) * dst_stride, _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD));
        _mm512_storeu_si512(dst + (16 + j) * dst_stride, _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88));
        _mm512_storeu_si512(dst + (24 + j) * dst_stride, _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD));
    }
}

int jetmoe_transpose16(const void *src, int64_t src_stride, int64_t rows, int64_t cols, void *dst, int64_t dst_stride,
                       int64_t padded, int threads) {
    const uint16_t *s = (const uint16_t *)src;
    uint16_t *d = (uint16_t *)dst;
    const int64_t blocks = (cols + 31) / 32, block_rows = rows / 32 * 32;
#pragma omp parallel for num_threads(threads) schedule(static) if (cols * padded >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t c0 = b * 32, c1 = c0 + 32 < cols ? c0 + 32 : cols;
        for (int64_t c = c0; c < c1 && c1 - c0 < 32; c++) /* a last, narrower column block */
            for (int64_t r = 0; r < block_rows; r++) d[c * dst_stride + r] = s[r * src_stride + c];
        for (int64_t r0 = 0; r0 < block_rows && c1 - c0 == 32; r0 += 32)
            transpose_block32(s + r0 * src_stride + c0, src_stride, d + c0 * dst_stride + r0, dst_stride);
        for (int64_t c = c0; c < c1; c++) {
            for (int64_t r = block_rows; r < rows; r++) d[c * dst_stride + r] = s[r * src_stride + c];
            if (padded > rows) memset(d + c * dst_stride + rows, 0, (size_t)(padded - rows) * sizeof(uint16_t));
        }
    }
    return 0;
}
