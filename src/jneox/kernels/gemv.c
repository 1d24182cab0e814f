/* Weight-only linear kernels for CPU decoding: y[M][N] = x[M][K] . W[N][K]^T (+ bias), M small.
 *
 * Decoding reads every weight once per token, so the weights are stored pre-packed in tiles of
 * four output rows, interleaved along K, so that each tile is one contiguous stream that the
 * hardware prefetcher (helped by a software prefetch) keeps ahead of the arithmetic. fp32, bf16 and
 * int4 (groups other than 64) weights are widened to fp32 in registers only; x, y and the accumulation
 * are fp32. int8 (and int4 with groups of 64) round the activations to int8 per block and multiply in
 * integers. OpenMP splits the tiles over the cores (jneox loads this library after torch, so it shares
 * torch's libgomp).
 *
 * Packed formats (made by jneox/quantize.py; N is a multiple of 4):
 *   f32:  float  [N/4][K/8][4][8]
 *   bf16: uint16 [N/4][K/8][4][8]
 *   int8: int8   [N/4][K/8][4][8], fp32 scale[N]               (symmetric, per output row).
 *         The kernel rounds the activations to int8 per block of 64 along K (32, 16 or 8 where K is
 *         not a multiple of 64; one fp32 scale each) and sums the products in int32 per block, as
 *         llama.cpp's Q8_0 x Q8_0 does; the float steps after that follow one order on every path
 *         (see int8_tile), so a row gets the same bits on every instruction set and in every batch.
 *   int4: uint8  [N/4][K/G][4][G/2], fp16 scale[N/4][K/G][4]   (symmetric groups of G along K,
 *         stored as q+8; byte j of a row's group holds element j (low nibble) and j+G/2 (high)).
 *         For G == 64 the kernel also rounds the activations to int8 per group of 64 (one fp32
 *         scale each) and multiplies in integers, as llama.cpp's Q4_0 x Q8_0 does: three times
 *         fewer instructions per weight, which is what makes int4 memory-bound instead of
 *         compute-bound. The extra error is far below int4's own (measured in the tests).
 * Built with -march=native: AVX2/FMA code where the CPU has it, portable C otherwise. A batch of rows
 * (the server's decode steps) shares each pass over a tile: 3 rows (fp32) or 4 (bf16, int8) with AVX2,
 * 8 with AVX-512, every row computed bit for bit as it is alone. With AVX-512 BF16, prompts with bf16 or
 * int8 weights can use bf16 dot products (jneox_prompt_bf16 / jneox_prompt_int8); with AMX, prompts in every
 * format but fp32 are AMX tile multiplies (jneox_prompt_amx).
 *
 * Paths, what each needs, and how it is tested on every machine (JNEOX_SIMD=LEVEL caps the build
 * with -mno-* flags; tests/test_quantize.py forces each level the CPU can run, and skips, with the
 * reason shown, the ones it cannot):
 *   JNEOX_SIMD  simd()  CPU flags needed     paths
 *   portable    0       none                 scalar loops, 1-2 rows per pass, int4 in fp32, int8 in
 *                                            scalar integers; prompts (> 16 rows): jneox_unpack_rows +
 *                                            PyTorch's GEMM
 *   avx2        2       avx2 fma f16c        8-wide FMA tiles, 3 (fp32) / 4 (bf16) rows per pass; int8
 *                                            and int4 (G == 64) in integers (vpmaddubsw/vpmaddwd), int8
 *                                            4 rows per pass; prompts as portable
 *   avx2vnni    2       + avx_vnni           int8 with vpdpbusd (AVX-VNNI: Intel client CPUs since
 *                                            Alder Lake); the avx2 level builds without it
 *   avx512      3       avx512f              + 8 rows per pass for batches of 3+ rows (int8: 8 rows,
 *                                            vpdpbusd on 256-bit registers where avx512_vnni + avx512vl),
 *                                            int4 (G == 64) two output rows per register (avx512bw),
 *                                            prompts in chunks of 128 rows (on an AMX CPU capped below
 *                                            amx, bf16/int8/int4 prompts: jneox_unpack_rows + oneDNN)
 *   avx512bf16  4       avx512f avx512_bf16  + bf16/int8 prompts with bf16 dot products (vdpbf16ps)
 *   amx         5       + amx_tile amx_bf16  + bf16/int8/int4 prompts as AMX tile multiplies on the packed weight
 *                       (and Linux 5.16+)    (jneox_prompt_amx): bf16 tiles, int8 x int8 tiles (amx_int8) for
 *                                            int8 weights with K % 64 == 0 and int4 in groups of 64
 *   (aarch64)   1       neon (asimd)         2 x 4-lane FMAs per 8 weights, 1-2 rows per pass; int8 with
 *                                            vmull_s8/vpadalq_s16, 4 rows per pass; not forcible by
 *                                            JNEOX_SIMD: tests/test_kernels_c.py under qemu
 * jneox_kernels_int8_dot() says which int8 arithmetic was built (3 vpdpbusd, 2 AVX2, 1 NEON, 0 scalar).
 * Tests: test_every_kernel_path_is_exact_and_batch_invariant[LEVEL-*] (decode rows 1..16, each
 * level), test_int8_kernel_gives_the_same_bits_on_every_path (every level against each other and a
 * float64 product of the same int8 activations), test_int4_g64_kernel_gives_the_same_bits_on_avx2_and_
 * avx512, test_every_prompt_kernel_path_is_exact_and_chunk_
 * invariant[LEVEL-*] (avx512, avx512bf16, amx), test_amx_prompts_are_exact_products,
 * test_prompt_blocks_unpack_exactly[LEVEL-*],
 * test_prompts_through_gemm_blocks[LEVEL-*] (each level), test_simd_level_comes_from_the_environment,
 * tests/test_kernels_c.py (natively and under qemu, 1..9 rows); `JNEOX_SIMD=avx2 make test` runs the
 * whole suite so.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* syscall(), for the AMX permission (jneox_amx) */
#endif
#include <stdint.h>
#include <math.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(__AVX2__)
#include <arm_neon.h>
#define NEON 1         /* 64-bit ARM (Apple Silicon, Graviton): 2 x 4-lane FMAs per 8 weights */
#endif

#define RT 4           /* output rows per tile */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define BF16_DOT 1     /* the prompt kernels' bf16 dot products (jneox_prompt_*) */
#endif
#ifndef PREFETCH
#define PREFETCH 1024  /* bytes ahead in the tile stream (into L1) */
#endif
#ifndef PF_AHEAD
#define PF_AHEAD (64 * 1024)  /* bytes ahead into L2: the next tile, at most this far (see PREFETCH_NEXT) */
#endif

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
#endif
#ifdef NEON
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
#endif

/* Streaming the weights from memory and the arithmetic must overlap. The L1 prefetch (PREFETCH
 * bytes ahead) is enough while one row is decoded, but a batch spends many cycles on each chunk
 * and memory latency then shows: weight stream and arithmetic took turns (a 16-row batch cost the
 * sum of both). So the first pass over a tile also pulls the bytes PF_AHEAD further on (the next
 * tile, for tiles up to that size) into L2, one line per line consumed. ``next`` is that address
 * for this tile, NULL on later passes over the same tile (rows 3+ on AVX2, 9+ on AVX-512), which
 * find it in cache. Measured on one Zen 4 core, a 2816x11264 fp32 weight: 16 rows 18 -> 12 ms
 * (8-row AVX-512 path), 1 row 7.7 -> 6.3 ms; a 2-layer model of the 3.6B shape, 1-2 rows: fp32
 * and bf16 10-50% faster. The int8 and int4 tiles were as fast or slower with it while their
 * arithmetic was the limit; since int8 rounds its activations to int8 and int4 has an AVX-512 tile,
 * it pays there too: 36 layers of the 3.6B shape, 1 row, 2 threads, one process alternating builds,
 * int8 4.19 -> 4.44 tok/s (median of 8, 7 pairs won) and int4 (AVX-512) 7.5 -> 8.3 (10 of 10),
 * int4 held to AVX2 6.95 -> 7.12 (7 of 8) on a Sapphire Rapids Xeon. */
#define PREFETCH_NEXT(next, offset)                                                          \
    if (next) __builtin_prefetch((next) + (offset), 0, 2) /* into L2 */
#define NEXT_TILE(W, tile_bytes)                                                              \
    (m == 0 && t + 1 < N / RT ? (const char *)(W) + (size_t)t * (tile_bytes) +              \
                                    ((tile_bytes) < PF_AHEAD ? (tile_bytes) : PF_AHEAD)      \
                              : NULL)


/* Each tile function computes the 4 rows of one tile for NM (1 or 2) rows of x at once, so a weight
 * chunk is widened once and used twice when decoding a batch. ALWAYS_INLINE + a constant NM at
 * each call site gives two specialised copies. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

#ifdef __AVX2__
/* fp32 and bf16 on AVX2 (no AVX-512): rows of x per pass over a tile for batches of 3+ rows, 4
 * accumulators each. Measured on one core (AVX2 build on the Xeon, 16 rows x a 512x1024 weight, best of
 * 3 runs on a shared machine): fp32 2 rows 422 us, 3 rows 267, 4 rows 329; bf16 2 rows 335, 3 rows 347,
 * 4 rows 307 (bf16's widening is shared by more rows; fp32 runs out of registers at 4). */
#define AVX2_F32_ROWS 3
#define AVX2_BF16_ROWS 4
#define ZERO8(a) for (int i_ = 0; i_ < 8; i_++) a[i_] = _mm256_setzero_ps()
#define FMA4(W0, W1, W2, W3, X, A)          \
    A[0] = _mm256_fmadd_ps(W0, X, A[0]);    \
    A[1] = _mm256_fmadd_ps(W1, X, A[1]);    \
    A[2] = _mm256_fmadd_ps(W2, X, A[2]);    \
    A[3] = _mm256_fmadd_ps(W3, X, A[3])
#endif

/* ---- f32 ------------------------------------------------------------------------------- */
ALWAYS_INLINE void f32_tile(const float *x, int NM, const float *w, const char *next, int K, float *dot) {
#ifdef __AVX2__
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
#elif defined(NEON)
    (void)next;
    float32x4_t a[8][2], wv[8];
    NEON_ZERO(a);
    for (int k = 0; k < K; k += 8, w += 32) {
        __builtin_prefetch((const char *)w + PREFETCH);
        for (int i = 0; i < 8; i++) wv[i] = vld1q_f32(w + 4 * i);
        for (int m = 0; m < NM; m++) NEON_FMA_ROWS(wv, x + (size_t)m * K + k, m, a);
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = NEON_SUM(a, i);
#else
    for (int i = 0; i < 4 * NM; i++) dot[i] = 0.f;
    for (int k = 0; k < K; k += 8, w += 32)
        for (int m = 0; m < NM; m++)
            for (int r = 0; r < RT; r++)
                for (int i = 0; i < 8; i++) dot[m * 4 + r] += w[r * 8 + i] * x[m * K + k + i];
#endif
}

/* ---- bf16 ------------------------------------------------------------------------------ */
ALWAYS_INLINE void bf16_tile(const float *x, int NM, const uint16_t *w, const char *next, int K, float *dot) {
#ifdef __AVX2__
    __m256 a[4 * AVX2_BF16_ROWS];
    for (int i = 0; i < 4 * NM; i++) a[i] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8, w += 32) {
        PREFETCH_NEXT(next, (size_t)k * 8);
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        __m256 w0 = bf16x8(w), w1 = bf16x8(w + 8), w2 = bf16x8(w + 16), w3 = bf16x8(w + 24);
        for (int m = 0; m < NM; m++) { FMA4(w0, w1, w2, w3, _mm256_loadu_ps(x + (size_t)m * K + k), (a + 4 * m)); }
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = hsum8(a[i]);
#elif defined(NEON)
    (void)next;
    float32x4_t a[8][2], wv[8];
    NEON_ZERO(a);
    for (int k = 0; k < K; k += 8, w += 32) {
        __builtin_prefetch((const char *)w + PREFETCH);
        for (int i = 0; i < 8; i++) wv[i] = neon_bf16x4(w + 4 * i);
        for (int m = 0; m < NM; m++) NEON_FMA_ROWS(wv, x + (size_t)m * K + k, m, a);
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = NEON_SUM(a, i);
#else
    for (int i = 0; i < 4 * NM; i++) dot[i] = 0.f;
    for (int k = 0; k < K; k += 8, w += 32)
        for (int m = 0; m < NM; m++)
            for (int r = 0; r < RT; r++)
                for (int i = 0; i < 8; i++) dot[m * 4 + r] += bf16_f32(w[r * 8 + i]) * x[m * K + k + i];
#endif
}

/* ---- int8 ------------------------------------------------------------------------------ */
/* The activations are rounded to int8 per block of G along K (xq, one fp32 scale xs per block; see
 * quantize_x) and multiplied with the int8 weights in integers. Widening every weight to fp32 instead
 * (cvtepi8_epi32 + cvtepi32_ps + an FMA per 8 weights and row) made int8 decode compute-bound on an
 * AVX2-only CPU: 2.70 tok/s at the 3.6B shape, against llama.cpp Q8_0's 3.42 (issue 15).
 * Each path computes the exact integer sums I[g][r][h] (block g, output row r, half h: the k with
 * k % 8 < 4, or >= 4) however it likes, then one fixed float order, the same on every path, so that a
 * row's bits depend neither on the batch nor on the instruction set:
 *     t[r][h] = fmaf((float)I[g][r][h], xs[g], t[r][h])   for g = 0, 1, ... in order
 *     dot[r]  = (t[r][0] + t[r][1]) * scale[r]
 * A chunk of 8 k x 4 rows is 32 bytes; as int32 lanes of maddubs/madd or dpbusd, lane 2r + h is I[r][h].
 *   AVX2: maddubs(|w|, x * sign(w)) then madd with ones (a pair is at most 2 * 127 * 127: no int16
 *     overflow), int32 adds over the block.
 *   VNNI (AVX512-VNNI with VL, or AVX-VNNI): dpbusd(x + 128, w) - dpbusd(128, w): one instruction per
 *     chunk and row of x (the sign trick costs two more), the correction one per chunk for all rows.
 *     256-bit registers (32 of them with AVX-512): a register holds 4 output rows, so INT8_ROWS rows of x
 *     share each weight chunk. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif
#if defined(__AVX512F__)
#define INT8_ROWS 8    /* 32 ymm registers: 2 per row of x */
#define INT8_GROUPS GROUPS_OF_8
#elif defined(__AVX2__) || defined(NEON)
#define INT8_ROWS 4    /* 16 ymm registers (AVX2); NEON: 4 x 4 int32 accumulators per row of x */
#define INT8_GROUPS GROUPS_OF_4
#else
#define INT8_ROWS 2
#define INT8_GROUPS GROUPS_OF_2
#endif

/* the block length for the activations' int8 rounding: 64 where K allows (one scale per 64, as int4) */
static inline int int8_block(int K) { return K % 64 == 0 ? 64 : K % 32 == 0 ? 32 : K % 16 == 0 ? 16 : 8; }

#ifdef __AVX2__
static inline __m256i bcast8(const void *p) { /* 8 bytes into all four 64-bit lanes (vpbroadcastq) */
    int64_t v;
    memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
}
#endif

/* xq: [NM][K] int8 (xu: the same + 128 as uint8, for DPBUSD), xs: row m's block scales at xs[m * K/G] */
ALWAYS_INLINE void int8_tile(const int8_t *xq, const uint8_t *xu, const float *xs, int NM, const int8_t *w, int K,
                             int G, const float *scale, const char *next, float *dot) {
    const int blocks = K / G;
    float t[INT8_ROWS][8];
#ifdef __AVX2__
    __m256 tv[INT8_ROWS];
    __m256i acc[INT8_ROWS];
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
#else
    (void)xu, (void)next;
    for (int m = 0; m < NM; m++)
        for (int i = 0; i < 8; i++) t[m][i] = 0.f;
    for (int g = 0; g < blocks; g++) {
        const size_t k0 = (size_t)g * G;
        int32_t I[INT8_ROWS][8];
#ifdef NEON
        int32x4_t acc[INT8_ROWS][RT];  /* lanes: products (0,1), (2,3), (4,5), (6,7) of row r's chunk */
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
#else
        for (int m = 0; m < NM; m++)
            for (int i = 0; i < 8; i++) I[m][i] = 0;
        for (int c = 0; c < G; c += 8, w += 32)
            for (int m = 0; m < NM; m++)
                for (int i = 0; i < 32; i++) I[m][i / 4] += w[i] * xq[(size_t)m * K + k0 + c + i % 8];
#endif
        for (int m = 0; m < NM; m++)
            for (int i = 0; i < 8; i++) t[m][i] = fmaf((float)I[m][i], xs[m * blocks + g], t[m][i]);
    }
#endif
    for (int m = 0; m < NM; m++)
        for (int r = 0; r < RT; r++) dot[4 * m + r] = (t[m][2 * r] + t[m][2 * r + 1]) * scale[r];
}

/* ---- int4 ------------------------------------------------------------------------------ */
/* dot(q - 8, x) over a group = dot(q, x) - 8 * sum(x): the offset is applied once per group
 * through the group's x-sum (xsum, computed once per call), not once per weight. */
ALWAYS_INLINE void int4_tile(const float *x, const float *xsum, int NM, const uint8_t *w, const uint16_t *s,
                             int K, int G, float *dot) {
    int groups = K / G, half = G / 2;
    float corr[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#ifdef __AVX2__
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
#elif defined(NEON)
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
#else
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
#endif
}

#if defined(__AVX512BW__)
/* int4 x int8 for groups of 64 with AVX-512 (BW): the AVX2 tile below, two output rows per 512-bit
 * register (a row's 32 bytes of a group are next to the next row's), the four rows' scale products in
 * one vector. Lane for lane the same integer sums, the same fp32 multiplies, FMAs and corrections in
 * the same order, and the same final sums: a row gets the AVX2 tile's bits (tested), with about 2.5x
 * fewer instructions per weight, which int4 decode was bound by: one 5632x1024 linear from cache, 1
 * row, 2 threads, 51.5 -> 66.0 GMAC/s (11264x2816: 55 -> 75) on a Sapphire Rapids Xeon. */
ALWAYS_INLINE void int4x8_tile(const int8_t *xq, const float *xs, const int32_t *xqsum, int NM, const uint8_t *w,
                               const uint16_t *s, const char *next, int K, float *dot) {
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
        __m512i lo01 = _mm512_and_si512(q01, nib), hi01 = _mm512_and_si512(_mm512_srli_epi16(q01, 4), nib);
        __m512i lo23 = _mm512_and_si512(q23, nib), hi23 = _mm512_and_si512(_mm512_srli_epi16(q23, 4), nib);
        __m128 ws = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)s));
        for (int m = 0; m < NM; m++) {
            const int8_t *xg = xq + (size_t)m * K + (size_t)g * G;
            __m512i x0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xg));
            __m512i x1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xg + 32)));
            __m128 sa = _mm_mul_ps(ws, _mm_set1_ps(xs[m * groups + g])); /* ws * xs[g], row by row */
            __m512 sa4 = _mm512_castps128_ps512(sa);
            __m512i p01 = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo01, x0), _mm512_maddubs_epi16(hi01, x1)), ones);
            __m512i p23 = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo23, x0), _mm512_maddubs_epi16(hi23, x1)), ones);
            tot[2 * m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), _mm512_permutexvar_ps(rows01, sa4), tot[2 * m]);
            tot[2 * m + 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), _mm512_permutexvar_ps(rows23, sa4), tot[2 * m + 1]);
            corr[m] = _mm_add_ps(corr[m], _mm_mul_ps(sa, _mm_set1_ps((float)xqsum[m * groups + g])));
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
#elif defined(__AVX2__)
/* int4 x int8 for groups of 64: the activations of each group are rounded to int8 (xq, with one
 * fp32 scale per group: xs) once per call; maddubs multiplies the 32 unsigned nibbles of a half
 * group by 32 int8 activations into 16-bit pairs (at most 2*15*127 each: no overflow). */
ALWAYS_INLINE void int4x8_tile(const int8_t *xq, const float *xs, const int32_t *xqsum, int NM, const uint8_t *w,
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
            corr[r] += sa * (float)xqsum[g];
            if (NM == 2) {
                __m256i pb = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xb0), _mm256_maddubs_epi16(hi, xb1)), ones);
                float sb = ws * xs[groups + g];
                tot[4 + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb), _mm256_set1_ps(sb), tot[4 + r]);
                corr[4 + r] += sb * (float)xqsum[groups + g];
            }
        }
    }
    for (int i = 0; i < 4 * NM; i++) dot[i] = hsum8(tot[i]) - 8.f * corr[i];
}
#endif

#ifdef __AVX512F__
/* ---- AVX-512: up to 8 rows of x per pass over a tile ------------------------------------------
 * A batch of decode rows is compute-bound. With 2 rows per pass, 16 rows pass over every tile 8
 * times at 3 loads per 4 FMAs. Here a 512-bit register holds one chunk of two output rows (2 x 8 k),
 * x's 8 values are broadcast into both halves, and each widened weight chunk serves up to 8 rows of
 * x (16 accumulators): 2 passes, 5 loads per 8 FMAs. Measured on one Zen 4 core, 16 rows x a
 * 2816x11264 fp32 weight: 33 -> 18 ms, 10-12 ms with PREFETCH_NEXT (~9 ms is the FMA limit).
 * Lane by lane this is the AVX2 tile's arithmetic (the same widening, the same FMAs in the same
 * order, the same final horizontal sums), so a row's result is bit-identical whichever path ran
 * and however many rows came with it: batching changes nothing but speed. (fp32 and bf16; int8 takes
 * int8_tile, 8 rows per pass on 256-bit registers: 16 rows x a 1024x1024 int8 weight on one Xeon core,
 * 316 us with the former 8-row widening path here, 280-310 us with vpdpbusd.) */
#define MR 8
#define MR_FROM 3  /* 1-2 rows: the AVX2 tiles are as fast (memory-bound) */
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

ALWAYS_INLINE void f32_tile_mr(const float *x, int NM, const float *w, const char *next, int K, float *dot) {
    __m512 a[2 * MR];
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

ALWAYS_INLINE void bf16_tile_mr(const float *x, int NM, const uint16_t *w, const char *next, int K, float *dot) {
    __m512 a[2 * MR];
    for (int i = 0; i < 2 * NM; i++) a[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 8, w += 32) {
        PREFETCH_NEXT(next, (size_t)k * 8);
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        __m512 w01 = bf16x16(w), w23 = bf16x16(w + 16);
        FMA_ROWS(NM, w01, w23, x, K, k, a)
    }
    reduce_rows(a, NM, dot);
}

#endif

/* ---- entry points: rows of x in groups of G, tiles of W split over the threads ---------------
 * (G: INT8_ROWS, AVX2_F32_ROWS, AVX2_BF16_ROWS, MR, or DP_ROWS for the prompt kernels); a constant NM at
 * each case gives one specialised copy per group size */
#define CASES_1_TO_7(TILE_CALL)                                                                \
    case 1: TILE_CALL(1); break;                                                                \
    case 2: TILE_CALL(2); break;                                                                \
    case 3: TILE_CALL(3); break;                                                                \
    case 4: TILE_CALL(4); break;                                                                \
    case 5: TILE_CALL(5); break;                                                                \
    case 6: TILE_CALL(6); break;                                                                \
    case 7: TILE_CALL(7); break;
#define GROUPS_OF_2(TILE_CALL) case 1: TILE_CALL(1); break; default: TILE_CALL(2); break;
#define GROUPS_OF_3(TILE_CALL) case 1: TILE_CALL(1); break; case 2: TILE_CALL(2); break; default: TILE_CALL(3); break;
#define GROUPS_OF_4(TILE_CALL) case 1: TILE_CALL(1); break; case 2: TILE_CALL(2); break; case 3: TILE_CALL(3); break; \
    default: TILE_CALL(4); break;
#define GROUPS_OF_8(TILE_CALL) CASES_1_TO_7(TILE_CALL) default: TILE_CALL(8); break;
#define GROUPS_OF_16(TILE_CALL)                                                                 \
    CASES_1_TO_7(TILE_CALL)                                                                    \
    case 8: TILE_CALL(8); break;                                                                \
    case 9: TILE_CALL(9); break;                                                                \
    case 10: TILE_CALL(10); break;                                                              \
    case 11: TILE_CALL(11); break;                                                              \
    case 12: TILE_CALL(12); break;                                                              \
    case 13: TILE_CALL(13); break;                                                              \
    case 14: TILE_CALL(14); break;                                                              \
    case 15: TILE_CALL(15); break;                                                              \
    default: TILE_CALL(16); break;
#define FOR_TILES_AND_GROUPS_OF(G, CASES, TILE_CALL)                                            \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                           \
    for (int t = 0; t < N / RT; t++) {                                                          \
        float dot[4 * G];                                                                       \
        const int n0 = t * RT;                                                                  \
        for (int m = 0; m < M; m += G) {                                                        \
            const int nm = M - m < G ? M - m : G;                                               \
            switch (nm) { CASES(TILE_CALL) }                                                    \
            for (int i = 0; i < 4 * nm; i++)                                                    \
                y[(size_t)(m + i / 4) * N + n0 + i % 4] = dot[i] + (bias ? bias[n0 + i % 4] : 0.f); \
        }                                                                                       \
    }

#define FOR_TILES_AND_ROW_PAIRS(TILE_CALL) FOR_TILES_AND_GROUPS_OF(2, GROUPS_OF_2, TILE_CALL)

/* fp32 and bf16: AVX-512 takes 1-2 rows with the tiles above and MR_FROM rows or more with the 8-row
 * path; AVX2 takes AVX2_ROWS (3 or 4) rows per pass with the same tile function (the same bits per row) */
#ifdef __AVX512F__
#define BY_ROW_COUNT(MR_CALL, ROWS_CALL, AVX2_ROWS)                                             \
    if (M >= MR_FROM) { FOR_TILES_AND_GROUPS_OF(MR, GROUPS_OF_8, MR_CALL) } else { FOR_TILES_AND_ROW_PAIRS(ROWS_CALL) }
#elif defined(__AVX2__)
#define GROUPS_OF(G) GROUPS_OF_EXPANDED(G) /* GROUPS_OF(AVX2_F32_ROWS) -> GROUPS_OF_3 */
#define GROUPS_OF_EXPANDED(G) GROUPS_OF_##G
#define BY_ROW_COUNT(MR_CALL, ROWS_CALL, AVX2_ROWS) FOR_TILES_AND_GROUPS_OF(AVX2_ROWS, GROUPS_OF(AVX2_ROWS), ROWS_CALL)
#else
#define BY_ROW_COUNT(MR_CALL, ROWS_CALL, AVX2_ROWS) FOR_TILES_AND_ROW_PAIRS(ROWS_CALL)
#endif

void jneox_linear_f32(const float *x, const float *W, const float *bias, float *y,
                      int M, int N, int K, int threads) {
#define MR_CALL(NM) f32_tile_mr(x + (size_t)m * K, NM, W + (size_t)t * RT * K, NEXT_TILE(W, RT * K * 4), K, dot)
#define ROWS_CALL(NM) f32_tile(x + (size_t)m * K, NM, W + (size_t)t * RT * K, NEXT_TILE(W, RT * K * 4), K, dot)
    BY_ROW_COUNT(MR_CALL, ROWS_CALL, AVX2_F32_ROWS)
#undef MR_CALL
#undef ROWS_CALL
}

void jneox_linear_bf16(const float *x, const uint16_t *W, const float *bias, float *y,
                       int M, int N, int K, int threads) {
#define MR_CALL(NM) bf16_tile_mr(x + (size_t)m * K, NM, W + (size_t)t * RT * K, NEXT_TILE(W, RT * K * 2), K, dot)
#define ROWS_CALL(NM) bf16_tile(x + (size_t)m * K, NM, W + (size_t)t * RT * K, NEXT_TILE(W, RT * K * 2), K, dot)
    BY_ROW_COUNT(MR_CALL, ROWS_CALL, AVX2_BF16_ROWS)
#undef MR_CALL
#undef ROWS_CALL
}

/* Rounds each row of x to int8 per group of G (one fp32 scale each: xs = max|x| / 127), into scratch:
 * xsum (the fp32 group sums), xs, xqsum (the int8 group sums) as [M][K/G], then xq [M][K]. */
static int8_t *quantize_x(const float *x, int M, int K, int G, void *scratch, int threads) {
    const int groups = K / G;
    float *xsum = (float *)scratch, *xs = xsum + M * groups;
    int32_t *xqsum = (int32_t *)(xs + M * groups);
    int8_t *xq = (int8_t *)(xqsum + M * groups);
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 8)
    for (int mg = 0; mg < M * groups; mg++) {
        const int m = mg / groups, g = mg % groups;
        const float *xg = x + (size_t)m * K + (size_t)g * G;
        float sum = 0.f, amax = 0.f;
        for (int j = 0; j < G; j++) {
            sum += xg[j];
            amax = amax > fabsf(xg[j]) ? amax : fabsf(xg[j]);
        }
        xsum[mg] = sum;
        float sc = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t qsum = 0;
        for (int j = 0; j < G; j++) {
            int v = (int)lrintf(xg[j] * inv);
            xq[(size_t)m * K + (size_t)g * G + j] = (int8_t)v;
            qsum += v;
        }
        xs[mg] = sc;
        xqsum[mg] = qsum;
    }
    return xq;
}

/* scratch: caller-provided, at least 2*M*K + 12*M*(K/8) bytes (see quantize_x; then x + 128 for DPBUSD) */
void jneox_linear_int8(const float *x, const int8_t *W, const float *scale, const float *bias, float *y,
                       int M, int N, int K, void *scratch, int threads) {
    const int G = int8_block(K), blocks = K / G;
    const int8_t *xq = quantize_x(x, M, K, G, scratch, threads);
    const float *xs = (const float *)scratch + M * blocks;
    uint8_t *xu = (uint8_t *)xq + (size_t)M * K;
#ifdef DPBUSD
    for (size_t i = 0; i < (size_t)M * K; i++) xu[i] = (uint8_t)(xq[i] ^ 0x80); /* x + 128 */
#endif
#define CALL(NM) int8_tile(xq + (size_t)m * K, xu + (size_t)m * K, xs + m * blocks, NM, W + (size_t)t * RT * K, K, G, \
                           scale + t * RT, NEXT_TILE(W, RT * K), dot)
    FOR_TILES_AND_GROUPS_OF(INT8_ROWS, INT8_GROUPS, CALL)
#undef CALL
}

/* scratch: caller-provided, at least M*K + 12*M*(K/G) bytes. With AVX2 and G == 64 the activations
 * are rounded to int8 per group (see int4x8_tile); otherwise the fp32 path runs. */
void jneox_linear_int4(const float *x, const uint8_t *W, const uint16_t *scale, const float *bias, float *y,
                       int M, int N, int K, int G, void *scratch, int threads) {
    const int groups = K / G;
    const int8_t *xq = quantize_x(x, M, K, G, scratch, threads);
    const float *xsum = (const float *)scratch, *xs = xsum + M * groups;
    const int32_t *xqsum = (const int32_t *)(xs + M * groups);
#ifdef __AVX2__
    if (G == 64) {
#define CALL(NM) int4x8_tile(xq + (size_t)m * K, xs + m * groups, xqsum + m * groups, NM, W + (size_t)t * RT * K / 2, \
                             scale + (size_t)t * RT * groups, NEXT_TILE(W, RT * K / 2), K, dot)
        FOR_TILES_AND_ROW_PAIRS(CALL)
#undef CALL
        return;
    }
#else
    (void)xq, (void)xs, (void)xqsum;
#endif
#define CALL(NM) int4_tile(x + (size_t)m * K, xsum + m * groups, NM, W + (size_t)t * RT * K / 2, \
                           scale + (size_t)t * RT * groups, K, G, dot)
    FOR_TILES_AND_ROW_PAIRS(CALL)
#undef CALL
}

/* ---- prompts with bf16 or int8 weights: AVX-512 BF16 dot products ---------------------------
 * A prompt is compute-bound, and vdpbf16ps multiplies 32 bf16 pairs per instruction where an fp32
 * FMA does 16 (measured on Zen 4: 220 vs 112 GFLOP/s per core). The activations must be bf16
 * (xb: x rounded to bf16 by the caller, [M][K]), so this is for prompts only, as oneDNN's bf16
 * matmul was before it: decode keeps fp32 activations. One bf16 chunk (4 output rows x 8 k) is one
 * register, 128-bit block r holding row r; x's 8 values are broadcast to the four blocks, and lane
 * j of block r accumulates row r's pairs (2j, 2j+1): one accumulator per row of x, up to 16 rows per
 * pass (int8 13% faster than 8 rows: its widening is shared by more rows; bf16 the same). Each row
 * is computed on its own, so a prompt gives the same bits in chunks or whole. */
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
    for (int m = 0; m < NM; m++) {  /* the four lanes of each 128-bit block summed: one output row each */
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

/* ---- prompts through the library GEMM: tiles back to plain rows -----------------------------
 * A prompt is compute-bound: the fastest multiply on most CPUs is PyTorch's own GEMM (MKL's sgemm;
 * oneDNN's bf16 matmul on AMX / AVX-512 BF16). quantize.py feeds it one block of output rows at a
 * time, re-laid out (and dequantized) by this function into a plain [rows][K] buffer reused for
 * every block, instead of widening the whole weight to a fresh matrix at every prompt. Writes tiles
 * t0..t1-1 (output rows 4*t0 .. 4*t1-1) as fp32 (out_bf16 0) or bf16 (out_bf16 1, rounded to
 * nearest even; exact for bf16 and int8 weights). fmt: 0 f32, 1 bf16, 2 int8 (unscaled: the caller
 * scales the output columns, so bf16 stays exact), 3 int4 (times its fp16 group scales). */
static inline uint16_t f32_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

void jneox_unpack_rows(int fmt, const void *W, const uint16_t *scale, int K, int G, int t0, int t1, void *out,
                       int out_bf16, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (int t = t0; t < t1; t++) {
        for (int r = 0; r < RT; r++) {
            size_t row = (size_t)(t - t0) * RT + r;
            float *of = (float *)out + row * K;
            uint16_t *ob = (uint16_t *)out + row * K;
            if (fmt == 3) { /* [N/4][K/G][4][G/2] bytes, fp16 scale [N/4][K/G][4] */
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
                    float v = fmt == 0 ? ((const float *)W)[at + j]
                            : fmt == 1 ? bf16_f32(((const uint16_t *)W)[at + j]) : (float)((const int8_t *)W)[at + j];
                    if (out_bf16) ob[c * 8 + j] = fmt == 1 ? ((const uint16_t *)W)[at + j] : f32_bf16(v);
                    else of[c * 8 + j] = v;
                }
            }
        }
    }
}

/* ---- prompts on AMX: tile matrix multiplies straight from the packed weights -------------------
 * With AMX (Intel Xeon since Sapphire Rapids) one tdpbf16ps multiplies a 16x32 bf16 tile by a 32x16 one,
 * 16 times the work of an AVX-512 dot product instruction. oneDNN's bf16 matmul reaches it only from a
 * plain-layout weight, so the block path (above) re-laid out all 7.2 GB of a 3.6B model's bf16 tiles per
 * prompt and oneDNN then reordered them again: 2.6 s for 128 tokens, against transformers' 1.6-1.8 s
 * (issue 15). Here each thread re-lays out 32 output rows x one K block of the packed weight at a time
 * into AMX tiles in its own cache (bf16 copied, int8 widened exactly, int4 times its scale and rounded to
 * bf16 as jneox_unpack_rows does), the next 32 rows between the tile multiplies of these (the vector units
 * re-lay out while the tile unit multiplies), and multiplies them with every row of the prompt: the weight
 * is read from memory once per call, whatever the prompt's length.
 *   A tiles: 16 output rows x 32 k of the re-laid out weight (64 bytes a row);
 *   B tiles: 32 k x 16 prompt rows in AMX's pair layout (row p: each prompt row's bf16 pair 2p, 2p+1), made
 *            once per call from x, in K blocks whose B tiles stay in L2 (AMX_KBLOCK_BYTES);
 *   C tiles: 16 output rows x 16 prompt rows, fp32, kept in the scratch between K blocks and written to
 *            y[m][n] (times the int8 row scale, plus bias) after the last.
 * int8 weights with K % 64 == 0 multiply int8 x int8 tiles instead (tdpbssd, 16x16 outputs x 64 k): the
 * activations rounded to int8 per block of 64 exactly as quantize_x rounds them for the decode kernel, the
 * weight re-laid out without widening, each block's exact int32 sums times its row's block scale added
 * up in fp32 (the decode kernel's integer sums in another float order: a prompt row is its decode row
 * to ~1e-7). The per-block float work costs about what the widening did: measured on a shared machine
 * (128 rows, 2 threads) 2816->8448 about even, 11264->2816 10-30% faster.
 * int4 weights in groups of 64 take the same int8 tiles: the nibbles minus 8 are exact int8, a group is
 * one activation block, and each block sum is scaled by the weight row's group scale times the prompt
 * row's block scale, the product the decode kernel (int4x8_tile) multiplies by: a prompt row is its decode
 * row to ~1e-7, where bf16 tiles rounded the dequantized weight and the activations to bf16. 36 layers of
 * the 3.6B shape, 128 tokens, 2 threads, the two builds alternated in one process: 2227-2363 ms with bf16
 * tiles, 1352-1385 ms with int8 tiles.
 * Each output is one fixed sequence of tile multiplies over k whatever the other rows, so a row's bits depend
 * neither on the prompt's length nor on its split (tests: test_every_prompt_kernel_path_is_exact_and_chunk_
 * invariant[amx-*], test_amx_prompts_are_exact_products). Needs K % 32 == 0 (int4:
 * G % 32 == 0); quantize.py sends anything else to the other paths. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(BF16_DOT) && defined(__linux__)
#define AMX 1
#include <sys/syscall.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <unistd.h>
#ifdef __AMX_INT8__
#define AMX_INT8 1
#else
#define AMX_INT8 0
#endif
#define AMX_KBLOCK_BYTES (1 << 20) /* a K block's slice of the B tiles (the prompt's activations): stays in L2 */

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } amx_config;

/* rows 4*t .. 4*t+3 of the weight, k0 .. k0+31, as 4 rows of 32 bf16 at dst (64 bytes apart) */
static inline void amx_rows(int fmt, const void *W, const uint16_t *scale, int K, int G, int t, int k0, uint16_t *dst) {
    if (fmt == 1) { /* bf16 [N/4][K/8][4][8]: 4 chunks of 64 bytes; 128-bit block r of each is row r */
        const uint16_t *src = (const uint16_t *)W + (size_t)t * RT * K + (size_t)k0 * RT;
        __m512i v0 = _mm512_loadu_si512(src), v1 = _mm512_loadu_si512(src + 32), v2 = _mm512_loadu_si512(src + 64),
                v3 = _mm512_loadu_si512(src + 96);
        __m512i t0 = _mm512_shuffle_i32x4(v0, v1, 0x44), t1 = _mm512_shuffle_i32x4(v0, v1, 0xEE),
                t2 = _mm512_shuffle_i32x4(v2, v3, 0x44), t3 = _mm512_shuffle_i32x4(v2, v3, 0xEE);
        _mm512_storeu_si512(dst, _mm512_shuffle_i32x4(t0, t2, 0x88));
        _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(t0, t2, 0xDD));
        _mm512_storeu_si512(dst + 64, _mm512_shuffle_i32x4(t1, t3, 0x88));
        _mm512_storeu_si512(dst + 96, _mm512_shuffle_i32x4(t1, t3, 0xDD));
    } else if (fmt == 2) { /* int8 [N/4][K/8][4][8]: 4 chunks of 32 bytes; 64-bit lane r of each is row r */
        const int8_t *src = (const int8_t *)W + (size_t)t * RT * K + (size_t)k0 * RT;
        __m256i c0 = _mm256_loadu_si256((const __m256i *)src), c1 = _mm256_loadu_si256((const __m256i *)(src + 32)),
                c2 = _mm256_loadu_si256((const __m256i *)(src + 64)), c3 = _mm256_loadu_si256((const __m256i *)(src + 96));
        __m256i t0 = _mm256_unpacklo_epi64(c0, c1), t1 = _mm256_unpackhi_epi64(c0, c1),
                t2 = _mm256_unpacklo_epi64(c2, c3), t3 = _mm256_unpackhi_epi64(c2, c3);
        __m256i row[4] = {_mm256_permute2x128_si256(t0, t2, 0x20), _mm256_permute2x128_si256(t1, t3, 0x20),
                          _mm256_permute2x128_si256(t0, t2, 0x31), _mm256_permute2x128_si256(t1, t3, 0x31)};
        for (int r = 0; r < RT; r++) {
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(row[r])));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(row[r], 1)));
            _mm512_storeu_si512(dst + 32 * r, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)); /* exact: |q| <= 127 */
        }
    } else { /* int4 [N/4][K/G][4][G/2] bytes, fp16 scales [N/4][K/G][4]; G % 32 == 0: 16 k in one half-group */
        const int half = G / 2;
        for (int r = 0; r < RT; r++) {
            __m512 p[2];
            for (int h = 0; h < 2; h++) {
                const int k = k0 + 16 * h, g = k / G, j = k % G;
                const uint8_t *b = (const uint8_t *)W + (size_t)t * RT * K / 2 + ((size_t)g * RT + r) * half + j % half;
                __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
                if (j >= half) q = _mm512_srli_epi32(q, 4);
                q = _mm512_sub_epi32(_mm512_and_si512(q, _mm512_set1_epi32(15)), _mm512_set1_epi32(8));
                float sc = f16_f32(scale[(size_t)t * RT * (K / G) + (size_t)g * RT + r]);
                p[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(sc));
            }
            _mm512_storeu_si512(dst + 32 * r, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0])); /* to nearest even */
        }
    }
}

/* unit u of an n-block's re-layout (unit = 4 rows x 32 k: u % 8 the 4 rows, u / 8 the 32 k) into a
 * [kb/32][32 rows][32] buffer; rows past N are zeros */
static inline void amx_pack_unit(int fmt, const void *W, const uint16_t *scale, int K, int G, int N, int nb, int k0,
                                 int u, uint16_t *a) {
    const int tl = u % 8, s = u / 8, t = nb * 8 + tl;
    uint16_t *dst = a + ((size_t)s * 32 + (size_t)tl * RT) * 32;
    if (t * RT < N && fmt != 3) { /* this tile's stream 4 units on (int8 10-20% faster on one core of the shared machine) */
        const int bytes = fmt == 1 ? 256 : 128;
        const char *p = (const char *)W + ((size_t)t * RT * K + (size_t)(k0 + 32 * s) * RT) * (fmt == 1 ? 2 : 1);
        for (int i = 0; i < bytes; i += 64) _mm_prefetch(p + 4 * bytes + i, _MM_HINT_T0);
    }
    if (t * RT < N) amx_rows(fmt, W, scale, K, G, t, k0 + 32 * s, dst);
    else memset(dst, 0, RT * 64);
}

/* int8 x int8 tiles (tdpbssd), for int8 weights where K % 64 == 0: unit u = 4 rows x 64 k (one activation
 * block) of n-block nb, as 4 rows of 64 bytes into [kb/64][32 rows][64]; rows past N are zeros */
static inline void amx_pack_unit8(const int8_t *W, int K, int N, int nb, int k0, int u, int8_t *a) {
    const int tl = u % 8, s = u / 8, t = nb * 8 + tl;
    int8_t *dst = a + ((size_t)s * 32 + (size_t)tl * RT) * 64;
    if (t * RT >= N) {
        memset(dst, 0, RT * 64);
        return;
    }
    const int8_t *src = W + (size_t)t * RT * K + (size_t)(k0 + 64 * s) * RT; /* 8 chunks [4 rows][8 bytes] */
    for (int i = 0; i < 256; i += 64) _mm_prefetch((const char *)src + 4 * 256 + i, _MM_HINT_T0);
    __m512i v0 = _mm512_loadu_si512(src), v1 = _mm512_loadu_si512(src + 64), v2 = _mm512_loadu_si512(src + 128),
            v3 = _mm512_loadu_si512(src + 192); /* 64-bit lane 4h + r of v_i: chunk 2i + h, row r */
    for (int r = 0; r < RT; r++) {
        const __m512i idx = _mm512_setr_epi64(r, 4 + r, 8 + r, 12 + r, r, 4 + r, 8 + r, 12 + r);
        _mm512_storeu_si512(dst + 64 * r, _mm512_mask_blend_epi64(0xF0, _mm512_permutex2var_epi64(v0, idx, v1),
                                                                  _mm512_permutex2var_epi64(v2, idx, v3)));
    }
}

/* int4 weights in groups of 64 as int8 tiles: unit u = 4 rows x one group (64 k) of n-block nb, the
 * nibbles minus 8 (exact, -8..7) as 4 rows of 64 bytes into [kb/64][32 rows][64], and the rows' group
 * scales (fp32) into ws [kb/64][32]; rows past N are zeros */
static inline void amx_pack_unit4(const uint8_t *W, const uint16_t *scale, int K, int N, int nb, int k0, int u,
                                  int8_t *a, float *ws) {
    const int tl = u % 8, s = u / 8, t = nb * 8 + tl, g = k0 / 64 + s;
    int8_t *dst = a + ((size_t)s * 32 + (size_t)tl * RT) * 64;
    float *wd = ws + (size_t)s * 32 + (size_t)tl * RT;
    if (t * RT >= N) {
        memset(dst, 0, RT * 64);
        memset(wd, 0, RT * sizeof(float));
        return;
    }
    const uint8_t *src = W + (size_t)t * RT * K / 2 + (size_t)g * RT * 32; /* 4 rows x 32 bytes */
    _mm_prefetch((const char *)src + 4 * 128, _MM_HINT_T0);
    _mm_prefetch((const char *)src + 4 * 128 + 64, _MM_HINT_T0);
    const __m256i nib = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    for (int r = 0; r < RT; r++) { /* byte j: k = j in its low nibble, k = 32 + j in its high one */
        const __m256i v = _mm256_loadu_si256((const __m256i *)(src + 32 * r));
        _mm256_storeu_si256((__m256i *)(dst + 64 * r), _mm256_sub_epi8(_mm256_and_si256(v, nib), eight));
        _mm256_storeu_si256((__m256i *)(dst + 64 * r + 32),
                            _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), nib), eight));
        wd[r] = f16_f32(scale[(size_t)t * RT * (K / 64) + (size_t)g * RT + r]);
    }
}

/* unit u of an n-block's int8 tiles: int8 weights (amx_pack_unit8), or int4 in groups of 64 (amx_pack_unit4,
 * its scales in the second half of the buffer a, which the int8 tiles leave free) */
static inline void amx_pack_i8(int fmt, const void *W, const void *scale, int K, int N, int nb, int k0, int u,
                               uint16_t *a, int kblock) {
    if (fmt == 2) amx_pack_unit8((const int8_t *)W, K, N, nb, k0, u, (int8_t *)a);
    else amx_pack_unit4((const uint8_t *)W, (const uint16_t *)scale, K, N, nb, k0, u, (int8_t *)a,
                        (float *)((char *)a + (size_t)32 * kblock));
}

/* a 16x16 fp32 block transposed in registers (r[i] row i in, column i out): 64 shuffles where 16
 * gathers cost 256 loads */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + j], 128-bit lane l: rows 4i..4i+3 of column 4l + j */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) { /* lanes l of r[j], r[4+j], r[8+j], r[12+j] together: column 4l + j */
        __m512 t0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), t1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE),
               t2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44), t3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
        t[j] = _mm512_shuffle_f32x4(t0, t2, 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(t1, t3, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* a C tile (16 output rows n0.. x 16 prompt rows m0.., row-major at c) into y[m][n] (times the int8 row
 * scale, plus bias) */
static inline void amx_out(int fmt, const float *c, const float *scale, const float *bias, float *y, int M, int N,
                           int n0, int m0) {
    const __mmask16 live = N - n0 >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
    __m512 sc = fmt == 2 ? _mm512_maskz_loadu_ps(live, scale + n0) : _mm512_set1_ps(1.f);
    __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + n0) : _mm512_setzero_ps();
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(c + 16 * i);
    transpose16(r);
    for (int m = 0; m < 16 && m0 + m < M; m++)
        _mm512_mask_storeu_ps(y + (size_t)(m0 + m) * N + n0, live, _mm512_fmadd_ps(r[m], sc, b));
}

/* the K block: its B tiles (AMX_KBLOCK_BYTES) stay in L2 */
static inline int amx_kblock(int Mp, int K) {
    int kblock = AMX_KBLOCK_BYTES / (Mp * 2) / 32 * 32;
    kblock = kblock < 256 ? 256 : kblock;
    return K < kblock ? K : kblock;
}
#endif

/* whether the AMX prompt kernel runs here: built with AMX, and Linux lets this process use the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; kernels before 5.16 refuse it) */
int jneox_amx(void) {
#ifdef AMX
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

/* the scratch jneox_prompt_amx needs (0 without AMX): the B tiles, the C tiles, and each thread's two
 * re-laid out blocks of weight rows (an allocation of their own per call cost page faults every call) */
long jneox_prompt_amx_scratch(int M, int N, int K, int threads) {
#ifdef AMX
    const long Mp = (M + 31) / 32 * 32;
    return (long)K * Mp * 2 + (long)(N + 31) / 32 * 32 * Mp * 4 + (long)threads * 2 * 64 * amx_kblock((int)Mp, K);
#else
    (void)M, (void)N, (void)K, (void)threads;
    return 0;
#endif
}

/* x: [M][K] fp32 (rounded to bf16 here, to nearest even, or to int8 per block of 64 for the int8 tiles);
 * fmt: 1 bf16, 2 int8 (scale: fp32 per output row),
 * 3 int4 (scale: fp16 groups of G); scratch: jneox_prompt_amx_scratch bytes, 64-byte aligned; y: [M][N];
 * N: output rows padded to tiles of 4 */
void jneox_prompt_amx(int fmt, const float *x, const void *W, const void *scale, const float *bias, float *y,
                      int M, int N, int K, int G, void *scratch, int threads) {
#ifdef AMX
    if (!jneox_amx()) return; /* never so from quantize.py, which asks jneox_amx first (a ~1 us syscall) */
    const int Mp = (M + 31) / 32 * 32, mt = Mp / 16, nblocks = (N + 31) / 32;
    /* int8 weights with K % 64 == 0, and int4 in groups of 64: int8 x int8 tiles (tdpbssd) on activations
     * rounded to int8 per block of 64, as the decode kernel rounds them; each block's int32 sums times its
     * scale (int4: times the group scale too), summed in fp32 */
    const int i8 = ((fmt == 2 && K % 64 == 0) || (fmt == 3 && G == 64)) && AMX_INT8, sw = i8 ? 64 : 32; /* k per step */
    /* B tiles, [K/sw][Mp/16][16 pairs or quads][16 rows] (each tile 1 KB in a row; int8: then the block scales
     * [K/64][Mp]), then C tiles [N/16][Mp/16][16][16] (int8: the fp32 sums) */
    uint32_t *xt = (uint32_t *)scratch;
    float *xs = (float *)((char *)scratch + (size_t)K * Mp);
    float *ct = (float *)((char *)scratch + (size_t)K * Mp * 2);
    const int kblock = i8 ? amx_kblock(Mp, K) / 64 * 64 : amx_kblock(Mp, K);
    uint16_t *blocks = (uint16_t *)(ct + (size_t)nblocks * 32 * Mp);
    _Pragma("omp parallel num_threads(threads)")
    {
        _Pragma("omp for schedule(static)")
        for (int ms = 0; ms < mt * (K / sw); ms++) { /* one 16-row x sw-k piece of x into its B tile */
            const int mb = ms % mt, s = ms / mt;
            __m512 r[16]; /* row m: its 16 bf16 pairs (int8 quads); transposed: row p, the 16 rows' pair p */
            for (int m = 0; m < 16; m++) {
                const int row = mb * 16 + m;
                const float *src = x + (size_t)row * K + (size_t)s * sw;
                if (row >= M) {
                    r[m] = _mm512_setzero_ps();
                    if (i8) xs[(size_t)s * Mp + row] = 0.f;
                } else if (!i8) {
                    r[m] = (__m512)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
                } else { /* rounded to int8 as quantize_x does for the decode kernel: one scale per 64 */
                    __m512 f[4], am = _mm512_setzero_ps();
                    for (int i = 0; i < 4; i++) f[i] = _mm512_loadu_ps(src + 16 * i), am = _mm512_max_ps(am, _mm512_abs_ps(f[i]));
                    const float amax = _mm512_reduce_max_ps(am), inv = amax > 0.f ? 127.f / amax : 0.f;
                    __m128i q[4];
                    for (int i = 0; i < 4; i++)
                        q[i] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(f[i], _mm512_set1_ps(inv))));
                    __m512i v = _mm512_castsi128_si512(q[0]);
                    v = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(v, q[1], 1), q[2], 2), q[3], 3);
                    r[m] = (__m512)v;
                    xs[(size_t)s * Mp + row] = amax / 127.f;
                }
            }
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_store_ps((float *)(xt + ((size_t)s * mt + mb) * 256 + 16 * p), r[p]);
        }
        /* (the omp for's barrier: every B tile is written before the first multiply) */
        amx_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
        _tile_loadconfig(&cfg);
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int tid = 0, nth = 1;
#endif
        const int lo = (int)((long)nblocks * tid / nth), hi = (int)((long)nblocks * (tid + 1) / nth);
        float c[256] __attribute__((aligned(64)));
        int32_t ci[4][256] __attribute__((aligned(64))); /* int8: one block's sums */
        (void)ci;
        /* two re-laid out n-blocks: the next one is made between the tile multiplies of this one, so the
         * vector units re-lay out while the tile unit multiplies */
        uint16_t *a[2] = {blocks + (size_t)tid * 2 * 32 * kblock, blocks + ((size_t)tid * 2 + 1) * 32 * kblock};
        for (int k0 = 0; k0 < K && lo < hi; k0 += kblock) {
            const int kb = K - k0 < kblock ? K - k0 : kblock, steps = kb / sw, units = 8 * steps;
            const int last = k0 + kb == K;
            for (int u = 0; u < units; u++) {
                if (i8) amx_pack_i8(fmt, W, scale, K, N, lo, k0, u, a[0], kblock);
                else amx_pack_unit(fmt, W, (const uint16_t *)scale, K, G, N, lo, k0, u, a[0]);
            }
            for (int nb = lo; nb < hi; nb++) {
                uint16_t *cur = a[(nb - lo) & 1], *nxt = a[(nb - lo + 1) & 1];
                const int todo = nb + 1 < hi ? units : 0, q_all = (Mp / 32) * steps;
                int u = 0, q = 0;
#if AMX_INT8
                for (int m0 = 0; i8 && m0 < Mp; m0 += 32) {
                    float *c0 = ct + ((size_t)(2 * nb) * mt + m0 / 16) * 256, *c1 = c0 + (size_t)mt * 256;
                    float *acc[4] = {c0, c0 + 256, c1, c1 + 256}; /* tile i: A tile i / 2, B tile i % 2 */
                    const uint32_t *b = xt + ((size_t)k0 / 64 * mt + m0 / 16) * 256;
                    const float *xsb = xs + (size_t)k0 / 64 * Mp + m0;
                    for (int s = 0; s < steps; s++, b += (size_t)mt * 256, xsb += Mp) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                        _tile_loadd(4, (const char *)cur + (size_t)s * 2048, 64);
                        _tile_loadd(5, (const char *)cur + (size_t)s * 2048 + 1024, 64);
                        _tile_loadd(6, b, 64);
                        _tile_loadd(7, b + 256, 64);
                        _tile_dpbssd(0, 4, 6);
                        _tile_dpbssd(1, 4, 7);
                        _tile_dpbssd(2, 5, 6);
                        _tile_dpbssd(3, 5, 7);
                        _tile_stored(0, ci[0], 64); _tile_stored(1, ci[1], 64);
                        _tile_stored(2, ci[2], 64); _tile_stored(3, ci[3], 64);
                        const int first = k0 == 0 && s == 0;
                        /* int4: the weight rows' group scales, made with the tiles */
                        const float *ws = fmt == 3 ? (const float *)((const char *)cur + (size_t)32 * kblock) + s * 32 : NULL;
                        for (int i = 0; i < 4; i++) { /* each output's block sum times its prompt row's block scale
                                                       * (int4: times the weight row's group scale first, as the
                                                       * decode kernel multiplies the two) */
                            const __m512 sx = _mm512_loadu_ps(xsb + 16 * (i % 2));
                            for (int j = 0; j < 16; j++) {
                                const __m512 sc = ws ? _mm512_mul_ps(_mm512_set1_ps(ws[16 * (i / 2) + j]), sx) : sx;
                                const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(ci[i] + 16 * j));
                                float *at = acc[i] + 16 * j;
                                _mm512_store_ps(at, first ? _mm512_mul_ps(v, sc) : _mm512_fmadd_ps(v, sc, _mm512_load_ps(at)));
                            }
                        }
                        for (q++; u < (long)todo * q / q_all; u++) amx_pack_i8(fmt, W, scale, K, N, nb + 1, k0, u, nxt, kblock);
                    }
                    if (!last) continue;
                    const float *sc = (const float *)scale;
                    amx_out(fmt, acc[0], sc, bias, y, M, N, nb * 32, m0);
                    amx_out(fmt, acc[1], sc, bias, y, M, N, nb * 32, m0 + 16);
                    if (nb * 32 + 16 < N) {
                        amx_out(fmt, acc[2], sc, bias, y, M, N, nb * 32 + 16, m0);
                        amx_out(fmt, acc[3], sc, bias, y, M, N, nb * 32 + 16, m0 + 16);
                    }
                }
#endif
                for (int m0 = 0; !i8 && m0 < Mp; m0 += 32) {
                    float *c0 = ct + ((size_t)(2 * nb) * mt + m0 / 16) * 256, *c1 = c0 + (size_t)mt * 256;
                    if (k0 == 0) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    } else {
                        _tile_loadd(0, c0, 64); _tile_loadd(1, c0 + 256, 64);
                        _tile_loadd(2, c1, 64); _tile_loadd(3, c1 + 256, 64);
                    }
                    const uint32_t *b = xt + ((size_t)k0 / 32 * mt + m0 / 16) * 256;
                    for (int s = 0; s < steps; s++, b += (size_t)mt * 256) {
                        _tile_loadd(4, cur + (size_t)s * 1024, 64);
                        _tile_loadd(5, cur + (size_t)s * 1024 + 512, 64);
                        _tile_loadd(6, b, 64);
                        _tile_loadd(7, b + 256, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                        for (q++; u < (long)todo * q / q_all; u++)
                            amx_pack_unit(fmt, W, (const uint16_t *)scale, K, G, N, nb + 1, k0, u, nxt);
                    }
                    if (!last) {
                        _tile_stored(0, c0, 64); _tile_stored(1, c0 + 256, 64);
                        _tile_stored(2, c1, 64); _tile_stored(3, c1 + 256, 64);
                        continue;
                    }
                    const float *sc = (const float *)scale;
                    _tile_stored(0, c, 64); amx_out(fmt, c, sc, bias, y, M, N, nb * 32, m0);
                    _tile_stored(1, c, 64); amx_out(fmt, c, sc, bias, y, M, N, nb * 32, m0 + 16);
                    if (nb * 32 + 16 < N) {
                        _tile_stored(2, c, 64); amx_out(fmt, c, sc, bias, y, M, N, nb * 32 + 16, m0);
                        _tile_stored(3, c, 64); amx_out(fmt, c, sc, bias, y, M, N, nb * 32 + 16, m0 + 16);
                    }
                }
                for (; u < todo; u++) {
                    if (i8) amx_pack_i8(fmt, W, scale, K, N, nb + 1, k0, u, nxt, kblock);
                    else amx_pack_unit(fmt, W, (const uint16_t *)scale, K, G, N, nb + 1, k0, u, nxt);
                }
            }
        }
        _tile_release();
    }
#else
    (void)fmt, (void)x, (void)W, (void)scale, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)G, (void)scratch,
        (void)threads;
#endif
}

/* ---- decode attention (one or a few new tokens per row) --------------------------------------------------------- */
static inline float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum8(acc);
#elif defined(NEON)
    float32x4_t acc = vdupq_n_f32(0.f);
    for (; i + 4 <= n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(a + i), vld1q_f32(b + i));
    s = vaddvq_f32(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy_f32(float *y, float a, const float *x, int n) {
    int i = 0;
#ifdef __AVX2__
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#elif defined(NEON)
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* GPT-NeoX rotary on the first R dims of x (half-split layout); cos/sin hold R values. */
static inline void rotate(float *dst, const float *x, const float *cos, const float *sin, int R, int D) {
    int half = R / 2;
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        dst[i] = x1 * cos[i] - x2 * sin[i];
        dst[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
    for (int i = R; i < D; i++) dst[i] = x[i];
}

/* One new token per row: rotary on q and k, k and v written to the cache at the row's position,
 * then softmax(q.K^T / sqrt(D)).V over positions 0..pos[b]. Replaces a dozen small PyTorch ops
 * per layer.
 *   qkv: [B][H][3][D] (the fused projection's output, per-head interleaved as in GPT-NeoX)
 *   cos, sin: [B][R], row stride cs_stride (0 when every row is at the same position)
 *   kc, vc: [B'][H][S][D] caches (B' >= B); pos: [B] int64; out: [B][H*D]
 *   scratch: B*H*(S + D) floats */
/* T new tokens per row of the batch, at positions pos[b] .. pos[b] + T - 1 (T == 1: decoding; T > 1:
 * the k + 1 rows that check speculative guesses). Each token's keys and values go to the cache first,
 * then each token attends to the cache up to its own position, in the same order of operations as
 * when it comes alone: a token's output is bit for bit the same whether it was decoded alone or
 * checked with others, which is what keeps speculative greedy decoding identical to plain greedy
 * (PyTorch's attention over T tokens sums in another order, and the int8 kernels' activation
 * rounding can turn a last-bit difference into another token). qkv is (B, T, H, 3, D); cos/sin
 * rows: token t of row b reads row b * cs_b + t * cs_t. */
void jneox_decode_attention(const float *qkv, const float *cos, const float *sin, int R, int cs_b, int cs_t,
                            float *kc, float *vc, const int64_t *pos, int B, int T, int H, int S, int D,
                            float *out, float *scratch, int threads) {
    const float scale = 1.f / sqrtf((float)D);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        float *scores = scratch + (size_t)bh * (S + D), *q = scores + S;
        float *K = kc + ((size_t)b * H + h) * S * D, *V = vc + ((size_t)b * H + h) * S * D;
        for (int t = 0; t < T; t++) {
            long p = (long)pos[b] + t;
            const float *src = qkv + (((size_t)b * T + t) * H + h) * 3 * D;
            const float *c = cos + (size_t)b * cs_b + (size_t)t * cs_t, *sn = sin + (size_t)b * cs_b + (size_t)t * cs_t;
            rotate(K + p * D, src + D, c, sn, R, D);
            memcpy(V + p * D, src + 2 * D, sizeof(float) * D);
        }
        for (int t = 0; t < T; t++) {
            long p = (long)pos[b] + t;
            const float *src = qkv + (((size_t)b * T + t) * H + h) * 3 * D;
            const float *c = cos + (size_t)b * cs_b + (size_t)t * cs_t, *sn = sin + (size_t)b * cs_b + (size_t)t * cs_t;
            rotate(q, src, c, sn, R, D);
            float mx = -INFINITY;
            for (long j = 0; j <= p; j++) {
                scores[j] = dot_f32(q, K + j * D, D) * scale;
                mx = scores[j] > mx ? scores[j] : mx;
            }
            float sum = 0.f;
            for (long j = 0; j <= p; j++) sum += (scores[j] = expf(scores[j] - mx));
            float *o = out + (((size_t)b * T + t) * H + h) * D;
            memset(o, 0, sizeof(float) * D);
            for (long j = 0; j <= p; j++) axpy_f32(o, scores[j] / sum, V + j * D, D);
        }
    }
}

/* 5 with AMX (bf16/int8/int4 prompts in tiles), 4 with AVX-512 BF16 (also the prompt kernels), 3 with AVX-512 (the batch path), 2 with AVX2/FMA,
 * 1 with NEON (64-bit ARM), 0 for the portable loops */
int jneox_kernels_simd(void) {
#if defined(AMX)
    return 5;
#elif defined(BF16_DOT)
    return 4;
#elif defined(__AVX512F__)
    return 3;
#elif defined(__AVX2__)
    return 2;
#elif defined(NEON)
    return 1;
#else
    return 0;
#endif
}

/* how int8_tile multiplies: 3 dpbusd (AVX512-VNNI or AVX-VNNI), 2 maddubs/madd (AVX2, also AVX-512 without
 * VNNI), 1 NEON, 0 scalar C */
int jneox_kernels_int8_dot(void) {
#ifdef DPBUSD
    return 3;
#else
    return jneox_kernels_simd() >= 2 ? 2 : jneox_kernels_simd();
#endif
}
