/* A JetMoE layer's steps for a few tokens in bf16 (decoding), in two calls around attention.
 *
 * A decoding step of the "small" config ran ~45 PyTorch operators per layer around its 7 weight products; on
 * the 2-core CPU their dispatch, and the caches they found empty after each product had streamed its weights
 * (gemv.c), cost about as much as the products. Here the steps before attention (norm, router, query and K/V
 * projections, rotary) are one call, and the steps after it (output projection, residual, norm, router,
 * experts, residual) another; attention, with the cache update where the cache allows it, a third (the last
 * section of this file), which the operator path runs too for the same inputs.
 *
 * Each step is the kernel the operator path runs (gemv.c, elementwise.c) on the same inputs, so the results
 * are the operator path's bit for bit. The router is the one step done here: its logits are rounded to bf16
 * (the product's dtype) and read as fp32, the top k taken best first, and the gates are PyTorch's CPU softmax
 * over those k logits (exp(l - max) with SLEEF's expf_u10 as in elementwise.c, summed in order, times one
 * over the sum) rounded to bf16. Where the result would hinge on PyTorch's own tie-breaking (see route) or on
 * a nan or inf, a call returns 1, and the caller runs the operator path for that part of the layer.
 *
 * Shapes (N tokens, k choices, H hidden, E experts, A = Nkv * D attention width, I expert inner width), all
 * contiguous bf16 unless said: weights as the model stores them ([E, out, in] for experts, [out, in] dense);
 * the projections may instead be int8 with per-row scales (see product). The caller (ops/native/decode.py)
 * checks the shapes; H, A and D are multiples of 32, 2I of 64. Calls return 0, 1 (routing left to the caller,
 * see below), -1 (out of memory) or -2 (an expert id given out of range).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { BF16 = 1 };
#define MAX_EXPERTS 64
#define MAX_SLOTS 16
#define PARALLEL_MIN_PRODUCTS 4096 /* attention: query-key products below which one thread does them all */

int jetmoe_bf16_gemv(const uint16_t *w, int64_t rows, int64_t cols, const uint16_t *x, const int64_t *groups,
                     int64_t n_groups, uint16_t *y, int threads);
int jetmoe_int8_gemv(const int8_t *q, const void *scale, int scale_dtype, int64_t rows, int64_t cols,
                     const void *x, int x_dtype, int64_t m_rows, const int64_t *groups, int64_t n_groups, void *y,
                     int y_dtype, int threads);
int jetmoe_rms_norm(const void *x, const void *weight, void *out, float *inv_rms, int64_t rows, int64_t cols,
                    float eps, int dtype, int threads);
int jetmoe_rotary(const void *x, int64_t sb, int64_t st, int64_t sh, const void *cos, const void *sin, int64_t cos_sb,
                  void *out, int64_t batch, int64_t length, int64_t heads, int64_t dim, int inverse, int dtype,
                  int threads);
int jetmoe_combine(const void *y, const int64_t *rows, const void *gates, const void *bias, void *out,
                   int64_t tokens, int64_t k, int64_t hidden, int dtype, int threads);
int jetmoe_silu_mul(const void *h, void *out, int64_t rows, int64_t inner, int dtype, int threads);
float jetmoe_exp(float x);

/* A weight product's operand: bf16 weights [E, rows, cols], or int8 ones with a bf16 scale per output row
 * ([E, rows]) where scale is not NULL (generation/quantize.py's modules); the product is the kernel the operator
 * path runs for it (gemv.c). x has m_rows rows; returns 0, or -1 when out of memory. */
static int product(const void *w, const uint16_t *scale, int64_t rows, int64_t cols, const uint16_t *x, int64_t m_rows,
                   const int64_t *groups, int64_t n_groups, uint16_t *y, int threads) {
    if (scale)
        return jetmoe_int8_gemv(w, scale, BF16, rows, cols, x, BF16, m_rows, groups, n_groups, y, BF16, threads);
    return jetmoe_bf16_gemv(w, rows, cols, x, groups, n_groups, y, threads);
}

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &wide, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as PyTorch */
    __m128bh b = _mm_cvtneps_pbh(_mm_set1_ps(f));
    uint16_t bits;
    memcpy(&bits, &b, sizeof bits);
    return bits;
}

/* softmax over rows of `count` fp32 values in descending order (top-k logits), as PyTorch's CPU kernel computes
 * it for a short last dimension: exp(v - max) (SLEEF's expf_u10), summed in order, each times 1 / sum. */
int jetmoe_softmax_sorted(const float *values, int64_t rows, int64_t count, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = values + r * count;
        float *result = out + r * count, sum = 0.0f;
        for (int64_t j = 0; j < count; j++) {
            result[j] = jetmoe_exp(row[j] - row[0]);
            sum = j == 0 ? result[0] : sum + result[j];
        }
        float inverse = 1.0f / sum;
        for (int64_t j = 0; j < count; j++) result[j] *= inverse;
    }
    return 0;
}

/* Router for rows of `normed` [N, H]: logits (fp32 [N, E], the bf16 product read as fp32), each row's top k
 * experts best first and their gates. Returns 1 (and leaves experts and gates unset) where a row's choice is
 * not decided by distinct finite logits. */
static int route(const uint16_t *normed, int64_t tokens, int64_t hidden, const uint16_t *router_w, int64_t experts,
                 int64_t k, float *logits, int64_t *chosen, uint16_t *gates, int threads) {
    uint16_t scores[MAX_SLOTS * MAX_EXPERTS];
    int64_t dense[3] = {0, 0, tokens};
    jetmoe_bf16_gemv(router_w, experts, hidden, normed, dense, 1, scores, threads);
    for (int64_t n = 0; n < tokens; n++) {
        float *row = logits + n * experts;
        for (int64_t e = 0; e < experts; e++) {
            row[e] = bf16_to_float(scores[n * experts + e]);
            if (!isfinite(row[e])) return 1;
        }
        int64_t *best = chosen + n * k;
        for (int64_t j = 0; j < k; j++) { /* selection: the largest logit not taken yet, lowest index first */
            int64_t pick = -1;
            for (int64_t e = 0; e < experts; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= best[i] == e;
                if (!taken && (pick < 0 || row[e] > row[pick])) pick = e;
            }
            best[j] = pick;
        }
        /* Ties PyTorch's topk breaks its own way: across the cut (which expert it keeps), or between chosen
         * experts after the first two (their order decides the order of the gated sum's additions). The first
         * two may tie: swapping them swaps two equal gates and the two terms of a commutative addition. */
        for (int64_t e = 0; e < experts; e++) {
            int taken = 0;
            for (int64_t i = 0; i < k; i++) taken |= best[i] == e;
            if (!taken && row[e] == row[best[k - 1]] && k < experts) return 1;
            for (int64_t j = 2; j < k; j++)
                if (e != best[j] && row[e] == row[best[j]]) return 1;
        }
        float top[MAX_SLOTS], probabilities[MAX_SLOTS];
        for (int64_t j = 0; j < k; j++) top[j] = row[best[j]];
        jetmoe_softmax_sorted(top, 1, k, probabilities);
        for (int64_t j = 0; j < k; j++) gates[n * k + j] = float_to_bf16(probabilities[j]);
    }
    return 0;
}

/* The slots (token n's j-th choice is slot n * k + j) grouped by expert, as the operator path's sorted plan
 * orders them: order[g] is the slot at grouped row g (slots of one expert in slot order, experts in order),
 * position[s] the grouped row of slot s, and groups the gemv groups (expert, first row, end row). Returns
 * the number of groups, or -1 if a slot's expert is not in 0..experts-1. Each expert's weights are then read
 * once for all of its rows. */
static int64_t group_slots(const int64_t *chosen, int64_t slots, int64_t experts, int64_t *order, int64_t *position,
                           int64_t *groups) {
    int64_t rows = 0, count = 0;
    for (int64_t e = 0; e < experts; e++) {
        int64_t first = rows;
        for (int64_t s = 0; s < slots; s++) {
            if (chosen[s] != e) continue;
            order[rows] = s;
            position[s] = rows++;
        }
        if (rows > first) {
            groups[3 * count] = e;
            groups[3 * count + 1] = first;
            groups[3 * count + 2] = rows;
            count++;
        }
    }
    return rows == slots ? count : -1;
}

/* rows[order[g] / per] for each grouped row g: each slot's token row (per = k), or each slot's own row (per = 1). */
static void gather_rows(const uint16_t *rows, int64_t width, const int64_t *order, int64_t count, int64_t per,
                        uint16_t *out) {
    for (int64_t g = 0; g < count; g++) memcpy(out + g * width, rows + (order[g] / per) * width, width * sizeof *out);
}

/* Before attention, for x [B, T, H] (N = B * T tokens):
 *   normed = rms_norm(x); logits, experts, gates = route(normed)
 *   queries = rotary(each slot's normed row times its expert's query weight) [B, T, k * Nkv, D]
 *   kv = normed @ kv_w^T [B, T, 2, Nkv, D]; keys = rotary(kv[:, :, 0]) [B, T, Nkv, D]
 * cos and sin: [B or 1, T, D] (cos_sb: T * D, or 0 to share one table). */
int jetmoe_decode_attention_in(const uint16_t *x, int64_t batch, int64_t length, int64_t hidden, const uint16_t *norm_w,
                               float eps, const uint16_t *router_w, int64_t experts, int64_t k, const void *query_w,
                               const uint16_t *query_scale, const void *kv_w, const uint16_t *kv_scale,
                               int64_t kv_heads, int64_t head_dim, const uint16_t *cos, const uint16_t *sin,
                               int64_t cos_sb, float *logits, int64_t *chosen, uint16_t *gates, uint16_t *queries,
                               uint16_t *kv, uint16_t *keys, int threads) {
    const int64_t tokens = batch * length, slots = tokens * k, width = kv_heads * head_dim;
    if (experts > MAX_EXPERTS || slots > MAX_SLOTS) return -1;
    uint16_t *normed = malloc((size_t)(tokens * hidden + slots * hidden + 2 * slots * width) * sizeof *normed);
    if (!normed) return -1;
    uint16_t *grouped = normed + tokens * hidden, *projected = grouped + slots * hidden;
    uint16_t *in_slot_order = projected + slots * width;
    int64_t groups[3 * MAX_SLOTS], order[MAX_SLOTS], position[MAX_SLOTS], dense[3] = {0, 0, tokens};
    int status = 0;
    jetmoe_rms_norm(x, norm_w, normed, NULL, tokens, hidden, eps, BF16, threads);
    if (route(normed, tokens, hidden, router_w, experts, k, logits, chosen, gates, threads)) {
        status = 1;
        goto done;
    }
    int64_t n_groups = group_slots(chosen, slots, experts, order, position, groups);
    gather_rows(normed, hidden, order, slots, k, grouped);
    if (product(query_w, query_scale, width, hidden, grouped, slots, groups, n_groups, projected, threads)) {
        status = -1;
        goto done;
    }
    for (int64_t s = 0; s < slots; s++)
        memcpy(in_slot_order + s * width, projected + position[s] * width, width * sizeof *projected);
    jetmoe_rotary(in_slot_order, length * k * width, k * width, head_dim, cos, sin, cos_sb, queries, batch, length,
                  k * kv_heads, head_dim, 0, BF16, threads);
    if (product(kv_w, kv_scale, 2 * width, hidden, normed, tokens, dense, 1, kv, threads)) {
        status = -1;
        goto done;
    }
    jetmoe_rotary(kv, length * 2 * width, 2 * width, head_dim, cos, sin, cos_sb, keys, batch, length, kv_heads,
                  head_dim, 0, BF16, threads);
done:
    free(normed);
    return status;
}

/* round(a + b) element by element: PyTorch's bf16 add. */
static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static void add_rows(const uint16_t *a, const uint16_t *b, uint16_t *out, int64_t count) {
    for (int64_t i = 0; i < count; i += 16) {
        __m512 sum = _mm512_add_ps(load_bf16x16(a + i), load_bf16x16(b + i));
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(sum));
    }
}

/* After attention, for the residual x [N, H] and the attention output of each slot [N * k, A]:
 *   h = x + (sum_j gates[n, j] * (attended[n * k + j] @ output_w[expert]^T) + attn_bias)
 *   normed = rms_norm(h); logits, experts, gates = route(normed)
 *   out = h + (sum_j gates * (silu_glu(normed @ w1[expert]^T) @ w2[expert]^T) + mlp_bias)
 * Writes h always; returns 1 after h and the MoE logits when the MoE's routing is not decided (the caller
 * then runs the MoE on h itself), 0 with out written. */
int jetmoe_decode_attention_out(const uint16_t *x, int64_t tokens, int64_t hidden, int64_t k, const uint16_t *attended,
                                int64_t width, const void *output_w, const uint16_t *output_scale,
                                const int64_t *attn_chosen, const uint16_t *attn_gates, const uint16_t *attn_bias,
                                const uint16_t *norm_w, float eps, const uint16_t *router_w, int64_t experts,
                                const void *w1, const uint16_t *w1_scale, int64_t inner, const void *w2,
                                const uint16_t *w2_scale, const uint16_t *mlp_bias, uint16_t *h, float *logits,
                                uint16_t *out, int threads) {
    const int64_t slots = tokens * k;
    if (experts > MAX_EXPERTS || slots > MAX_SLOTS) return -1;
    const int64_t widest = 2 * inner > hidden ? 2 * inner : hidden, inputs = hidden > width ? hidden : width;
    uint16_t *buffer = malloc((size_t)(slots * widest + slots * inputs + slots * inner + 2 * tokens * hidden) * 2);
    if (!buffer) return -1;
    uint16_t *products = buffer, *grouped = products + slots * widest, *activated = grouped + slots * inputs;
    uint16_t *summed = activated + slots * inner, *normed = summed + tokens * hidden;
    int64_t groups[3 * MAX_SLOTS], order[MAX_SLOTS], position[MAX_SLOTS], chosen[MAX_SLOTS];
    uint16_t gates[MAX_SLOTS];
    int status = 0;

    int64_t n_groups = group_slots(attn_chosen, slots, experts, order, position, groups);
    if (n_groups < 0) {
        status = -2;
        goto done;
    }
    gather_rows(attended, width, order, slots, 1, grouped);
    if (product(output_w, output_scale, hidden, width, grouped, slots, groups, n_groups, products, threads)) {
        status = -1;
        goto done;
    }
    jetmoe_combine(products, position, attn_gates, attn_bias, summed, tokens, k, hidden, BF16, threads);
    add_rows(x, summed, h, tokens * hidden);

    jetmoe_rms_norm(h, norm_w, normed, NULL, tokens, hidden, eps, BF16, threads);
    if (route(normed, tokens, hidden, router_w, experts, k, logits, chosen, gates, threads)) {
        status = 1;
        goto done;
    }
    n_groups = group_slots(chosen, slots, experts, order, position, groups);
    gather_rows(normed, hidden, order, slots, k, grouped);
    if (product(w1, w1_scale, 2 * inner, hidden, grouped, slots, groups, n_groups, products, threads)) {
        status = -1;
        goto done;
    }
    jetmoe_silu_mul(products, activated, slots, inner, BF16, threads);
    if (product(w2, w2_scale, hidden, inner, activated, slots, groups, n_groups, products, threads)) {
        status = -1;
        goto done;
    }
    jetmoe_combine(products, position, gates, mlp_bias, summed, tokens, k, hidden, BF16, threads);
    add_rows(h, summed, out, tokens * hidden);
done:
    free(buffer);
    return status;
}

/* ---- Attention of a few query positions over K/V (decoding) -----------------------------------------------
 * For b < B, kv head h < Nkv, query group g < G (JetMoE's k experts, all reading kv head h) and position t < T:
 *   s[p] = (q . key[b, h, p]) * scale + mask[b, t, p] in fp32 (bf16 products summed in fp32), p < S,
 *   out = round(sum_p round_bf16(exp(s[p] - max)) value[b, h, p] / sum_p exp(s[p] - max)).
 * The steps of PyTorch's CPU flash attention for bf16, in an order of its own (SDPA's values agree to within
 * roundings, not bit for bit). A query that may attend to nothing gets 0 (as SDPA's boolean-mask case).
 * query and out: element strides (b, h, g, t) with contiguous rows of D; key and value: strides (sb, sh, ss)
 * alike; mask: NULL, or [B or 1, T, S] with strides (mb, mt, 1), "may attend" bytes (mask_kind 1) or
 * additive bf16 (2) or fp32 (3). D is a multiple of 32.
 * With `new_keys`/`new_values` (one new position per row b: Nkv rows of D at new_keys + b * new_keys_sb, and
 * alike) those are first written into key/value at position new_positions[b]: a cache update and attention in
 * one call. */
float jetmoe_exp_shifted(float *x, int64_t n, float shift);

static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t dim) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + d), (__m512bh)_mm512_loadu_si512(b + d));
    return _mm512_reduce_add_ps(acc);
}

static inline float mask_value(const void *mask, int kind, int64_t at) {
    if (kind == 1) return ((const uint8_t *)mask)[at] ? 0.0f : -INFINITY;
    if (kind == 2) return bf16_to_float(((const uint16_t *)mask)[at]);
    return ((const float *)mask)[at];
}

int jetmoe_decode_attention(const uint16_t *query, const int64_t *query_strides, uint16_t *key, uint16_t *value,
                            int64_t sb, int64_t sh, int64_t ss, const void *mask, int mask_kind, int64_t mb,
                            int64_t mt, uint16_t *out, const int64_t *out_strides, int64_t batch, int64_t kv_heads,
                            int64_t groups, int64_t length, int64_t positions, int64_t dim, float scale,
                            const uint16_t *new_keys, int64_t new_keys_sb, const uint16_t *new_values,
                            int64_t new_values_sb, const int64_t *new_positions, int threads) {
    if (new_keys) {
        for (int64_t b = 0; b < batch; b++)
            if (new_positions[b] < 0 || new_positions[b] >= positions) return -2;
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t at = b * sb + h * sh + new_positions[b] * ss;
                memcpy(key + at, new_keys + b * new_keys_sb + h * dim, dim * sizeof *key);
                memcpy(value + at, new_values + b * new_values_sb + h * dim, dim * sizeof *value);
            }
        }
    }
    /* (row, kv head) pairs split over the threads: each output is computed by one thread in the same order
     * whatever the split, so the thread count never changes a value. */
    const int64_t pairs = batch * kv_heads;
    if (threads < 1 || pairs * groups * length * positions < PARALLEL_MIN_PRODUCTS) threads = 1;
    if (threads > pairs) threads = (int)pairs;
    float *scratch = malloc((size_t)threads * (positions + dim) * sizeof(float));
    if (!scratch) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t pair = 0; pair < pairs; pair++) {
        const int64_t b = pair / kv_heads, h = pair % kv_heads;
        float *scores = scratch + (int64_t)omp_get_thread_num() * (positions + dim), *acc = scores + positions;
        const uint16_t *keys = key + b * sb + h * sh, *values = value + b * sb + h * sh;
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t t = 0; t < length; t++) {
                const uint16_t *q = query + b * query_strides[0] + h * query_strides[1] + g * query_strides[2] +
                                    t * query_strides[3];
                uint16_t *o = out + b * out_strides[0] + h * out_strides[1] + g * out_strides[2] + t * out_strides[3];
                float peak = -INFINITY;
                for (int64_t p = 0; p < positions; p++) {
                    float extra = mask_kind ? mask_value(mask, mask_kind, b * mb + t * mt + p) : 0.0f;
                    scores[p] = extra == -INFINITY ? -INFINITY : dot_bf16(q, keys + p * ss, dim) * scale + extra;
                    if (scores[p] > peak) peak = scores[p];
                }
                if (peak == -INFINITY) { /* sees nothing */
                    memset(o, 0, dim * sizeof *o);
                    continue;
                }
                float sum = jetmoe_exp_shifted(scores, positions, peak);
                for (int64_t d = 0; d < dim; d++) acc[d] = 0.0f;
                for (int64_t p = 0; p < positions; p++) {
                    if (scores[p] == 0.0f) continue;
                    __m512 weight = _mm512_set1_ps(bf16_to_float(float_to_bf16(scores[p])));
                    for (int64_t d = 0; d < dim; d += 16)
                        _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(weight, load_bf16x16(values + p * ss + d),
                                                                  _mm512_loadu_ps(acc + d)));
                }
                __m512 inverse = _mm512_set1_ps(1.0f / sum);
                for (int64_t d = 0; d < dim; d += 16)
                    _mm256_storeu_si256((__m256i *)(o + d),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + d), inverse)));
            }
        }
    }
    free(scratch);
    return 0;
}

/* ---- Decoder layers one after another (decoding, one new position per row) ---------------------------------
 * For x [B, H] (row b: one new token at cache position new_positions[b]), layers first..end-1 of `layers`:
 * attention_in, the cache write and attention over positions 0..positions-1 of the layer's cache, then
 * attention_out, each layer's output the next one's input: the per-layer calls above in one, with no return to
 * the caller between layers. Writes each layer's MoA and MoE router logits at moa_logits + l * B * E (and
 * moe_logits alike). Returns 0 with `out` = the last layer's output; or stops at a layer whose routing is the
 * caller's to decide: 1 (MoA: `out` = that layer's input, nothing of it done) or 2 (MoE: `out` = h, its
 * attention and cache write done), with *stopped = that layer; or -1 (out of memory), -2 (expert id out of
 * range), -3 (a new position outside 0..positions-1). */
typedef struct {
    const uint16_t *input_norm, *moa_router, *moa_bias, *post_norm, *mlp_router, *mlp_bias;
    const void *query_w, *kv_w, *output_w, *w1, *w2;
    const uint16_t *query_scale, *kv_scale, *output_scale, *w1_scale, *w2_scale; /* NULL: bf16 weights */
    uint16_t *keys, *values;                                                     /* the layer's cache buffers */
    int64_t cache_sb, cache_sh, cache_ss;                                        /* their strides, alike */
    float input_eps, post_eps, scale;
} jetmoe_layer;

int jetmoe_decode_layers(const jetmoe_layer *layers, int64_t first, int64_t end, const uint16_t *x, int64_t batch,
                         int64_t hidden, int64_t experts, int64_t k, int64_t kv_heads, int64_t head_dim,
                         int64_t inner, const uint16_t *cos, const uint16_t *sin, int64_t cos_sb, const void *mask,
                         int mask_kind, int64_t mb, int64_t positions, const int64_t *new_positions,
                         float *moa_logits, float *moe_logits, uint16_t *out, int64_t *stopped, int threads) {
    const int64_t width = kv_heads * head_dim, slots = batch * k;
    for (int64_t b = 0; b < batch; b++)
        if (new_positions[b] < 0 || new_positions[b] >= positions) return -3;
    uint16_t *buffer = malloc((size_t)(2 * batch * hidden + 2 * slots * width + 3 * batch * width) * 2);
    if (!buffer) return -1;
    uint16_t *input = buffer, *h = input + batch * hidden, *queries = h + batch * hidden;
    uint16_t *attended = queries + slots * width, *kv = attended + slots * width, *keys = kv + 2 * batch * width;
    int64_t chosen[MAX_SLOTS], strides[4] = {k * width, head_dim, width, k * width}; /* (b, head, slot, t) */
    uint16_t gates[MAX_SLOTS];
    int status = 0;
    memcpy(input, x, batch * hidden * sizeof *input);
    for (int64_t l = first; l < end; l++) {
        const jetmoe_layer *L = layers + l;
        float *moa = moa_logits + l * batch * experts, *moe = moe_logits + l * batch * experts;
        status = jetmoe_decode_attention_in(input, batch, 1, hidden, L->input_norm, L->input_eps, L->moa_router,
                                            experts, k, L->query_w, L->query_scale, L->kv_w, L->kv_scale, kv_heads,
                                            head_dim, cos, sin, cos_sb, moa, chosen, gates, queries, kv, keys, threads);
        if (status) {
            if (status == 1) memcpy(out, input, batch * hidden * sizeof *out);
            *stopped = l;
            break;
        }
        status = jetmoe_decode_attention(queries, strides, L->keys, L->values, L->cache_sb, L->cache_sh, L->cache_ss,
                                         mask, mask_kind, mb, 0, attended, strides, batch, kv_heads, k, 1, positions,
                                         head_dim, L->scale, keys, width, kv + width, 2 * width, new_positions,
                                         threads);
        if (status) {
            *stopped = l;
            break;
        }
        status = jetmoe_decode_attention_out(input, batch, hidden, k, attended, width, L->output_w, L->output_scale,
                                             chosen, gates, L->moa_bias, L->post_norm, L->post_eps, L->mlp_router,
                                             experts, L->w1, L->w1_scale, inner, L->w2, L->w2_scale, L->mlp_bias, h,
                                             moe, out, threads);
        if (status) {
            if (status == 1) {
                memcpy(out, h, batch * hidden * sizeof *out);
                status = 2;
            }
            *stopped = l;
            break;
        }
        if (l + 1 < end) memcpy(input, out, batch * hidden * sizeof *input);
    }
    free(buffer);
    return status;
}
