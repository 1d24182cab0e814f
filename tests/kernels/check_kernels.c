/* A stand-alone check of the kernels' linear entry points (src/jneox/kernels/csrc), for machines where Python cannot run them: built with
 * any C compiler (also a cross compiler, run under qemu-user), it packs random weights in the layouts
 * jneox.h documents, runs jneox_linear_{f32,bf16,int8,int4} for 1..9 rows, and checks
 *   - the outputs against double-precision dot products of the same (rounded) weights (relative
 *     error of the whole output, as the Python tests measure it); for int8 also of the same activations,
 *     rounded to int8 per block of 64 as the kernels document (its integer sums are exact), and
 *   - that a row gives the same bits alone and in every batch (the server's promise).
 * Prints one line per format and exits non-zero on any failure.  tests/kernels/test_kernels_c.py drives it. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jneox.h"

enum { N = 12, K = 256, MMAX = 9 }; /* up to 9 rows: groups of 2, 3, 4 and 8 rows, and one more */
static uint32_t rng = 12345;
static float urand(void) { /* uniform in [-1, 1) */
    rng = rng * 1664525u + 1013904223u;
    return (float)(rng >> 8) / (float)(1u << 23) - 1.f;
}
static float half_to_float(uint16_t h) { /* fp16 with a normal exponent (all this file makes) */
    int e = (h >> 10) & 31, m = h & 1023;
    return (h & 0x8000 ? -1.f : 1.f) * ldexpf(1.f + m / 1024.f, e - 15);
}
static uint16_t float_to_bf16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the tile index of element (n, k) in [N/4][K/inner][4][inner] */
static size_t tiled(int n, int k, int inner) {
    return (((size_t)(n / 4) * (K / inner) + k / inner) * 4 + n % 4) * inner + k % inner;
}

static int failures = 0;

/* y[M][N] against ref[M][N] (doubles), and bit-identity of every row of every batch size */
static void check(const char *name, float tol, void (*run)(const float *x, float *y, int m), const double *ref,
                  const float *x) {
    static float y[MMAX * N], alone[MMAX * N];
    double worst = 0.0;
    int identical = 1;
    for (int m = 0; m < MMAX; m++) run(x + (size_t)m * K, alone + (size_t)m * N, 1);
    for (int M = 1; M <= MMAX; M++) {
        double err = 0.0, norm = 0.0;
        run(x, y, M);
        for (int i = 0; i < M * N; i++) {
            err += (y[i] - ref[i]) * (y[i] - ref[i]);
            norm += ref[i] * ref[i];
            if (memcmp(&y[i], &alone[i], 4)) identical = 0;
        }
        worst = sqrt(err / norm) > worst ? sqrt(err / norm) : worst;
    }
    int ok = worst < tol && identical;
    failures += !ok;
    printf("%s %s: max rel err %.2e (tolerance %.0e), rows batch-invariant: %s\n", ok ? "ok  " : "FAIL", name, worst,
           tol, identical ? "yes" : "NO");
}

static float x[MMAX * K], wf[N * K], bias[N], f32w[N * K], i8scale[N];
static uint16_t bf16w[N * K], i4scale[N * K / 32];
static int8_t i8w[N * K];
static uint8_t i4w[N * K / 2];
static int G;
static unsigned char scratch[2 * MMAX * K + 12 * MMAX * (K / 8)];

static void run_f32(const float *xx, float *y, int m) { jneox_linear_f32(xx, f32w, bias, y, m, N, K, 1); }
static void run_bf16(const float *xx, float *y, int m) { jneox_linear_bf16(xx, bf16w, bias, y, m, N, K, 1); }
static void run_int8(const float *xx, float *y, int m) {
    jneox_linear_int8(xx, i8w, i8scale, bias, y, m, N, K, scratch, 1);
}
static void run_int4(const float *xx, float *y, int m) {
    jneox_linear_int4(xx, i4w, i4scale, bias, y, m, N, K, G, scratch, 1);
}

int main(void) {
    static double ref[MMAX * N], xi8[MMAX * K];
    static float w[N * K];
    for (int i = 0; i < MMAX * K; i++) x[i] = urand();
    /* x as the int8 kernel sees it: per block of 64, q = round-half-even(x * 127 / max|x|), times max|x| / 127 */
    for (int b = 0; b < MMAX * K; b += 64) {
        float amax = 0.f;
        for (int j = 0; j < 64; j++) amax = fabsf(x[b + j]) > amax ? fabsf(x[b + j]) : amax;
        for (int j = 0; j < 64; j++) xi8[b + j] = (double)nearbyintf(x[b + j] * (127.f / amax)) * (amax / 127.f);
    }
    for (int i = 0; i < N; i++) bias[i] = urand();
    for (int i = 0; i < N * K; i++) wf[i] = urand() * 0.1f;
    printf("kernels built at SIMD level %d\n", jneox_kernels_simd());

    /* f32 and bf16: the same weights, bf16 rounded; int8: q * per-row scale */
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            f32w[tiled(n, k, 8)] = wf[n * K + k];
            bf16w[tiled(n, k, 8)] = float_to_bf16(wf[n * K + k]);
        }
    for (int fmt = JNEOX_FLOAT32; fmt <= JNEOX_INT8; fmt++) {
        for (int n = 0; n < N; n++) {
            i8scale[n] = 0.001f * (1 + n);
            for (int k = 0; k < K; k++) {
                int q = (int)lrintf(wf[n * K + k] / i8scale[n] * 0.5f);
                q = q > 127 ? 127 : q < -127 ? -127 : q;
                if (fmt == JNEOX_INT8) i8w[tiled(n, k, 8)] = (int8_t)q;
                w[n * K + k] = fmt == JNEOX_FLOAT32 ? wf[n * K + k] : fmt == JNEOX_BFLOAT16 ? bf16_to_float(float_to_bf16(wf[n * K + k]))
                                                                   : q * i8scale[n];
            }
        }
        for (int m = 0; m < MMAX; m++)
            for (int n = 0; n < N; n++) {
                double s = bias[n];
                for (int k = 0; k < K; k++) s += (double)w[n * K + k] * (fmt == JNEOX_INT8 ? xi8[m * K + k] : x[m * K + k]);
                ref[m * N + n] = s;
            }
        check(fmt == JNEOX_FLOAT32 ? "f32 " : fmt == JNEOX_BFLOAT16 ? "bf16" : "int8", 1e-5f,
              fmt == JNEOX_FLOAT32 ? run_f32 : fmt == JNEOX_BFLOAT16 ? run_bf16 : run_int8, ref, x);
    }

    /* int4, groups of 32 (fp32 arithmetic) and 64 (int8 activations where the CPU has the integer path) */
    for (G = 32; G <= 64; G *= 2) {
        int groups = K / G, half = G / 2;
        for (int n = 0; n < N; n++)
            for (int g = 0; g < groups; g++) {
                uint16_t sbits = (uint16_t)(0x1c00 + ((n * 7 + g * 13) % 512)); /* about 0.004-0.008 */
                i4scale[((size_t)(n / 4) * groups + g) * 4 + n % 4] = sbits;
                for (int j = 0; j < G; j++) {
                    int q = (int)((urand() + 1.f) * 8.f) & 15;
                    w[n * K + g * G + j] = (q - 8) * half_to_float(sbits);
                    uint8_t *byte = &i4w[(((size_t)(n / 4) * groups + g) * 4 + n % 4) * half + j % half];
                    *byte = j < half ? (uint8_t)((*byte & 0xf0) | q) : (uint8_t)((*byte & 0x0f) | (q << 4));
                }
            }
        for (int m = 0; m < MMAX; m++)
            for (int n = 0; n < N; n++) {
                double s = bias[n];
                for (int k = 0; k < K; k++) s += (double)w[n * K + k] * x[m * K + k];
                ref[m * N + n] = s;
            }
        /* G == 64 may round activations to int8 (1/254 of each group's largest): a looser bound */
        check(G == 32 ? "int4 (group 32)" : "int4 (group 64)", G == 32 ? 1e-5f : 1e-2f, run_int4, ref, x);
    }
    return failures ? 1 : 0;
}
