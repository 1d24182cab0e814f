/* x86-64 tiles: AVX2/FMA (with F16C), AVX-512 for batches, VNNI integer dot products where the CPU has
 * them. Each computes what its generic.c counterpart computes; the int8 tiles and the int4 tiles on int8
 * activations keep the same bits as their generic and AVX2 versions (see int8_tile_generic). */
#ifdef __AVX2__
/* rows of x per pass over a tile for batches of 3+ rows without AVX-512, 4 accumulators each: bf16's
 * widening is shared by more rows; fp32 runs out of the 16 registers at 4 */
#define AVX2_F32_ROWS 3
#define AVX2_BF16_ROWS 4
#ifdef __AVX512F__
#define X86_INT8_ROWS 8 /* 32 ymm registers: 2 per row of x */
#else
#define X86_INT8_ROWS 4 /* 16 ymm registers */
#endif

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline __m256i bcast8(const void *p) { /* 8 bytes into all four 64-bit lanes (vpbroadcastq) */
    int64_t v;
    memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
}
#define ZERO8(a) for (int i_ = 0; i_ < 8; i_++) a[i_] = _mm256_setzero_ps()
#define FMA4(W0, W1, W2, W3, X, A)          \
    A[0] = _mm256_fmadd_ps(W0, X, A[0]);    \
    A[1] = _mm256_fmadd_ps(W1, X, A[1]);    \
    A[2] = _mm256_fmadd_ps(W2, X, A[2]);    \
    A[3] = _mm256_fmadd_ps(W3, X, A[3])

ALWAYS_INLINE void f32_tile_avx2(const float *x, int NM, const float *w, const char *next, int K, float *dot) {
    __m256 a[4 * AVX2_F32_ROWS];
    for (int i = 0; i < 4 * NM; i++) a[i] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8, w += 32) {
        PREFETCH_NEXT(next, (size_t)k * 16);
        PREFETCH_NEXT(next, (size_t)k * 16 + 64);
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T0);
        __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8), w2 = _mm256_loadu_ps(w + 16), w3 = _mm256_loadu_ps(w + 24);
        for (int m = 0; m < NM; m++) { FMA4(w0, w1, w2, w3, _mm256_loadu_ps(x + (size_t)m * K + k), (a + 4 * m)); }
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = hsum8(a[i]);
}

ALWAYS_INLINE void bf16_tile_avx2(const float *x, int NM, const uint16_t *w, const char *next, int K, float *dot) {
    __m256 a[4 * AVX2_BF16_ROWS];
    for (int i = 0; i < 4 * NM; i++) a[i] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8, w += 32) {
        PREFETCH_NEXT(next, (size_t)k * 8);
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        __m256 w0 = bf16x8(w), w1 = bf16x8(w + 8), w2 = bf16x8(w + 16), w3 = bf16x8(w + 24);
        for (int m = 0; m < NM; m++) { FMA4(w0, w1, w2, w3, _mm256_loadu_ps(x + (size_t)m * K + k), (a + 4 * m)); }
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = hsum8(a[i]);
}

/* int8 (see int8_tile_generic for the float order all paths share). A chunk of 8 k x 4 rows is 32 bytes;
 * as int32 lanes of maddubs/madd or dpbusd, lane 2r + h is I[r][h].
 *   AVX2: maddubs(|w|, x * sign(w)) then madd with ones (a pair is at most 2 * 127 * 127: no int16
 *     overflow), int32 adds over the block.
 *   VNNI (AVX512-VNNI with VL, or AVX-VNNI): dpbusd(x + 128, w) - dpbusd(128, w): one instruction per
 *     chunk and row of x (the sign trick costs two more), the correction one per chunk for all rows.
 *     256-bit registers: one holds 4 output rows, so X86_INT8_ROWS rows of x share each weight chunk. */
ALWAYS_INLINE void int8_tile_avx2(const int8_t *xq, const uint8_t *xu, const float *xs, int NM, const int8_t *w, int K,
                                  int G, const float *scale, const char *next, float *dot) {
    const int blocks = K / G;
    float t[X86_INT8_ROWS][8];
    __m256 tv[X86_INT8_ROWS];
    __m256i acc[X86_INT8_ROWS];
    for (int m = 0; m < NM; m++) tv[m] = _mm256_setzero_ps();
    for (int g = 0; g < blocks; g++) {
        const size_t k0 = (size_t)g * G;
        for (int m = 0; m < NM; m++) acc[m] = _mm256_setzero_si256();
#ifdef DPBUSD
        const __m256i c128 = _mm256_set1_epi8((char)0x80);
        __m256i corr = _mm256_setzero_si256();
        for (int c = 0; c < G; c += 8, w += 32) {
            if (c % 16 == 0) PREFETCH_NEXT(next, (k0 + c) * 4);
            _mm_prefetch((const char *)w + 2 * PREFETCH, _MM_HINT_T0);
            __m256i q = _mm256_loadu_si256((const __m256i *)w);
            corr = DPBUSD(corr, c128, q);
            for (int m = 0; m < NM; m++) acc[m] = DPBUSD(acc[m], bcast8(xu + (size_t)m * K + k0 + c), q);
        }
        for (int m = 0; m < NM; m++) acc[m] = _mm256_sub_epi32(acc[m], corr);
#else
        const __m256i ones = _mm256_set1_epi16(1);
        for (int c = 0; c < G; c += 8, w += 32) {
            if (c % 16 == 0) PREFETCH_NEXT(next, (k0 + c) * 4);
            _mm_prefetch((const char *)w + 2 * PREFETCH, _MM_HINT_T0);
            __m256i q = _mm256_loadu_si256((const __m256i *)w), aq = _mm256_abs_epi8(q);
            for (int m = 0; m < NM; m++) {
                __m256i xs8 = _mm256_sign_epi8(bcast8(xq + (size_t)m * K + k0 + c), q);
                acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(_mm256_maddubs_epi16(aq, xs8), ones));
            }
        }
#endif
        for (int m = 0; m < NM; m++)
            tv[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(xs[m * blocks + g]), tv[m]);
    }
    for (int m = 0; m < NM; m++) _mm256_storeu_ps(t[m], tv[m]);
    (void)xq, (void)xu;
    for (int m = 0; m < NM; m++)
        for (int r = 0; r < RT; r++) dot[4 * m + r] = (t[m][2 * r] + t[m][2 * r + 1]) * scale[r];
}

/* int4 on fp32 activations (groups other than 64), as int4_tile_generic; 1-2 rows of x */
ALWAYS_INLINE void int4_tile_avx2(const float *x, const float *xsum, int NM, const uint8_t *w, const uint16_t *s,
                                  int K, int G, float *dot) {
    int groups = K / G, half = G / 2;
    float corr[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const __m256i low = _mm256_set1_epi32(15);
    __m256 tot[8];
    ZERO8(tot);
    for (int g = 0; g < groups; g++, s += RT) {
        const float *xg = x + (size_t)g * G;
        for (int r = 0; r < RT; r++, w += half) {
            _mm_prefetch((const char *)w + 2 * PREFETCH, _MM_HINT_T0);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
            for (int j = 0; j < half; j += 8) {
                __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + j)));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, low)), hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
                a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xg + j), a0);
                a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xg + j + half), a1);
                if (NM == 2) {
                    b0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xg + K + j), b0);
                    b1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xg + K + j + half), b1);
                }
            }
            __m256 sc = _mm256_set1_ps(f16_f32(s[r]));
            tot[r] = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), sc, tot[r]);
            corr[r] += f16_f32(s[r]) * xsum[g];
            if (NM == 2) {
                tot[4 + r] = _mm256_fmadd_ps(_mm256_add_ps(b0, b1), sc, tot[4 + r]);
                corr[4 + r] += f16_f32(s[r]) * xsum[groups + g];
            }
        }
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = hsum8(tot[i]) - 8.f * corr[i];
}

/* int4 x int8 for groups of 64: the activations of each group are rounded to int8 (xq, with one fp32
 * scale per group: xs) once per call; maddubs multiplies the 32 unsigned nibbles of a half group by 32
 * int8 activations into 16-bit pairs (at most 2*15*127 each: no overflow). Integer products instead of
 * widening every nibble to fp32: three times fewer instructions per weight, which keeps int4 decode bound
 * by memory. 1-2 rows of x. */
ALWAYS_INLINE void int4x8_tile_avx2(const int8_t *xq, const float *xs, const float *xqsum, int NM, const uint8_t *w,
                                    const uint16_t *s, const char *next, int K, float *dot) {
    const int G = 64, groups = K / G;
    const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 tot[8];
    ZERO8(tot);
    float corr[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < groups; g++, s += RT) {
        PREFETCH_NEXT(next, (size_t)g * 128);
        PREFETCH_NEXT(next, (size_t)g * 128 + 64);
        const int8_t *xg = xq + (size_t)g * G;
        __m256i xa0 = _mm256_loadu_si256((const __m256i *)xg), xa1 = _mm256_loadu_si256((const __m256i *)(xg + 32));
        __m256i xb0 = xa0, xb1 = xa1;
        if (NM == 2) {
            xb0 = _mm256_loadu_si256((const __m256i *)(xg + K));
            xb1 = _mm256_loadu_si256((const __m256i *)(xg + K + 32));
        }
        for (int r = 0; r < RT; r++, w += 32) {
            _mm_prefetch((const char *)w + 2 * PREFETCH, _MM_HINT_T0);
            __m256i q = _mm256_loadu_si256((const __m256i *)w);
            __m256i lo = _mm256_and_si256(q, nib), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nib);
            float ws = f16_f32(s[r]);
            __m256i p = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xa0), _mm256_maddubs_epi16(hi, xa1)), ones);
            float sa = ws * xs[g];
            tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sa), tot[r]);
            corr[r] += sa * xqsum[g];
            if (NM == 2) {
                __m256i pb = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xb0), _mm256_maddubs_epi16(hi, xb1)), ones);
                float sb = ws * xs[groups + g];
                tot[4 + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb), _mm256_set1_ps(sb), tot[4 + r]);
                corr[4 + r] += sb * xqsum[groups + g];
            }
        }
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = hsum8(tot[i]) - 8.f * corr[i];
}

/* quantize_group_generic, 32 activations per step (other G: the generic code): the same max, the same
 * float multiply, rounded to nearest even (vcvtps2dq, as lrintf) */
static inline int32_t quantize_group_avx2(const float *xg, int G, int8_t *q, float *scale) {
    if (G % 32) return quantize_group_generic(xg, G, q, scale);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 am = _mm256_setzero_ps();
    for (int j = 0; j < G; j += 8) am = _mm256_max_ps(am, _mm256_and_ps(_mm256_loadu_ps(xg + j), absmask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))), inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 iv = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes packs' interleave of 128-bit lanes */
    __m256i qs = _mm256_setzero_si256();
    for (int j = 0; j < G; j += 32) {
        __m256i v[4];
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + j + 8 * i), iv));
            qs = _mm256_add_epi32(qs, v[i]);
        }
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_permutevar8x32_epi32(b, order));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *scale = amax / 127.f;
    return _mm_cvtsi128_si32(s4);
}

static inline float dot_f32_avx2(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy_f32_avx2(float *y, float a, const float *x, int n) {
    int i = 0;
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}
#endif /* __AVX2__ */

#ifdef __AVX512F__
/* ---- AVX-512: up to 8 rows of x per pass over a tile (fp32 and bf16) ------------------------------
 * A batch of decode rows is bound by arithmetic. With 2 rows per pass, 16 rows pass over every tile 8
 * times at 3 loads per 4 FMAs. Here a 512-bit register holds one chunk of two output rows (2 x 8 k),
 * x's 8 values are broadcast into both halves, and each widened weight chunk serves up to 8 rows of x
 * (16 accumulators): 2 passes, 5 loads per 8 FMAs. Lane by lane this is the AVX2 tile's arithmetic (the
 * same widening, the same FMAs in the same order, the same final horizontal sums), so a row's result is
 * bit-identical whichever path ran and however many rows came with it: batching changes only speed. */
#define AVX512_ROWS 8
#define AVX512_FROM 3 /* 1-2 rows: the AVX2 tiles are as fast (bound by memory) */
#define LO8(v) _mm512_castps512_ps256(v)
#define HI8(v) _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))
/* 8 floats into both halves (vbroadcastf64x4: AVX-512F, where vbroadcastf32x8 would need DQ) */
#define BCAST8(p) _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))))
#define FMA_ROWS(NM, W01, W23, X, K, k, A)                                                  \
    for (int m_ = 0; m_ < NM; m_++) {                                                        \
        __m512 xb_ = BCAST8(X + (size_t)m_ * K + k);                                      \
        A[2 * m_] = _mm512_fmadd_ps(W01, xb_, A[2 * m_]);                                    \
        A[2 * m_ + 1] = _mm512_fmadd_ps(W23, xb_, A[2 * m_ + 1]);                            \
    }

ALWAYS_INLINE void reduce_rows(const __m512 *a, int NM, float *dot) {
    for (int m = 0; m < NM; m++) {
        dot[4 * m] = hsum8(LO8(a[2 * m]));
        dot[4 * m + 1] = hsum8(HI8(a[2 * m]));
        dot[4 * m + 2] = hsum8(LO8(a[2 * m + 1]));
        dot[4 * m + 3] = hsum8(HI8(a[2 * m + 1]));
    }
}

ALWAYS_INLINE void f32_tile_avx512(const float *x, int NM, const float *w, const char *next, int K, float *dot) {
    __m512 a[2 * AVX512_ROWS];
    for (int i = 0; i < 2 * NM; i++) a[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 8, w += 32) {
        PREFETCH_NEXT(next, (size_t)k * 16);
        PREFETCH_NEXT(next, (size_t)k * 16 + 64);
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T0);
        __m512 w01 = _mm512_loadu_ps(w), w23 = _mm512_loadu_ps(w + 16);
        FMA_ROWS(NM, w01, w23, x, K, k, a)
    }
    reduce_rows(a, NM, dot);
}

static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

ALWAYS_INLINE void bf16_tile_avx512(const float *x, int NM, const uint16_t *w, const char *next, int K, float *dot) {
    __m512 a[2 * AVX512_ROWS];
    for (int i = 0; i < 2 * NM; i++) a[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 8, w += 32) {
        PREFETCH_NEXT(next, (size_t)k * 8);
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        __m512 w01 = bf16x16(w), w23 = bf16x16(w + 16);
        FMA_ROWS(NM, w01, w23, x, K, k, a)
    }
    reduce_rows(a, NM, dot);
}

/* quantize_group_generic, 16 activations per step (other G: the generic code) */
static inline int32_t quantize_group_avx512(const float *xg, int G, int8_t *q, float *scale) {
    if (G % 16) return quantize_group_generic(xg, G, q, scale);
    __m512 am = _mm512_setzero_ps();
    for (int j = 0; j < G; j += 16) am = _mm512_max_ps(am, _mm512_abs_ps(_mm512_loadu_ps(xg + j)));
    const float amax = _mm512_reduce_max_ps(am), inv = amax > 0.f ? 127.f / amax : 0.f;
    __m512i qs = _mm512_setzero_si512();
    for (int j = 0; j < G; j += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + j), _mm512_set1_ps(inv)));
        qs = _mm512_add_epi32(qs, v);
        _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtepi32_epi8(v));
    }
    *scale = amax / 127.f;
    return _mm512_reduce_add_epi32(qs);
}

#ifdef __AVX512BW__
/* int4 x int8 for groups of 64 with AVX-512 (BW): int4x8_tile_avx2 with two output rows per 512-bit
 * register (a row's 32 bytes of a group are next to the next row's), the four rows' scale products in
 * one vector. Lane for lane the same integer sums, the same fp32 multiplies, FMAs and corrections in the
 * same order, and the same final sums: a row gets the AVX2 tile's bits (tested), with fewer instructions
 * per weight, which int4 decode is bound by. */
#ifdef __GFNI__ /* one instruction: each byte times the bit matrix of a right shift by 4 (vgf2p8affineqb) */
#define HIGH_NIBBLES(q) _mm512_gf2p8affine_epi64_epi8(q, _mm512_set1_epi64(0x1020408000000000LL), 0)
#else
#define HIGH_NIBBLES(q) _mm512_and_si512(_mm512_srli_epi16(q, 4), nib)
#endif
ALWAYS_INLINE void int4x8_tile_avx512(const int8_t *xq, const float *xs, const float *xqsum, int NM,
                                      const uint8_t *w, const uint16_t *s, const char *next, int K, float *dot) {
    const int G = 64, groups = K / G;
    const __m512i nib = _mm512_set1_epi8(15), ones = _mm512_set1_epi16(1);
    const __m512i rows01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i rows23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
    __m512 tot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m128 corr[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
    for (int g = 0; g < groups; g++, s += RT, w += RT * 32) {
        PREFETCH_NEXT(next, (size_t)g * 128);
        PREFETCH_NEXT(next, (size_t)g * 128 + 64);
        _mm_prefetch((const char *)w + 2 * PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + 2 * PREFETCH + 64, _MM_HINT_T0);
        __m512i q01 = _mm512_loadu_si512(w), q23 = _mm512_loadu_si512(w + 64);
        __m512i lo01 = _mm512_and_si512(q01, nib), hi01 = HIGH_NIBBLES(q01);
        __m512i lo23 = _mm512_and_si512(q23, nib), hi23 = HIGH_NIBBLES(q23);
        __m128 ws = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)s));
        for (int m = 0; m < NM; m++) {
            const int8_t *xg = xq + (size_t)m * K + (size_t)g * G;
            __m512i x0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xg));
            __m512i x1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xg + 32)));
            __m128 sa = _mm_mul_ps(ws, _mm_set1_ps(xs[m * groups + g])); /* ws * xs[g], row by row */
            __m512 sa4 = _mm512_castps128_ps512(sa);
#ifdef __AVX512VNNI__ /* the same int32 sums (4 + 4 products each, all exact) in two instructions */
            __m512i p01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo01, x0), hi01, x1);
            __m512i p23 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo23, x0), hi23, x1);
            (void)ones;
#else
            __m512i p01 = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo01, x0), _mm512_maddubs_epi16(hi01, x1)), ones);
            __m512i p23 = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo23, x0), _mm512_maddubs_epi16(hi23, x1)), ones);
#endif
            tot[2 * m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), _mm512_permutexvar_ps(rows01, sa4), tot[2 * m]);
            tot[2 * m + 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), _mm512_permutexvar_ps(rows23, sa4), tot[2 * m + 1]);
            corr[m] = _mm_add_ps(corr[m], _mm_mul_ps(sa, _mm_set1_ps(xqsum[m * groups + g])));
        }
    }
    for (int m = 0; m < NM; m++) {
        float c[4];
        _mm_storeu_ps(c, corr[m]);
        for (int h = 0; h < 2; h++) {
            __m512 t = tot[2 * m + h];
            dot[4 * m + 2 * h] = hsum8(_mm512_castps512_ps256(t)) - 8.f * c[2 * h];
            dot[4 * m + 2 * h + 1] = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1))) - 8.f * c[2 * h + 1];
        }
    }
}
#endif /* __AVX512BW__ */
#endif /* __AVX512F__ */
