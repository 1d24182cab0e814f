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

/* scratch: quantize_x's, then x + 128 as uint8 for DPBUSD */
void jneox_linear_int8(const float *x, const int8_t *W, const float *scale, const float *bias, float *y, int M, int N,
                       int K, void *scratch, int threads) {
    const int G = int8_block(K), blocks = K / G;
    const int8_t *xq = quantize_x(x, M, K, G, scratch, threads);
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
    const int8_t *xq = quantize_x(x, M, K, G, scratch, threads);
    const float *xsum = (const float *)scratch, *xs = xsum + M * groups;
    const int32_t *xqsum = (const int32_t *)(xs + M * groups);
#ifdef INT4_INT8_DOT
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
