/* The vectors jetmoe's kernels are written in, once for every instruction-set level.
 *
 * A vector `vf` is LANES fp32 lanes (GCC/Clang vector extensions), one register of the level the library is
 * built for (native/build.py): 16 with AVX-512, 8 with AVX2, 4 elsewhere (SSE2, NEON). Arithmetic is plain C
 * operators; the few steps whose result depends on one instruction (fused multiply-add, bf16 and int16 pair dot
 * products, fp32 -> bf16 rounding, rounding to integers) are helpers here that use that instruction where the
 * level has it and compute the same values where it does not.
 *
 * Element-wise results are therefore the same at every level, bit for bit. Sums across lanes (a matrix-vector
 * product's chains, a log-sum-exp) follow the vector width, so they agree across levels to fp32 rounding; and
 * vdpbf16ps treats denormal bf16 inputs as zero where the portable pair product does not.
 */
#ifndef JETMOE_SIMD_H
#define JETMOE_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };

/* The level this copy of the library was compiled for (native/build.py reads it back). */
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define JETMOE_LEVEL "avx512bf16"
#elif defined(__AVX512F__) && defined(__AVX512BW__)
#define JETMOE_LEVEL "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define JETMOE_LEVEL "avx2"
#else
#define JETMOE_LEVEL "generic"
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#else
#define LANES 4
#endif

/* Whether there are 32 vector registers (AVX-512): kernels then keep several rows' sums in registers at once;
 * elsewhere they take one row at a time, which spills nothing. */
#if LANES == 16
#define MANY_REGISTERS 1
#else
#define MANY_REGISTERS 0
#endif

typedef float vf __attribute__((vector_size(4 * LANES)));       /* LANES fp32 */
typedef int32_t vi __attribute__((vector_size(4 * LANES)));     /* LANES int32; comparisons give -1 / 0 lanes */
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));    /* LANES uint32 */
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));    /* LANES uint16 (bf16 bits) */
typedef int16_t vs __attribute__((vector_size(2 * LANES)));     /* LANES int16 */
typedef int16_t vs2 __attribute__((vector_size(4 * LANES)));    /* 2 * LANES int16 */
typedef int8_t vb2 __attribute__((vector_size(2 * LANES)));     /* 2 * LANES int8 */
typedef float vf8 __attribute__((vector_size(32)));             /* 8 fp32 (ATen's summation order, elementwise.c) */
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

/* ---- scalars ---- */

static inline float bits_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t float_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

/* fp32 -> bf16 as vcvtneps2bf16: nearest even, denormals to signed zero, NaN quietened. */
static inline uint16_t bf16_bits(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_to_float(uint16_t bits) { return bits_float((uint32_t)bits << 16); }

static inline float load_float(const void *p, int dtype, int64_t i) {
    if (dtype == F32) return ((const float *)p)[i];
    if (dtype == BF16) return bf16_to_float(((const uint16_t *)p)[i]);
    _Float16 h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    return (float)h;
}

static inline void store_float(void *p, int dtype, int64_t i, float f) {
    if (dtype == F32) {
        ((float *)p)[i] = f;
    } else if (dtype == BF16) {
        ((uint16_t *)p)[i] = bf16_bits(f);
    } else {
        _Float16 h = (_Float16)f;
        memcpy((uint16_t *)p + i, &h, sizeof h);
    }
}

/* ---- vectors ---- */

static inline vf v_zero(void) { return (vf){0}; }

static inline vf v_set(float x) {
    vf v;
    for (int i = 0; i < LANES; i++) v[i] = x;
    return v;
}

static inline vi vi_set(int32_t x) {
    vi v;
    for (int i = 0; i < LANES; i++) v[i] = x;
    return v;
}

static inline vf v_add(vf a, vf b) { return a + b; }
static inline vf v_sub(vf a, vf b) { return a - b; }
static inline vf v_mul(vf a, vf b) { return a * b; }
static inline vf v_div(vf a, vf b) { return a / b; }

static inline vf v_select(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

/* Lanes 0 .. n-1 (n clamped to 0 .. LANES). */
static inline vi v_first(int64_t n) {
    vi iota;
    for (int i = 0; i < LANES; i++) iota[i] = i;
    return iota < vi_set((int32_t)(n < 0 ? 0 : (n > LANES ? LANES : n)));
}

/* a * b + c with one rounding. */
static inline vf v_fma(vf a, vf b, vf c) {
#if LANES == 16
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif LANES == 8
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__aarch64__)
    return (vf)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
#else
    vf r;
    for (int i = 0; i < LANES; i++) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
    return r;
#endif
}

/* The lanes' sum, halving: lane i + lane i + LANES/2, and so on (with 16 lanes, _mm512_reduce_add_ps's tree). */
static inline float v_sum(vf v) {
    float lanes[LANES];
    memcpy(lanes, &v, sizeof lanes);
    for (int half = LANES / 2; half > 0; half /= 2)
        for (int i = 0; i < half; i++) lanes[i] += lanes[i + half];
    return lanes[0];
}

/* a > b ? a : b, as x86's maxps (a NaN lane may be skipped: callers check NaN themselves). */
static inline vf v_max(vf a, vf b) { return v_select(a > b, a, b); }

static inline float v_max_lane(vf v) {
    float m = v[0];
    for (int i = 1; i < LANES; i++) m = v[i] > m ? v[i] : m;
    return m;
}

static inline vf v_abs(vf v) { return (vf)((vu)v & 0x7fffffffu); }

static inline int v_any(vi mask) {
    int any = 0;
    for (int i = 0; i < LANES; i++) any |= mask[i] != 0;
    return any;
}

/* Round to the nearest integer (ties to even), as cvtps2dq; out-of-range lanes are unspecified. */
static inline vi v_round_int(vf v) {
#if LANES == 16
    return (vi)_mm512_cvt_roundps_epi32((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif LANES == 8
    return (vi)_mm256_cvtps_epi32((__m256)v);
#elif defined(__aarch64__)
    return (vi)vcvtnq_s32_f32((float32x4_t)v);
#else
    vi q;
    for (int i = 0; i < LANES; i++) {
        float r = __builtin_rintf(v[i]);
        q[i] = fabsf(r) < 2147483520.0f ? (int32_t)r : INT32_MIN;
    }
    return q;
#endif
}

static inline vf v_from_bf16(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

/* fp32 -> bf16 bits of each lane, as bf16_bits. */
static inline vu v_bf16_bits(vu u) {
    vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);
    rounded = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    vu tiny = (vu)((u & 0x7f800000u) == 0u);
    return (rounded & ~tiny) | (((u >> 16) & 0x8000u) & tiny);
}

static inline vh v_to_bf16(vf v) {
#if defined(__AVX512BF16__) && LANES == 16
    __m256bh b = _mm512_cvtneps_pbh((__m512)v);
    vh h;
    memcpy(&h, &b, sizeof h);
    return h;
#else
    return __builtin_convertvector(v_bf16_bits((vu)v), vh);
#endif
}

/* v as a bf16 store would round it, read back; fp32 unchanged. */
static inline vf v_round_to(vf v, int dtype) { return dtype == F32 ? v : v_from_bf16(v_to_bf16(v)); }

static inline vf v_loadu(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void v_storeu(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* LANES elements from index i of fp32 or bf16 data, as fp32. */
static inline vf v_load(const void *base, int dtype, int64_t i) {
    if (dtype == F32) return v_loadu((const float *)base + i);
    vh h;
    memcpy(&h, (const uint16_t *)base + i, sizeof h);
    return v_from_bf16(h);
}

static inline void v_store(void *base, int dtype, int64_t i, vf v) {
    if (dtype == F32) {
        v_storeu((float *)base + i, v);
    } else {
        vh h = v_to_bf16(v);
        memcpy((uint16_t *)base + i, &h, sizeof h);
    }
}

/* The first n elements; the other lanes read as zero. */
static inline vf v_load_first(const void *base, int dtype, int64_t i, int64_t n) {
    if (n >= LANES) return v_load(base, dtype, i);
    vf v = v_zero();
    for (int64_t j = 0; j < n; j++) v[j] = load_float(base, dtype, i + j);
    return v;
}

static inline void v_store_first(void *base, int dtype, int64_t i, vf v, int64_t n) {
    if (n >= LANES) {
        v_store(base, dtype, i, v);
        return;
    }
    for (int64_t j = 0; j < n; j++) store_float(base, dtype, i + j, v[j]);
}

/* ---- 8-lane vectors (sums in ATen's order) ---- */

static inline vf8 v8_load(const void *base, int dtype, int64_t i) {
    if (dtype == F32) {
        vf8 v;
        memcpy(&v, (const float *)base + i, sizeof v);
        return v;
    }
    vh8 h;
    memcpy(&h, (const uint16_t *)base + i, sizeof h);
    return (vf8)(__builtin_convertvector(h, vu8) << 16);
}

static inline vf8 v8_round_to(vf8 v, int dtype) {
    if (dtype == F32) return v;
    vu8 u = (vu8)v;
    vu8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu8 nan = (vu8)((u & 0x7fffffffu) > 0x7f800000u);
    rounded = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    vu8 tiny = (vu8)((u & 0x7f800000u) == 0u);
    rounded = (rounded & ~tiny) | (((u >> 16) & 0x8000u) & tiny);
    return (vf8)(rounded << 16);
}

/* ---- pair dot products ---- */

/* 2 * LANES bf16, as the bf16 dot product takes them. */
#if defined(__AVX512BF16__) && LANES == 16
typedef __m512bh bf16_pairs;
static inline bf16_pairs bf16_pairs_load(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }
#else
typedef struct {
    vf odd, even;
} bf16_pairs;
static inline bf16_pairs bf16_pairs_load(const uint16_t *p) {
    vu u;
    memcpy(&u, p, sizeof u);
    return (bf16_pairs){(vf)(u & 0xffff0000u), (vf)(u << 16)};
}
#endif

/* acc[i] + a[2i+1] b[2i+1] + a[2i] b[2i], each product added with one rounding, odd first (vdpbf16ps). */
static inline vf v_dot_bf16(vf acc, bf16_pairs a, bf16_pairs b) {
#if defined(__AVX512BF16__) && LANES == 16
    return (vf)_mm512_dpbf16_ps((__m512)acc, a, b);
#else
    return v_fma(a.even, b.even, v_fma(a.odd, b.odd, acc));
#endif
}

/* 2 * LANES int8 widened to int16. */
static inline vs2 i16_pairs_widen(const int8_t *p) {
    vb2 b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vs2);
}

static inline vs2 i16_pairs_load(const int16_t *p) {
    vs2 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1] in int32 (vpdpwssd; callers keep the sums from overflowing). */
static inline vi v_dot_i16(vi acc, vs2 a, vs2 b) {
#if defined(__AVX512VNNI__) && LANES == 16
    return (vi)_mm512_dpwssd_epi32((__m512i)acc, (__m512i)a, (__m512i)b);
#elif LANES == 16
    return acc + (vi)_mm512_madd_epi16((__m512i)a, (__m512i)b);
#elif LANES == 8
    return acc + (vi)_mm256_madd_epi16((__m256i)a, (__m256i)b);
#else
    vi wide_a, wide_b;
    memcpy(&wide_a, &a, sizeof wide_a);
    memcpy(&wide_b, &b, sizeof wide_b);
    vi a_even = (wide_a << 16) >> 16, a_odd = wide_a >> 16, b_even = (wide_b << 16) >> 16, b_odd = wide_b >> 16;
    return (vi)((vu)acc + (vu)(a_even * b_even) + (vu)(a_odd * b_odd));
#endif
}

#endif
