/* Decode entry points: rows of x in groups (the dispatch's rows per pass), tiles of W over the threads.
 * Every tile is the dispatched one (jneox.c). */

void jneox_linear_f32(const float *x, const float *W, const float *bias, float *y, int M, int N, int K, int threads) {
#define WIDE_CALL(NM) f32_tile_avx512(x + (size_t)m * K, NM, W + (size_t)t * RT * K, NEXT_TILE(W, RT * K * 4), K, dot)
#define ROWS_CALL(NM) f32_tile(x + (size_t)m * K, NM, W + (size_t)t * RT * K, NEXT_TILE(W, RT * K * 4), K, dot)
    BY_ROW_COUNT(WIDE_CALL, ROWS_CALL, AVX2_F32_ROWS)
#undef WIDE_CALL
#undef ROWS_CALL
}

void jneox_linear_bf16(const float *x, const uint16_t *W, const float *bias, float *y, int M, int N, int K,
                       int threads) {
#define WIDE_CALL(NM) bf16_tile_avx512(x + (size_t)m * K, NM, W + (size_t)t * RT * K, NEXT_TILE(W, RT * K * 2), K, dot)
#define ROWS_CALL(NM) bf16_tile(x + (size_t)m * K, NM, W + (size_t)t * RT * K, NEXT_TILE(W, RT * K * 2), K, dot)
    BY_ROW_COUNT(WIDE_CALL, ROWS_CALL, AVX2_BF16_ROWS)
#undef WIDE_CALL
#undef ROWS_CALL
}

/* Per group of G of each row of x, into scratch: where sums, xsum (the fp32 sum, in order: int4_tile's
 * offset correction); where ints, the group rounded to int8 (quantize_group): xs (its fp32 scale,
 * max|x| / 127) and xqsum (its int8 sum, exact in fp32: at most 127 * G). xsum, xs and xqsum as [M][K/G],
 * then xq [M][K]. */
static int8_t *quantize_x(const float *x, int M, int K, int G, int sums, int ints, void *scratch, int threads) {
    const int groups = K / G;
    float *xsum = (float *)scratch, *xs = xsum + M * groups;
    float *xqsum = xs + M * groups;
    int8_t *xq = (int8_t *)(xqsum + M * groups);
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 8)
    for (int mg = 0; mg < M * groups; mg++) {
        const int m = mg / groups, g = mg % groups;
        const float *xg = x + (size_t)m * K + (size_t)g * G;
        if (sums) {
            float sum = 0.f;
            for (int j = 0; j < G; j++) sum += xg[j];
            xsum[mg] = sum;
        }
        if (ints) xqsum[mg] = (float)quantize_group(xg, G, xq + (size_t)m * K + (size_t)g * G, xs + mg);
    }
    return xq;
}

/* scratch: quantize_x's, then x + 128 as uint8 for DPBUSD */
void jneox_linear_int8(const float *x, const int8_t *W, const float *scale, const float *bias, float *y, int M, int N,
                       int K, void *scratch, int threads) {
    const int G = int8_block(K), blocks = K / G;
    const int8_t *xq = quantize_x(x, M, K, G, 0, 1, scratch, threads);
    const float *xs = (const float *)scratch + M * blocks;
    uint8_t *xu = (uint8_t *)xq + (size_t)M * K;
#ifdef DPBUSD
    for (size_t i = 0; i < (size_t)M * K; i++) xu[i] = (uint8_t)(xq[i] ^ 0x80); /* x + 128 */
#endif
#define CALL(NM) int8_tile(xq + (size_t)m * K, xu + (size_t)m * K, xs + m * blocks, NM, W + (size_t)t * RT * K, K, G, \
                           scale + t * RT, NEXT_TILE(W, RT * K), dot)
    FOR_TILES_AND_GROUPS_OF(INT8_ROWS, GROUPS_OF(INT8_ROWS), CALL)
#undef CALL
}

/* With G == 64 and int4x8_tile in this build the activations are rounded to int8 per group; otherwise
 * int4_tile runs on fp32 activations. */
void jneox_linear_int4(const float *x, const uint8_t *W, const uint16_t *scale, const float *bias, float *y, int M,
                       int N, int K, int G, void *scratch, int threads) {
    const int groups = K / G;
#ifdef INT4_INT8_DOT
    if (G == 64) {
        const int8_t *xq = quantize_x(x, M, K, G, 0, 1, scratch, threads);
        const float *xs = (const float *)scratch + M * groups, *xqsum = xs + M * groups;
#define CALL(NM) int4x8_tile(xq + (size_t)m * K, xs + m * groups, xqsum + m * groups, NM, W + (size_t)t * RT * K / 2, \
                             scale + (size_t)t * RT * groups, NEXT_TILE(W, RT * K / 2), K, dot)
        FOR_TILES_AND_ROW_PAIRS(CALL)
#undef CALL
        return;
    }
#endif
    quantize_x(x, M, K, G, 1, 0, scratch, threads);
    const float *xsum = (const float *)scratch;
#define CALL(NM) int4_tile(x + (size_t)m * K, xsum + m * groups, NM, W + (size_t)t * RT * K / 2, \
                           scale + (size_t)t * RT * groups, K, G, dot)
    FOR_TILES_AND_ROW_PAIRS(CALL)
#undef CALL
}

/* The bound of decode: a token reads every weight once, so decode cannot beat the memory's read
 * bandwidth. Reads ``bytes`` of buf (whole 64-byte lines, buf 64-byte aligned) split over the threads
 * in contiguous slices, with the widest vector loads of this build, four independent sums per thread so
 * that the adds never wait; returns what it summed, so the reads cannot be left out. */
uint64_t jneox_read_bytes(const void *buf, long bytes, int threads) {
    const long lines = bytes / 64;
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
#ifdef _OPENMP
        const long tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const long tid = 0, nth = 1;
#endif
        const char *p = (const char *)buf + lines * tid / nth * 64, *end = (const char *)buf + lines * (tid + 1) / nth * 64;
#if defined(__AVX512F__)
        __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
        for (; p + 256 <= end; p += 256) {
            s0 = _mm512_add_epi64(s0, _mm512_load_si512(p));
            s1 = _mm512_add_epi64(s1, _mm512_load_si512(p + 64));
            s2 = _mm512_add_epi64(s2, _mm512_load_si512(p + 128));
            s3 = _mm512_add_epi64(s3, _mm512_load_si512(p + 192));
        }
        for (; p < end; p += 64) s0 = _mm512_add_epi64(s0, _mm512_load_si512(p));
        total += (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
#elif defined(__AVX2__)
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (; p < end; p += 64) {
            s0 = _mm256_add_epi64(s0, _mm256_load_si256((const __m256i *)p));
            s1 = _mm256_add_epi64(s1, _mm256_load_si256((const __m256i *)(p + 32)));
            if (p + 128 <= end) {
                p += 64;
                s2 = _mm256_add_epi64(s2, _mm256_load_si256((const __m256i *)p));
                s3 = _mm256_add_epi64(s3, _mm256_load_si256((const __m256i *)(p + 32)));
            }
        }
        uint64_t v[4];
        _mm256_storeu_si256((__m256i *)v, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
        total += v[0] + v[1] + v[2] + v[3];
#else
        uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (; p < end; p += 64)
            for (int i = 0; i < 8; i++) {
                uint64_t w;
                memcpy(&w, p + 8 * i, 8);
                s[i] += w;
            }
        for (int i = 0; i < 8; i++) total += s[i];
#endif
    }
    return total;
}
