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

/* ---- fp32 and bf16 weights: fp32 FMA blocks (AVX-512) ---------------------------------------------
 * Without bf16 dot products a prompt multiplies in fp32. The decode tiles keep eight partial sums per
 * output (one per k mod 8) and re-widen the weight for every 8 rows of x; a prompt needs neither. Here
 * each output is ONE running sum over k in order (an FMA per k: y = ((x0 w0 + x1 w1) + ...) + bias), and
 * the work is blocked as a GEMM is: K in blocks of FMA_KB; per block, the activations re-laid out once
 * for all threads as [rows / FMA_MR][k][FMA_MR] (every row of x padded with zero rows to whole blocks),
 * and per FMA_NV * 16 output rows (a panel) the weight widened to fp32 and transposed to [k][panel] (it
 * stays in L1 while every row block of x passes over it); a register block of FMA_MR rows x FMA_NV
 * vectors of outputs takes one broadcast of x and FMA_NV weight loads per FMA_NV * FMA_MR FMAs. The
 * running sums wait in y between K blocks (stored and reloaded exactly): each row is computed on its
 * own, in one order, whatever rows come with it. */
#ifdef __AVX512F__
#define FMA_MR 12 /* rows of x per register block */
#define FMA_NV 2  /* 16-output vectors per register block: FMA_MR * FMA_NV accumulators */
#define FMA_NR (16 * FMA_NV)
#define FMA_KB 256 /* k per block: a panel (FMA_KB x FMA_NR fp32) stays in L1 */

/* chunk c (8 k) of tiles t .. t+FMA_NR/4-1 into panel rows c*8 .. c*8+7 ([k][FMA_NR], fp32); tiles past
 * the last give zeros */
static inline void fma_pack_chunk(enum jneox_format fmt, const void *W, int K, int tiles, int t, int c, float *dst) {
    /* a tile's chunk is [4 rows][8 k]; as two registers of 2 rows x 8 k, the permutation below takes
     * lane j of each row into 128-bit block j % 4 of register j / 4: [k j][row 0..3] */
    const __m512i lo = _mm512_set_epi32(27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16, 8, 0);
    const __m512i hi = _mm512_set_epi32(31, 23, 15, 7, 30, 22, 14, 6, 29, 21, 13, 5, 28, 20, 12, 4);
    for (int i = 0; i < FMA_NR / RT; i++) {
        __m512 a, b;
        if (t + i >= tiles) {
            a = b = _mm512_setzero_ps();
        } else if (fmt == JNEOX_BFLOAT16) {
            const uint16_t *src = (const uint16_t *)W + (size_t)(t + i) * RT * K + (size_t)c * 32;
            a = bf16x16(src), b = bf16x16(src + 16);
        } else {
            const float *src = (const float *)W + (size_t)(t + i) * RT * K + (size_t)c * 32;
            a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
        }
        __m512 j03 = _mm512_permutex2var_ps(a, lo, b), j47 = _mm512_permutex2var_ps(a, hi, b);
#define FMA_STORE_K(j) /* (an immediate: j must be a constant) */                                    \
    _mm_store_ps(dst + (j) * FMA_NR + i * RT, _mm512_extractf32x4_ps(j03, j));                           \
    _mm_store_ps(dst + ((j) + 4) * FMA_NR + i * RT, _mm512_extractf32x4_ps(j47, j))
        FMA_STORE_K(0); FMA_STORE_K(1); FMA_STORE_K(2); FMA_STORE_K(3);
#undef FMA_STORE_K
    }
}

/* FMA_MR rows (xp: [kl][FMA_MR]) x FMA_NR outputs (bp: [kl][FMA_NR]) over kl k; the sums start at zero
 * (first) or from y, and end in y (+ bias when last); only rows < nm and outputs < nn are stored */
static inline void fma_block(const float *xp, const float *bp, int kl, float *y, int N, int nm, int nn, int first,
                             const float *bias) {
    __m512 c[FMA_MR * FMA_NV];
    __mmask16 mask[FMA_NV];
    for (int v = 0; v < FMA_NV; v++) {
        int left = nn - 16 * v;
        mask[v] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    }
    for (int i = 0; i < FMA_MR; i++)
        for (int v = 0; v < FMA_NV; v++)
            c[i * FMA_NV + v] = first || i >= nm ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[v], y + (size_t)i * N + 16 * v);
    for (int k = 0; k < kl; k++, xp += FMA_MR, bp += FMA_NR) {
        __m512 b[FMA_NV];
        for (int v = 0; v < FMA_NV; v++) b[v] = _mm512_load_ps(bp + 16 * v);
        for (int i = 0; i < FMA_MR; i++) {
            const __m512 a = _mm512_set1_ps(xp[i]);
            for (int v = 0; v < FMA_NV; v++) c[i * FMA_NV + v] = _mm512_fmadd_ps(a, b[v], c[i * FMA_NV + v]);
        }
    }
    for (int v = 0; v < FMA_NV; v++) {
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask[v], bias + 16 * v) : _mm512_setzero_ps();
        for (int i = 0; i < nm; i++) {
            __m512 r = c[i * FMA_NV + v];
            if (bias) r = _mm512_add_ps(r, bv);
            _mm512_mask_storeu_ps(y + (size_t)i * N + 16 * v, mask[v], r);
        }
    }
}
#endif

long jneox_prompt_fma_scratch(int M, int K, int threads) {
#ifdef __AVX512F__
    const long mp = (M + FMA_MR - 1) / FMA_MR * FMA_MR;
    return (mp * K + (long)threads * FMA_KB * FMA_NR) * 4 + 64;
#else
    (void)M, (void)K, (void)threads;
    return 0;
#endif
}

void jneox_prompt_fma(enum jneox_format fmt, const float *x, const void *W, const float *bias, float *y, int M, int N,
                      int K, void *scratch, int threads) {
#ifdef __AVX512F__
    if (fmt != JNEOX_FLOAT32 && fmt != JNEOX_BFLOAT16) return;
    const int mb = (M + FMA_MR - 1) / FMA_MR, tiles = N / RT, panels = (N + FMA_NR - 1) / FMA_NR;
    float *xp = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63); /* [K blocks][mb][kl][FMA_MR] */
    float *bps = xp + (size_t)mb * FMA_MR * K;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int b = 0; b < mb; b++) {
            for (int k0 = 0; k0 < K; k0 += FMA_KB) {
                const int kl = K - k0 < FMA_KB ? K - k0 : FMA_KB;
                float *dst = xp + (size_t)k0 * mb * FMA_MR + (size_t)b * kl * FMA_MR;
                for (int i = 0; i < FMA_MR; i++) {
                    const int m = b * FMA_MR + i;
                    for (int k = 0; k < kl; k++) dst[k * FMA_MR + i] = m < M ? x[(size_t)m * K + k0 + k] : 0.f;
                }
            }
        }
        /* (the omp for's barrier: every row block is laid out before the first multiply) */
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int tid = 0, nth = 1;
#endif
        const int p0 = (int)((long)panels * tid / nth), p1 = (int)((long)panels * (tid + 1) / nth);
        float *bp = bps + (size_t)tid * FMA_KB * FMA_NR;
        for (int k0 = 0; k0 < K; k0 += FMA_KB) {
            const int kl = K - k0 < FMA_KB ? K - k0 : FMA_KB;
            const float *xk = xp + (size_t)k0 * mb * FMA_MR;
            for (int p = p0; p < p1; p++) {
                const int n0 = p * FMA_NR, nn = N - n0 < FMA_NR ? N - n0 : FMA_NR;
                for (int c = 0; c < kl / 8; c++) fma_pack_chunk(fmt, W, K, tiles, p * (FMA_NR / RT), k0 / 8 + c, bp + c * 8 * FMA_NR);
                for (int b = 0; b < mb; b++) {
                    const int nm = M - b * FMA_MR < FMA_MR ? M - b * FMA_MR : FMA_MR;
                    fma_block(xk + (size_t)b * kl * FMA_MR, bp, kl, y + (size_t)b * FMA_MR * N + n0, N, nm, nn, k0 == 0,
                              k0 + kl == K && bias ? bias + n0 : NULL);
                }
            }
        }
    }
#else
    (void)fmt, (void)x, (void)W, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)scratch, (void)threads;
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
