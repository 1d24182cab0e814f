/* 64-bit ARM tiles (NEON: Apple Silicon, Graviton, ...): two 4-lane FMAs per 8 weights, 1-2 rows of x
 * per pass (int8: 4). Each computes what its generic.c counterpart computes; the int8 tile keeps its bits. */
#ifdef NEON
#define NEON_INT8_ROWS 4 /* 4 x 4 int32 accumulators per row of x */

/* the four rows of a chunk of 8 k: 8 registers w[2r], w[2r+1]; a[i][0..1]: row i's two half-sums */
#define NEON_FMA_ROWS(w, x, m, a)                                                          \
    do {                                                                                   \
        float32x4_t x0_ = vld1q_f32(x), x1_ = vld1q_f32((x) + 4);                          \
        for (int r_ = 0; r_ < RT; r_++) {                                                  \
            a[(m) * 4 + r_][0] = vfmaq_f32(a[(m) * 4 + r_][0], w[2 * r_], x0_);             \
            a[(m) * 4 + r_][1] = vfmaq_f32(a[(m) * 4 + r_][1], w[2 * r_ + 1], x1_);         \
        }                                                                                  \
    } while (0)
#define NEON_ZERO(a) for (int i_ = 0; i_ < 8; i_++) a[i_][0] = a[i_][1] = vdupq_n_f32(0.f)
#define NEON_SUM(a, i) vaddvq_f32(vaddq_f32(a[i][0], a[i][1]))
static inline float32x4_t neon_bf16x4(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }

ALWAYS_INLINE void f32_tile_neon(const float *x, int NM, const float *w, const char *next, int K, float *dot) {
    (void)next;
    float32x4_t a[8][2], wv[8];
    NEON_ZERO(a);
    for (int k = 0; k < K; k += 8, w += 32) {
        __builtin_prefetch((const char *)w + PREFETCH);
        for (int i = 0; i < 8; i++) wv[i] = vld1q_f32(w + 4 * i);
        for (int m = 0; m < NM; m++) NEON_FMA_ROWS(wv, x + (size_t)m * K + k, m, a);
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = NEON_SUM(a, i);
}

ALWAYS_INLINE void bf16_tile_neon(const float *x, int NM, const uint16_t *w, const char *next, int K, float *dot) {
    (void)next;
    float32x4_t a[8][2], wv[8];
    NEON_ZERO(a);
    for (int k = 0; k < K; k += 8, w += 32) {
        __builtin_prefetch((const char *)w + PREFETCH);
        for (int i = 0; i < 8; i++) wv[i] = neon_bf16x4(w + 4 * i);
        for (int m = 0; m < NM; m++) NEON_FMA_ROWS(wv, x + (size_t)m * K + k, m, a);
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = NEON_SUM(a, i);
}

/* int8: vmull_s8 products widened and pairwise added (vpadalq_s16) into int32 lanes, then the float
 * order of int8_tile_generic */
ALWAYS_INLINE void int8_tile_neon(const int8_t *xq, const uint8_t *xu, const float *xs, int NM, const int8_t *w, int K,
                                  int G, const float *scale, const char *next, float *dot) {
    const int blocks = K / G;
    float t[NEON_INT8_ROWS][8];
    (void)xu, (void)next;
    for (int m = 0; m < NM; m++)
        for (int i = 0; i < 8; i++) t[m][i] = 0.f;
    for (int g = 0; g < blocks; g++) {
        const size_t k0 = (size_t)g * G;
        int32_t I[NEON_INT8_ROWS][8];
        int32x4_t acc[NEON_INT8_ROWS][RT]; /* lanes: products (0,1), (2,3), (4,5), (6,7) of row r's chunk */
        for (int m = 0; m < NM; m++)
            for (int r = 0; r < RT; r++) acc[m][r] = vdupq_n_s32(0);
        for (int c = 0; c < G; c += 8, w += 32) {
            __builtin_prefetch((const char *)w + 2 * PREFETCH);
            int8x8_t wr[RT];
            for (int r = 0; r < RT; r++) wr[r] = vld1_s8(w + 8 * r);
            for (int m = 0; m < NM; m++) {
                int8x8_t xv = vld1_s8(xq + (size_t)m * K + k0 + c);
                for (int r = 0; r < RT; r++) acc[m][r] = vpadalq_s16(acc[m][r], vmull_s8(wr[r], xv));
            }
        }
        for (int m = 0; m < NM; m++)
            for (int r = 0; r < RT; r++) {
                I[m][2 * r] = vgetq_lane_s32(acc[m][r], 0) + vgetq_lane_s32(acc[m][r], 1);
                I[m][2 * r + 1] = vgetq_lane_s32(acc[m][r], 2) + vgetq_lane_s32(acc[m][r], 3);
            }
        for (int m = 0; m < NM; m++)
            for (int i = 0; i < 8; i++) t[m][i] = fmaf((float)I[m][i], xs[m * blocks + g], t[m][i]);
    }
    for (int m = 0; m < NM; m++)
        for (int r = 0; r < RT; r++) dot[4 * m + r] = (t[m][2 * r] + t[m][2 * r + 1]) * scale[r];
}

/* int4 on fp32 activations, as int4_tile_generic */
ALWAYS_INLINE void int4_tile_neon(const float *x, const float *xsum, int NM, const uint8_t *w, const uint16_t *s,
                                  int K, int G, float *dot) {
    int groups = K / G, half = G / 2;
    float corr[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const uint8x8_t low = vdup_n_u8(15);
    float tot[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < groups; g++, s += RT) {
        for (int r = 0; r < RT; r++, w += half) {
            __builtin_prefetch((const char *)w + 2 * PREFETCH);
            float sc = f16_f32(s[r]);
            float32x4_t acc[2][2];
            for (int m = 0; m < 2; m++) acc[m][0] = acc[m][1] = vdupq_n_f32(0.f);
            for (int j = 0; j < half; j += 8) {
                uint8x8_t q = vld1_u8(w + j);
                uint16x8_t lo = vmovl_u8(vand_u8(q, low)), hi = vmovl_u8(vshr_n_u8(q, 4));
                float32x4_t l0 = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))), l1 = vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo)));
                float32x4_t h0 = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))), h1 = vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi)));
                for (int m = 0; m < NM; m++) {
                    const float *xg = x + (size_t)m * K + (size_t)g * G;
                    acc[m][0] = vfmaq_f32(vfmaq_f32(acc[m][0], l0, vld1q_f32(xg + j)), l1, vld1q_f32(xg + j + 4));
                    acc[m][1] = vfmaq_f32(vfmaq_f32(acc[m][1], h0, vld1q_f32(xg + j + half)), h1,
                                          vld1q_f32(xg + j + half + 4));
                }
            }
            for (int m = 0; m < NM; m++) {
                tot[m * 4 + r] += sc * vaddvq_f32(vaddq_f32(acc[m][0], acc[m][1]));
                corr[m * 4 + r] += sc * xsum[m * groups + g];
            }
        }
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = tot[i] - 8.f * corr[i];
}

static inline float dot_f32_neon(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
    float32x4_t acc = vdupq_n_f32(0.f);
    for (; i + 4 <= n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(a + i), vld1q_f32(b + i));
    s = vaddvq_f32(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy_f32_neon(float *y, float a, const float *x, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}
#endif /* NEON */
