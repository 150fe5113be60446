/* A JetMoE layer's steps for a few tokens (decoding), in bf16 or fp32, in two calls around attention.
 *
 * A decoding step of the "small" config ran ~45 PyTorch operators per layer around its 7 weight products; on
 * the 2-core CPU their dispatch, and the caches they found empty after each product had streamed its weights
 * (gemv.c), cost about as much as the products. Here the steps before attention (norm, router, query and K/V
 * projections, rotary) are one call, and the steps after it (output projection, residual, norm, router,
 * experts, residual) another; attention, with the cache update where the cache allows it, a third (the last
 * section of this file), which the operator path runs too for the same inputs.
 *
 * Each step is the kernel the operator path runs (gemv.c, elementwise.c) on the same inputs, so the results
 * are the operator path's bit for bit. The router is the one step done here: its logits are rounded to the
 * activations' dtype (the product's) and read as fp32, the top k taken best first, and the gates are
 * PyTorch's CPU softmax over those k logits (exp(l - max) with SLEEF's expf_u10 as in elementwise.c, summed in
 * order, times one over the sum) rounded to that dtype. Where the result would hinge on PyTorch's own
 * tie-breaking (see route) or on a nan or inf, a call returns 1, and the caller runs the operator path for
 * that part of the layer.
 *
 * Shapes (N tokens, k choices, H hidden, E experts, A = Nkv * D attention width, I expert inner width), all
 * contiguous and in one dtype (`dtype`: BF16 or F32) unless said: weights as the model stores them ([E, out,
 * in] for experts, [out, in] dense); the projections may instead be int8 with per-row scales (see product).
 * The caller (ops/native/decode.py) checks the shapes; H, A and D are multiples of 32, 2I of 64. Calls return
 * 0, 1 (routing left to the caller, see below), -1 (out of memory) or -2 (an expert id given out of range).
 */
#include "simd.h"

#include <omp.h>
#include <stdlib.h>

#define MAX_EXPERTS 64
#define MAX_SLOTS 16
#define PARALLEL_MIN_PRODUCTS 4096 /* attention: query-key products below which one thread does them all */

int jetmoe_gemv(const void *w, int64_t rows, int64_t cols, const void *x, const int64_t *groups, int64_t n_groups,
                void *y, int dtype, int threads);
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

/* A weight product's operand: weights [E, rows, cols] in the activations' dtype, or int8 ones with a scale per
 * output row ([E, rows], in that dtype) where scale is not NULL (generation/quantize.py's modules); the product
 * is the kernel the operator path runs for it (gemv.c). x has m_rows rows; returns 0, or -1 when out of memory. */
static int product(const void *w, const void *scale, int64_t rows, int64_t cols, const void *x, int64_t m_rows,
                   const int64_t *groups, int64_t n_groups, void *y, int dtype, int threads) {
    if (scale)
        return jetmoe_int8_gemv(w, scale, dtype, rows, cols, x, dtype, m_rows, groups, n_groups, y, dtype, threads);
    return jetmoe_gemv(w, rows, cols, x, groups, n_groups, y, dtype, threads);
}

static inline int64_t element_bytes(int dtype) { return dtype == F32 ? 4 : 2; }

/* Element i of an array of the dtype. */
static inline void *at(const void *p, int64_t i, int dtype) { return (char *)p + i * element_bytes(dtype); }

/* The width of PyTorch's fp32 vectors on this CPU (its ATEN_CPU_CAPABILITY), which decides the order in which its
 * softmax sums a row; 0 where that order is not known here (decode.py sets it from torch). */
#define MAX_ATEN_LANES 64
static int aten_lanes = 0;

void jetmoe_set_aten_lanes(int lanes) { aten_lanes = lanes > 0 && lanes <= MAX_ATEN_LANES ? lanes : 0; }

/* sum of a row as ATen's vectorised reduction adds it: a row shorter than a vector in order; a longer one
 * into a vector's lanes (later vectors and the tail added lane-wise), then the lanes halved in a tree. */
static float aten_sum(const float *v, int64_t count, int lanes) {
    if (count < lanes || lanes <= 0) {
        float sum = v[0];
        for (int64_t j = 1; j < count; j++) sum += v[j];
        return sum;
    }
    float acc[MAX_ATEN_LANES];
    for (int i = 0; i < lanes; i++) acc[i] = v[i];
    for (int64_t j = lanes; j < count; j++) acc[(j - lanes) % lanes] += v[j];
    for (int half = lanes / 2; half > 0; half /= 2)
        for (int i = 0; i < half; i++) acc[i] += acc[i + half];
    return acc[0];
}

/* softmax over rows of `count` fp32 values in descending order (top-k logits), as PyTorch's CPU kernel computes
 * it for a short last dimension: exp(v - max) (SLEEF's expf_u10), summed as aten_sum, each times 1 / sum.
 * Returns 1 (nothing written) where the order of PyTorch's sum is not known here and could matter. */
int jetmoe_softmax_sorted(const float *values, int64_t rows, int64_t count, float *out) {
    if (aten_lanes <= 0 && count > 3) return 1;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = values + r * count;
        float *result = out + r * count;
        for (int64_t j = 0; j < count; j++) result[j] = jetmoe_exp(row[j] - row[0]);
        float inverse = 1.0f / aten_sum(result, count, aten_lanes);
        for (int64_t j = 0; j < count; j++) result[j] *= inverse;
    }
    return 0;
}

/* The routing rule of modeling/routing.make_plan for fp32 logits [N, E]: each row's top k experts best first
 * and the softmax of their logits as gates (in the dtype). Returns 1 (and leaves experts and gates unset) where
 * a row's choice is not decided by distinct finite logits: PyTorch's topk breaks such ties its own way. */
int jetmoe_route_logits(const float *logits, int64_t tokens, int64_t experts, int64_t k, int64_t *chosen,
                        void *gates, int dtype) {
    if (k < 1 || k > experts || k > MAX_SLOTS) return 1;
    for (int64_t n = 0; n < tokens; n++) {
        const float *row = logits + n * experts;
        for (int64_t e = 0; e < experts; e++)
            if (!isfinite(row[e])) return 1;
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
        if (jetmoe_softmax_sorted(top, 1, k, probabilities)) return 1;
        for (int64_t j = 0; j < k; j++) store_float(gates, dtype, n * k + j, probabilities[j]);
    }
    return 0;
}

/* Router for rows of `normed` [N, H]: logits (fp32 [N, E], the product in the dtype read as fp32), then
 * jetmoe_route_logits. */
static int route(const void *normed, int64_t tokens, int64_t hidden, const void *router_w, int64_t experts, int64_t k,
                 float *logits, int64_t *chosen, void *gates, int dtype, int threads) {
    float scores[MAX_SLOTS * MAX_EXPERTS]; /* room for N x E values of either dtype */
    int64_t dense[3] = {0, 0, tokens};
    jetmoe_gemv(router_w, experts, hidden, normed, dense, 1, scores, dtype, threads);
    for (int64_t i = 0; i < tokens * experts; i++) logits[i] = load_float(scores, dtype, i);
    return jetmoe_route_logits(logits, tokens, experts, k, chosen, gates, dtype);
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
static void gather_rows(const void *rows, int64_t width, const int64_t *order, int64_t count, int64_t per, void *out,
                        int dtype) {
    for (int64_t g = 0; g < count; g++)
        memcpy(at(out, g * width, dtype), at(rows, order[g] / per * width, dtype), width * element_bytes(dtype));
}

/* Before attention, for x [B, T, H] (N = B * T tokens):
 *   normed = rms_norm(x); logits, experts, gates = route(normed)
 *   queries = rotary(each slot's normed row times its expert's query weight) [B, T, k * Nkv, D]
 *   kv = normed @ kv_w^T [B, T, 2, Nkv, D]; keys = rotary(kv[:, :, 0]) [B, T, Nkv, D]
 * cos and sin: [B or 1, T, D] (cos_sb: T * D, or 0 to share one table). */
int jetmoe_decode_attention_in(const void *x, int64_t batch, int64_t length, int64_t hidden, const void *norm_w,
                               float eps, const void *router_w, int64_t experts, int64_t k, const void *query_w,
                               const void *query_scale, const void *kv_w, const void *kv_scale, int64_t kv_heads,
                               int64_t head_dim, const void *cos, const void *sin, int64_t cos_sb, float *logits,
                               int64_t *chosen, void *gates, void *queries, void *kv, void *keys, int dtype,
                               int threads) {
    const int64_t tokens = batch * length, slots = tokens * k, width = kv_heads * head_dim;
    if (experts > MAX_EXPERTS || slots > MAX_SLOTS) return -1;
    void *normed = malloc((size_t)(tokens * hidden + slots * hidden + 2 * slots * width) * element_bytes(dtype));
    if (!normed) return -1;
    void *grouped = at(normed, tokens * hidden, dtype), *projected = at(grouped, slots * hidden, dtype);
    void *in_slot_order = at(projected, slots * width, dtype);
    int64_t groups[3 * MAX_SLOTS], order[MAX_SLOTS], position[MAX_SLOTS], dense[3] = {0, 0, tokens};
    int status = 0;
    jetmoe_rms_norm(x, norm_w, normed, NULL, tokens, hidden, eps, dtype, threads);
    if (route(normed, tokens, hidden, router_w, experts, k, logits, chosen, gates, dtype, threads)) {
        status = 1;
        goto done;
    }
    int64_t n_groups = group_slots(chosen, slots, experts, order, position, groups);
    gather_rows(normed, hidden, order, slots, k, grouped, dtype);
    if (product(query_w, query_scale, width, hidden, grouped, slots, groups, n_groups, projected, dtype, threads)) {
        status = -1;
        goto done;
    }
    for (int64_t s = 0; s < slots; s++)
        memcpy(at(in_slot_order, s * width, dtype), at(projected, position[s] * width, dtype),
               width * element_bytes(dtype));
    jetmoe_rotary(in_slot_order, length * k * width, k * width, head_dim, cos, sin, cos_sb, queries, batch, length,
                  k * kv_heads, head_dim, 0, dtype, threads);
    if (product(kv_w, kv_scale, 2 * width, hidden, normed, tokens, dense, 1, kv, dtype, threads)) {
        status = -1;
        goto done;
    }
    jetmoe_rotary(kv, length * 2 * width, 2 * width, head_dim, cos, sin, cos_sb, keys, batch, length, kv_heads,
                  head_dim, 0, dtype, threads);
done:
    free(normed);
    return status;
}

/* a + b element by element, rounded to the dtype: PyTorch's add. */
static void add_rows(const void *a, const void *b, void *out, int64_t count, int dtype) {
    for (int64_t i = 0; i < count; i += LANES)
        v_store(out, dtype, i, v_add(v_load(a, dtype, i), v_load(b, dtype, i)));
}

/* After attention, for the residual x [N, H] and the attention output of each slot [N * k, A]:
 *   h = x + (sum_j gates[n, j] * (attended[n * k + j] @ output_w[expert]^T) + attn_bias)
 *   normed = rms_norm(h); logits, experts, gates = route(normed)
 *   out = h + (sum_j gates * (silu_glu(normed @ w1[expert]^T) @ w2[expert]^T) + mlp_bias)
 * Writes h always; returns 1 after h and the MoE logits when the MoE's routing is not decided (the caller
 * then runs the MoE on h itself), 0 with out written. */
int jetmoe_decode_attention_out(const void *x, int64_t tokens, int64_t hidden, int64_t k, const void *attended,
                                int64_t width, const void *output_w, const void *output_scale,
                                const int64_t *attn_chosen, const void *attn_gates, const void *attn_bias,
                                const void *norm_w, float eps, const void *router_w, int64_t experts, const void *w1,
                                const void *w1_scale, int64_t inner, const void *w2, const void *w2_scale,
                                const void *mlp_bias, void *h, float *logits, void *out, int dtype, int threads) {
    const int64_t slots = tokens * k;
    if (experts > MAX_EXPERTS || slots > MAX_SLOTS) return -1;
    const int64_t widest = 2 * inner > hidden ? 2 * inner : hidden, inputs = hidden > width ? hidden : width;
    void *buffer = malloc((size_t)(slots * widest + slots * inputs + slots * inner + 2 * tokens * hidden) *
                          element_bytes(dtype));
    if (!buffer) return -1;
    void *products = buffer, *grouped = at(products, slots * widest, dtype);
    void *activated = at(grouped, slots * inputs, dtype), *summed = at(activated, slots * inner, dtype);
    void *normed = at(summed, tokens * hidden, dtype);
    int64_t groups[3 * MAX_SLOTS], order[MAX_SLOTS], position[MAX_SLOTS], chosen[MAX_SLOTS];
    float gates[MAX_SLOTS]; /* room for k values a token of either dtype */
    int status = 0;

    int64_t n_groups = group_slots(attn_chosen, slots, experts, order, position, groups);
    if (n_groups < 0) {
        status = -2;
        goto done;
    }
    gather_rows(attended, width, order, slots, 1, grouped, dtype);
    if (product(output_w, output_scale, hidden, width, grouped, slots, groups, n_groups, products, dtype, threads)) {
        status = -1;
        goto done;
    }
    jetmoe_combine(products, position, attn_gates, attn_bias, summed, tokens, k, hidden, dtype, threads);
    add_rows(x, summed, h, tokens * hidden, dtype);

    jetmoe_rms_norm(h, norm_w, normed, NULL, tokens, hidden, eps, dtype, threads);
    if (route(normed, tokens, hidden, router_w, experts, k, logits, chosen, gates, dtype, threads)) {
        status = 1;
        goto done;
    }
    n_groups = group_slots(chosen, slots, experts, order, position, groups);
    gather_rows(normed, hidden, order, slots, k, grouped, dtype);
    if (product(w1, w1_scale, 2 * inner, hidden, grouped, slots, groups, n_groups, products, dtype, threads)) {
        status = -1;
        goto done;
    }
    jetmoe_silu_mul(products, activated, slots, inner, dtype, threads);
    if (product(w2, w2_scale, hidden, inner, activated, slots, groups, n_groups, products, dtype, threads)) {
        status = -1;
        goto done;
    }
    jetmoe_combine(products, position, gates, mlp_bias, summed, tokens, k, hidden, dtype, threads);
    add_rows(h, summed, out, tokens * hidden, dtype);
done:
    free(buffer);
    return status;
}

/* ---- Attention of a few query positions over K/V (decoding) -----------------------------------------------
 * For b < B, kv head h < Nkv, query group g < G (JetMoE's k experts, all reading kv head h) and position t < T:
 *   s[p] = (q . key[b, h, p]) * scale + mask[b, t, p] in fp32 (products summed in fp32), p < S,
 *   out = round(sum_p w[p] value[b, h, p] / sum_p exp(s[p] - max)), w[p] = exp(s[p] - max) (rounded to bf16 in
 *   bf16, as PyTorch's kernel does before its product with V).
 * The steps of PyTorch's CPU flash attention, in an order of its own (SDPA's values agree to within roundings,
 * not bit for bit). A query that may attend to nothing gets 0 (as SDPA's boolean-mask case).
 * query and out: element strides (b, h, g, t) with contiguous rows of D; key and value: strides (sb, sh, ss)
 * alike; all in `dtype`; mask: NULL, or [B or 1, T, S] with strides (mb, mt, 1), "may attend" bytes (mask_kind
 * 1) or additive bf16 (2) or fp32 (3). D is a multiple of 32.
 * With `new_keys`/`new_values` (one new position per row b: Nkv rows of D at new_keys + b * new_keys_sb, and
 * alike) those are first written into key/value at position new_positions[b]: a cache update and attention in
 * one call. */
float jetmoe_exp_shifted(float *x, int64_t n, float shift);

static inline float dot(const void *a, const void *b, int64_t dim, int dtype) {
    vf acc = v_zero();
    if (dtype == F32) {
        const float *x = a, *y = b;
        for (int64_t d = 0; d < dim; d += LANES) acc = v_fma(v_loadu(x + d), v_loadu(y + d), acc);
    } else {
        const uint16_t *x = a, *y = b;
        for (int64_t d = 0; d < dim; d += 2 * LANES)
            acc = v_dot_bf16(acc, bf16_pairs_load(x + d), bf16_pairs_load(y + d));
    }
    return v_sum(acc);
}

static inline float mask_value(const void *mask, int kind, int64_t i) {
    if (kind == 1) return ((const uint8_t *)mask)[i] ? 0.0f : -INFINITY;
    if (kind == 2) return bf16_to_float(((const uint16_t *)mask)[i]);
    return ((const float *)mask)[i];
}

int jetmoe_decode_attention(const void *query, const int64_t *query_strides, void *key, void *value, int64_t sb,
                            int64_t sh, int64_t ss, const void *mask, int mask_kind, int64_t mb, int64_t mt, void *out,
                            const int64_t *out_strides, int64_t batch, int64_t kv_heads, int64_t groups,
                            int64_t length, int64_t positions, int64_t dim, float scale, const void *new_keys,
                            int64_t new_keys_sb, const void *new_values, int64_t new_values_sb,
                            const int64_t *new_positions, int dtype, int threads) {
    const int64_t row_bytes = dim * element_bytes(dtype);
    if (new_keys) {
        for (int64_t b = 0; b < batch; b++)
            if (new_positions[b] < 0 || new_positions[b] >= positions) return -2;
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t i = b * sb + h * sh + new_positions[b] * ss;
                memcpy(at(key, i, dtype), at(new_keys, b * new_keys_sb + h * dim, dtype), row_bytes);
                memcpy(at(value, i, dtype), at(new_values, b * new_values_sb + h * dim, dtype), row_bytes);
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
        const void *keys = at(key, b * sb + h * sh, dtype), *values = at(value, b * sb + h * sh, dtype);
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t t = 0; t < length; t++) {
                const void *q = at(query, b * query_strides[0] + h * query_strides[1] + g * query_strides[2] +
                                              t * query_strides[3], dtype);
                void *o = at(out, b * out_strides[0] + h * out_strides[1] + g * out_strides[2] + t * out_strides[3],
                             dtype);
                float peak = -INFINITY;
                for (int64_t p = 0; p < positions; p++) {
                    float extra = mask_kind ? mask_value(mask, mask_kind, b * mb + t * mt + p) : 0.0f;
                    scores[p] =
                        extra == -INFINITY ? -INFINITY : dot(q, at(keys, p * ss, dtype), dim, dtype) * scale + extra;
                    if (scores[p] > peak) peak = scores[p];
                }
                if (peak == -INFINITY) { /* sees nothing */
                    memset(o, 0, row_bytes);
                    continue;
                }
                float sum = jetmoe_exp_shifted(scores, positions, peak);
                for (int64_t d = 0; d < dim; d++) acc[d] = 0.0f;
                for (int64_t p = 0; p < positions; p++) {
                    if (scores[p] == 0.0f) continue;
                    float w = dtype == F32 ? scores[p] : bf16_to_float(bf16_bits(scores[p]));
                    vf weight = v_set(w);
                    const void *v = at(values, p * ss, dtype);
                    for (int64_t d = 0; d < dim; d += LANES)
                        v_storeu(acc + d, v_fma(weight, v_load(v, dtype, d), v_loadu(acc + d)));
                }
                vf inverse = v_set(1.0f / sum);
                for (int64_t d = 0; d < dim; d += LANES)
                    v_store(o, dtype, d, v_mul(v_loadu(acc + d), inverse));
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
 * moe_logits alike). Returns 0 with `out` = the last layer's output (with `head`: its final norm, and where
 * head->w is set, logits [B, vocab] = that times the head's weights); or stops at a layer whose routing is the
 * caller's to decide: 1 (MoA: `out` = that layer's input, nothing of it done) or 2 (MoE: `out` = h, its
 * attention and cache write done), with *stopped = that layer; or -1 (out of memory), -2 (expert id out of
 * range), -3 (a new position outside 0..positions-1). All tensors in `dtype` but the int8 weights. */
typedef struct {
    const void *input_norm, *moa_router, *moa_bias, *post_norm, *mlp_router, *mlp_bias;
    const void *query_w, *kv_w, *output_w, *w1, *w2;
    const void *query_scale, *kv_scale, *output_scale, *w1_scale, *w2_scale; /* NULL: weights in the dtype */
    void *keys, *values;                                                     /* the layer's cache buffers */
    int64_t cache_sb, cache_sh, cache_ss;                                    /* their strides, alike */
    float input_eps, post_eps, scale;
} jetmoe_layer;

/* What follows the last layer, where the caller hands it over: the final norm, then the output head's product
 * (weights [vocab, hidden] in the dtype, or int8 with a scale per row; w NULL: the norm only). */
typedef struct {
    const void *norm, *w, *scale;
    int64_t vocab;
    float eps;
    int dtype; /* of the norm weight (and a float head): the call's dtype, checked by the caller */
} jetmoe_head;

int jetmoe_decode_layers(const jetmoe_layer *layers, int64_t first, int64_t end, const void *x, int64_t batch,
                         int64_t hidden, int64_t experts, int64_t k, int64_t kv_heads, int64_t head_dim,
                         int64_t inner, const void *cos, const void *sin, int64_t cos_sb, const void *mask,
                         int mask_kind, int64_t mb, int64_t positions, const int64_t *new_positions,
                         float *moa_logits, float *moe_logits, void *out, const jetmoe_head *head, void *logits,
                         int64_t *stopped, int dtype, int threads) {
    const int64_t width = kv_heads * head_dim, slots = batch * k, row_bytes = hidden * element_bytes(dtype);
    for (int64_t b = 0; b < batch; b++)
        if (new_positions[b] < 0 || new_positions[b] >= positions) return -3;
    void *buffer = malloc((size_t)(2 * batch * hidden + 2 * slots * width + 3 * batch * width) * element_bytes(dtype));
    if (!buffer) return -1;
    void *input = buffer, *h = at(input, batch * hidden, dtype), *queries = at(h, batch * hidden, dtype);
    void *attended = at(queries, slots * width, dtype), *kv = at(attended, slots * width, dtype);
    void *keys = at(kv, 2 * batch * width, dtype);
    int64_t chosen[MAX_SLOTS], strides[4] = {k * width, head_dim, width, k * width}; /* (b, head, slot, t) */
    float gates[MAX_SLOTS];                                                          /* either dtype */
    int status = 0;
    memcpy(input, x, batch * row_bytes);
    for (int64_t l = first; l < end; l++) {
        const jetmoe_layer *L = layers + l;
        float *moa = moa_logits + l * batch * experts, *moe = moe_logits + l * batch * experts;
        status = jetmoe_decode_attention_in(input, batch, 1, hidden, L->input_norm, L->input_eps, L->moa_router,
                                            experts, k, L->query_w, L->query_scale, L->kv_w, L->kv_scale, kv_heads,
                                            head_dim, cos, sin, cos_sb, moa, chosen, gates, queries, kv, keys, dtype,
                                            threads);
        if (status) {
            if (status == 1) memcpy(out, input, batch * row_bytes);
            *stopped = l;
            break;
        }
        status = jetmoe_decode_attention(queries, strides, L->keys, L->values, L->cache_sb, L->cache_sh, L->cache_ss,
                                         mask, mask_kind, mb, 0, attended, strides, batch, kv_heads, k, 1, positions,
                                         head_dim, L->scale, keys, width, at(kv, width, dtype), 2 * width,
                                         new_positions, dtype, threads);
        if (status) {
            *stopped = l;
            break;
        }
        status = jetmoe_decode_attention_out(input, batch, hidden, k, attended, width, L->output_w, L->output_scale,
                                             chosen, gates, L->moa_bias, L->post_norm, L->post_eps, L->mlp_router,
                                             experts, L->w1, L->w1_scale, inner, L->w2, L->w2_scale, L->mlp_bias, h,
                                             moe, out, dtype, threads);
        if (status) {
            if (status == 1) {
                memcpy(out, h, batch * row_bytes);
                status = 2;
            }
            *stopped = l;
            break;
        }
        if (l + 1 < end) memcpy(input, out, batch * row_bytes);
    }
    if (status == 0 && head) { /* out = norm(out); logits = out @ head^T */
        int64_t dense[3] = {0, 0, batch};
        jetmoe_rms_norm(out, head->norm, input, NULL, batch, hidden, head->eps, dtype, threads);
        memcpy(out, input, batch * row_bytes);
        if (head->w && product(head->w, head->scale, head->vocab, hidden, out, batch, dense, 1, logits, dtype, threads))
            status = -1;
    }
    free(buffer);
    return status;
}
