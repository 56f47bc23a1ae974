// Check of the software fp16 conversions of setup_ext/kernels.h (FS_SOFT_HALF: the path of
// compilers without _Float16 in C++, e.g. GCC 11) against the compiler's own _Float16 (GCC >= 12
// or clang >= 15 on x86-64: F16C's instructions, or libgcc's soft-float routines without F16C):
// every binary16 value to float32, and float32 values to binary16: with argument `all` every one
// of the 2^32 (~20 s), else every float32 whose binary16 is subnormal or near the overflow
// threshold, the 32 bit patterns about each rounding boundary of every binary16 exponent, and a
// stride through the rest. tests/optim/test_cpu_backend.py compiles and runs it:
//
//     g++ -O2 -std=c++17 -Isetup_ext -Isetup_ext/generated setup_ext/check_half.cpp -o /tmp/ch
//     /tmp/ch [all]
//
// prints the counts checked and mismatched (exit status 1 on any; 2 where the compiler has no
// _Float16 to compare with).
#define FS_SOFT_HALF 1
#include <cstdio>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 15) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12))
static uint32_t fbits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

static long checked = 0, bad = 0;

static void to_half(uint32_t x) {
    float f;
    std::memcpy(&f, &x, 4);
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t ref;
    std::memcpy(&ref, &h, 2);
    const uint16_t got = fs::float_to_half(f).bits;
    checked++;
    if (got != ref && bad++ < 10)
        std::printf("float32 %08x -> fp16: %04x, the compiler's %04x\n", x, got, ref);
}

int main(int argc, char** argv) {
    for (uint32_t b = 0; b < 65536; b++) {
        _Float16 h;
        const uint16_t b16 = static_cast<uint16_t>(b);
        std::memcpy(&h, &b16, 2);
        const uint32_t ref = fbits(static_cast<float>(h));
        const uint32_t got = fbits(fs::half_to_float(fs::half_t{b16}));
        checked++;
        if (got != ref && bad++ < 10)
            std::printf("fp16 %04x -> float32: %08x, the compiler's %08x\n", b, got, ref);
    }
    if (argc > 1 && std::strcmp(argv[1], "all") == 0) {
        for (uint64_t x = 0; x < (1ull << 32); x++) to_half(static_cast<uint32_t>(x));
    } else {
        for (uint32_t s = 0; s < 2; s++) {
            const uint32_t sign = s << 31;
            // binary16 subnormals and the smallest normals: |x| < 2^-13, every float32
            for (uint32_t a = 0; a < 0x39000000u; a += 1) {
                if (a < 0x32000000u) a = 0x32000000u;  // (below 2^-27: all round to 0)
                to_half(sign | a);
            }
            // every binary16 exponent's rounding boundaries: the 13 bits dropped at, below and
            // above a half of the last place, and at the ends, for every significand
            for (uint32_t e = 0x38800000u; e < 0x48000000u; e += 0x800000u)
                for (uint32_t m = 0; m < 0x800000u; m += 0x2000u)
                    for (uint32_t d : {0u, 1u, 0xFFFu, 0x1000u, 0x1001u, 0x1FFFu})
                        to_half(sign | e | m | d);
            // overflow threshold (65504 .. 65536) and inf / NaN, every float32 about them
            for (uint32_t a = 0x477FE000u; a < 0x47801000u; a++) to_half(sign | a);
            for (uint32_t a = 0x7F800000u; a < 0x7F810000u; a++) to_half(sign | a);
            for (uint32_t a = 0x7FBFF000u; a <= 0x7FC01000u; a++) to_half(sign | a);
            // a stride through all the rest
            for (uint64_t a = 0; a < 0x80000000ull; a += 4099) to_half(sign | uint32_t(a));
        }
    }
    std::printf("checked %ld, mismatched %ld\n", checked, bad);
    return bad ? 1 : 0;
}
#else
int main() {
    std::printf("no _Float16 in this compiler to compare with\n");
    return 2;
}
#endif
