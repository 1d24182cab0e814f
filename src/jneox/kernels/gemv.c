/* Weight-only linear kernels for CPU decoding: y[M][N] = x[M][K] . W[N][K]^T (+ bias), M small.
 *
 * Decoding reads every weight once per token, so the weights are stored pre-packed in tiles of
 * four output rows, interleaved along K, so that each tile is one contiguous stream that the
 * hardware prefetcher (helped by a software prefetch) keeps ahead of the arithmetic. Weights are
 * widened to fp32 in registers only; x, y and the accumulation are fp32. OpenMP splits the
 * tiles over the cores (jneox loads this library after torch, so it shares torch's libgomp).
 *
 * Packed formats (made by jneox/quantize.py; N is a multiple of 4):
 *   f32:  float  [N/4][K/8][4][8]
 *   bf16: uint16 [N/4][K/8][4][8]
 *   int8: int8   [N/4][K/8][4][8], fp32 scale[N]               (symmetric, per output row)
 *   int4: uint8  [N/4][K/G][4][G/2], fp16 scale[N/4][K/G][4]   (symmetric groups of G along K,
 *         stored as q+8; byte j of a row's group holds element j (low nibble) and j+G/2 (high))
 * Built with -march=native: AVX2/FMA code where the CPU has it, portable C otherwise.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define RT 4           /* output rows per tile */
#define PREFETCH 1024  /* bytes ahead in the tile's stream */

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) { /* zero or subnormal */
        if (man == 0) u = sign;
        else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; exp--; } u = sign | (exp << 23) | ((man & 0x3ff) << 13); }
    } else if (exp == 31) u = sign | 0x7f800000 | (man << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

static inline void store_tile(float *y, int N, int n0, const float *dot, const float *bias) {
    for (int r = 0; r < RT; r++) y[n0 + r] = dot[r] + (bias ? bias[n0 + r] : 0.f);
}

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline __m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
#endif

/* ---- f32 ------------------------------------------------------------------------------- */
static void f32_tile(const float *x, const float *w, int K, float *dot) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; k += 8, w += 32) {
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T0);
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 24), xv, a3);
    }
    dot[0] = hsum8(a0), dot[1] = hsum8(a1), dot[2] = hsum8(a2), dot[3] = hsum8(a3);
#else
    for (int r = 0; r < RT; r++) dot[r] = 0.f;
    for (int k = 0; k < K; k += 8, w += 32)
        for (int r = 0; r < RT; r++)
            for (int i = 0; i < 8; i++) dot[r] += w[r * 8 + i] * x[k + i];
#endif
}

void jneox_linear_f32(const float *x, const float *W, const float *bias, float *y,
                      int M, int N, int K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < N / RT; t++) {
        float dot[RT];
        for (int m = 0; m < M; m++) {
            f32_tile(x + (size_t)m * K, W + (size_t)t * RT * K, K, dot);
            store_tile(y + (size_t)m * N, N, t * RT, dot, bias);
        }
    }
}

/* ---- bf16 ------------------------------------------------------------------------------ */
static void bf16_tile(const float *x, const uint16_t *w, int K, float *dot) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; k += 8, w += 32) {
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(bf16x8(w), xv, a0);
        a1 = _mm256_fmadd_ps(bf16x8(w + 8), xv, a1);
        a2 = _mm256_fmadd_ps(bf16x8(w + 16), xv, a2);
        a3 = _mm256_fmadd_ps(bf16x8(w + 24), xv, a3);
    }
    dot[0] = hsum8(a0), dot[1] = hsum8(a1), dot[2] = hsum8(a2), dot[3] = hsum8(a3);
#else
    for (int r = 0; r < RT; r++) dot[r] = 0.f;
    for (int k = 0; k < K; k += 8, w += 32)
        for (int r = 0; r < RT; r++)
            for (int i = 0; i < 8; i++) dot[r] += bf16_f32(w[r * 8 + i]) * x[k + i];
#endif
}

void jneox_linear_bf16(const float *x, const uint16_t *W, const float *bias, float *y,
                       int M, int N, int K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < N / RT; t++) {
        float dot[RT];
        for (int m = 0; m < M; m++) {
            bf16_tile(x + (size_t)m * K, W + (size_t)t * RT * K, K, dot);
            store_tile(y + (size_t)m * N, N, t * RT, dot, bias);
        }
    }
}

/* ---- int8 ------------------------------------------------------------------------------ */
static void int8_tile(const float *x, const int8_t *w, int K, const float *scale, float *dot) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; k += 8, w += 32) {
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        __m256 xv = _mm256_loadu_ps(x + k);
        __m256i q = _mm256_loadu_si256((const __m256i *)w);
        __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        a0 = _mm256_fmadd_ps(i8x8(lo), xv, a0);
        a1 = _mm256_fmadd_ps(i8x8(_mm_srli_si128(lo, 8)), xv, a1);
        a2 = _mm256_fmadd_ps(i8x8(hi), xv, a2);
        a3 = _mm256_fmadd_ps(i8x8(_mm_srli_si128(hi, 8)), xv, a3);
    }
    float d[RT] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
#else
    float d[RT] = {0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < K; k += 8, w += 32)
        for (int r = 0; r < RT; r++)
            for (int i = 0; i < 8; i++) d[r] += (float)w[r * 8 + i] * x[k + i];
#endif
    for (int r = 0; r < RT; r++) dot[r] = d[r] * scale[r];
}

void jneox_linear_int8(const float *x, const int8_t *W, const float *scale, const float *bias, float *y,
                       int M, int N, int K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < N / RT; t++) {
        float dot[RT];
        for (int m = 0; m < M; m++) {
            int8_tile(x + (size_t)m * K, W + (size_t)t * RT * K, K, scale + t * RT, dot);
            store_tile(y + (size_t)m * N, N, t * RT, dot, bias);
        }
    }
}

/* ---- int4 ------------------------------------------------------------------------------ */
/* dot(q - 8, x) over a group = dot(q, x) - 8 * sum(x): the offset is applied once per group
 * through the group's x-sum (xsum, computed once per call), not once per weight. */
static void int4_tile(const float *x, const float *xsum, const uint8_t *w, const uint16_t *s,
                      int K, int G, float *dot) {
    int groups = K / G, half = G / 2;
    float corr[RT] = {0.f, 0.f, 0.f, 0.f};
#ifdef __AVX2__
    const __m256i low = _mm256_set1_epi32(15);
    __m256 tot[RT];
    for (int r = 0; r < RT; r++) tot[r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++, s += RT) {
        const float *xg = x + (size_t)g * G;
        for (int r = 0; r < RT; r++, w += half) {
            _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
            __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
            for (int j = 0; j < half; j += 8) {
                __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + j)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, low)), _mm256_loadu_ps(xg + j), acc);
                acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), _mm256_loadu_ps(xg + j + half), acc2);
            }
            float sc = f16_f32(s[r]);
            tot[r] = _mm256_fmadd_ps(_mm256_add_ps(acc, acc2), _mm256_set1_ps(sc), tot[r]);
            corr[r] += sc * xsum[g];
        }
    }
    for (int r = 0; r < RT; r++) dot[r] = hsum8(tot[r]) - 8.f * corr[r];
#else
    float tot[RT] = {0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < groups; g++, s += RT) {
        const float *xg = x + (size_t)g * G;
        for (int r = 0; r < RT; r++, w += half) {
            float acc = 0.f;
            for (int j = 0; j < half; j++) acc += (float)(w[j] & 15) * xg[j] + (float)(w[j] >> 4) * xg[j + half];
            float sc = f16_f32(s[r]);
            tot[r] += sc * acc;
            corr[r] += sc * xsum[g];
        }
    }
    for (int r = 0; r < RT; r++) dot[r] = tot[r] - 8.f * corr[r];
#endif
}

/* xsum: caller-provided scratch of M * K/G floats */
void jneox_linear_int4(const float *x, const uint8_t *W, const uint16_t *scale, const float *bias, float *y,
                       int M, int N, int K, int G, float *xsum, int threads) {
    int groups = K / G;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < groups; g++) {
            float sum = 0.f;
            for (int j = 0; j < G; j++) sum += x[(size_t)m * K + (size_t)g * G + j];
            xsum[m * groups + g] = sum;
        }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < N / RT; t++) {
        float dot[RT];
        for (int m = 0; m < M; m++) {
            int4_tile(x + (size_t)m * K, xsum + m * groups, W + (size_t)t * RT * K / 2,
                      scale + (size_t)t * RT * groups, K, G, dot);
            store_tile(y + (size_t)m * N, N, t * RT, dot, bias);
        }
    }
}

/* 2 when built with AVX2/FMA, 0 for the portable loops */
int jneox_kernels_simd(void) {
#ifdef __AVX2__
    return 2;
#else
    return 0;
#endif
}
