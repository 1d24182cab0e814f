/* ---- prompts on AMX: tile matrix multiplies straight from the packed weights ----------------------
 * With AMX (Intel Xeon since Sapphire Rapids) one tdpbf16ps multiplies a 16x32 bf16 tile by a 32x16 one,
 * 16 times the work of an AVX-512 dot product instruction. oneDNN's bf16 matmul reaches it only from a
 * plain-layout weight, which would mean re-laying out every weight per prompt and oneDNN reordering it
 * again. Here each thread re-lays out 32 output rows x one K block of the packed weight at a time into AMX
 * tiles in its own cache (bf16 copied, int8 widened exactly, int4 times its scale and rounded to bf16 as
 * jneox_unpack_rows does), the next 32 rows between the tile multiplies of these (the vector units re-lay
 * out while the tile unit multiplies), and multiplies them with every row of the prompt: the weight is
 * read from memory once per call, whatever the prompt's length.
 *   A tiles: 16 output rows x 32 k of the re-laid out weight (64 bytes a row);
 *   B tiles: 32 k x 16 prompt rows in AMX's pair layout (row p: each prompt row's bf16 pair 2p, 2p+1), made
 *            once per call from x, in K blocks whose B tiles stay in L2 (AMX_KBLOCK_BYTES);
 *   C tiles: 16 output rows x 16 prompt rows, fp32, kept in the scratch between K blocks and written to
 *            y[m][n] (times the int8 row scale, plus bias) after the last.
 * int8 weights with K % 64 == 0 multiply int8 x int8 tiles instead (tdpbssd, 16x16 outputs x 64 k): the
 * activations rounded to int8 per block of 64 exactly as quantize_x rounds them for the decode kernel, the
 * weight re-laid out without widening, each block's exact int32 sums times its row's block scale added up
 * in fp32 (the decode kernel's integer sums in another float order: a prompt row is its decode row to
 * ~1e-7).
 * int4 weights in groups of 64 take the same int8 tiles: the nibbles minus 8 are exact int8, a group is one
 * activation block, and each block sum is scaled by the weight row's group scale times the prompt row's
 * block scale, the product the decode kernel (int4x8_tile) multiplies by: a prompt row is its decode row
 * to ~1e-7, where bf16 tiles would round the dequantized weight and the activations to bf16.
 * Each output is one fixed sequence of tile multiplies over k whatever the other rows, so a row's bits
 * depend neither on the prompt's length nor on its split. Needs K % 32 == 0 (int4: G % 32 == 0);
 * quantize.py sends anything else to the other paths. */
#ifdef AMX
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
static inline void amx_rows(enum jneox_format fmt, const void *W, const uint16_t *scale, int K, int G, int t, int k0, uint16_t *dst) {
    if (fmt == JNEOX_BFLOAT16) { /* bf16 [N/4][K/8][4][8]: 4 chunks of 64 bytes; 128-bit block r of each is row r */
        const uint16_t *src = (const uint16_t *)W + (size_t)t * RT * K + (size_t)k0 * RT;
        __m512i v0 = _mm512_loadu_si512(src), v1 = _mm512_loadu_si512(src + 32), v2 = _mm512_loadu_si512(src + 64),
                v3 = _mm512_loadu_si512(src + 96);
        __m512i t0 = _mm512_shuffle_i32x4(v0, v1, 0x44), t1 = _mm512_shuffle_i32x4(v0, v1, 0xEE),
                t2 = _mm512_shuffle_i32x4(v2, v3, 0x44), t3 = _mm512_shuffle_i32x4(v2, v3, 0xEE);
        _mm512_storeu_si512(dst, _mm512_shuffle_i32x4(t0, t2, 0x88));
        _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(t0, t2, 0xDD));
        _mm512_storeu_si512(dst + 64, _mm512_shuffle_i32x4(t1, t3, 0x88));
        _mm512_storeu_si512(dst + 96, _mm512_shuffle_i32x4(t1, t3, 0xDD));
    } else if (fmt == JNEOX_INT8) { /* int8 [N/4][K/8][4][8]: 4 chunks of 32 bytes; 64-bit lane r of each is row r */
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
static inline void amx_pack_unit(enum jneox_format fmt, const void *W, const uint16_t *scale, int K, int G, int N, int nb, int k0,
                                 int u, uint16_t *a) {
    const int tl = u % 8, s = u / 8, t = nb * 8 + tl;
    uint16_t *dst = a + ((size_t)s * 32 + (size_t)tl * RT) * 32;
    if (t * RT < N && fmt != JNEOX_INT4) { /* this tile's stream 4 units on */
        const int bytes = fmt == JNEOX_BFLOAT16 ? 256 : 128;
        const char *p = (const char *)W + ((size_t)t * RT * K + (size_t)(k0 + 32 * s) * RT) * (fmt == JNEOX_BFLOAT16 ? 2 : 1);
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
static inline void amx_pack_i8(enum jneox_format fmt, const void *W, const void *scale, int K, int N, int nb, int k0, int u,
                               uint16_t *a, int kblock) {
    if (fmt == JNEOX_INT8) amx_pack_unit8((const int8_t *)W, K, N, nb, k0, u, (int8_t *)a);
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
static inline void amx_out(enum jneox_format fmt, const float *c, const float *scale, const float *bias, float *y, int M, int N,
                           int n0, int m0) {
    const __mmask16 live = N - n0 >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
    __m512 sc = fmt == JNEOX_INT8 ? _mm512_maskz_loadu_ps(live, scale + n0) : _mm512_set1_ps(1.f);
    __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + n0) : _mm512_setzero_ps();
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(c + 16 * i);
    transpose16(r);
    for (int m = 0; m < 16 && m0 + m < M; m++)
        _mm512_mask_storeu_ps(y + (size_t)(m0 + m) * N + n0, live, _mm512_fmadd_ps(r[m], sc, b));
}

#if AMX_INT8
#define AMX_INT8_PAIRS 4 /* pairs of B tiles (32 prompt rows each) per A tile load: their fp32 sums, 16 KB, stay in L1 */

/* the block sums ci (tiles i: A tile i / 2, B tile i % 2) of step s, m-pair mp of n-block nb, each output's
 * times its prompt row's block scale (int4: times the weight row's group scale first, as the decode kernel
 * multiplies the two), into the fp32 sums in ct (the first block: stored, then added) */
static inline void amx_sums8(enum jneox_format fmt, int32_t ci[4][256], float *ct, const float *xs, const uint16_t *cur,
                             int kblock, int nb, int mt, int Mp, int k0, int s, int mp) {
    const int m0 = 32 * mp, first = k0 == 0 && s == 0;
    float *c0 = ct + ((size_t)(2 * nb) * mt + m0 / 16) * 256, *c1 = c0 + (size_t)mt * 256;
    float *acc[4] = {c0, c0 + 256, c1, c1 + 256};
    const float *xsb = xs + ((size_t)k0 / 64 + s) * Mp + m0;
    /* int4: the weight rows' group scales, made with the tiles */
    const float *ws = fmt == JNEOX_INT4 ? (const float *)((const char *)cur + (size_t)32 * kblock) + s * 32 : NULL;
    for (int i = 0; i < 4; i++) {
        const __m512 sx = _mm512_loadu_ps(xsb + 16 * (i % 2));
        for (int j = 0; j < 16; j++) {
            const __m512 sc = ws ? _mm512_mul_ps(_mm512_set1_ps(ws[16 * (i / 2) + j]), sx) : sx;
            const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(ci[i] + 16 * j));
            float *at = acc[i] + 16 * j;
            _mm512_store_ps(at, first ? _mm512_mul_ps(v, sc) : _mm512_fmadd_ps(v, sc, _mm512_load_ps(at)));
        }
    }
}
#endif

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
 * fmt: JNEOX_BFLOAT16, JNEOX_INT8 (scale: fp32 per output row) or JNEOX_INT4 (scale: fp16 groups of G);
 * scratch: jneox_prompt_amx_scratch bytes, 64-byte aligned; y: [M][N]; N: output rows padded to tiles of 4 */
void jneox_prompt_amx(enum jneox_format fmt, const float *x, const void *W, const void *scale, const float *bias,
                      float *y, int M, int N, int K, int G, void *scratch, int threads) {
#ifdef AMX
    if (!jneox_amx()) return; /* never so from quantize.py, which asks jneox_amx first */
    const int Mp = (M + 31) / 32 * 32, mt = Mp / 16, nblocks = (N + 31) / 32;
    /* int8 weights with K % 64 == 0, and int4 in groups of 64: int8 x int8 tiles (tdpbssd) on activations
     * rounded to int8 per block of 64, as the decode kernel rounds them; each block's int32 sums times its
     * scale (int4: times the group scale too), summed in fp32 */
    const int i8 = ((fmt == JNEOX_INT8 && K % 64 == 0) || (fmt == JNEOX_INT4 && G == 64)) && AMX_INT8, sw = i8 ? 64 : 32; /* k per step */
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
        int32_t ci[2][4][256] __attribute__((aligned(64))); /* int8: two pairs' block sums (one converted while the other is made) */
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
                /* int8 tiles: per step, the A tiles loaded once for a group of AMX_INT8_PAIRS pairs of B tiles
                 * (whose fp32 sums stay in L1), and each pair's block sums converted and added while the tile
                 * unit multiplies the next pair (ci: two buffers); every output still takes its blocks in k order */
                for (int g0 = 0; i8 && g0 < Mp / 32; g0 += AMX_INT8_PAIRS) {
                    const int g1 = g0 + AMX_INT8_PAIRS < Mp / 32 ? g0 + AMX_INT8_PAIRS : Mp / 32;
                    int pending = -1, pend_s = 0, buf = 0;
                    for (int s = 0; s < steps; s++) {
                        _tile_loadd(4, (const char *)cur + (size_t)s * 2048, 64);
                        _tile_loadd(5, (const char *)cur + (size_t)s * 2048 + 1024, 64);
                        for (int mp = g0; mp < g1; mp++) {
                            const uint32_t *b = xt + (((size_t)k0 / 64 + s) * mt + 2 * mp) * 256;
                            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                            _tile_loadd(6, b, 64);
                            _tile_loadd(7, b + 256, 64);
                            _tile_dpbssd(0, 4, 6);
                            _tile_dpbssd(1, 4, 7);
                            _tile_dpbssd(2, 5, 6);
                            _tile_dpbssd(3, 5, 7);
                            if (pending >= 0)
                                amx_sums8(fmt, ci[buf ^ 1], ct, xs, cur, kblock, nb, mt, Mp, k0, pend_s, pending);
                            _tile_stored(0, ci[buf][0], 64); _tile_stored(1, ci[buf][1], 64);
                            _tile_stored(2, ci[buf][2], 64); _tile_stored(3, ci[buf][3], 64);
                            pending = mp, pend_s = s, buf ^= 1;
                            for (q++; u < (long)todo * q / q_all; u++) amx_pack_i8(fmt, W, scale, K, N, nb + 1, k0, u, nxt, kblock);
                        }
                    }
                    if (pending >= 0) amx_sums8(fmt, ci[buf ^ 1], ct, xs, cur, kblock, nb, mt, Mp, k0, pend_s, pending);
                    for (int mp = g0; last && mp < g1; mp++) {
                        const int m0 = 32 * mp;
                        const float *c0 = ct + ((size_t)(2 * nb) * mt + m0 / 16) * 256, *c1 = c0 + (size_t)mt * 256;
                        const float *sc = (const float *)scale;
                        amx_out(fmt, c0, sc, bias, y, M, N, nb * 32, m0);
                        amx_out(fmt, c0 + 256, sc, bias, y, M, N, nb * 32, m0 + 16);
                        if (nb * 32 + 16 < N) {
                            amx_out(fmt, c1, sc, bias, y, M, N, nb * 32 + 16, m0);
                            amx_out(fmt, c1 + 256, sc, bias, y, M, N, nb * 32 + 16, m0 + 16);
                        }
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
