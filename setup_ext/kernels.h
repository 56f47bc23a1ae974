// The passes of the fused step on CPU: element types, schedule evaluation, statistics, update.
// Formulas follow fastsched/optim/_reference.py (the oracle) operation by operation in fp32
// (no FMA contraction: built with -ffp-contract=off), finalize in float64.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "layout.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fs {

namespace L = layout;

//: elements per block of the statistics and update passes: partial sums are per block and
//: combined in block order, so results do not depend on the thread count
constexpr int64_t BLK = 8192;
//: accumulation lanes of a block's sums (fixed: the summation order is part of the result)
constexpr int W = 16;

enum Dtype : int64_t { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

inline float bits_to_float(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline uint32_t float_to_bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

// storage types: ld converts to the fp32 of the arithmetic, st rounds to nearest even, ldd is
// the float64 value of the statistics pass (the reference sums g.to(float64))
// GCC / Clang vector extensions (the lane order, and so every sum, is the same whatever
// instructions the target has)
typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

struct TF32 {
    static constexpr bool NARROW = true;  // its values square exactly in float64
    using T = float;
    static float ld(T x) { return x; }
    static T st(float x) { return x; }
    static double ldd(T x) { return x; }
    static v8d ld8d(const T* p) {  // ldd of p[0..8)
#if defined(__AVX512F__)  // GCC lowers the generic conversion in two halves
        return (v8d)_mm512_cvtps_pd(_mm256_loadu_ps(p));
#else
        v8f f;
        std::memcpy(&f, p, sizeof f);
        return __builtin_convertvector(f, v8d);
#endif
    }
};
struct TBF16 {
    static constexpr bool NARROW = true;  // its values square exactly in float64
    using T = uint16_t;
    static float ld(T x) { return bits_to_float(static_cast<uint32_t>(x) << 16); }
    static T st(float x) {  // torch's round_to_nearest_even (NaN -> 0x7FC0)
        uint32_t b = float_to_bits(x);
        uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
        return x != x ? static_cast<T>(0x7FC0) : static_cast<T>(r);
    }
    static double ldd(T x) { return ld(x); }
    static v8d ld8d(const T* p) {
#if defined(__AVX512F__)
        const __m256i u = _mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
        return (v8d)_mm512_cvtps_pd(_mm256_castsi256_ps(u));
#else
        v8h h;
        std::memcpy(&h, p, sizeof h);
        const v8u u = __builtin_convertvector(h, v8u) << 16;
        v8f f;
        std::memcpy(&f, &u, sizeof f);
        return __builtin_convertvector(f, v8d);
#endif
    }
};
struct TF16 {
    static constexpr bool NARROW = true;  // its values square exactly in float64
    using T = _Float16;
    static float ld(T x) { return static_cast<float>(x); }
    static T st(float x) { return static_cast<T>(x); }  // IEEE conversion: nearest even
    static double ldd(T x) { return static_cast<float>(x); }
    static v8d ld8d(const T* p) {
        v8d d;
        for (int j = 0; j < 8; j++) d[j] = ldd(p[j]);
        return d;
    }
};
struct TF64 {  // float64 parameters: fp32 arithmetic as the reference (p.to(float32))
    static constexpr bool NARROW = false;
    using T = double;
    static float ld(T x) { return static_cast<float>(x); }
    static T st(float x) { return x; }
    static double ldd(T x) { return x; }
    static v8d ld8d(const T* p) {
        v8d d;
        std::memcpy(&d, p, sizeof d);
        return d;
    }
};

// -- schedule: fastsched.schedules._core.evaluate_table for one step, float64 ------------------

inline double pw(double b, double e) { return std::exp(e * std::log(b)); }
inline double nan_min(double a, double b) {  // torch.minimum: nan if either is nan
    return (a != a || b != b) ? NAN : (a < b ? a : b);
}

inline double schedule_value(const double* tab, int64_t nseg, double t) {
    int64_t idx = 0;  // searchsorted(starts, t, right=True) - 1, clamped at 0
    for (int64_t k = 0; k < nseg; k++)
        if (tab[k * L::SEG_COLS + L::SEG_START] <= t) idx = k + 1;
    idx = idx > 0 ? idx - 1 : 0;
    const double* r = tab + idx * L::SEG_COLS;
    double start = r[L::SEG_START], length = r[L::SEG_LENGTH], shape = r[L::SEG_SHAPE];
    double v0 = r[L::SEG_V0], v1 = r[L::SEG_V1], a = r[L::SEG_A], b = r[L::SEG_B];
    double c = r[L::SEG_C];
    double x = t - start;
    x = x < 0.0 ? 0.0 : x;
    double p = x / length;
    p = (p != p) ? 0.0 : (p < 0.0 ? 0.0 : (p > 1.0 ? 1.0 : p));
    double dv = v0 - v1;
    auto is = [&](int64_t code) { return shape == static_cast<double>(code); };
    if (is(L::SHAPE_LINEAR)) return v0 + (v1 - v0) * p;
    if (is(L::SHAPE_COSINE)) return v1 + dv * pw(0.5 * (1.0 + std::cos(M_PI * p)), a);
    if (is(L::SHAPE_POLY)) return v1 + dv * pw(1.0 - p, a);
    if (is(L::SHAPE_POW_DECAY)) return v1 + dv * (1.0 - pw(p, a));
    if (is(L::SHAPE_GEOMETRIC)) return v0 == 0 ? v0 : v0 * pw(v1 / v0, p);
    if (is(L::SHAPE_EXP_RATE)) {
        double e = x / b;
        if (c != 0) e = std::floor(e);
        return v1 + dv * pw(a, e);
    }
    if (is(L::SHAPE_INV_SQRT)) return v1 + dv / std::sqrt(1.0 + x / a);
    if (is(L::SHAPE_REX)) return v1 + dv * (1.0 - p) / (1.0 - a * p);
    if (is(L::SHAPE_POWER)) return nan_min(v0, v1 * pw((x + a) * c, b));
    if (is(L::SHAPE_INV_SQRT_CD)) {
        double h1 = 1.0 / std::sqrt(1.0 + a) - 1.0;
        double hp = 1.0 / std::sqrt(1.0 + a * p) - 1.0;
        return v0 + (v1 - v0) * hp / (h1 == 0 ? 1.0 : h1);
    }
    return v0;  // SHAPE_CONST (and unknown codes, as evaluate_table)
}

// -- statistics pass: (sum g^2, sum |g|, non-finite count) of one block, float64 ---------------

// W = 16 lanes as two vectors of 8 doubles: element i of a block goes to lane i % 16

inline v8d vabs(v8d x) {  // |x| (the sign bit cleared)
    const v8l m = (v8l)x & 0x7FFFFFFFFFFFFFFFLL;
    return (v8d)m;
}

// acc + x * x where the product is exact (x a float32 value: 24-bit significands give a 48-bit
// product, within float64's 53 bits), so one fused multiply-add rounds exactly as the multiply
// and the add do one after the other: the same bits, one instruction fewer
inline v8d add_sq_exact(v8d acc, v8d x) {
#if defined(__AVX512F__)
    return (v8d)_mm512_fmadd_pd((__m512d)x, (__m512d)x, (__m512d)acc);
#elif defined(__FMA__)
    v8d r;
    for (int j = 0; j < 8; j++) r[j] = __builtin_fma(x[j], x[j], acc[j]);
    return r;
#else
    return acc + x * x;
#endif
}

inline double lane_sum(v8d a, v8d b) {  // lanes 0..15 in order
    double s = 0;
    for (int j = 0; j < 8; j++) s += a[j];
    for (int j = 0; j < 8; j++) s += b[j];
    return s;
}

template <bool GUARD>
inline void sums8(v8d x, v8d& sq, v8d& ab, v8d& nf) {
    const v8d zero = {0, 0, 0, 0, 0, 0, 0, 0};
    const v8d one = zero + 1.0;
    const v8d ax = x < zero ? -x : x;
    const v8l fin = ax <= (zero + DBL_MAX);  // false for nan and inf
    const v8d ok = GUARD ? (fin ? x : zero) : x;
    sq += ok * ok;
    ab += GUARD ? (fin ? ax : zero) : ax;
    nf += fin ? zero : one;
}

// the exact pass, element by element: used for a block with a non-finite value (or, float64,
// a square that overflows)
template <class E, bool GUARD>
void grad_sums_exact(const typename E::T* __restrict g, int64_t n, double out[3]) {
    v8d sq[2] = {}, ab[2] = {}, nf[2] = {};
    double tmp[W];
    for (int64_t i = 0; i < n; i += W) {
        const int64_t m = n - i < W ? n - i : W;
        if (m == W) {
            for (int j = 0; j < W; j++) tmp[j] = E::ldd(g[i + j]);
        } else {
            for (int j = 0; j < W; j++) tmp[j] = j < m ? E::ldd(g[i + j]) : 0.0;
        }
        v8d x0, x1;
        std::memcpy(&x0, tmp, 64);
        std::memcpy(&x1, tmp + 8, 64);
        sums8<GUARD>(x0, sq[0], ab[0], nf[0]);
        sums8<GUARD>(x1, sq[1], ab[1], nf[1]);
    }
    double s0 = 0, s1 = 0, s2 = 0;
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 8; j++) {
            s0 += sq[h][j];
            s1 += ab[h][j];
            s2 += nf[h][j];
        }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
}

// A block's (sum g^2, sum |g|, non-finite count). First without the finiteness test: when both
// sums come out finite every element was finite (a float32 square cannot overflow a float64 sum
// of 8192), so the count is 0 and the guard (which zeroes non-finite values) changed nothing: the
// sums are those of the exact pass, bit for bit. Otherwise the block is summed again exactly.
template <class E, bool GUARD>
void grad_sums(const typename E::T* __restrict g, int64_t n, double out[3]) {
    v8d sq0 = {}, sq1 = {}, ab0 = {}, ab1 = {};
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        const v8d x0 = E::ld8d(g + i), x1 = E::ld8d(g + i + 8);
        if (E::NARROW) {
            sq0 = add_sq_exact(sq0, x0);
            sq1 = add_sq_exact(sq1, x1);
        } else {
            sq0 += x0 * x0;
            sq1 += x1 * x1;
        }
        ab0 += vabs(x0);
        ab1 += vabs(x1);
    }
    if (i < n) {  // the last partial group, zero padded (a zero adds nothing: lanes start at +0)
        double t[W] = {0};
        for (int j = 0; i + j < n; j++) t[j] = E::ldd(g[i + j]);
        v8d x0, x1;
        std::memcpy(&x0, t, 64);
        std::memcpy(&x1, t + 8, 64);
        sq0 += x0 * x0;
        sq1 += x1 * x1;
        ab0 += vabs(x0);
        ab1 += vabs(x1);
    }
    const double s0 = lane_sum(sq0, sq1), s1 = lane_sum(ab0, ab1);
    if (std::isfinite(s0) && std::isfinite(s1)) {
        out[0] = s0;
        out[1] = s1;
        out[2] = 0.0;
        return;
    }
    grad_sums_exact<E, GUARD>(g, n, out);
}

// sum of p^2 (ALLoRA unit norms), float64, lanes in a fixed order
template <class E>
double sum_sq(const typename E::T* __restrict p, int64_t n) {
    if constexpr (E::NARROW) {  // the same lanes in vectors (squares exact: fused multiply-add)
        v8d a0 = {}, a1 = {};
        int64_t i = 0;
        for (; i + W <= n; i += W) {
            a0 = add_sq_exact(a0, E::ld8d(p + i));
            a1 = add_sq_exact(a1, E::ld8d(p + i + 8));
        }
        if (i < n) {  // zero padded: lanes past the end add +0
            alignas(64) double t[W] = {0};
            for (int j = 0; i + j < n; j++) t[j] = E::ldd(p[i + j]);
            v8d x0, x1;
            std::memcpy(&x0, t, 64);
            std::memcpy(&x1, t + 8, 64);
            a0 = add_sq_exact(a0, x0);
            a1 = add_sq_exact(a1, x1);
        }
        return lane_sum(a0, a1);
    }
    double acc[W] = {0};
    int64_t i = 0;
    for (; i + W <= n; i += W)
        for (int j = 0; j < W; j++) {
            double x = E::ld(p[i + j]);
            acc[j] += x * x;
        }
    for (int j = 0; i + j < n; j++) {
        double x = E::ld(p[i + j]);
        acc[j] += x * x;
    }
    double s = 0;
    for (int j = 0; j < W; j++) s += acc[j];
    return s;
}

// the update statistics of a block: lanes of sum p^2 and sum u^2 (lane = index in the span % 16)
struct Lanes {
    v8d p0, p1, u0, u1;
};

// add the squares of one group of 16 new p (x) and u (y) values, in float64
inline void acc16(const float* x, const float* y, Lanes& s) {
    s.p0 = add_sq_exact(s.p0, TF32::ld8d(x));
    s.p1 = add_sq_exact(s.p1, TF32::ld8d(x + 8));
    s.u0 = add_sq_exact(s.u0, TF32::ld8d(y));
    s.u1 = add_sq_exact(s.u1, TF32::ld8d(y + 8));
}

// The loop of a span: one(i, p_new, u) updates element i. With STATS, groups of 16 elements whose
// squares are added right after (while the next loads are in flight: in a separate pass over a
// chunk they cost ~25% of a memory-bound step); the last partial group is zero padded (a zero
// adds nothing: the lanes start at +0).
template <bool STATS, class F>
inline void span_loop(int64_t n, Lanes* ls, F one) {
    if (!STATS) {
        float a, b;
        for (int64_t i = 0; i < n; i++) one(i, a, b);
        return;
    }
    Lanes s = *ls;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        alignas(64) float pn[W], un[W];
        for (int j = 0; j < W; j++) one(i + j, pn[j], un[j]);
        acc16(pn, un, s);
    }
    if (i < n) {
        alignas(64) float pn[W] = {0}, un[W] = {0};
        for (int j = 0; i + j < n; j++) one(i + j, pn[j], un[j]);
        acc16(pn, un, s);
    }
    *ls = s;
}

// -- update pass -------------------------------------------------------------------------------

//: elements per chunk of a span of 16-bit (or float64) storage, converted to float32 around the
//: float32 loop (a multiple of 16: the statistics lanes continue from chunk to chunk)
constexpr int64_t NCH = 256;

struct AdamScal {
    float gmul, step_size, bc2s, decay, l2, omb1, omb1c, omb2, omb2c, eps;
    bool lo;  // lerp from the start (1 - beta1 < 0.5), as torch's lerp
    bool upd;  // ALLoRA allora_apply="update": gs multiplies the step, not the gradient
};

struct SgdScal {
    float gmul, lr, mom_a, mom_b, wd, momentum;
    bool nesterov;
    bool upd;  // as AdamScal::upd
};

// One contiguous span of one tensor. SVEC: the ALLoRA multiplier of column units (one per
// element: gs[i]), else gs[0] for the whole span (1.0 without ALLoRA: exact); it multiplies the
// gradient, or with s.upd (allora_apply="update") the step after the decoupled decay. STATS:
// the new p and the update u (times the multiplier with s.upd) go to the lanes *ls.
template <class E, bool AMS, bool STATS, bool SVEC>
void adam_span(const AdamScal& s, typename E::T* __restrict p, const typename E::T* __restrict g,
               typename E::T* __restrict m, typename E::T* __restrict v,
               typename E::T* __restrict vm, int64_t n, const float* __restrict gs, Lanes* ls) {
    if constexpr (!std::is_same<E, TF32>::value) {
        // GCC does not vectorize the loop with the bf16 rounding in it: convert a chunk to
        // float32 (exact), run the float32 loop, round back (the same values, bit for bit)
        alignas(64) float tp[NCH], tg[NCH], tm[NCH], tv[NCH], tw[AMS ? NCH : 1];
        for (int64_t c0 = 0; c0 < n; c0 += NCH) {
            const int64_t cn = n - c0 < NCH ? n - c0 : NCH;
            for (int64_t k = 0; k < cn; k++) {
                tp[k] = E::ld(p[c0 + k]);
                tg[k] = E::ld(g[c0 + k]);
                tm[k] = E::ld(m[c0 + k]);
                tv[k] = E::ld(v[c0 + k]);
            }
            if (AMS)
                for (int64_t k = 0; k < cn; k++) tw[k] = E::ld(vm[c0 + k]);
            adam_span<TF32, AMS, STATS, SVEC>(s, tp, tg, tm, tv, AMS ? tw : nullptr, cn,
                                              SVEC ? gs + c0 : gs, ls);
            for (int64_t k = 0; k < cn; k++) {
                p[c0 + k] = E::st(tp[k]);
                m[c0 + k] = E::st(tm[k]);
                v[c0 + k] = E::st(tv[k]);
            }
            if (AMS)
                for (int64_t k = 0; k < cn; k++) vm[c0 + k] = E::st(tw[k]);
        }
        return;
    }
    const float gmul = s.gmul, step_size = s.step_size, bc2s = s.bc2s, decay = s.decay;
    const float l2 = s.l2, omb1 = s.omb1, omb1c = s.omb1c, omb2 = s.omb2, omb2c = s.omb2c;
    const float eps = s.eps;
    const bool lo = s.lo, upd = s.upd;
    const float g0 = gs[0];
    span_loop<STATS>(n, ls, [&](int64_t i, float& p_new, float& u_out) {
        float pf = E::ld(p[i]);
        float gf = E::ld(g[i]) * gmul;
        const float sc = SVEC ? gs[i] : g0;
        gf = gf * (upd ? 1.0f : sc);
        pf = pf * decay;      // AdamW: p * (1 - lr * wd); Adam: 1
        gf = gf + l2 * pf;    // Adam: L2 penalty in the gradient; AdamW: 0
        float mf = E::ld(m[i]);
        float vf = E::ld(v[i]);
        const float d = gf - mf;
        const float m_lo = mf + omb1 * d;
        const float m_hi = gf - d * omb1c;
        mf = lo ? m_lo : m_hi;
        vf = omb2c * vf + omb2 * gf * gf;
        float vv = vf;
        if (AMS) {
            const float a = E::ld(vm[i]);
            float r = a > vf ? a : vf;
            r = (a != a) ? a : r;  // torch.maximum: nan if either is nan
            vv = r;
            vm[i] = E::st(r);
        }
        const float u = mf / (std::sqrt(vv) / bc2s + eps) * (upd ? sc : 1.0f);
        pf = pf - step_size * u;
        p[i] = E::st(pf);
        m[i] = E::st(mf);
        v[i] = E::st(vf);
        p_new = pf;
        u_out = u;
    });
}

// 16 bf16 values at a time: the conversions of TBF16::ld / st (exact widening; round to nearest
// even on the bits, NaN -> 0x7FC0) and the float32 operations of the span's loop in the same
// order, in one pass (no float32 buffers between the passes of a chunk)
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline v16f bf16_ld16(const uint16_t* p) {
#if defined(__AVX512F__)  // GCC lowers the generic widening in pieces
    return (v16f)_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
    v16h h;
    std::memcpy(&h, p, sizeof h);
    const v16u u = __builtin_convertvector(h, v16u) << 16;
    return (v16f)u;
#endif
}
inline void bf16_st16(uint16_t* p, v16f x) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    // the instruction rounds to nearest even as below, but subnormal inputs are read as zero
    // and a NaN keeps its sign and payload: groups with either go the integer way
    if (_mm512_fpclass_ps_mask((__m512)x, 0xA1) == 0) {  // no QNaN (0x01), subnormal, SNaN
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)x));
        return;
    }
#endif
    const v16u b = (v16u)x;
    v16u r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    const v16u nan = (v16u)(x != x);  // all ones where x is NaN
    r = (r & ~nan) | (nan & 0x7FC0u);
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)r));
#else
    const v16h h = __builtin_convertvector(r, v16h);
    std::memcpy(p, &h, sizeof h);
#endif
}

template <class E, bool MOM, bool STATS, bool SVEC>
void sgd_span(const SgdScal& s, typename E::T* __restrict p, const typename E::T* __restrict g,
              typename E::T* __restrict buf, int64_t n, const float* __restrict gs, Lanes* ls) {
    if constexpr (std::is_same<E, TBF16>::value && !STATS && !SVEC) {
        const int64_t nv = n & ~int64_t(63);
        if (nv > 0) {
            const float gmul = s.gmul, lr = s.lr, mom_a = s.mom_a, mom_b = s.mom_b, wd = s.wd;
            const float momentum = s.momentum;
            const float pre = s.upd ? 1.0f : gs[0], post = s.upd ? gs[0] : 1.0f;
            const bool nesterov = s.nesterov;
            const bool one_gmul = gmul == 1.0f, one_pre = pre == 1.0f, one_post = post == 1.0f;
            for (int64_t i = 0; i < nv; i += 64) {
                v16f pf[4], d[4], b[4];
                for (int j = 0; j < 4; j++) {  // the group's loads before its stores
                    pf[j] = bf16_ld16(p + i + 16 * j);
                    d[j] = bf16_ld16(g + i + 16 * j);
                    if (MOM) b[j] = bf16_ld16(buf + i + 16 * j);
                }
                for (int j = 0; j < 4; j++) {
                    // a multiplication by 1 is skipped: x * 1 is x (a NaN stays a NaN, stored
                    // as 0x7FC0 whatever its payload)
                    if (!one_gmul) d[j] = d[j] * gmul;
                    if (!one_pre) d[j] = d[j] * pre;  // the gradient's multiplier (1 with s.upd)
                    d[j] = d[j] + wd * pf[j];
                    if (MOM) {
                        b[j] = mom_a * b[j] + mom_b * d[j];
                        const v16f dn = d[j] + momentum * b[j];
                        d[j] = nesterov ? dn : b[j];
                    }
                    if (!one_post) d[j] = d[j] * post;  // the multiplier of the step (s.upd)
                    pf[j] = pf[j] - lr * d[j];
                }
                for (int j = 0; j < 4; j++) {
                    if (MOM) bf16_st16(buf + i + 16 * j, b[j]);
                    bf16_st16(p + i + 16 * j, pf[j]);
                }
            }
        }
        if (nv == n) return;
        p += nv;  // the rest (< 64) through the chunk below
        g += nv;
        if (MOM) buf += nv;
        n -= nv;
    }
    if constexpr (!std::is_same<E, TF32>::value) {  // as adam_span
        alignas(64) float tp[NCH], tg[NCH], tb[MOM ? NCH : 1];
        for (int64_t c0 = 0; c0 < n; c0 += NCH) {
            const int64_t cn = n - c0 < NCH ? n - c0 : NCH;
            for (int64_t k = 0; k < cn; k++) {
                tp[k] = E::ld(p[c0 + k]);
                tg[k] = E::ld(g[c0 + k]);
            }
            if (MOM)
                for (int64_t k = 0; k < cn; k++) tb[k] = E::ld(buf[c0 + k]);
            sgd_span<TF32, MOM, STATS, SVEC>(s, tp, tg, MOM ? tb : nullptr, cn,
                                             SVEC ? gs + c0 : gs, ls);
            for (int64_t k = 0; k < cn; k++) p[c0 + k] = E::st(tp[k]);
            if (MOM)
                for (int64_t k = 0; k < cn; k++) buf[c0 + k] = E::st(tb[k]);
        }
        return;
    }
    const float gmul = s.gmul, lr = s.lr, mom_a = s.mom_a, mom_b = s.mom_b, wd = s.wd;
    const float momentum = s.momentum;
    const bool nesterov = s.nesterov, upd = s.upd;
    const float g0 = gs[0];
    span_loop<STATS>(n, ls, [&](int64_t i, float& p_new, float& u_out) {
        float pf = E::ld(p[i]);
        float d = E::ld(g[i]) * gmul;
        const float sc = SVEC ? gs[i] : g0;
        d = d * (upd ? 1.0f : sc);
        d = d + wd * pf;
        if (MOM) {
            const float b = mom_a * E::ld(buf[i]) + mom_b * d;
            buf[i] = E::st(b);
            const float dn = d + momentum * b;
            d = nesterov ? dn : b;
        }
        d = d * (upd ? sc : 1.0f);
        pf = pf - lr * d;
        p[i] = E::st(pf);
        p_new = pf;
        u_out = d;
    });
}

}  // namespace fs
