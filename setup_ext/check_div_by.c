// Exhaustive check of div_by16 (setup_ext/kernels.h): Markstein's a / b from y = RN(1 / b),
// q = RN(a * y), r = a - q * b (one fma), RN(q + r * y), against the divider's a / b, on every
// float32 significand of a in [1, 2) for each divisor (the quotient's bits depend on a's
// exponent only through overflow and underflow), and on every exponent of a the Adam loop can
// divide (sqrt of a float32: 2^-75 .. 2^64) for a few divisors. Divisors: sqrt(1 - beta2^t) in
// float32 for nine beta2 and t = 1..200, then every 97th step to 20000 (the loop's bias
// corrections), then N random b in [2^-30, 1). Needs AVX-512F. Not part of the build:
//
//     gcc -O2 -mavx512f -mfma setup_ext/check_div_by.c -lm -o /tmp/check_div_by && /tmp/check_div_by 20000
//
// prints the number of divisors and of mismatches (exit status 1 on any).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long check(float b, int e0, int e1) {
    const float y = 1.0f / b;
    const __m512 vb = _mm512_set1_ps(b), vy = _mm512_set1_ps(y);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    long bad = 0;
    for (int e = e0; e <= e1; e++) {
        for (uint32_t s = 0; s < (1u << 23); s += 16) {
            const __m512 a = _mm512_castsi512_ps(
                _mm512_add_epi32(_mm512_set1_epi32((int)(((uint32_t)(e + 127) << 23) | s)), lane));
            const __m512 ref = _mm512_div_ps(a, vb);
            const __m512 q = _mm512_mul_ps(a, vy);
            const __m512 r = _mm512_fnmadd_ps(q, vb, a);
            const __m512 q2 = _mm512_fmadd_ps(r, vy, q);
            const __mmask16 ne = _mm512_cmpneq_epi32_mask(_mm512_castps_si512(ref),
                                                          _mm512_castps_si512(q2));
            if (ne) {
                bad += __builtin_popcount(ne);
                float A[16], R[16], Q[16];
                _mm512_storeu_ps(A, a);
                _mm512_storeu_ps(R, ref);
                _mm512_storeu_ps(Q, q2);
                for (int j = 0; j < 16 && bad < 10; j++)
                    if (ne >> j & 1) printf("b=%a a=%a: a/b=%a, got %a\n", b, A[j], R[j], Q[j]);
            }
        }
    }
    return bad;
}

int main(int argc, char** argv) {
    const long nrand = argc > 1 ? atol(argv[1]) : 2000;
    const double betas[] = {0.999, 0.99, 0.95, 0.98, 0.9999, 0.995, 0.9, 0.5, 0.99999};
    long bad = 0, nb = 0;
    for (int k = 0; k < 9; k++)
        for (int t = 1; t <= 20000; t += (t < 200 ? 1 : 97)) {
            const float b = (float)sqrt(1.0 - pow(betas[k], t));
            if (b == 1.0f) break;  // (the loop leaves x / 1 out)
            bad += check(b, 0, 0);
            nb++;
        }
    srand(1);
    for (long i = 0; i < nrand; i++) {
        const uint32_t bits = ((uint32_t)(-(rand() % 30) - 1 + 127) << 23) | ((uint32_t)rand() & 0x7FFFFF);
        float b;
        memcpy(&b, &bits, 4);
        bad += check(b, 0, 0);
        nb++;
    }
    const float few[] = {0.0316227766f, 0.99999994f, 0.5f, 0.70710677f, 0.1f, 0x1.000002p-30f};
    for (int k = 0; k < 6; k++) bad += check(few[k], -75, 64);
    printf("%ld divisors on every significand, 6 on every exponent too: %ld mismatches\n", nb, bad);
    return bad != 0;
}
