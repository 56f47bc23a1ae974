// The passes of the fused step on CPU: element types, schedule evaluation, statistics, update;
// below fp32: the 8-bit block-scaled codec and stochastic rounding of fastsched/optim/_lowp.py
// (bit for bit), the fused Adam loop of the low-precision storage.
// Formulas follow fastsched/optim/_reference.py (the oracle) operation by operation in fp32
// (no FMA contraction: built with -ffp-contract=off), finalize in float64.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <array>
#include <utility>

#include "layout.h"

#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace fs {

// a lambda of a loop body inlined whatever GCC's estimate: without AVX-512 the Adam group's,
// over Wide vectors, became a call that passed its vectors through memory (AVX-512 builds keep
// GCC's choice, the code measured there)
#if defined(__AVX512F__)
#define FS_ALWAYS_INLINE
#else
#define FS_ALWAYS_INLINE __attribute__((always_inline))
#endif

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
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
#if defined(__AVX512F__)
typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

// the bits of a vector as another type of the same size
template <class To, class From>
inline To vcast(From x) {
    return (To)x;
}
// the lanes of a where mask (all ones or zero per lane) is set, else those of b
template <class M, class V>
inline V vsel(M mask, V a, V b) {
    return mask ? a : b;
}
#else
// Without AVX-512 GCC keeps a 64-byte vector of its vector extension in memory: every
// operation on it loads its pieces from the stack and stores the result back (the float32
// AdamW step of an x86-64-v3 build took 2.7x torch's fused step, GPT-2 x0.1, 1 thread). Wide
// holds the same lanes in native vectors (32 bytes with AVX, else 16), which GCC keeps in
// registers, with the operators the loops use applied part by part: the same lanes, the same
// operations, the same bits.
#if defined(__AVX__)
constexpr int NATIVE = 32;
#else
constexpr int NATIVE = 16;
#endif
template <class S>
using LaneMask = typename std::conditional<sizeof(S) == 8, int64_t, int32_t>::type;
template <class S, int N>
struct Wide {
    typedef S part __attribute__((vector_size(NATIVE)));
    static constexpr int K = N * static_cast<int>(sizeof(S)) / NATIVE;
    static_assert(K >= 1 && K * NATIVE == N * static_cast<int>(sizeof(S)), "whole parts");
    part v[K];
    static constexpr int P = NATIVE / static_cast<int>(sizeof(S));  // lanes per part
    S operator[](int j) const { return v[j / P][j % P]; }
    // an assignable lane: clang binds no reference to a vector element (GCC does)
    struct Lane {
        part& p;
        int i;
        operator S() const { return p[i]; }
        Lane& operator=(S x) {
            p[i] = x;
            return *this;
        }
        Lane& operator=(const Lane& o) { return *this = static_cast<S>(o); }
    };
    Lane operator[](int j) { return Lane{v[j / P], j % P}; }
};
template <class X>
using ScalarOnly = typename std::enable_if<std::is_arithmetic<X>::value>::type;

#define FS_WIDE_BINARY(OP)                                                              \
    template <class S, int N>                                                           \
    inline Wide<S, N> operator OP(const Wide<S, N>& a, const Wide<S, N>& b) {           \
        Wide<S, N> r;                                                                   \
        for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = a.v[k] OP b.v[k];              \
        return r;                                                                       \
    }                                                                                   \
    template <class S, int N, class X, class = ScalarOnly<X>>                           \
    inline Wide<S, N> operator OP(const Wide<S, N>& a, X b) {                           \
        Wide<S, N> r;                                                                   \
        for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = a.v[k] OP static_cast<S>(b);   \
        return r;                                                                       \
    }                                                                                   \
    template <class S, int N, class X, class = ScalarOnly<X>>                           \
    inline Wide<S, N> operator OP(X a, const Wide<S, N>& b) {                           \
        Wide<S, N> r;                                                                   \
        for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = static_cast<S>(a) OP b.v[k];   \
        return r;                                                                       \
    }                                                                                   \
    template <class S, int N, class B>                                                  \
    inline Wide<S, N>& operator OP##=(Wide<S, N>& a, const B& b) {                      \
        a = a OP b;                                                                     \
        return a;                                                                       \
    }
FS_WIDE_BINARY(+)
FS_WIDE_BINARY(-)
FS_WIDE_BINARY(*)
FS_WIDE_BINARY(/)
FS_WIDE_BINARY(&)
FS_WIDE_BINARY(|)
FS_WIDE_BINARY(^)
#undef FS_WIDE_BINARY
template <class S, int N>  // shifts by a scalar count
inline Wide<S, N> operator<<(const Wide<S, N>& a, int c) {
    Wide<S, N> r;
    for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = a.v[k] << c;
    return r;
}
template <class S, int N>
inline Wide<S, N> operator>>(const Wide<S, N>& a, int c) {
    Wide<S, N> r;
    for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = a.v[k] >> c;
    return r;
}
template <class S, int N>
inline Wide<S, N> operator-(const Wide<S, N>& a) {
    Wide<S, N> r;
    for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = -a.v[k];
    return r;
}
template <class S, int N>
inline Wide<S, N> operator~(const Wide<S, N>& a) {
    Wide<S, N> r;
    for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = ~a.v[k];
    return r;
}
// comparisons: all ones (-1) in the lanes where true, as GCC's vector comparisons
#define FS_WIDE_COMPARE(OP)                                                             \
    template <class S, int N>                                                           \
    inline Wide<LaneMask<S>, N> operator OP(const Wide<S, N>& a, const Wide<S, N>& b) { \
        Wide<LaneMask<S>, N> r;                                                         \
        for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = a.v[k] OP b.v[k];              \
        return r;                                                                       \
    }                                                                                   \
    template <class S, int N, class X, class = ScalarOnly<X>>                           \
    inline Wide<LaneMask<S>, N> operator OP(const Wide<S, N>& a, X b) {                 \
        Wide<LaneMask<S>, N> r;                                                         \
        for (int k = 0; k < Wide<S, N>::K; k++) r.v[k] = a.v[k] OP static_cast<S>(b);   \
        return r;                                                                       \
    }
FS_WIDE_COMPARE(<)
FS_WIDE_COMPARE(<=)
FS_WIDE_COMPARE(>)
FS_WIDE_COMPARE(>=)
FS_WIDE_COMPARE(==)
FS_WIDE_COMPARE(!=)
#undef FS_WIDE_COMPARE

typedef Wide<double, 8> v8d;
typedef Wide<int64_t, 8> v8l;
typedef Wide<float, 16> v16f;
typedef Wide<uint32_t, 16> v16u;
typedef Wide<int32_t, 16> v16i;

template <class To, class From>
inline To vcast(const From& x) {
    static_assert(sizeof(To) == sizeof(From), "the same size");
    To r;
    for (int k = 0; k < To::K; k++) r.v[k] = (typename To::part)x.v[k];
    return r;
}
template <class M, class V>
inline V vsel(const M& mask, const V& a, const V& b) {  // (mask: a comparison's lanes)
    V r;
#if defined(__AVX__)
    // one blend on the mask's sign bits (GCC's ?: on a vector tests each lane against zero
    // first: a compare more per blend)
    for (int k = 0; k < V::K; k++)
        r.v[k] = (typename V::part)_mm256_blendv_ps((__m256)b.v[k], (__m256)a.v[k],
                                                    (__m256)mask.v[k]);
#else
    for (int k = 0; k < V::K; k++) r.v[k] = mask.v[k] ? a.v[k] : b.v[k];
#endif
    return r;
}
#endif

// lane-wise max / min of unsigned 32-bit lanes: one vpmaxud / vpminud (GCC turned the ?: of a
// comparison into a compare and a blend: 2 instructions, both on the ports the 8-bit Adam loop
// is bound by, for each of its four per 16 elements)
inline v16u vmaxu(const v16u& a, const v16u& b) {
#if defined(__AVX512F__)
    return (v16u)_mm512_max_epu32((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
    v16u r;
    for (int k = 0; k < v16u::K; k++)
        r.v[k] = (v16u::part)_mm256_max_epu32((__m256i)a.v[k], (__m256i)b.v[k]);
    return r;
#else
    return vsel(a > b, a, b);
#endif
}
inline v16u vminu(const v16u& a, const v16u& b) {
#if defined(__AVX512F__)
    return (v16u)_mm512_min_epu32((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
    v16u r;
    for (int k = 0; k < v16u::K; k++)
        r.v[k] = (v16u::part)_mm256_min_epu32((__m256i)a.v[k], (__m256i)b.v[k]);
    return r;
#else
    return vsel(a < b, a, b);
#endif
}

// the 64 bytes at p into x, and x into p (a Wide part by part: GCC copied a whole Wide through
// the stack in 16-byte pieces)
template <class V>
inline void vld(V& x, const void* p) {
    static_assert(sizeof(V) == 64, "a 64-byte vector");
#if defined(__AVX512F__)
    std::memcpy(&x, p, 64);
#else
    for (int k = 0; k < V::K; k++)
        std::memcpy(&x.v[k], static_cast<const char*>(p) + k * NATIVE, NATIVE);
#endif
}
template <class V>
inline void vst(void* p, const V& x) {
    static_assert(sizeof(V) == 64, "a 64-byte vector");
#if defined(__AVX512F__)
    std::memcpy(p, &x, 64);
#else
    for (int k = 0; k < V::K; k++)
        std::memcpy(static_cast<char*>(p) + k * NATIVE, &x.v[k], NATIVE);
#endif
}

// 8 float32 values in float64 (exact)
inline v8d cvt8d(v8f f) {
#if defined(__AVX512F__)
    return __builtin_convertvector(f, v8d);
#elif defined(__AVX__)
    __m256 x;
    std::memcpy(&x, &f, 32);
    v8d r;
    r.v[0] = (v8d::part)_mm256_cvtps_pd(_mm256_castps256_ps128(x));
    r.v[1] = (v8d::part)_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    return r;
#else
    v8d r;
    for (int j = 0; j < 8; j++) r[j] = f[j];
    return r;
#endif
}

// The storage of fp16 tensors (F16), half_t, and its conversions from and to float32 (exact
// one way, round to nearest even the other, as torch's c10::Half and the F16C instructions):
// - _Float16 where the compiler has it in C++: GCC >= 12 and clang >= 15 on x86-64 (clang with
//   F16C only: without it its conversions are calls to libgcc's __truncsfhf2 / __extendhfsf2,
//   which a libgcc older than GCC 12's lacks);
// - ARM's __fp16 on AArch64 (GCC 12 knows _Float16 there in C only; the FCVT instructions);
// - else (GCC 11, the default compiler of Ubuntu 22.04, on which `_Float16` does not compile in
//   C++; other targets; or FS_SOFT_HALF defined, which CI's check of this path sets) 16-bit words
//   converted below. Where F16C is there the 16-wide loops convert with it on every path.
#if !defined(FS_SOFT_HALF) && defined(__aarch64__)
using half_t = __fp16;
inline float half_to_float(half_t x) { return static_cast<float>(x); }
inline half_t float_to_half(float x) { return static_cast<half_t>(x); }
#elif !defined(FS_SOFT_HALF) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 15 && defined(__F16C__)) || \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12))
using half_t = _Float16;
inline float half_to_float(half_t x) { return static_cast<float>(x); }
inline half_t float_to_half(float x) { return static_cast<half_t>(x); }
#else
#ifndef FS_SOFT_HALF
#define FS_SOFT_HALF 1
#endif
struct half_t {
    uint16_t bits;
};
static_assert(sizeof(half_t) == 2, "fp16 storage");
// binary16 -> binary32, exact; a NaN keeps its payload and becomes quiet (as vcvtph2ps)
inline float half_to_float(half_t x) {
    const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
    const uint32_t em = x.bits & 0x7FFFu;  // exponent and mantissa
    if (em >= 0x7C00u) {  // inf, NaN
        const uint32_t man = em & 0x3FFu;
        return bits_to_float(sign | 0x7F800000u | (man << 13) | (man ? 0x400000u : 0u));
    }
    if (em >= 0x0400u)  // normal: the exponent's bias 15 -> 127 (112 << 10 = 0x1C000)
        return bits_to_float(sign | ((em + 0x1C000u) << 13));
    // subnormal or zero: em * 2^-24 (an integer below 2^10 times a power of two: exact)
    return bits_to_float(sign | float_to_bits(static_cast<float>(em) * 0x1p-24f));
}
// binary32 -> binary16, round to nearest even; overflow to inf, a NaN quiet with the top 10
// bits of its payload (as vcvtps2ph)
inline half_t float_to_half(float f) {
    const uint32_t x = float_to_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    uint32_t h;
    if (a > 0x7F800000u) {
        h = 0x7E00u | ((a >> 13) & 0x3FFu);
    } else if (a >= 0x477FF000u) {  // >= 65520 = 65504 + half its ulp (a tie to even: inf)
        h = 0x7C00u;
    } else if (a >= 0x38800000u) {  // >= 2^-14: normal; 127 - 15 = 112 (112 << 23)
        const uint32_t r = a - 0x38000000u;
        h = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;  // (a carry into the exponent is right)
    } else if (a <= 0x33000000u) {  // <= 2^-25: half the smallest subnormal, a tie to 0
        h = 0;
    } else {  // subnormal: the significand, 24 bits, shifted right by 126 - e in [14, 24]
        const uint32_t m = (a & 0x7FFFFFu) | 0x800000u, sh = 126u - (a >> 23);
        const uint32_t rem = m & ((1u << sh) - 1u), halfway = 1u << (sh - 1u);
        h = m >> sh;
        h += (rem > halfway || (rem == halfway && (h & 1u))) ? 1u : 0u;  // 0x400: 2^-14
    }
    return half_t{static_cast<uint16_t>(sign | h)};
}
#endif

struct TF32 {
    static constexpr bool NARROW = true;  // its values square exactly in float64
    using T = float;
    using C = float;  // the arithmetic of adam_span / sgd_span
    static float ld(T x) { return x; }
    static T st(float x) { return x; }
    static double ldd(T x) { return x; }
    static v8d ld8d(const T* p) {  // ldd of p[0..8)
#if defined(__AVX512F__)  // GCC lowers the generic conversion in two halves
        return (v8d)_mm512_cvtps_pd(_mm256_loadu_ps(p));
#else
        v8f f;
        std::memcpy(&f, p, sizeof f);
        return cvt8d(f);
#endif
    }
};
struct TBF16 {
    static constexpr bool NARROW = true;  // its values square exactly in float64
    using T = uint16_t;
    using C = float;
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
        return cvt8d(f);
#endif
    }
};
struct TF16 {
    static constexpr bool NARROW = true;  // its values square exactly in float64
    using T = half_t;
    using C = float;
    static float ld(T x) { return half_to_float(x); }
    static T st(float x) { return float_to_half(x); }  // IEEE conversion: nearest even
    static double ldd(T x) { return half_to_float(x); }
    static v8d ld8d(const T* p) {  // F16C: 8 at a time (GCC converts one by one: the
                                   // statistics and unit sums of fp16 took 10x bf16's)
#if defined(__AVX512F__)
        return (v8d)_mm512_cvtps_pd(
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__F16C__)
        const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        v8f h;
        std::memcpy(&h, &f, 32);
        return cvt8d(h);
#else
        v8d d;
        for (int j = 0; j < 8; j++) d[j] = ldd(p[j]);
        return d;
#endif
    }
};
// 16 fp16 values <-> float32 with F16C (vcvtph2ps, exact; vcvtps2ph, round to nearest even:
// the instructions of TF16::ld / st, which GCC emits one element at a time, ~4x the time of a
// bf16 step); without F16C the scalar conversions
inline v16f f16_ld16(const half_t* p) {
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)  // AVX2 machines: two halves of 8
    v16f f;
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    std::memcpy(&f, &lo, 32);
    std::memcpy(reinterpret_cast<char*>(&f) + 32, &hi, 32);
    return f;
#else
    v16f f;
    for (int j = 0; j < 16; j++) f[j] = TF16::ld(p[j]);
    return f;
#endif
}
inline void f16_st16(half_t* p, v16f x) {
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
    __m256 lo, hi;
    std::memcpy(&lo, &x, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + 32, 32);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8),
                     _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    for (int j = 0; j < 16; j++) p[j] = TF16::st(x[j]);
#endif
}
// n values of E's storage -> float32 and back (the chunks of adam_span / sgd_span)
template <class E>
inline void chunk_in(const typename E::T* __restrict s, int64_t n, float* __restrict d) {
    int64_t i = 0;
    if constexpr (std::is_same<E, TF16>::value)
        for (; i + 16 <= n; i += 16) {
            const v16f v = f16_ld16(s + i);
            vst(d + i, v);
        }
    for (; i < n; i++) d[i] = E::ld(s[i]);
}
template <class E>
inline void chunk_out(const float* __restrict s, int64_t n, typename E::T* __restrict d) {
    int64_t i = 0;
    if constexpr (std::is_same<E, TF16>::value)
        for (; i + 16 <= n; i += 16) {
            v16f v;
            vld(v, s + i);
            f16_st16(d + i, v);
        }
    for (; i < n; i++) d[i] = E::st(s[i]);
}

struct TF64 {  // float64 storage read for float32 arithmetic (statistics, unit norms)
    static constexpr bool NARROW = false;
    using T = double;
    using C = float;
    static float ld(T x) { return static_cast<float>(x); }
    static T st(float x) { return x; }
    static double ldd(T x) { return x; }
    static v8d ld8d(const T* p) {
        v8d d;
        std::memcpy(&d, p, sizeof d);
        return d;
    }
};
// float64 parameters with float64 states step in float64, as torch.optim (and _reference)
// does: adam_span / sgd_span run their loop in double, from finalize's unrounded scalars
struct TD64 {
    using T = double;
    using C = double;
    static double ld(T x) { return x; }
    static T st(double x) { return x; }
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
    const v8l m = vcast<v8l>(x) & 0x7FFFFFFFFFFFFFFFLL;
    return vcast<v8d>(m);
}

// acc + x * x where the product is exact (x a float32 value: 24-bit significands give a 48-bit
// product, within float64's 53 bits), so one fused multiply-add rounds exactly as the multiply
// and the add do one after the other: the same bits, one instruction fewer
inline v8d add_sq_exact(v8d acc, v8d x) {
#if defined(__AVX512F__)
    return (v8d)_mm512_fmadd_pd((__m512d)x, (__m512d)x, (__m512d)acc);
#elif defined(__FMA__) && defined(__AVX__)
    for (int k = 0; k < v8d::K; k++)
        acc.v[k] = (v8d::part)_mm256_fmadd_pd((__m256d)x.v[k], (__m256d)x.v[k],
                                              (__m256d)acc.v[k]);
    return acc;
#elif defined(__FMA__)
    v8d r;
    for (int j = 0; j < 8; j++) r[j] = __builtin_fma(x[j], x[j], acc[j]);
    return r;
#else
    return acc + x * x;
#endif
}

// a * b + c, one rounding (the float32 partial sums of Lanes)
inline v16f fma16(v16f a, v16f b, v16f c) {
#if defined(__AVX512F__)
    return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && defined(__AVX__)
    for (int k = 0; k < v16f::K; k++)
        c.v[k] = (v16f::part)_mm256_fmadd_ps((__m256)a.v[k], (__m256)b.v[k], (__m256)c.v[k]);
    return c;
#else
    v16f r;
    for (int j = 0; j < 16; j++) r[j] = __builtin_fmaf(a[j], b[j], c[j]);
    return r;
#endif
}

// a / b for a float32 constant b in (0, 1] with y = 1 / b (float32, rounded to nearest), by
// Markstein's correction: q = a * y, r = a - q * b (exact in one fma), q + r * y (P. Markstein,
// "Computation of elementary functions on the IBM RISC System/6000 processor", IBM J. Res. Dev.
// 34 (1990); J.-M. Muller et al., Handbook of Floating-Point Arithmetic, on division with an
// fma). The theorem wants q within one ulp of a / b, which RN(a * y) need not be, so the claim
// "the bits of a / b" rests on the check: setup_ext/check_div_by.c compared it with division on
// every float32 significand of a for 22212 divisors (the bias corrections sqrt(1 - beta2^t) of
// nine beta2 up to step 20000, 20000 random b in [2^-30, 1)) and on every exponent of a from
// 2^-75 to 2^64 for six: no difference; tests/optim/test_cpu_backend.py checks it again on
// AVX-512 builds (others divide). It replaces one of the three divider operations of a group
// of 16 Adam elements (sqrt, this division, the update's division: ~10-12 cycles each on a
// 512-bit vector). Inputs are the loop's: a = sqrt(v) is +0, in [2^-75, 2^64], inf or NaN, so
// the quotient never overflows (an overflowing one would come out NaN) and a -0 (which sqrt(v)
// never is: v >= +0) would come out +0. An infinite a gives r = NaN: it keeps q (inf / b is
// inf); a NaN stays a NaN; 0 gives 0. On a Zen 1 (AVX2 on 128-bit units, 2026-12-02) the
// divider instead of these steps made bf16 AdamW 1.00-1.05x the step time (Llama-1B x0.1, 1
// thread, builds alternated in one process): the divider is what that core's loop waits on.
inline v16f div_by16(v16f a, float b, float y) {
#if defined(__AVX512F__)
    const __m512 va = (__m512)a, vb = _mm512_set1_ps(b), vy = _mm512_set1_ps(y);
    const __m512 q = _mm512_mul_ps(va, vy);
    const __m512 r = _mm512_fnmadd_ps(q, vb, va);
    const __m512 q2 = _mm512_fmadd_ps(r, vy, q);
    // lanes with r a NaN (a = inf; a NaN keeps its q, a NaN too): q
    const __mmask16 keep = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    return (v16f)_mm512_mask_mov_ps(q2, keep, q);
#elif defined(__FMA__) && defined(__AVX__)  // the same steps on two halves
    const __m256 vb = _mm256_set1_ps(b), vy = _mm256_set1_ps(y);
    for (int k = 0; k < v16f::K; k++) {
        const __m256 va = (__m256)a.v[k];
        const __m256 q = _mm256_mul_ps(va, vy);
        const __m256 r = _mm256_fnmadd_ps(q, vb, va);
        const __m256 q2 = _mm256_fmadd_ps(r, vy, q);
        a.v[k] = (v16f::part)_mm256_blendv_ps(q2, q, _mm256_cmp_ps(r, r, _CMP_UNORD_Q));
    }
    return a;
#else
    (void)y;
    return a / b;  // (the divider: the same bits)
#endif
}

inline v8d lo8d(v16f x) {  // lanes 0..7 in float64
    v8f h;
    std::memcpy(&h, &x, 32);
    return cvt8d(h);
}

inline v8d hi8d(v16f x) {  // lanes 8..15 in float64
    v8f h;
    std::memcpy(&h, reinterpret_cast<const char*>(&x) + 32, 32);
    return cvt8d(h);
}

// a two-vector shuffle of v8d: __builtin_shufflevector where the compiler has it (clang, GCC
// 12+), else GCC's __builtin_shuffle (GCC 11 and older build the extension too)
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FS_SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FS_SHUF8(a, b, ...) __builtin_shuffle(a, b, v8l{__VA_ARGS__})
#endif

inline double lane_sum(v8d a, v8d b) {  // lanes 0..15 in order
    double s = 0;
    for (int j = 0; j < 8; j++) s += a[j];
    for (int j = 0; j < 8; j++) s += b[j];
    return s;
}

template <bool GUARD>
inline void sums8(v8d x, v8d& sq, v8d& ab, v8d& nf) {
    const v8d zero = {};
    const v8d one = zero + 1.0;
    const v8d ax = vsel(x < zero, -x, x);
    const v8l fin = ax <= (zero + DBL_MAX);  // false for nan and inf
    const v8d ok = GUARD ? vsel(fin, x, zero) : x;
    sq += ok * ok;
    ab += GUARD ? vsel(fin, ax, zero) : ax;
    nf += vsel(fin, zero, one);
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
        vld(x0, tmp);
        vld(x1, tmp + 8);
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

//: bytes ahead of the loops that read one array alone (the statistics pass, ALLoRA's unit sums
//: before the update) that each group requests into L1 (prefetcht0). The hardware alone kept the
//: two streams of grad_sums_k at 10.7-11.5 GB/s where a loop of float32 additions over the same 381
//: MB read 14.7-15.1 GB/s (one thread, Xeon model 207, C++ microbenchmark): the float64 sums'
//: conversions and fused multiply-adds, ~4.5 cycles per 16 elements, leave fewer misses in flight.
//: Requested 2 or 4 KB ahead: 12.8-15.1 and 14.1-14.6 GB/s; into L2 (prefetcht1) 12.7-14.6;
//: non-temporal (prefetchnta) 8.6-11.4, slower than none.
constexpr int64_t READ_AHEAD = 4096;

// a request into L1 (RW 1: to be written) of the line `bytes` after element i of p, once per
// 64-byte line for a loop over groups of W elements (2-byte elements: every other group, 1-byte
// every fourth). A prefetch does not fault: past the end of the array it is dropped
template <int RW, class T>
inline void line_ahead(const T* p, int64_t i, int64_t bytes) {
    if (sizeof(T) * W >= 64 || i % static_cast<int64_t>(64 / sizeof(T)) == 0)
        __builtin_prefetch(reinterpret_cast<const char*>(p + i) + bytes, RW, 3);
}
template <class T>
inline void read_ahead(const T* p, int64_t i) {
    line_ahead<0>(p, i, READ_AHEAD);
}

// A block's (sum g^2, sum |g|, non-finite count). First without the finiteness test: when both
// sums come out finite every element was finite (a float32 square cannot overflow a float64 sum
// of 8192), so the count is 0 and the guard (which zeroes non-finite values) changed nothing: the
// sums are those of the exact pass, bit for bit. Otherwise the block is summed again exactly.
// GradAcc holds one block's lanes, so that grad_sums_k can step K blocks side by side with each
// block's sums in the order of grad_sums (the same bits).
template <class E>
struct GradAcc {
    using T = typename E::T;
    v8d sq0 = {}, sq1 = {}, ab0 = {}, ab1 = {};

    void group(const T* __restrict g) {  // W elements
        const v8d x0 = E::ld8d(g), x1 = E::ld8d(g + 8);
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

    // elements [i, n) of the block: whole groups, the last partial group zero padded (a zero
    // adds nothing: lanes start at +0); then the block's sums into out
    template <bool GUARD>
    void finish(const T* __restrict g, int64_t i, int64_t n, double out[3]) {
        for (; i + W <= n; i += W) {
            read_ahead(g, i);
            group(g + i);
        }
        if (i < n) {
            double t[W] = {0};
            for (int j = 0; i + j < n; j++) t[j] = E::ldd(g[i + j]);
            v8d x0, x1;
            vld(x0, t);
            vld(x1, t + 8);
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
};

template <class E, bool GUARD>
void grad_sums(const typename E::T* __restrict g, int64_t n, double out[3]) {
    GradAcc<E> a;
    a.template finish<GUARD>(g, 0, n, out);
}

//: blocks of the statistics pass one thread reads side by side (grad_sums_k). One thread
//: reading a single gradient stream is bound by the latency of its misses: foreach_norm and
//: grad_sums alike read ~9 GB/s on one thread of a 2-vCPU Xeon (Llama-1B x0.1, fp32 gradients,
//: 381 MB), where the update's seven streams move ~25 GB/s. Two streams: 0.70x the pass's time
//: (1 thread; 0.67x with 2); 4 and 8 streams gained nothing more (Xeon model 207, 2026-11-30;
//: on a later Xeon with AVX-512 BF16 / FP16, 2026-12-02: 4 streams 24.4-24.7 ms against 23.6-23.8
//: for 2, READ_AHEAD 8 or 16 KB 24.3-25.5 ms against 4 KB's 23.6-23.8; the blocks read in the
//: reverse of the update's order, to find the last ones in the cache: the clipping + statistics
//: step 1.00-1.04x its time, 1 and 2 threads)
constexpr int STATS_STREAMS = 2;

// K blocks of one dtype side by side: their common whole groups in lockstep, then each block's
// rest; each block's sums are grad_sums' (the same lanes in the same order)
template <class E, int K, bool GUARD>
void grad_sums_k(const typename E::T* const* g, const int64_t* n, double* const* out) {
    GradAcc<E> a[K];
    int64_t common = n[0];
    for (int k = 1; k < K; k++) common = n[k] < common ? n[k] : common;
    common = common / W * W;
    for (int64_t i = 0; i < common; i += W)
        for (int k = 0; k < K; k++) {
            read_ahead(g[k], i);
            a[k].group(g[k] + i);
        }
    for (int k = 0; k < K; k++) a[k].template finish<GUARD>(g[k], common, n[k], out[k]);
}

// sum of p^2 (ALLoRA unit norms), float64, lanes in a fixed order. SumSq takes a unit in
// pieces: add() whole groups of W elements, finish() the rest; the pieces of a unit give the
// bits of one sum_sq call over it (the same lanes, each in the same order). AHEAD: each group
// requests the line READ_AHEAD bytes on (read_ahead; for the sums of a pass of their own, unit
// sums: beside the update the next piece is in L1 already, where it cost 0.98-1.0x the step)
template <class E, bool AHEAD = false>
struct SumSq {
    using T = typename E::T;
    v8d a0 = {}, a1 = {};  // NARROW: the lanes in vectors (squares exact: fused multiply-add)
    double acc[W] = {0};   // float64 values: lane j, one by one

    void add(const T* __restrict p, int64_t n) {  // n: a multiple of W
        if constexpr (E::NARROW) {
            v8d x0 = a0, x1 = a1;
            for (int64_t i = 0; i < n; i += W) {
                if (AHEAD) read_ahead(p, i);
                x0 = add_sq_exact(x0, E::ld8d(p + i));
                x1 = add_sq_exact(x1, E::ld8d(p + i + 8));
            }
            a0 = x0;
            a1 = x1;
        } else {
            for (int64_t i = 0; i < n; i += W) {
                if (AHEAD) read_ahead(p, i);
                for (int j = 0; j < W; j++) {
                    double x = E::ld(p[i + j]);
                    acc[j] += x * x;
                }
            }
        }
    }

    double finish(const T* __restrict p, int64_t n) {  // the last n elements: the sum
        const int64_t nw = n / W * W;
        add(p, nw);
        p += nw;
        n -= nw;
        if constexpr (E::NARROW) {
            if (n > 0) {  // zero padded: lanes past the end add +0
                alignas(64) double t[W] = {0};
                for (int j = 0; j < n; j++) t[j] = E::ldd(p[j]);
                v8d x0, x1;
                vld(x0, t);
                vld(x1, t + 8);
                a0 = add_sq_exact(a0, x0);
                a1 = add_sq_exact(a1, x1);
            }
            return lane_sum(a0, a1);
        } else {
            for (int j = 0; j < n; j++) {
                double x = E::ld(p[j]);
                acc[j] += x * x;
            }
            double s = 0;
            for (int j = 0; j < W; j++) s += acc[j];
            return s;
        }
    }
};

// a software prefetch (into L1) of every 64-byte line of [p, p + bytes): for a loop that will
// read them after other work, so their misses overlap that work instead of stalling the loop
inline void prefetch_bytes(const void* p, int64_t bytes) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p), e = a + static_cast<uintptr_t>(bytes);
    for (uintptr_t c = a & ~uintptr_t(63); c < e; c += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(c), 0, 3);
}

template <class E, bool AHEAD = false>
double sum_sq(const typename E::T* __restrict p, int64_t n) {
    SumSq<E, AHEAD> s;
    return s.finish(p, n);
}

// the 8 x 8 transpose: out[j][k] = in[k][j]
inline void transpose8(const v8d* in, v8d* out) {
#if !defined(__AVX512F__) && defined(__AVX__)
    // four 4 x 4 transposes of the 256-bit halves: out[j]'s half h holds rows 4h..4h+3 of
    // column j, from the halves j / 4 of those rows (the scalar loop made ALLoRA on a LoRA
    // set's rows of 16 1.5x the plain step, against 1.05x with 512-bit shuffles)
    for (int h = 0; h < 2; h++)      // rows 4h..4h+3
        for (int q = 0; q < 2; q++) {  // columns 4q..4q+3
            const __m256d r0 = (__m256d)in[4 * h].v[q], r1 = (__m256d)in[4 * h + 1].v[q];
            const __m256d r2 = (__m256d)in[4 * h + 2].v[q], r3 = (__m256d)in[4 * h + 3].v[q];
            const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
            const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
            out[4 * q].v[h] = (v8d::part)_mm256_permute2f128_pd(t0, t2, 0x20);
            out[4 * q + 1].v[h] = (v8d::part)_mm256_permute2f128_pd(t1, t3, 0x20);
            out[4 * q + 2].v[h] = (v8d::part)_mm256_permute2f128_pd(t0, t2, 0x31);
            out[4 * q + 3].v[h] = (v8d::part)_mm256_permute2f128_pd(t1, t3, 0x31);
        }
#elif !defined(__AVX512F__)
    for (int j = 0; j < 8; j++)
        for (int k = 0; k < 8; k++) out[j][k] = in[k][j];
#else
    v8d t[8], u[8];
    for (int k = 0; k < 8; k += 2) {
        t[k] = FS_SHUF8(in[k], in[k + 1], 0, 8, 2, 10, 4, 12, 6, 14);
        t[k + 1] = FS_SHUF8(in[k], in[k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    }
    for (int k = 0; k < 8; k += 4)
        for (int h = 0; h < 2; h++) {
            u[k + h] = FS_SHUF8(t[k + h], t[k + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[k + h + 2] = FS_SHUF8(t[k + h], t[k + h + 2], 2, 3, 10, 11, 6, 7, 14,
                                                   15);
        }
    for (int j = 0; j < 4; j++) {
        out[j] = FS_SHUF8(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        out[j + 4] = FS_SHUF8(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
#endif
}

// sum_sq of 8 contiguous units of ulen elements (ulen a multiple of 16, or 8), side by side:
// each unit's lanes as SumSq's, then the 16 lanes of the 8 units transposed and added in
// lane_sum's order, 8 units to a vector: sum_sq's bits without a scalar chain of 16 additions
// per unit (a rank-16 LoRA B matrix has rows of 16)
template <class E>
void sum_sq_rows8(const typename E::T* __restrict p, int64_t ulen, double* out) {
    v8d lo[8], hi[8], c[8];
    const int64_t nw = ulen / W * W;
    for (int k = 0; k < 8; k++) {
        SumSq<E> s;
        s.add(p + k * ulen, nw);
        if (nw < ulen) s.a0 = add_sq_exact(s.a0, E::ld8d(p + k * ulen + nw));  // 8 more
        lo[k] = s.a0;
        hi[k] = s.a1;
    }
    v8d sum = {};
    transpose8(lo, c);
    for (int j = 0; j < 8; j++) sum += c[j];
    transpose8(hi, c);
    for (int j = 0; j < 8; j++) sum += c[j];
    vst(out, sum);
}

//: elements whose squares a float32 partial sum of Lanes takes before it goes to the float64
//: lanes (16 per lane: within 16 float32 roundings of exact, ~1e-6 relative, the accuracy of
//: torch's own float32 norms; the Triton kernels sum whole blocks in float32). Squares straight
//: into float64 (two conversions and two fused multiply-adds per 8 values, against one float32
//: multiply-add per 16) made the statistics step 1.07x (fp32) and 1.32x (bf16) the time of
//: this; a group counter in Lanes instead of these fixed places, 1.04-1.05x (GPT-2 x0.1,
//: clip + stats, 1 thread, Zen 4).
constexpr int64_t LANE_RUN = 256;

// the update statistics of a block: lanes of sum p^2 and sum u^2 (lane = index in the span % 16),
// float64, from float32 partial sums that the loops flush every LANE_RUN elements from the
// start of a call and at its end (places fixed by the plan: the same bits for any thread count)
struct Lanes {
    v8d p0, p1, u0, u1;
    v16f sp, su;  // the float32 partial sums

    void add(v16f p, v16f u) {
        sp = fma16(p, p, sp);
        su = fma16(u, u, su);
    }

    void flush() {  // (float32 values are exact in float64)
        p0 += lo8d(sp);
        p1 += hi8d(sp);
        u0 += lo8d(su);
        u1 += hi8d(su);
        sp = su = v16f{};
    }
};

// add the squares of one group of 16 new p (x) and u (y) values
inline void acc16(const float* x, const float* y, Lanes& s) {
    v16f a, b;
    vld(a, x);
    vld(b, y);
    s.add(a, b);
}

inline void acc16(const double* x, const double* y, Lanes& s) {  // (no contraction)
    v8d a, b, c, d;
    vld(a, x);
    vld(b, x + 8);
    vld(c, y);
    vld(d, y + 8);
    s.p0 += a * a;
    s.p1 += b * b;
    s.u0 += c * c;
    s.u1 += d * d;
}

// The loop of a span: one(i, p_new, u) updates element i (C: float or double). With STATS, groups of 16 elements whose
// squares are added right after (while the next loads are in flight: in a separate pass over a
// chunk they cost ~25% of a memory-bound step); the last partial group is zero padded (a zero
// adds nothing: the lanes start at +0).
template <class C, bool STATS, class F>
inline void span_loop(int64_t n, Lanes* ls, F one) {
    if (!STATS) {
        C a, b;
        for (int64_t i = 0; i < n; i++) one(i, a, b);
        return;
    }
    Lanes s = *ls;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        alignas(64) C pn[W], un[W];
        for (int j = 0; j < W; j++) one(i + j, pn[j], un[j]);
        acc16(pn, un, s);
        if (std::is_same<C, float>::value && (i + W) % LANE_RUN == 0) s.flush();
    }
    if (i < n) {
        alignas(64) C pn[W] = {0}, un[W] = {0};
        for (int j = 0; i + j < n; j++) one(i + j, pn[j], un[j]);
        acc16(pn, un, s);
    }
    if (std::is_same<C, float>::value) s.flush();
    *ls = s;
}

// -- update pass -------------------------------------------------------------------------------

//: elements per chunk of a span of 16-bit storage, converted to float32 around the
//: float32 loop (a multiple of 16: the statistics lanes continue from chunk to chunk)
constexpr int64_t NCH = 256;

// a tensor's scalars in the arithmetic's type (C: float32, or float64 for TD64)
template <class C>
struct AdamScalT {
    C gmul, step_size, bc2s, decay, l2, omb1, omb1c, omb2, omb2c, eps;
    bool lo;  // lerp from the start (1 - beta1 < 0.5), as torch's lerp
    bool upd;  // ALLoRA allora_apply="update": gs multiplies the step, not the gradient
};

template <class C>
struct SgdScalT {
    C gmul, lr, mom_a, mom_b, wd, momentum;
    bool nesterov;
    bool upd;  // as AdamScalT::upd
};

using AdamScal = AdamScalT<float>;
using SgdScal = SgdScalT<float>;

// One contiguous span of one tensor. SVEC: the ALLoRA multiplier of column units (one per
// element: gs[i]), else gs[0] for the whole span (1.0 without ALLoRA: exact); it multiplies the
// gradient, or with s.upd (allora_apply="update") the step after the decoupled decay. STATS:
// the new p and the update u (times the multiplier with s.upd) go to the lanes *ls.
template <class E, bool AMS, bool STATS, bool SVEC>
void adam_span(const AdamScalT<typename E::C>& s, typename E::T* __restrict p,
               const typename E::T* __restrict g, typename E::T* __restrict m,
               typename E::T* __restrict v, typename E::T* __restrict vm, int64_t n,
               const float* __restrict gs, Lanes* ls) {
    using C = typename E::C;
    if constexpr (!std::is_same<E, TF32>::value && !std::is_same<E, TD64>::value) {
        // GCC does not vectorize the loop with the bf16 rounding in it: convert a chunk to
        // float32 (exact), run the float32 loop, round back (the same values, bit for bit)
        alignas(64) float tp[NCH], tg[NCH], tm[NCH], tv[NCH], tw[AMS ? NCH : 1];
        for (int64_t c0 = 0; c0 < n; c0 += NCH) {
            const int64_t cn = n - c0 < NCH ? n - c0 : NCH;
            chunk_in<E>(p + c0, cn, tp);
            chunk_in<E>(g + c0, cn, tg);
            chunk_in<E>(m + c0, cn, tm);
            chunk_in<E>(v + c0, cn, tv);
            if (AMS) chunk_in<E>(vm + c0, cn, tw);
            adam_span<TF32, AMS, STATS, SVEC>(s, tp, tg, tm, tv, AMS ? tw : nullptr, cn,
                                              SVEC ? gs + c0 : gs, ls);
            chunk_out<E>(tp, cn, p + c0);
            chunk_out<E>(tm, cn, m + c0);
            chunk_out<E>(tv, cn, v + c0);
            if (AMS) chunk_out<E>(tw, cn, vm + c0);
        }
        return;
    }
    const C gmul = s.gmul, step_size = s.step_size, bc2s = s.bc2s, decay = s.decay;
    const C l2 = s.l2, omb1 = s.omb1, omb1c = s.omb1c, omb2 = s.omb2, omb2c = s.omb2c;
    const C eps = s.eps;
    const bool upd = s.upd;
    const C g0 = gs[0];  // ALLoRA multipliers: float32 for every dtype (exact in double)
    // The loop with its options fixed at compile time (float32: the loop of every 16-bit and
    // 32-bit span): LO the lerp's end, G1 gmul == 1, S1 no ALLoRA multiplier (g0 == 1, one per
    // span). A multiplication by 1 is left out only where it is exact (x * 1 is x; a NaN stays a
    // NaN and every stored value goes through later arithmetic), and one end of the lerp is
    // computed instead of both: the same bits with ~4 fewer vector operations per 16 elements,
    // which is what one thread of a bf16 step or of a step with statistics is bound by.
    auto loop = [&](auto lo_c, auto g1_c, auto s1_c) {
        constexpr bool LO = decltype(lo_c)::value, G1 = decltype(g1_c)::value;
        constexpr bool S1 = decltype(s1_c)::value && !SVEC;
        span_loop<C, STATS>(n, ls, [&](int64_t i, C& p_new, C& u_out) {
            C pf = E::ld(p[i]);
            C gf = E::ld(g[i]);
            if (!G1) gf = gf * gmul;
            const C sc = SVEC ? C(gs[i]) : g0;
            if (!S1 && !upd) gf = gf * sc;
            pf = pf * decay;      // AdamW: p * (1 - lr * wd); Adam: 1
            // Adam's L2 penalty, as torch only with weight_decay != 0 (0 * inf would put a NaN
            // in the moments of an inf parameter); loop-invariant: the compiler unswitches it
            if (l2 != C(0)) gf = gf + l2 * pf;
            C mf = E::ld(m[i]);
            C vf = E::ld(v[i]);
            const C d = gf - mf;
            mf = LO ? mf + omb1 * d : gf - d * omb1c;
            vf = omb2c * vf + omb2 * gf * gf;
            C vv = vf;
            if (AMS) {
                const C a = E::ld(vm[i]);
                C r = a > vf ? a : vf;
                r = (a != a) ? a : r;  // torch.maximum: nan if either is nan
                vv = r;
                vm[i] = E::st(r);
            }
            C u = mf / (std::sqrt(vv) / bc2s + eps);
            if (!S1 && upd) u = u * sc;
            pf = pf - step_size * u;
            p[i] = E::st(pf);
            m[i] = E::st(mf);
            v[i] = E::st(vf);
            p_new = pf;
            u_out = u;
        });
    };
    using T1 = std::true_type;
    using F0 = std::false_type;
    if constexpr (std::is_same<C, float>::value) {
        const bool g1 = gmul == C(1), s1 = !SVEC && g0 == C(1);
        const int k = int(s.lo) | int(g1) << 1 | int(s1) << 2;
        switch (k) {
            case 0: loop(F0{}, F0{}, F0{}); break;
            case 1: loop(T1{}, F0{}, F0{}); break;
            case 2: loop(F0{}, T1{}, F0{}); break;
            case 3: loop(T1{}, T1{}, F0{}); break;
            case 4: loop(F0{}, F0{}, T1{}); break;
            case 5: loop(T1{}, F0{}, T1{}); break;
            case 6: loop(F0{}, T1{}, T1{}); break;
            default: loop(T1{}, T1{}, T1{}); break;
        }
    } else if (s.lo) {  // float64 (TD64): the options as values, but one end of the lerp
        loop(T1{}, F0{}, F0{});
    } else {
        loop(F0{}, F0{}, F0{});
    }
}

// 16 bf16 values at a time: the conversions of TBF16::ld / st (exact widening; round to nearest
// even on the bits, NaN -> 0x7FC0) and the float32 operations of the span's loop in the same
// order, in one pass (no float32 buffers between the passes of a chunk)

typedef uint16_t v16h __attribute__((vector_size(32)));

inline v16f bf16_ld16(const uint16_t* p) {
#if defined(__AVX512F__)  // GCC lowers the generic widening in pieces
    return (v16f)_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
    v16f r;
    for (int k = 0; k < v16f::K; k++) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * k));
        r.v[k] = (v16f::part)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    }
    return r;
#else
    v16u u;
    for (int j = 0; j < 16; j++) u[j] = static_cast<uint32_t>(p[j]) << 16;
    return vcast<v16f>(u);
#endif
}
inline void u16_st16(uint16_t* p, v16u x) {  // each lane < 2^16: the low half of each lane
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)x));
#elif defined(__AVX2__)
    // packed within each 128-bit lane (packus: exact for lanes < 2^16, all the callers'), the
    // lanes' 64-bit pieces put back in order
    const __m256i pk = _mm256_packus_epi32((__m256i)x.v[0], (__m256i)x.v[1]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(pk, 0xD8));
#else
    for (int j = 0; j < 16; j++) p[j] = static_cast<uint16_t>(x[j]);
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
    const v16u b = vcast<v16u>(x);
    const v16u r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
#if !defined(__AVX512F__) && defined(__AVX__)
    // a NaN among the 16? (one unordered compare of the two halves and a test, against a
    // compare and a blend per half: a bf16 AdamW step stores three such groups per 16 elements)
    const __m256 un = _mm256_cmp_ps((__m256)x.v[0], (__m256)x.v[1], _CMP_UNORD_Q);
    if (_mm256_testz_ps(un, un)) {
        u16_st16(p, r);
        return;
    }
#endif
    const v16u nan = vcast<v16u>(x != x);  // all ones where x is NaN
    u16_st16(p, vsel(nan, v16u{} + 0x7FC0u, r));
}

// The bf16 loop of sgd_span, 64 elements at a time, its options fixed at compile time: GCC kept
// the tests of loop-invariant options in the loop (a vucomiss and two branches per option and
// 16 elements; perf annotate). One thread of SGD on bf16 is bound by vector instructions, not
// memory, on a Zen 4 (a loop without the arithmetic moves the same bytes 1.5x faster). (It
// measured 0.8-1.0x torch's fused bf16 SGD there, but torch 2.12-2.13's fused CPU SGD leaves
// the SIMD blocks of bf16 and fp16 parameters unchanged, pytorch/pytorch#191763: a step that
// does less; the benchmark no longer times it.) SG: the gradient's multipliers
// (gmul, pre) are not both 1; POST: the step's multiplier (s.upd) is not 1; DAMP: mom_b != 1.
// A multiplication by 1 is skipped only where it is exact (x * 1 is x; a NaN stays a NaN,
// stored as 0x7FC0 whatever its payload); weight decay always runs (d + 0 * inf is NaN, as in
// the float32 loop).
// fp16 (E = TF16) takes the same loop with F16C's conversions (the chunks of float32 took
// 2x torch's fused SGD time with nesterov and weight decay, GPT-2 x0.1, 1 thread), and fp32
// too: the span loop multiplies by gmul and by the two ALLoRA factors even when they are 1
// (the update of 65536 parameters from L2, 1 thread, Xeon 2.3 GHz: this loop 0.86-0.92x its
// time; from L3 and memory no difference).
// 16 values of E's storage <-> float32 (E: TF32, TBF16, TF16)
template <class E>
inline v16f ld16(const typename E::T* p);
template <>
inline v16f ld16<TF32>(const float* p) {
    v16f v;
    vld(v, p);
    return v;
}
template <>
inline v16f ld16<TBF16>(const uint16_t* p) { return bf16_ld16(p); }
template <>
inline v16f ld16<TF16>(const half_t* p) { return f16_ld16(p); }
template <class E>
inline void st16(typename E::T* p, v16f x);
template <>
inline void st16<TF32>(float* p, v16f x) { vst(p, x); }
template <>
inline void st16<TBF16>(uint16_t* p, v16f x) { bf16_st16(p, x); }
template <>
inline void st16<TF16>(half_t* p, v16f x) { f16_st16(p, x); }
//: groups of 16 that sgd16_loop loads before it stores: 4 (12 vectors in flight) fit AVX-512's
//: 32 registers; a Wide vector of AVX2 takes two of its 16, so there 2. (Requests of its three
//: arrays 2 or 4 KB ahead, as adam_fused's UPDATE_AHEAD, gained nothing: fp32 SGD with momentum
//: on Llama-1B x0.1, 1 thread, 78.3 and 77.7 ms against 78.2 and 77.8 without; 2 threads 42.9
//: and 41.6 against 41.6 and 41.7; one process alternating the builds, a 2-vCPU Xeon with
//: AVX-512 BF16 / FP16, 2026-12-02)
#if defined(__AVX512F__)
constexpr int SGD_GROUPS = 4;
#else
constexpr int SGD_GROUPS = 2;
#endif
template <class E, bool MOM, bool SG, bool POST, bool DAMP, bool NEST>
void sgd16_loop(const SgdScal& s, float pre, float post, typename E::T* __restrict p,
                const typename E::T* __restrict g, typename E::T* __restrict buf, int64_t nv) {
    const float gmul = s.gmul, lr = s.lr, mom_a = s.mom_a, mom_b = s.mom_b, wd = s.wd;
    const float momentum = s.momentum;
    constexpr int G = SGD_GROUPS;  // (nv: a multiple of 64)
    for (int64_t i = 0; i < nv; i += 16 * G) {
        v16f pf[G], d[G], b[G];
        for (int j = 0; j < G; j++) {  // the group's loads before its stores
            pf[j] = ld16<E>(p + i + 16 * j);
            d[j] = ld16<E>(g + i + 16 * j);
            if (MOM) b[j] = ld16<E>(buf + i + 16 * j);
        }
        for (int j = 0; j < G; j++) {
            if (SG) d[j] = d[j] * gmul * pre;  // (d * gmul) * pre: the float32 loop's order
            if (wd != 0.0f) d[j] = d[j] + wd * pf[j];  // as torch.optim.SGD (adam_span)
            if (MOM) {
                b[j] = mom_a * b[j] + (DAMP ? mom_b * d[j] : d[j]);
                d[j] = NEST ? d[j] + momentum * b[j] : b[j];
            }
            if (POST) d[j] = d[j] * post;
            pf[j] = pf[j] - lr * d[j];
        }
        for (int j = 0; j < G; j++) {
            if (MOM) st16<E>(buf + i + 16 * j, b[j]);
            st16<E>(p + i + 16 * j, pf[j]);
        }
    }
}

template <class E>
using Sgd16Loop = void (*)(const SgdScal&, float, float, typename E::T*, const typename E::T*,
                           typename E::T*, int64_t);

template <class E, bool MOM, size_t... I>
constexpr std::array<Sgd16Loop<E>, sizeof...(I)> sgd16_loops(std::index_sequence<I...>) {
    return {&sgd16_loop<E, MOM, (I & 1) != 0, (I & 2) != 0, (I & 4) != 0, (I & 8) != 0>...};
}

template <class E, bool MOM, bool STATS, bool SVEC>
void sgd_span(const SgdScalT<typename E::C>& s, typename E::T* __restrict p,
              const typename E::T* __restrict g, typename E::T* __restrict buf, int64_t n,
              const float* __restrict gs, Lanes* ls) {
    using C = typename E::C;
    if constexpr (!std::is_same<E, TD64>::value && !STATS && !SVEC) {
        const int64_t nv = n & ~int64_t(63);
        if (nv > 0) {
            static constexpr auto loops = sgd16_loops<E, MOM>(std::make_index_sequence<16>{});
            const float pre = s.upd ? 1.0f : gs[0], post = s.upd ? gs[0] : 1.0f;
            const bool sg = !(s.gmul == 1.0f && pre == 1.0f), po = post != 1.0f;
            const bool damp = s.mom_b != 1.0f;
            loops[sg | po << 1 | damp << 2 | s.nesterov << 3](s, pre, post, p, g, buf, nv);
        }
        if (nv == n) return;
        p += nv;  // the rest (< 64): the chunks below (fp32: the span loop)
        g += nv;
        if (MOM) buf += nv;
        n -= nv;
    }
    if constexpr (!std::is_same<E, TF32>::value && !std::is_same<E, TD64>::value) {  // as adam_span
        alignas(64) float tp[NCH], tg[NCH], tb[MOM ? NCH : 1];
        for (int64_t c0 = 0; c0 < n; c0 += NCH) {
            const int64_t cn = n - c0 < NCH ? n - c0 : NCH;
            chunk_in<E>(p + c0, cn, tp);
            chunk_in<E>(g + c0, cn, tg);
            if (MOM) chunk_in<E>(buf + c0, cn, tb);
            sgd_span<TF32, MOM, STATS, SVEC>(s, tp, tg, MOM ? tb : nullptr, cn,
                                             SVEC ? gs + c0 : gs, ls);
            chunk_out<E>(tp, cn, p + c0);
            if (MOM) chunk_out<E>(tb, cn, buf + c0);
        }
        return;
    }
    const C gmul = s.gmul, lr = s.lr, mom_a = s.mom_a, mom_b = s.mom_b, wd = s.wd;
    const C momentum = s.momentum;
    const bool nesterov = s.nesterov, upd = s.upd;
    const C g0 = gs[0];
    span_loop<C, STATS>(n, ls, [&](int64_t i, C& p_new, C& u_out) {
        C pf = E::ld(p[i]);
        C d = E::ld(g[i]) * gmul;
        const C sc = SVEC ? C(gs[i]) : g0;
        d = d * (upd ? C(1) : sc);
        if (wd != C(0)) d = d + wd * pf;  // as torch.optim.SGD (see adam_span)
        if (MOM) {
            const C b = mom_a * E::ld(buf[i]) + mom_b * d;
            buf[i] = E::st(b);
            const C dn = d + momentum * b;
            d = nesterov ? dn : b;
        }
        d = d * (upd ? sc : C(1));
        pf = pf - lr * d;
        p[i] = E::st(pf);
        p_new = pf;
        u_out = d;
    });
}

// -- low precision: 8-bit block-scaled states, stochastic rounding, storage conversions --------
// fastsched/optim/_lowp.py is the definition (bit for bit); see kernels/layout.py Q_*, MODE_*.

static_assert(L::Q_BLOCK % 16 == 0 && BLK % L::Q_BLOCK == 0, "quantisation blocks in 16s");

//: the largest magnitude of a code (layout.Q_TOP: a float, not in the generated header;
//: fastsched.optim._cpu compares it with q_top() of the extension at import)
constexpr float Q_TOP = 1.875f;

typedef uint8_t v16b __attribute__((vector_size(16)));

inline constexpr float pow2f(int e) {  // 2^e, exactly (normal range)
    float r = 1.0f;
    for (; e > 0; e--) r *= 2.0f;
    for (; e < 0; e++) r *= 0.5f;
    return r;
}

// 16 bytes widened to 32-bit lanes, and back (GCC lowers the generic conversions lane by lane)
inline v16u u8_ld16(const uint8_t* p) {
#if defined(__AVX512F__)
    return (v16u)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    v16u r;
    r.v[0] = (v16u::part)_mm256_cvtepu8_epi32(b);
    r.v[1] = (v16u::part)_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    return r;
#else
    v16u r;
    for (int j = 0; j < 16; j++) r[j] = p[j];
    return r;
#endif
}
inline void u8_st16(uint8_t* p, v16u x) {  // the low byte of each lane
#if defined(__AVX512F__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8((__m512i)x));
#elif defined(__AVX2__)
    // the low bytes (masked: the packs saturate) packed to 16-bit, then to 8-bit, then the
    // 32-bit pieces of the two 128-bit lanes put back in order
    const __m256i k = _mm256_set1_epi32(0xFF);
    const __m256i w = _mm256_packus_epi32(_mm256_and_si256((__m256i)x.v[0], k),
                                          _mm256_and_si256((__m256i)x.v[1], k));
    const __m256i b = _mm256_packus_epi16(w, w);
    const __m256i o = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(o));
#else
    for (int j = 0; j < 16; j++) p[j] = static_cast<uint8_t>(x[j]);
#endif
}

template <bool SIGNED>
struct QCodec {
    static constexpr int BIAS = SIGNED ? L::Q_BIAS_SIGNED : L::Q_BIAS_UNSIGNED;
    static constexpr int M = L::Q_MANT;
    static constexpr uint32_t EOFF = uint32_t(127 - BIAS) << M;   // exponent offset of a code
    static constexpr float SUBQ = pow2f(1 - BIAS - M);             // the subnormal quantum
    static constexpr float MAGIC = pow2f(24 - BIAS - M);           // ulp(MAGIC) = SUBQ
    static constexpr float SUBMAX = pow2f(1 - BIAS);               // below: subnormal codes
    static constexpr uint32_t MASK = SIGNED ? 0x7Fu : 0xFFu;
    static constexpr float KDEC = pow2f(127 - BIAS);  // float32 bits of a code -> its value
    // the low byte of a code is all that is stored: EOFF and the bits of MAGIC subtracted mod
    // 256 (MAGIC's low byte is 0; EOFF's is 0 or 0x80, subtracted as an exclusive or)
    static constexpr uint32_t LOWB_EOFF = EOFF & 0xFFu;
    //: the rounding constant of enc16: half an ulp of the code less one, and -EOFF mod 256 in
    //: the bits above the shift (a carry out of bit 31 drops 2^12 codes: 0 mod 256)
    static constexpr uint32_t RND =
        ((1u << (22 - M)) - 1u) + (((256u - LOWB_EOFF) & 0xFFu) << (23 - M));
    static_assert(LOWB_EOFF == 0 || LOWB_EOFF == 0x80, "EOFF mod 256 as an exclusive or");
    static_assert(24 - BIAS - M > -127 && 24 - BIAS - M < 128, "MAGIC: a normal float32");

    // magnitude codes of a in [0, Q_TOP] (or NaN): _lowp._encode, mod 256
    static v16u enc(v16f a) {
        const v16u sub = vcast<v16u>(a + MAGIC) - float_to_bits(MAGIC);
        const v16u b = vcast<v16u>(a);
        const v16u r = ((b + ((1u << (22 - M)) - 1u) + ((b >> (23 - M)) & 1u)) >> (23 - M)) - EOFF;
        return vsel(a < SUBMAX, sub, r);
    }
    static uint32_t enc1(float a) {
        const uint32_t b = float_to_bits(a);
        if (a < SUBMAX) return float_to_bits(a + MAGIC) - float_to_bits(MAGIC);
        return ((b + ((1u << (22 - M)) - 1u) + ((b >> (23 - M)) & 1u)) >> (23 - M)) - EOFF;
    }
    // fp32 values of 16 codes with the block's scale (_lowp.dequantize): the magnitude's bits
    // in place as a float32 (exponent field E, the 3 mantissa bits on top; E = 0: a float32
    // subnormal) times 2^(127 - BIAS) is the decoded magnitude exactly (E = 0: mag *
    // 2^(1 - BIAS - M), as _decode), then the scale (one rounding), then the sign
    static v16f dec(v16u c, float scale) {
        const v16f d = vcast<v16f>((c << (23 - M)) & (MASK << (23 - M))) * KDEC;
        v16f v = d * scale;
        if (SIGNED) v = vcast<v16f>(vcast<v16u>(v) ^ ((c << 24) & 0x80000000u));  // -(d * scale)
        return v;
    }
    // the multiplier of dec16 for a block's scale: KDEC * scale, exact when finite (a power of
    // 2 times a float); 0 when not finite (a NaN scale, or an overflow): use dec then
    static float kscale(float scale) {
        const float k = KDEC * scale;
        return std::isfinite(k) ? k : 0.0f;
    }
    // dec of 16 codes at p with ks = kscale(scale) != 0: (bits * KDEC) * scale is
    // bits * (KDEC * scale), one rounding of the same exact product; the sign in place before
    // the multiplication (-(d * s) = (-d) * s: rounding to nearest is symmetric) from the sign
    // extended byte, whose bits 27..31 are all the sign
    static v16f dec16(const uint8_t* p, float ks) {
#if defined(__AVX512F__)
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        __m512i c = SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
        c = _mm512_slli_epi32(c, 23 - M);
        if (SIGNED)
            c = _mm512_and_si512(c, _mm512_set1_epi32(int(0x80000000u | (MASK << (23 - M)))));
        return (v16f)_mm512_mul_ps(_mm512_castsi512_ps(c), _mm512_set1_ps(ks));
#else
        const v16u c = u8_ld16(p);
        v16u b = (c & MASK) << (23 - M);
        if (SIGNED) b |= (c << 24) & 0x80000000u;
        return vcast<v16f>(b) * ks;
#endif
    }
    static float dec1(uint32_t c, float scale) {
        const uint32_t mag = c & MASK;
        const float d = mag < (1u << M) ? static_cast<float>(mag) * SUBQ
                                        : bits_to_float((mag + EOFF) << (23 - M));
        float v = d * scale;
        if (SIGNED && (c & 0x80u)) v = -v;
        return v;
    }

    // the bits of max |x| and min |x| of n values (the integer order of |x| bits is the float
    // order, NaN above inf)
    static uint32_t absmax_bits(const float* __restrict x, int64_t n, uint32_t* mnp = nullptr) {
        v16u vm = {}, vn = {};
        vn = ~vn;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            v16u b;
            vld(b, x + i);
            b &= 0x7FFFFFFFu;
            vm = vmaxu(vm, b);
            vn = vminu(vn, b);
        }
        uint32_t mx = 0, mn = ~0u;
        for (int j = 0; j < 16; j++) {
            mx = vm[j] > mx ? vm[j] : mx;
            mn = vn[j] < mn ? vn[j] : mn;
        }
        for (int64_t k = 0; k < (n & 15); k++) {  // the last partial group
            const uint32_t b = float_to_bits(x[i + k]) & 0x7FFFFFFFu;
            mx = b > mx ? b : mx;
            mn = b < mn ? b : mn;
        }
        if (mnp) *mnp = mn;
        return mx;
    }
    // a block's scale from its absmax bits; the multiplier inv of its values; false: the block
    // has a NaN or inf (scale NaN, every code 0 but for the sign bits, as _lowp)
    static bool scale_of(uint32_t mx, float* scale, float* inv) {
        if (mx >= 0x7F800000u) {
            *scale = bits_to_float(0x7FC00000u);
            *inv = 0.0f;
            return false;
        }
        const float absmax = bits_to_float(mx);
        *scale = absmax / Q_TOP;
        // torch's Q_TOP / absmax is reciprocal(absmax) * Q_TOP: two roundings
        *inv = absmax > 0.0f ? (1.0f / absmax) * Q_TOP : 0.0f;
        return true;
    }
    // the codes of 16 values of a finite block (multiplier inv). NORMAL (normal_block): every
    // |x| * inv of the block is at least SUBMAX and at most Q_TOP(1 + 2^-22): no subnormal
    // codes, and the clamp at Q_TOP changes no code (Q_TOP's code is the top one of its binade)
    template <bool NORMAL>
    static void enc16(const float* __restrict x, uint8_t* __restrict codes, float inv) {
#if defined(__AVX512F__)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes),
                         _mm512_cvtepi32_epi8(codes16<NORMAL>(x, inv)));
#else
        const v16f zero = {}, top = zero + Q_TOP;
        v16f xv;
        vld(xv, x);
        v16f a = vcast<v16f>(vcast<v16u>(xv) & 0x7FFFFFFFu) * inv;
        a = vsel(a > top, top, a);  // torch.clamp(max=): a NaN stays NaN
        v16u m = enc(a);
        if (SIGNED) m |= vcast<v16u>(xv < zero) & 0x80u;
        u8_st16(codes, m);
#endif
    }
#if defined(__AVX512F__)
    // b + rnd + (bit 23 - M of b): the rounding of enc with the even code's tie (the bit tested
    // into a mask and added under it: one operation fewer than shift, and, add)
    static __m512i round_up(__m512i b, __m512i rnd, __m512i one) {
        const __mmask16 odd = _mm512_test_epi32_mask(b, _mm512_set1_epi32(1 << (23 - M)));
        const __m512i t = _mm512_add_epi32(b, rnd);
        return _mm512_mask_add_epi32(t, odd, t, one);
    }
    // the codes of enc16 in the low bytes of the lanes (the bits above: any)
    template <bool NORMAL>
    static __m512i codes16(const float* __restrict x, float inv) {
        // the low byte only: see LOWB_EOFF, added before the shift
        const __m512i xb = _mm512_loadu_si512(x);
        const __m512i one = _mm512_set1_epi32(1), rnd = _mm512_set1_epi32(int(RND));
        if (NORMAL) {
            // x * inv with its sign: no zero or NaN here, so x < 0 is the sign bit, which the
            // rounding below carries to bit 11 of r (out of the low byte) and nothing else
            const __m512i b = _mm512_castps_si512(
                _mm512_mul_ps(_mm512_castsi512_ps(xb), _mm512_set1_ps(inv)));
            __m512i r = _mm512_srli_epi32(round_up(b, rnd, one), 23 - M);
            if (SIGNED)  // r | (sign: bit 11 to bit 7)
                r = _mm512_ternarylogic_epi32(r, _mm512_srli_epi32(r, 4),
                                              _mm512_set1_epi32(0x80), 0xF8);
            return r;
        }
        __m512 a = _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_and_si512(xb, _mm512_set1_epi32(0x7FFFFFFF))),
            _mm512_set1_ps(inv));
        a = _mm512_min_ps(_mm512_set1_ps(Q_TOP), a);  // clamp: a NaN stays NaN
        const __m512i b = _mm512_castps_si512(a);
        __m512i r = _mm512_srli_epi32(round_up(b, rnd, one), 23 - M);
        const __mmask16 ks = _mm512_cmp_ps_mask(a, _mm512_set1_ps(SUBMAX), _CMP_LT_OQ);
        r = _mm512_mask_mov_epi32(r, ks,
                                  _mm512_castps_si512(_mm512_add_ps(a, _mm512_set1_ps(MAGIC))));
        if (SIGNED) {
            const __mmask16 kn = _mm512_cmp_ps_mask(_mm512_castsi512_ps(xb),
                                                    _mm512_setzero_ps(), _CMP_LT_OQ);
            r = _mm512_mask_or_epi32(r, kn, r, _mm512_set1_epi32(0x80));
        }
        return r;
    }
#endif
    // whether enc16<true> encodes a finite block with multiplier inv and min |x| bits mn
    static bool normal_block(uint32_t mn, float inv) {
        return inv <= FLT_MAX && bits_to_float(mn) * inv >= SUBMAX;
    }
    static uint8_t enc_one(float x, float inv, bool fin) {
        float a = std::fabs(x) * inv;
        a = a > Q_TOP ? Q_TOP : a;
        if (!fin) a = 0.0f;
        uint32_t m = enc1(a);
        if (SIGNED && x < 0.0f) m |= 0x80u;
        return static_cast<uint8_t>(m);
    }
    // n (<= Q_BLOCK) new fp32 values of one block -> codes and the block's scale
    static void encode_block(const float* __restrict x, int64_t n, uint8_t* __restrict codes,
                             float* __restrict scale) {
        float inv;
        uint32_t mn;
        const bool fin = scale_of(absmax_bits(x, n, &mn), scale, &inv);
        int64_t i = 0;
        if (fin && normal_block(mn, inv))
            for (; i + 16 <= n; i += 16) enc16<true>(x + i, codes + i, inv);
        else if (fin)
            for (; i + 16 <= n; i += 16) enc16<false>(x + i, codes + i, inv);
        for (; i < n; i++) codes[i] = enc_one(x[i], inv, fin);
    }
    // n values from the start of a block: codes, one scale per Q_BLOCK
    static void encode(const float* __restrict x, int64_t n, uint8_t* __restrict codes,
                       float* __restrict scales) {
        for (int64_t b = 0; b * L::Q_BLOCK < n; b++) {
            const int64_t o = b * L::Q_BLOCK;
            encode_block(x + o, n - o < L::Q_BLOCK ? n - o : L::Q_BLOCK, codes + o, scales + b);
        }
    }
    static void decode(const uint8_t* __restrict codes, const float* __restrict scales,
                       int64_t n, float* __restrict out) {
        for (int64_t b = 0; b * L::Q_BLOCK < n; b++) {
            const int64_t o = b * L::Q_BLOCK, m = n - o < L::Q_BLOCK ? n - o : L::Q_BLOCK;
            const float s = scales[b], ks = kscale(s);
            int64_t i = 0;
            if (ks != 0.0f)
                for (; i + 16 <= m; i += 16) {
                    const v16f v = dec16(codes + o + i, ks);
                    vst(out + o + i, v);
                }
            for (; i + 16 <= m; i += 16) {
                const v16f v = dec(u8_ld16(codes + o + i), s);
                vst(out + o + i, v);
            }
            for (; i < m; i++) out[o + i] = dec1(codes[o + i], s);
        }
    }
};

// -- stochastic rounding to bf16: _lowp.sr_bits / stochastic_round_bf16 -------------------------

// U: uint32_t or a vector of them (v16u): the same operations lane by lane
template <class U>
inline U fmix32(U h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    return h ^ (h >> 16);
}
//: the per-tensor, per-step word c = fmix32(key ^ step)
inline uint32_t sr_c(uint32_t key, uint32_t step) { return fmix32(key ^ step); }
inline uint16_t sr_one(float x, uint32_t c, uint64_t idx) {
    const uint32_t h =
        fmix32(fmix32(static_cast<uint32_t>(idx) ^ c) + static_cast<uint32_t>(idx >> 32));
    const uint32_t r = (float_to_bits(x) + (h & 0xFFFFu)) >> 16;
    return x != x ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}
// r & 0xFFFF of sr_bits for the 16 indices from idx (its low word + 15 < 2^32)
inline v16u sr_hash16(uint32_t c, uint64_t idx) {
#if defined(__AVX512F__)
    // the first step of the first fmix32 folded: (lo ^ c) ^ ((lo ^ c) >> 16) is
    // lo ^ (lo >> 16) ^ (c ^ (c >> 16)), one three-way exclusive or (GCC lowers the generic
    // version in 64-bit halves)
    const __m512i lo = _mm512_add_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(idx))));
    const __m512i k1 = _mm512_set1_epi32(int(0x85EBCA6Bu));
    const __m512i k2 = _mm512_set1_epi32(int(0xC2B2AE35u));
    __m512i h = _mm512_ternarylogic_epi32(lo, _mm512_srli_epi32(lo, 16),
                                          _mm512_set1_epi32(int(c ^ (c >> 16))), 0x96);
    h = _mm512_mullo_epi32(h, k1);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, k2);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_add_epi32(h, _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(idx >> 32))));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, k1);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, k2);
    // (h ^ (h >> 16)) & 0xFFFF
    h = _mm512_ternarylogic_epi32(h, _mm512_srli_epi32(h, 16), _mm512_set1_epi32(0xFFFF), 0x28);
    return (v16u)h;
#else
    const v16u iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16u lo = iota + static_cast<uint32_t>(idx);
    return fmix32(fmix32(lo ^ c) + static_cast<uint32_t>(idx >> 32)) & 0xFFFFu;
#endif
}
inline uint32_t sr_hash1(uint32_t c, uint64_t idx) {
    return fmix32(fmix32(static_cast<uint32_t>(idx) ^ c) + static_cast<uint32_t>(idx >> 32)) &
           0xFFFFu;
}
// 16 values rounded stochastically, the first with index idx (its low word + 15 < 2^32)
inline v16u sr16(v16f x, uint32_t c, uint64_t idx) {
    const v16u h = sr_hash16(c, idx);
#if defined(__AVX512F__)
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32((__m512i)x, (__m512i)h), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask((__m512)x, (__m512)x, _CMP_UNORD_Q),
                              _mm512_set1_epi32(0x7FC0));
    return (v16u)r;
#else
    const v16u r = (vcast<v16u>(x) + h) >> 16;
    return vsel(x != x, v16u{} + 0x7FC0u, r);
#endif
}
inline void sr_st16(uint16_t* __restrict out, v16f x, uint32_t c, uint64_t idx) {
    if (static_cast<uint32_t>(idx) <= 0xFFFFFFF0u) {
        u16_st16(out, sr16(x, c, idx));
        return;
    }
    for (int j = 0; j < 16; j++) out[j] = sr_one(x[j], c, idx + j);  // the low word wraps
}
// out[i] = stochastic_round_bf16(x[i]) with the element index idx0 + i
inline void sr_bf16(const float* __restrict x, int64_t n, uint16_t* __restrict out, uint32_t c,
                    uint64_t idx0) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16f xv;
        vld(xv, x + i);
        sr_st16(out + i, xv, c, idx0 + static_cast<uint64_t>(i));
    }
    for (; i < n; i++) out[i] = sr_one(x[i], c, idx0 + static_cast<uint64_t>(i));
}

// the 16 random bits of sr_bits for n (a multiple of 16) elements from index idx0, in the low
// halves of out[0..n)
inline void sr_words(uint32_t c, uint64_t idx0, int64_t n, uint32_t* __restrict out) {
    for (int64_t i = 0; i < n; i += 16) {
        const uint64_t idx = idx0 + static_cast<uint64_t>(i);
        if (static_cast<uint32_t>(idx) <= 0xFFFFFFF0u) {
            const v16u h = sr_hash16(c, idx);
            vst(out + i, h);
        } else {  // the low word wraps
            for (int j = 0; j < 16; j++) out[i + j] = sr_hash1(c, idx + j);
        }
    }
}
// 16 values rounded stochastically with their words r of sr_words (sr16, bit for bit)
inline void sr_st16_r(uint16_t* __restrict out, v16f x, const uint32_t* __restrict r) {
#if defined(__AVX512F__)
    const __m512i h = _mm512_loadu_si512(r);
    const __m512i t = _mm512_srli_epi32(_mm512_add_epi32((__m512i)x, h), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(t));
    // NaN (rare): one classification and a branch, the lanes then rewritten; a compare, the
    // constant's broadcast (GCC made it again in every iteration) and a blend in the loop
    // otherwise
    const __mmask16 nan = _mm512_fpclass_ps_mask((__m512)x, 0x81);  // QNaN | SNaN
    if (__builtin_expect(nan != 0, 0)) {
        for (int j = 0; j < 16; j++)
            if (nan >> j & 1) out[j] = 0x7FC0;
    }
#else
    v16u h;
    vld(h, r);
    const v16u t = (vcast<v16u>(x) + h) >> 16;
    u16_st16(out, vsel(x != x, v16u{} + 0x7FC0u, t));
#endif
}

// -- conversions between a storage dtype (Dtype code) and float32 buffers ----------------------

inline int64_t dtype_size(int64_t code) { return code == F32 ? 4 : code == F64 ? 8 : 2; }

// dst[0..n) = float32 of src[0..n) (src: elements of the dtype code)
inline void cvt_load(int64_t code, const void* src, int64_t n, float* __restrict dst) {
    switch (code) {
        case F32: std::memcpy(dst, src, n * sizeof(float)); break;
        case BF16: {
            auto* s = static_cast<const uint16_t*>(src);
            int64_t i = 0;
            for (; i + 16 <= n; i += 16) {
                const v16f v = bf16_ld16(s + i);
                vst(dst + i, v);
            }
            for (; i < n; i++) dst[i] = TBF16::ld(s[i]);
            break;
        }
        case F16: chunk_in<TF16>(static_cast<const half_t*>(src), n, dst); break;
        default: {
            auto* s = static_cast<const double*>(src);
            for (int64_t i = 0; i < n; i++) dst[i] = TF64::ld(s[i]);
            break;
        }
    }
}

// dst[0..n) = src[0..n) rounded to nearest even in the dtype code
inline void cvt_store(int64_t code, void* dst, int64_t n, const float* __restrict src) {
    switch (code) {
        case F32: std::memcpy(dst, src, n * sizeof(float)); break;
        case BF16: {
            auto* d = static_cast<uint16_t*>(dst);
            int64_t i = 0;
            for (; i + 16 <= n; i += 16) {
                v16f v;
                vld(v, src + i);
                bf16_st16(d + i, v);
            }
            for (; i < n; i++) d[i] = TBF16::st(src[i]);
            break;
        }
        case F16: chunk_out<TF16>(src, n, static_cast<half_t*>(dst)); break;
        default: {
            auto* d = static_cast<double*>(dst);
            for (int64_t i = 0; i < n; i++) d[i] = TF64::st(src[i]);
            break;
        }
    }
}

// -- fused Adam / AdamW below fp32 -------------------------------------------------------------
// One loop over a block of a tensor without amsgrad: the weights (float32 parameter,
// the master, or a bfloat16 parameter), the gradient and the states (float32, bfloat16 or 8-bit
// codes) read 16 at a time, the float32 operations of adam_span's loop in the same order, and
// the parameter (float32, rounded to nearest even, stochastically; the master), the states
// (rounded, or into a buffer) written back; 8-bit states: a quantisation block is encoded while
// the next one is updated (the integer work of the codes next to the divisions and the square
// root of the update, which leave most execution ports idle). ALLoRA: the multipliers of the
// units filled a quantisation block at a time.

inline v16f sqrt16(v16f x) {
#if defined(__AVX512F__)
    return (v16f)_mm512_sqrt_ps((__m512)x);
#elif defined(__AVX__)
    for (int k = 0; k < v16f::K; k++) x.v[k] = (v16f::part)_mm256_sqrt_ps((__m256)x.v[k]);
    return x;
#else
    for (int j = 0; j < 16; j++) x[j] = std::sqrt(x[j]);
    return x;
#endif
}

//: bytes ahead of the fused loop (adam_fused) that each of its arrays is requested into L1. The
//: hardware alone left the bf16 loop, ~22 cycles per 16 elements of arithmetic, fewer misses in
//: flight: bf16 AdamW on Llama-1B x0.1 took 0.88-0.90x the step time with 1, 2 or 4 KB ahead (1
//: thread; 2 threads 0.87-0.92x; one process alternating the builds, Xeon model 207); bf16 with an
//: fp32 master 0.87x, fp32 parameters with bf16 states 0.79x, with 8-bit states 0.83x (2 threads
//: 0.87x); ALLoRA rows beside the next row's sum (SideSum) 0.93x (bf16, fp32; Llama-1B x0.1; the
//: sum's own weights requested ahead too since 2026-12-02: see adam_fused). Not
//: with 8-bit states of bf16 parameters, whose loop is bound by its arithmetic (1.00-1.10x with
//: it). (The float32 span loop, adam_span, gained nothing from requests ahead, 0.97-1.05x: fp32
//: Adam now takes this loop too.) On a Zen 1, whose bf16 loop is bound by its arithmetic
//: (~6.7 cycles an element at 2.0 GHz), the loop without the requests ran 0.94-0.99x the time
//: of the one with them, within the spread of two copies of one build in the same runs
//: (0.5-4.5%; bf16 AdamW, Llama-1B x0.1, 1 thread, 2026-12-02): kept for the others.
constexpr int64_t UPDATE_AHEAD = 2048;

//: how the fused loop writes the parameter (the T_MODE bits)
constexpr int WM_PLAIN = 0, WM_MASTER = 1, WM_SR = 2;
//: 8-bit states in the fused loop (its state type argument)
struct TQ8 {
    using T = uint8_t;
};

// The sum of squares of another unit's weights read inside an update loop (unit_pipe): W
// elements of it per W updated, in SumSq's lanes and order (the bits of sum_sq). Its chain of
// dependent float64 fma (4 cycles per W elements) and its loads then run beside the update's
// arithmetic instead of after it: summed after each update piece, the next row's sum was 24%
// of a bf16 ALLoRA step's samples (Llama-like rows of 2048, 1 thread). done: elements summed
// (what the loop left, the caller sums).
struct SideSum {
    const void* w;  // the weights: the parameter's storage, or the float32 master
    int64_t n;      // elements to sum (a multiple of W)
    int64_t done;
    v8d a0, a1;
};

struct FusedIo {  // pointers at the block's first element (scales: at its first scale)
    SideSum* side = nullptr;  // (unit_pipe: the next unit's sum, or none)
    void* p;
    const void* g;
    float* master;
    void* m;
    void* v;
    float* mq;
    float* vq;
    uint32_t src;  // stochastic rounding: fmix32(key ^ step)
    uint64_t idx0;  // stochastic rounding: the index of the block's first element
};

// ALLoRA multipliers of the elements of a fused range (as block(): one per unit of rows or the
// tensor, one per column of column units); upd: they multiply the step, else the gradient
struct UnitMul {
    const float* scales;  // per unit
    int64_t ulen;  // rows / the tensor: element e has scales[e / ulen]
    int64_t cols;  // columns (ulen 0): element e has scales[e % cols]
    int64_t e0;  // the index in the tensor of the range's first element
    bool upd;
    // out[k] = the multiplier of element i + k of the range
    void fill(int64_t i, int64_t n, float* __restrict out) const {
        const int64_t e = e0 + i;
        if (ulen > 0) {
            int64_t u = e / ulen, off = e - u * ulen;
            for (int64_t k = 0; k < n; u++, off = 0) {
                const int64_t run = ulen - off < n - k ? ulen - off : n - k;
                for (int64_t j = 0; j < run; j++) out[k + j] = scales[u];
                k += run;
            }
        } else {
            int64_t c = e % cols;
            for (int64_t k = 0; k < n; c = 0) {
                const int64_t run = cols - c < n - k ? cols - c : n - k;
                std::memcpy(out + k, scales + c, run * sizeof(float));
                k += run;
            }
        }
    }
};

// n elements: a multiple of 16 (8-bit states: of Q_BLOCK); STATS: the lanes of sum p^2 and
// sum u^2 as span_loop (lane = index % 16); MUL: ALLoRA multipliers um (else none: 1); FAST:
// s.lo and s.gmul == 1 (beta1 >= 0.5, no clipping or scaler: the usual step) known at compile
// time, as adam_span's loop: the lerp's other end and the multiplication by 1 (exact: x * 1 is
// x) left out, and the two branches on them out of the loop of a group of 16
template <class E, int WM, class S, bool STATS, bool MUL, bool FAST>
void adam_fused(const AdamScal& s, const FusedIo& io, int64_t n, Lanes* ls, const UnitMul* um) {
    using T = typename E::T;
    T* __restrict p = static_cast<T*>(io.p);
    const T* __restrict g = static_cast<const T*>(io.g);
    float* __restrict w32 = io.master;
    const float gmul = s.gmul, step_size = s.step_size, bc2s = s.bc2s, decay = s.decay;
    const float l2 = s.l2, omb1 = s.omb1, omb1c = s.omb1c, omb2 = s.omb2, omb2c = s.omb2c;
    const float eps = s.eps;
    const bool lo = FAST || s.lo, one_gmul = FAST || gmul == 1.0f;
    // x / 1 is x: the bias correction of the second moment rounds to 1 in float32 once beta2^t
    // < 2^-24 (beta2 0.999: from step 16.6K on; 0.95: from step 325), and its division, one of
    // the loop's three divider operations, goes
    const bool one_bc2 = bc2s == 1.0f;
    const float rbc2s = 1.0f / bc2s;
    Lanes st = STATS ? *ls : Lanes{};  // (flushed at multiples of MB = LANE_RUN and the end)
    const bool upd = MUL && um->upd;
    // rows or the tensor with the whole range in one unit (unit_pipe's calls): one multiplier
    // for all, not filled and read back per element
    const bool one_mul = MUL && um->ulen > 0 && um->e0 % um->ulen + n <= um->ulen;
    v16f mul1 = {};
    if (one_mul) mul1 = mul1 + um->scales[um->e0 / um->ulen];
    constexpr int64_t MB = 256;  // multipliers filled at a time (a quantisation block)
    static_assert(MB == LANE_RUN && L::Q_BLOCK == LANE_RUN, "statistics flushed per MB");
    alignas(64) float mul[MUL ? MB : 1];
    // stochastic rounding: the random words of MB elements at a time, before their loop (the
    // integer chain of the hash apart from the update's; with bf16 states too: 0.965x the
    // time of the hash inside the loop, GPT-2 x0.1, 1 thread)
    alignas(64) uint32_t rnd[WM == WM_SR ? MB : 1];
    // one group of 16: mf, vf the states in, the new ones out; sc: the ALLoRA multipliers of
    // the group (MUL; else 1, left out as adam_span's multiplications by 1: x * 1 is x)
    auto group = [&](int64_t i, v16f& mf, v16f& vf, const float* sc) FS_ALWAYS_INLINE {
        v16f pf = WM == WM_MASTER ? ld16<TF32>(w32 + i) : ld16<E>(p + i);
        v16f gf = ld16<E>(g + i);
        if (!one_gmul) gf = gf * gmul;  // x * 1 is x
        v16f scv = {};
        if (MUL) {
            scv = one_mul ? mul1 : ld16<TF32>(sc);
            if (!upd) gf = gf * scv;
        }
        pf = pf * decay;
        if (l2 != 0.0f) gf = gf + l2 * pf;  // as adam_span
        const v16f d = gf - mf;
        mf = lo ? mf + omb1 * d : gf - d * omb1c;
        vf = omb2c * vf + omb2 * gf * gf;
        v16f den = sqrt16(vf);
        if (!one_bc2) den = div_by16(den, bc2s, rbc2s);
        v16f u = mf / (den + eps);
        if (MUL && upd) u = u * scv;
        pf = pf - step_size * u;
        if (WM == WM_MASTER) {
            st16<TF32>(w32 + i, pf);
            st16<E>(p + i, pf);
        } else if (WM == WM_SR) {
            // (i >= 0: the mask; GCC's signed i % MB is five scalar instructions a group)
            sr_st16_r(reinterpret_cast<uint16_t*>(p) + i, pf, rnd + (i & (MB - 1)));
        } else {
            st16<E>(p + i, pf);
        }
        if (STATS) st.add(pf, u);
    };
    // the side sum (SideSum): W elements of the other unit's weights per group of 16 updated,
    // in the master's storage with WM_MASTER, else in the parameter's. Not with 8-bit states
    // (left to the caller: ALLoRA tensors, the only ones with a side sum, keep float32 states)
    using WT = typename std::conditional<WM == WM_MASTER, TF32, E>::type;
    const typename WT::T* side_w = nullptr;
    int64_t side_n = 0;  // elements of it this call sums (0: none)
    v8d side0 = {}, side1 = {};
    if (io.side && !std::is_same<S, TQ8>::value) {
        side_w = static_cast<const typename WT::T*>(io.side->w) + io.side->done;
        side_n = io.side->n - io.side->done;
        side_n = side_n < n ? side_n : n / 16 * 16;
        side0 = io.side->a0;
        side1 = io.side->a1;
    }
    auto side_group = [&](int64_t i) {  // as SumSq::add
        side0 = add_sq_exact(side0, WT::ld8d(side_w + i));
        side1 = add_sq_exact(side1, WT::ld8d(side_w + i + 8));
    };
    if constexpr (!std::is_same<S, TQ8>::value) {
        using ST = typename S::T;
        ST* __restrict m = static_cast<ST*>(io.m);
        ST* __restrict v = static_cast<ST*>(io.v);
        auto run = [&](auto side_c) {
            constexpr bool SIDE = decltype(side_c)::value;  // (the loop without it as before)
            for (int64_t i = 0; i < n; i += 16) {
                if (STATS && i % MB == 0 && i > 0) st.flush();
                if (MUL && !one_mul && i % MB == 0) um->fill(i, n - i < MB ? n - i : MB, mul);
                if (WM == WM_SR && i % MB == 0)
                    sr_words(io.src, io.idx0 + i, n - i < MB ? n - i : MB, rnd);
                if (SIDE && i < side_n) side_group(i);
                // the side sum's weights are the first touch of the next unit's p (the update
                // of that unit reads them again from L1 / L2 and writes them): requested ahead
                // with the intent to write (prefetchw), as the update's own arrays. ALLoRA rows
                // of Llama-1B x0.1, one process alternating the builds (Xeon with AVX-512 BF16 /
                // FP16, 2026-12-02): bf16 0.90-0.92x the step time (1 and 2 threads), fp32
                // 0.94-0.96x; 4 KB ahead the same, 1 KB and a read request (prefetcht0) nothing.
                // An hour later, the VM's ALLoRA / plain ratio without it down from 1.36 to 1.20
                // (bf16), the same builds measured 0.99-1.01x (bf16) and 0.97-0.99x (fp32)
                if (SIDE) line_ahead<1>(side_w, i, UPDATE_AHEAD);
                line_ahead<1>(p, i, UPDATE_AHEAD);  // (UPDATE_AHEAD)
                line_ahead<0>(g, i, UPDATE_AHEAD);
                line_ahead<1>(m, i, UPDATE_AHEAD);
                line_ahead<1>(v, i, UPDATE_AHEAD);
                if (WM == WM_MASTER) line_ahead<1>(w32, i, UPDATE_AHEAD);
                v16f mf = ld16<S>(m + i), vf = ld16<S>(v + i);
                group(i, mf, vf, mul + (MUL ? i % MB : 0));
                st16<S>(m + i, mf);
                st16<S>(v + i, vf);
            }
        };
        if (io.side)
            run(std::true_type{});
        else
            run(std::false_type{});
    } else {
        constexpr int64_t QB = L::Q_BLOCK;
        uint8_t* __restrict mc = static_cast<uint8_t*>(io.m);
        uint8_t* __restrict vc = static_cast<uint8_t*>(io.v);
        alignas(64) float bm[2][QB], bv[2][QB];  // the new states of this block and the last
        float invm = 0.0f, invv = 0.0f;
        // the last block: 0 both states' codes are to be computed by encode_block (a NaN or
        // an inf), 1 by enc16<false>, 2 by enc16<true>
        int how = 0;
        const int64_t nq = n / QB;
        // block q: decode, update into the buffers, |x| range; HOW: encode block q - 1 alongside
        // KK: both scales' kscale are not 0 (dec16; else dec, a block alone: HOW 0)
        auto update = [&](int64_t q, auto how_c, auto kk_c) {
            constexpr int HOW = decltype(how_c)::value;
            constexpr bool KK = decltype(kk_c)::value;
            const int64_t o = q * QB, po = o - QB;
            float* __restrict nm = bm[q & 1];
            float* __restrict nv = bv[q & 1];
            const float* __restrict pm = bm[(q + 1) & 1];
            const float* __restrict pv = bv[(q + 1) & 1];
            const float sm = io.mq[q], sv = io.vq[q];
            const float km = QCodec<true>::kscale(sm), kv = QCodec<false>::kscale(sv);
            v16u xm = {}, xv = {}, nnm = {}, nnv = {};
            nnm = ~nnm;
            nnv = ~nnv;
            if (MUL && !one_mul) um->fill(o, QB, mul);
            if (WM == WM_SR) sr_words(io.src, io.idx0 + o, QB, rnd);
            for (int64_t j = 0; j < QB; j += 16) {
                if (std::is_same<E, TF32>::value) {  // (see UPDATE_AHEAD)
                    line_ahead<1>(p, o + j, UPDATE_AHEAD);
                    line_ahead<0>(g, o + j, UPDATE_AHEAD);
                    line_ahead<1>(mc, o + j, UPDATE_AHEAD);
                    line_ahead<1>(vc, o + j, UPDATE_AHEAD);
                }
                v16f mf, vf;
                if (KK) {
                    mf = QCodec<true>::dec16(mc + o + j, km);
                    vf = QCodec<false>::dec16(vc + o + j, kv);
                } else {
                    mf = QCodec<true>::dec(u8_ld16(mc + o + j), sm);
                    vf = QCodec<false>::dec(u8_ld16(vc + o + j), sv);
                }
                group(o + j, mf, vf, mul + (MUL ? j : 0));
                vst(nm + j, mf);
                vst(nv + j, vf);
                const v16u am = vcast<v16u>(mf) & 0x7FFFFFFFu;
                const v16u av = vcast<v16u>(vf) & 0x7FFFFFFFu;
                xm = vmaxu(xm, am);
                xv = vmaxu(xv, av);
                nnm = vminu(nnm, am);
                nnv = vminu(nnv, av);
                if (HOW > 0) {
                    QCodec<true>::template enc16<HOW == 2>(pm + j, mc + po + j, invm);
                    QCodec<false>::template enc16<HOW == 2>(pv + j, vc + po + j, invv);
                }
            }
            if (STATS) st.flush();  // (QB == LANE_RUN)
            uint32_t r[4] = {0, 0, ~0u, ~0u};
            for (int j = 0; j < 16; j++) {
                r[0] = xm[j] > r[0] ? xm[j] : r[0];
                r[1] = xv[j] > r[1] ? xv[j] : r[1];
                r[2] = nnm[j] < r[2] ? nnm[j] : r[2];
                r[3] = nnv[j] < r[3] ? nnv[j] : r[3];
            }
            return std::array<uint32_t, 4>{r[0], r[1], r[2], r[3]};
        };
        // block q - 1 alone (after the last block, or with a NaN or inf: encoded as _lowp)
        auto encode_last = [&](int64_t q) {
            const int64_t po = (q - 1) * QB;
            const float* pm = bm[(q + 1) & 1];
            const float* pv = bv[(q + 1) & 1];
            if (how == 0) {
                QCodec<true>::encode_block(pm, QB, mc + po, io.mq + q - 1);
                QCodec<false>::encode_block(pv, QB, vc + po, io.vq + q - 1);
                return;
            }
            for (int64_t j = 0; j < QB; j += 16) {
                if (how == 2) {
                    QCodec<true>::template enc16<true>(pm + j, mc + po + j, invm);
                    QCodec<false>::template enc16<true>(pv + j, vc + po + j, invv);
                } else {
                    QCodec<true>::template enc16<false>(pm + j, mc + po + j, invm);
                    QCodec<false>::template enc16<false>(pv + j, vc + po + j, invv);
                }
            }
        };
        for (int64_t q = 0; q < nq; q++) {
            std::array<uint32_t, 4> r;
            using K1 = std::true_type;
            const bool kk = QCodec<true>::kscale(io.mq[q]) != 0.0f &&
                            QCodec<false>::kscale(io.vq[q]) != 0.0f;
            if (kk && q > 0 && how == 2) {
                r = update(q, std::integral_constant<int, 2>{}, K1{});
            } else if (kk && q > 0 && how == 1) {
                r = update(q, std::integral_constant<int, 1>{}, K1{});
            } else {
                if (kk)
                    r = update(q, std::integral_constant<int, 0>{}, K1{});
                else
                    r = update(q, std::integral_constant<int, 0>{}, std::false_type{});
                if (q > 0) encode_last(q);
            }
            const bool fm = QCodec<true>::scale_of(r[0], io.mq + q, &invm);
            const bool fv = QCodec<false>::scale_of(r[1], io.vq + q, &invv);
            const bool nb = QCodec<true>::normal_block(r[2], invm) &&
                            QCodec<false>::normal_block(r[3], invv);
            how = !(fm && fv) ? 0 : nb ? 2 : 1;
        }
        if (nq > 0) encode_last(nq);
    }
    if (io.side) {
        io.side->a0 = side0;
        io.side->a1 = side1;
        io.side->done += side_n;
    }
    if (STATS) {
        st.flush();
        *ls = st;
    }
}

}  // namespace fs
