/* Portable reference tiles in plain C: what every other path computes, and what runs where the CPU has
 * none of the instruction sets of x86.c and arm.c. NM rows of x per pass (at most GENERIC_ROWS). */
#define GENERIC_ROWS 2

ALWAYS_INLINE void f32_tile_generic(const float *x, int NM, const float *w, const char *next, int K, float *dot) {
    (void)next;
    for (int i = 0; i < 4 * NM; i++) dot[i] = 0.f;
    for (int k = 0; k < K; k += 8, w += 32)
        for (int m = 0; m < NM; m++)
            for (int r = 0; r < RT; r++)
                for (int i = 0; i < 8; i++) dot[m * 4 + r] += w[r * 8 + i] * x[m * K + k + i];
}

ALWAYS_INLINE void bf16_tile_generic(const float *x, int NM, const uint16_t *w, const char *next, int K, float *dot) {
    (void)next;
    for (int i = 0; i < 4 * NM; i++) dot[i] = 0.f;
    for (int k = 0; k < K; k += 8, w += 32)
        for (int m = 0; m < NM; m++)
            for (int r = 0; r < RT; r++)
                for (int i = 0; i < 8; i++) dot[m * 4 + r] += bf16_f32(w[r * 8 + i]) * x[m * K + k + i];
}

/* int8: the activations are rounded to int8 per block of G along K (xq, one fp32 scale xs per block; see
 * quantize_x) and multiplied with the int8 weights in integers, so that int8 decode stays bound by memory
 * rather than by widening every weight to fp32. Every path computes the exact integer sums I[g][r][h]
 * (block g, output row r, half h: the k with k % 8 < 4, or >= 4) however it likes, then this one float
 * order, so that a row's bits depend neither on the batch nor on the instruction set:
 *     t[r][h] = fmaf((float)I[g][r][h], xs[g], t[r][h])   for g = 0, 1, ... in order
 *     dot[r]  = (t[r][0] + t[r][1]) * scale[r]
 * xq: [NM][K] int8 (xu: the same + 128 as uint8, for DPBUSD), xs: row m's block scales at xs[m * K/G]. */
ALWAYS_INLINE void int8_tile_generic(const int8_t *xq, const uint8_t *xu, const float *xs, int NM, const int8_t *w,
                                     int K, int G, const float *scale, const char *next, float *dot) {
    const int blocks = K / G;
    float t[GENERIC_ROWS][8];
    (void)xu, (void)next;
    for (int m = 0; m < NM; m++)
        for (int i = 0; i < 8; i++) t[m][i] = 0.f;
    for (int g = 0; g < blocks; g++) {
        const size_t k0 = (size_t)g * G;
        int32_t I[GENERIC_ROWS][8];
        for (int m = 0; m < NM; m++)
            for (int i = 0; i < 8; i++) I[m][i] = 0;
        for (int c = 0; c < G; c += 8, w += 32)
            for (int m = 0; m < NM; m++)
                for (int i = 0; i < 32; i++) I[m][i / 4] += w[i] * xq[(size_t)m * K + k0 + c + i % 8];
        for (int m = 0; m < NM; m++)
            for (int i = 0; i < 8; i++) t[m][i] = fmaf((float)I[m][i], xs[m * blocks + g], t[m][i]);
    }
    for (int m = 0; m < NM; m++)
        for (int r = 0; r < RT; r++) dot[4 * m + r] = (t[m][2 * r] + t[m][2 * r + 1]) * scale[r];
}

/* rounds G activations to int8 (q) with one scale, max|x| / 127 (*scale), and returns the sum of the int8
 * values: round to nearest even of x * (127 / max|x|), the float multiply and rounding every path shares */
static inline int32_t quantize_group_generic(const float *xg, int G, int8_t *q, float *scale) {
    float amax = 0.f;
    for (int j = 0; j < G; j++) amax = amax > fabsf(xg[j]) ? amax : fabsf(xg[j]);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t qsum = 0;
    for (int j = 0; j < G; j++) {
        int v = (int)lrintf(xg[j] * inv);
        q[j] = (int8_t)v;
        qsum += v;
    }
    *scale = amax / 127.f;
    return qsum;
}

/* int4 on fp32 activations: dot(q - 8, x) over a group = dot(q, x) - 8 * sum(x), so the offset is applied
 * once per group through the group's x-sum (xsum, computed once per call), not once per weight. */
ALWAYS_INLINE void int4_tile_generic(const float *x, const float *xsum, int NM, const uint8_t *w, const uint16_t *s,
                                     int K, int G, float *dot) {
    int groups = K / G, half = G / 2;
    float corr[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float tot[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < groups; g++, s += RT) {
        for (int r = 0; r < RT; r++, w += half) {
            float sc = f16_f32(s[r]);
            for (int m = 0; m < NM; m++) {
                const float *xg = x + (size_t)m * K + (size_t)g * G;
                float acc = 0.f;
                for (int j = 0; j < half; j++) acc += (float)(w[j] & 15) * xg[j] + (float)(w[j] >> 4) * xg[j + half];
                tot[m * 4 + r] += sc * acc;
                corr[m * 4 + r] += sc * xsum[m * groups + g];
            }
        }
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = tot[i] - 8.f * corr[i];
}

/* the vector steps of decode attention; the other paths do the same with a vector body and this tail */
static inline float dot_f32_generic(const float *a, const float *b, int n) {
    float s = 0.f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy_f32_generic(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}
