// fused_wm: the dispatch of a range of one tensor to its adam_fused variant (kernels.h), by the
// row's types, mode and options. Its variants are ~60% of the extension's machine code (adam_fused
// ~1.2 of 2.0 MB at -O3): they are compiled in two files of their own (fused_f32.cpp,
// fused_16.cpp) that the build compiles beside cpu_ext.cpp, one compiler process each, so that a
// 2-core machine builds the extension in about half the time of one file (setup.py).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels.h"
#include "layout.h"

namespace fs {

// the fused loop of adam_fused for a row's types (E: parameter, WM: mode, S: states; fp16
// parameters: fp16 states only, the plain fp16 step)
template <class E, int WM, bool STATS, bool FAST>
void fused_k(const AdamScal& s, const FusedIo& io, int64_t st, int64_t n, Lanes* ls,
             const UnitMul* um) {
    auto go = [&](auto s_c) {
        using S = decltype(s_c);
        if (um)
            adam_fused<E, WM, S, STATS, true, FAST>(s, io, n, ls, um);
        else
            adam_fused<E, WM, S, STATS, false, FAST>(s, io, n, ls, um);
    };
    if constexpr (std::is_same<E, TF16>::value)
        go(TF16{});
    else if (st == F32)
        go(TF32{});
    else if (st == BF16)
        go(TBF16{});
    else
        go(TQ8{});
}
template <class E, int WM, bool STATS>
void fused_s(const AdamScal& s, const FusedIo& io, int64_t st, int64_t n, Lanes* ls,
             const UnitMul* um) {
    if (s.lo && s.gmul == 1.0f)
        fused_k<E, WM, STATS, true>(s, io, st, n, ls, um);
    else
        fused_k<E, WM, STATS, false>(s, io, st, n, ls, um);
}
template <class E, bool STATS>
void fused_wm(const AdamScal& s, const FusedIo& io, int64_t mode, int64_t st, int64_t n,
              Lanes* ls, const UnitMul* um) {
    // fused_prefix sends a mode only with bfloat16 parameters (a master copy, or stochastic
    // rounding); the others take the plain loop alone (no variant compiled that no row reaches)
    if constexpr (!std::is_same<E, TBF16>::value) {
        (void)mode;
        fused_s<E, WM_PLAIN, STATS>(s, io, st, n, ls, um);
    } else if (mode & L::MODE_MASTER) {
        fused_s<E, WM_MASTER, STATS>(s, io, st, n, ls, um);
    } else if (mode & L::MODE_SR) {
        fused_s<E, WM_SR, STATS>(s, io, st, n, ls, um);
    } else {
        fused_s<E, WM_PLAIN, STATS>(s, io, st, n, ls, um);
    }
}

}  // namespace fs

// PREFIX the variants of fused_wm the executor calls: "template" defines them (fused_*.cpp),
// "extern template" declares them compiled elsewhere (cpu_ext.cpp)
#define FS_FUSED_WM_ONE(PREFIX, E, STATS)                                                       \
    PREFIX void fs::fused_wm<fs::E, STATS>(const fs::AdamScal&, const fs::FusedIo&, int64_t,    \
                                           int64_t, int64_t, fs::Lanes*, const fs::UnitMul*);
#define FS_FUSED_WM_F32(PREFIX) \
    FS_FUSED_WM_ONE(PREFIX, TF32, false) FS_FUSED_WM_ONE(PREFIX, TF32, true)
#define FS_FUSED_WM_16(PREFIX)                                                                  \
    FS_FUSED_WM_ONE(PREFIX, TBF16, false) FS_FUSED_WM_ONE(PREFIX, TBF16, true)                   \
    FS_FUSED_WM_ONE(PREFIX, TF16, false) FS_FUSED_WM_ONE(PREFIX, TF16, true)
#define FS_FUSED_WM(PREFIX) FS_FUSED_WM_F32(PREFIX) FS_FUSED_WM_16(PREFIX)
