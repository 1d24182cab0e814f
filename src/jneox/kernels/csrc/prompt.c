/* Prompt (prefill) kernels other than AMX's (amx.c). A prompt is bound by arithmetic, not by the weight
 * stream, so it takes other instructions than decoding does. */

/* ---- bf16 or int8 weights: AVX-512 BF16 dot products ---------------------------------------------
 * vdpbf16ps multiplies 32 bf16 pairs per instruction where an fp32 FMA does 16. The activations must be
 * bf16 (xb: x rounded to bf16 by the caller, [M][K]), so this is for prompts only: decode keeps fp32
 * activations. One bf16 chunk (4 output rows x 8 k) is one register, 128-bit block r holding row r; x's 8
 * values are broadcast to the four blocks, and lane j of block r accumulates row r's pairs (2j, 2j+1): one
 * accumulator per row of x, up to DP_ROWS rows per pass (the int8 widening is shared by more rows). Each
 * row is computed on its own, so a prompt gives the same bits in chunks or whole. */
#ifdef BF16_DOT
/* int8 weights widen to bf16 exactly (|q| <= 127 fits bf16's 8-bit mantissa); the scale comes after */
static inline __m512bh int8_bf16x32(const int8_t *w) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

#define DP_ROWS 16 /* rows per pass: one accumulator each */
ALWAYS_INLINE void dp_tile(const uint16_t *xb, int NM, const void *wp, int int8, const char *next, int K,
                           const float *scale, float *dot) {
    __m512 a[DP_ROWS];
    for (int i = 0; i < NM; i++) a[i] = _mm512_setzero_ps();
    const int chunk = int8 ? 32 : 64; /* bytes per chunk */
    const char *w = (const char *)wp;
    for (int k = 0; k < K; k += 8, w += chunk) {
        if (!int8 || k % 16 == 0) PREFETCH_NEXT(next, (size_t)k / 8 * chunk);
        _mm_prefetch(w + (int8 ? 2 : 1) * PREFETCH, _MM_HINT_T0);
        __m512bh wv = int8 ? int8_bf16x32((const int8_t *)w) : (__m512bh)_mm512_loadu_si512((const void *)w);
        for (int m = 0; m < NM; m++) {
            __m512bh xv = (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + (size_t)m * K + k)));
            a[m] = _mm512_dpbf16_ps(a[m], wv, xv);
        }
    }
    for (int m = 0; m < NM; m++) { /* the four lanes of each 128-bit block summed: one output row each */
        __m512 s = _mm512_add_ps(a[m], _mm512_permute_ps(a[m], 0xB1));
        s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
        float out[16];
        _mm512_storeu_ps(out, s);
        for (int r = 0; r < 4; r++) dot[4 * m + r] = out[4 * r] * (scale ? scale[r] : 1.f);
    }
}
#endif

void jneox_prompt_bf16(const uint16_t *xb, const uint16_t *W, const float *bias, float *y, int M, int N, int K,
                       int threads) {
#ifdef BF16_DOT
#define CALL(NM) dp_tile(xb + (size_t)m * K, NM, W + (size_t)t * RT * K, 0, NEXT_TILE(W, RT * K * 2), K, NULL, dot)
    FOR_TILES_AND_GROUPS_OF(DP_ROWS, GROUPS_OF_16, CALL)
#undef CALL
#else
    (void)xb, (void)W, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)threads;
#endif
}

void jneox_prompt_int8(const uint16_t *xb, const int8_t *W, const float *scale, const float *bias, float *y, int M,
                       int N, int K, int threads) {
#ifdef BF16_DOT
#define CALL(NM) dp_tile(xb + (size_t)m * K, NM, W + (size_t)t * RT * K, 1, NEXT_TILE(W, RT * K), K, scale + t * RT, dot)
    FOR_TILES_AND_GROUPS_OF(DP_ROWS, GROUPS_OF_16, CALL)
#undef CALL
#else
    (void)xb, (void)W, (void)scale, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)threads;
#endif
}

/* ---- prompts through the library GEMM: tiles back to plain rows ---------------------------------
 * Where the kernels have no prompt path of their own, the fastest multiply is PyTorch's GEMM (MKL's
 * sgemm; oneDNN's bf16 matmul on AMX / AVX-512 BF16). quantize.py feeds it one block of output rows at a
 * time, re-laid out (and dequantized) by this function into a plain [rows][K] buffer reused for every
 * block, instead of widening the whole weight to a fresh matrix at every prompt. int8 stays unscaled (the
 * caller scales the output columns), so its bf16 rows are exact. */
void jneox_unpack_rows(enum jneox_format fmt, const void *W, const uint16_t *scale, int K, int G, int t0, int t1,
                       void *out, int out_bf16, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (int t = t0; t < t1; t++) {
        for (int r = 0; r < RT; r++) {
            size_t row = (size_t)(t - t0) * RT + r;
            float *of = (float *)out + row * K;
            uint16_t *ob = (uint16_t *)out + row * K;
            if (fmt == JNEOX_INT4) { /* [N/4][K/G][4][G/2] bytes, fp16 scale [N/4][K/G][4] */
                const uint8_t *w = (const uint8_t *)W + (size_t)t * RT * K / 2;
                const uint16_t *s = scale + (size_t)t * RT * (K / G);
                for (int g = 0; g < K / G; g++) {
                    const uint8_t *b = w + ((size_t)g * RT + r) * (G / 2);
                    float sc = f16_f32(s[g * RT + r]);
                    for (int j = 0; j < G / 2; j++) {
                        float lo = (float)((b[j] & 15) - 8) * sc, hi = (float)((b[j] >> 4) - 8) * sc;
                        size_t k = (size_t)g * G + j;
                        if (out_bf16) { ob[k] = f32_bf16(lo); ob[k + G / 2] = f32_bf16(hi); }
                        else { of[k] = lo; of[k + G / 2] = hi; }
                    }
                }
                continue;
            }
            for (int c = 0; c < K / 8; c++) { /* [N/4][K/8][4][8] elements */
                size_t at = (size_t)t * RT * K + ((size_t)c * RT + r) * 8;
                for (int j = 0; j < 8; j++) {
                    float v = fmt == JNEOX_FLOAT32 ? ((const float *)W)[at + j]
                            : fmt == JNEOX_BFLOAT16 ? bf16_f32(((const uint16_t *)W)[at + j])
                                                    : (float)((const int8_t *)W)[at + j];
                    if (out_bf16) ob[c * 8 + j] = fmt == JNEOX_BFLOAT16 ? ((const uint16_t *)W)[at + j] : f32_bf16(v);
                    else of[c * 8 + j] = v;
                }
            }
        }
    }
}
