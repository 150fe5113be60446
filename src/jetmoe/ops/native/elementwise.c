/* Fused element-wise kernels of a JetMoE layer, fp32 or bf16.
 *
 * PyTorch runs each of these as a chain of element-wise operators (an RMSNorm is eight of them: to fp32, pow,
 * mean, add, rsqrt, mul, to bf16, mul), each a pass over memory and, while decoding, a dispatch of its own. Each
 * kernel here is one pass that computes what the chain computes, bit for bit: every value the chain stores in
 * bf16 is rounded to bf16 (nearest even) from the same fp32 value, and where the chain's own order of
 * operations decides the fp32 result, the kernel follows it:
 * - rms_norm sums the squares, and combine's backward the gate gradients, in the order of PyTorch's CPU sum
 *   (see ordered_sum);
 * - silu uses PyTorch's vector exp (SLEEF's expf_u10, see v_exp) with the same fused multiply-adds; PyTorch
 *   computes a row's last (width mod 32) elements with the C library's scalar exp instead, so callers give
 *   this kernel widths that are multiples of 32 (ops/fused.py);
 * - rotary and combine multiply and add as the chain does.
 * The backward kernels of rms_norm (a hand-written formula with sums of its own) are within roundings of the
 * PyTorch formula, not bit for bit. tests/ops/test_fused.py checks all of this against the chains.
 *
 * Shapes are checked by the Python wrappers (ops/native/elementwise.py); the feature dimensions are multiples
 * of 16 (whole simd.h vectors at every level) and contiguous. Rows are split over `threads` OpenMP threads when
 * there is enough work to pay for waking them.
 */
#include "simd.h"

#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PARALLEL_MIN_ELEMENTS 32768 /* below this a single thread finishes before a second one wakes up */

static inline int64_t element_size(int dtype) { return dtype == F32 ? 4 : 2; }

/* exp(x) as PyTorch computes it on AVX2 and AVX-512 CPUs (SLEEF's expf_u10, which its vectorised exp calls):
 * x = q ln2 + s with ln2 in two parts, a degree-6 polynomial in s with fused multiply-adds, times 2^q in two
 * steps; 0 below -104, inf above 100. The same operations in the same order give the same fp32 value, bit for bit. */
static inline vf v_exp(vf x) {
    vi q = v_round_int(v_mul(x, v_set(1.442695040888963407359924681001892137f)));
    vf qf = __builtin_convertvector(q, vf);
    vf s = v_fma(qf, v_set(-0.693145751953125f), x);
    s = v_fma(qf, v_set(-1.428606765330187045e-06f), s);
    vf u = v_set(0.000198527617612853646278381f);
    u = v_fma(u, s, v_set(0.00139304355252534151077271f));
    u = v_fma(u, s, v_set(0.00833336077630519866943359f));
    u = v_fma(u, s, v_set(0.0416664853692054748535156f));
    u = v_fma(u, s, v_set(0.166666671633720397949219f));
    u = v_fma(u, s, v_set(0.5f));
    u = v_add(v_set(1.0f), v_fma(v_mul(s, s), u, s));
    vi half = q >> 1; /* 2^q as 2^(q/2) * 2^(q - q/2): no overflow of the exponent field */
    vf scale1 = (vf)(((vu)half + 0x7fu) << 23);
    vf scale2 = (vf)(((vu)q - (vu)half + 0x7fu) << 23);
    u = v_mul(v_mul(u, scale1), scale2);
    u = v_select(x < v_set(-104.0f), v_zero(), u);
    return v_select(v_set(100.0f) < x, v_set(INFINITY), u);
}

/* One value of v_exp (the router's gates, decode.c). */
float jetmoe_exp(float x) { return v_exp(v_set(x))[0]; }

float jetmoe_exp_shifted(float *x, int64_t n, float shift) {
    vf total = v_zero(), s = v_set(shift);
    for (int64_t i = 0; i < n; i += LANES) {
        vf e = v_select(v_first(n - i), v_exp(v_sub(v_load_first(x, F32, i, n - i), s)), v_zero());
        v_store_first(x, F32, i, e, n - i);
        total = v_add(total, e);
    }
    return v_sum(total);
}

static inline vf v_sigmoid(vf x) {
    vf one = v_set(1.0f);
    return v_div(one, v_add(one, v_exp(v_sub(v_zero(), x))));
}

/* silu(x) = x / (1 + exp(-x)), PyTorch's formula (not x * sigmoid(x), which rounds differently) */
static inline vf v_silu(vf x) {
    return v_div(x, v_add(v_set(1.0f), v_exp(v_sub(v_zero(), x))));
}

/* ---- RMSNorm: y = w * round(x * r), r = 1 / sqrt(mean(x^2) + eps) in fp32 ------------------------------ */

/* Vector `vector` (8 elements) of the terms a * b (a * a where b is NULL), each as the chain stores it: in
 * fp32 for the norm's squares (it squares fp32 copies), rounded to `product_dtype` for products of tensors. */
static inline vf8 term8(const void *a, const void *b, int dtype, int product_dtype, int64_t vector) {
    vf8 x = v8_load(a, dtype, vector * 8);
    return v8_round_to(x * (b ? v8_load(b, dtype, vector * 8) : x), product_dtype);
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
    vf8 acc[LEVELS][ILP];
    for (int l = 0; l < LEVELS; l++)
        for (int k = 0; k < ILP; k++) acc[l][k] = (vf8){0};
    int64_t i = 0;
    while (i + step <= rounds) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < ILP; k++)
                acc[0][k] += term8(a, b, dtype, product_dtype, i * ILP + k);
        for (int l = 1; l < LEVELS; l++) {
            for (int k = 0; k < ILP; k++) {
                acc[l][k] += acc[l - 1][k];
                acc[l - 1][k] = (vf8){0};
            }
            if (i & ((step - 1) << (l * power))) break;
        }
    }
    for (; i < rounds; i++)
        for (int k = 0; k < ILP; k++)
            acc[0][k] += term8(a, b, dtype, product_dtype, i * ILP + k);
    for (int l = 1; l < LEVELS; l++)
        for (int k = 0; k < ILP; k++) acc[0][k] += acc[l][k];
    for (int64_t v = rounds * ILP; v < vectors; v++)
        acc[0][0] += term8(a, b, dtype, product_dtype, v);
    vf8 sum = acc[0][0];
    for (int k = 1; k < ILP; k++) sum = sum + acc[0][k];
    float total = 0.0f;
    for (int k = 0; k < 8; k++) total += sum[k];
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
        vf s = v_set(scale);
        for (int64_t c = 0; c < cols; c += LANES) {
            vf normalized = v_round_to(v_mul(v_load(row, dtype, c), s), dtype);
            v_store(out_row, dtype, c, v_mul(v_load(weight, dtype, c), normalized));
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
            vf s = v_set(inv_rms[r]);
            if (mine) {
                for (int64_t c = 0; c < cols; c += LANES) {
                    vf normalized = v_round_to(v_mul(v_load(row, dtype, c), s), dtype);
                    vf acc = v_loadu(mine + c);
                    vf term = v_mul(v_load(grad_row, dtype, c), normalized);
                    v_storeu(mine + c, v_add(acc, term));
                }
            }
            if (!grad_x) continue;
            vf dot = v_zero();
            for (int64_t c = 0; c < cols; c += LANES) {
                vf gn = v_round_to(v_mul(v_load(grad_row, dtype, c), v_load(weight, dtype, c)), dtype);
                dot = v_add(dot, v_mul(gn, v_mul(v_load(row, dtype, c), s)));
            }
            vf mean = v_set(v_sum(dot) / (float)cols);
            char *out_row = (char *)grad_x + r * cols * size;
            for (int64_t c = 0; c < cols; c += LANES) {
                vf gn = v_round_to(v_mul(v_load(grad_row, dtype, c), v_load(weight, dtype, c)), dtype);
                vf normalized = v_mul(v_load(row, dtype, c), s);
                v_store(out_row, dtype, c, v_mul(s, v_sub(gn, v_mul(normalized, mean))));
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
        for (int64_t c = 0; c < inner; c += LANES) {
            vf g = v_load(gate, dtype, c);
            vf activated = v_round_to(v_silu(g), dtype);
            v_store(out_row, dtype, c, v_mul(activated, v_load(up, dtype, c)));
        }
    }
    return 0;
}

/* grad_h = [grad_g | grad_u]: grad_u = round(dy * round(silu(g))), grad_g = round(round(dy * u) * silu'(g)),
 * silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g), as PyTorch's silu_backward. */
int jetmoe_silu_mul_backward(const void *h, const void *grad, void *grad_h, int64_t rows, int64_t inner, int dtype,
                             int threads) {
    const int64_t size = element_size(dtype);
    const vf one = v_set(1.0f);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inner >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *gate = (const char *)h + r * 2 * inner * size, *up = gate + inner * size;
        const char *grad_row = (const char *)grad + r * inner * size;
        char *grad_gate = (char *)grad_h + r * 2 * inner * size, *grad_up = grad_gate + inner * size;
        for (int64_t c = 0; c < inner; c += LANES) {
            vf g = v_load(gate, dtype, c), dy = v_load(grad_row, dtype, c);
            vf s = v_sigmoid(g);
            vf activated = v_round_to(v_silu(g), dtype);
            v_store(grad_up, dtype, c, v_mul(dy, activated));
            vf grad_activated = v_round_to(v_mul(dy, v_load(up, dtype, c)), dtype);
            vf slope = v_fma(g, v_sub(one, s), one);
            v_store(grad_gate, dtype, c, v_mul(v_mul(grad_activated, s), slope));
        }
    }
    return 0;
}

/* ---- Rotary embedding: y = round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1] ----
 * x is [B, T, H, D] with element strides (sb, st, sh) and contiguous rows of D; cos and sin are contiguous
 * [B or 1, T, D] (cos_sb = T * D, or 0 to broadcast one table over the batch); out is contiguous [B, T, H, D].
 * `inverse` computes the gradient instead: dx = round(round(dy * cos) + rotate_half^T(round(dy * sin))),
 * rotate_half^T(y) = [y2, -y1]: the sum autograd forms from the same chain. */
static inline vf rotary_part(const char *x, const char *cos, const char *sin, int64_t c, int64_t half,
                                 int dtype, int inverse) {
    const vf zero = v_zero();
    vf direct = v_round_to(v_mul(v_load(x, dtype, c), v_load(cos, dtype, c)), dtype);
    vf rotated;
    if (!inverse) {
        vf partner = c < half ? v_sub(zero, v_load(x, dtype, c + half)) : v_load(x, dtype, c - half);
        rotated = v_round_to(v_mul(partner, v_load(sin, dtype, c)), dtype);
    } else {
        rotated = c < half ? v_round_to(v_mul(v_load(x, dtype, c + half), v_load(sin, dtype, c + half)), dtype)
                           : v_sub(zero, v_round_to(v_mul(v_load(x, dtype, c - half),
                                                                        v_load(sin, dtype, c - half)), dtype));
    }
    return v_add(direct, rotated);
}

int jetmoe_rotary(const void *x, int64_t sb, int64_t st, int64_t sh, const void *cos, const void *sin, int64_t cos_sb,
                  void *out, int64_t batch, int64_t length, int64_t heads, int64_t dim, int inverse, int dtype,
                  int threads) {
    const int64_t size = element_size(dtype), half = dim / 2;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)                                             \
    if (batch * length * heads * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < length; t++) {
            const char *cos_row = (const char *)cos + (b * cos_sb + t * dim) * size;
            const char *sin_row = (const char *)sin + (b * cos_sb + t * dim) * size;
            for (int64_t h = 0; h < heads; h++) {
                const char *x_row = (const char *)x + (b * sb + t * st + h * sh) * size;
                char *out_row = (char *)out + (((b * length) + t) * heads + h) * dim * size;
                for (int64_t c = 0; c < dim; c += LANES)
                    v_store(out_row, dtype, c, rotary_part(x_row, cos_row, sin_row, c, half, dtype, inverse));
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
        for (int64_t c = 0; c < hidden; c += LANES) {
            vf total = v_zero();
            for (int64_t j = 0; j < k; j++) {
                int64_t slot = n * k + j, row = rows ? rows[slot] : slot;
                vf gate = v_set(load_float(gates, dtype, slot));
                const char *y_row = (const char *)y + row * hidden * size;
                vf product = v_round_to(v_mul(v_load(y_row, dtype, c), gate), dtype);
                total = j == 0 ? product : v_add(total, product);
            }
            v_store(out_row, dtype, c, v_add(v_round_to(total, dtype), v_load(bias, dtype, c)));
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
            vf g = v_set(load_float(gates, dtype, slot));
            for (int64_t c = 0; c < hidden; c += LANES)
                v_store(grad_y_row, dtype, c, v_mul(v_load(grad_row, dtype, c), g));
            if (!grad_gates) continue;
            float total = ordered_sum(grad_row, (const char *)y + row * hidden * size, dtype, dtype, hidden);
            if (dtype == F32) {
                ((float *)grad_gates)[slot] = total;
            } else {
                ((uint16_t *)grad_gates)[slot] = bf16_bits(total);
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
        vf top = v_set(-INFINITY);
        for (int64_t c = 0; c < vocab; c += LANES) top = v_max(top, v_load(row, dtype, c));
        float peak = v_max_lane(top);
        if (!isfinite(peak)) { /* all -inf, or inf / nan present: what logsumexp gives for them */
            float naive = 0.0f;
            for (int64_t c = 0; c < vocab; c++) naive += expf(load_float(row, dtype, c));
            lse[r] = isnan(peak) ? NAN : (peak == INFINITY ? INFINITY : logf(naive));
            continue;
        }
        vf shift = v_set(peak), acc0 = v_zero(), acc1 = v_zero();
        int64_t c = 0;
        for (; c + 2 * LANES <= vocab; c += 2 * LANES) {
            acc0 = v_add(acc0, v_exp(v_sub(v_load(row, dtype, c), shift)));
            acc1 = v_add(acc1, v_exp(v_sub(v_load(row, dtype, c + LANES), shift)));
        }
        for (; c < vocab; c += LANES) acc0 = v_add(acc0, v_exp(v_sub(v_load(row, dtype, c), shift)));
        lse[r] = peak + logf(v_sum(v_add(acc0, acc1)));
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
        vf shift = v_set(lse[r]), s = v_set(scale[r]);
        int64_t target = targets[r];
        for (int64_t c = 0; c < vocab; c += LANES) {
            vf p = v_exp(v_sub(v_load(row, dtype, c), shift));
            if (target >= c && target < c + LANES)
                p[target - c] -= 1.0f;
            v_store(grad_row, dtype, c, v_mul(p, s));
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
 * grad_scores may be grad_probs (in place). The tail of a row (keys mod LANES) is handled with partial loads. */
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
        const vf shift = v_set(lse[r]), k = v_set(scale);
        const vf d = v_set(delta ? delta[r] : 0.0f);
        for (int64_t c = 0; c < keys; c += LANES) {
            const int64_t seen = visible - c;
            vf v = v_zero();
            if (seen > 0) {
                vf p = v_exp(v_fma(v_load_first(s_row, dtype, c, seen), k, -shift));
                if (g_row) {
                    vf centred = v_sub(v_load_first(g_row, dtype, c, seen), d);
                    p = v_mul(v_mul(p, centred), k);
                }
                v = v_select(v_first(seen), p, v_zero());
            }
            v_store_first(o_row, dtype, c, v, keys - c);
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
 * `dst_stride` apart. A bit copy (bf16 or fp16 alike), in blocks of 32 x 32 that stay in L1 (PyTorch's strided
 * copy is far slower, docs/performance.md). With AVX-512 a block is transposed in registers (the unpack butterfly
 * within 128-bit lanes, then a 4 x 4 transpose of the lanes); elsewhere the compiler's loop. Column blocks are
 * split over the threads (each writes its own dst rows). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
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

#else
static inline void transpose_block32(const uint16_t *src, int64_t src_stride, uint16_t *dst, int64_t dst_stride) {
    for (int c = 0; c < 32; c++)
        for (int r = 0; r < 32; r++) dst[c * dst_stride + r] = src[r * src_stride + c];
}
#endif

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
