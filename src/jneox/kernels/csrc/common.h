/* What every part of the kernels shares: the instruction sets this build has, the tile geometry, the
 * conversions, and the loops that spread tiles over threads and rows of x over tile passes.
 * Included once, by jneox.c: the kernels are one compilation unit, so that -march=native and the -mno-*
 * caps of JNEOX_SIMD decide every path at once. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* syscall(), for the AMX permission (jneox_amx) */
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h> /* the thread number, where a kernel splits work itself */
#endif

#include "jneox.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(__AVX2__)
#include <arm_neon.h>
#define NEON 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define BF16_DOT 1 /* the prompt kernels' bf16 dot products (jneox_prompt_bf16, jneox_prompt_int8) */
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(BF16_DOT) && defined(__linux__)
#define AMX 1
#endif

#define RT 4 /* output rows per tile */
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead in the tile stream (into L1) */
#endif
#ifndef PF_AHEAD
#define PF_AHEAD (64 * 1024) /* bytes ahead into L2: the next tile, at most this far (see PREFETCH_NEXT) */
#endif

/* Each tile function computes the 4 rows of one tile for NM rows of x at once, so a weight chunk is
 * widened once and used by every row. ALWAYS_INLINE and a constant NM at each call site give one
 * specialised copy per row count. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Streaming the weights and the arithmetic must overlap. The L1 prefetch (PREFETCH bytes ahead) is
 * enough while one row is decoded, but a batch spends many cycles on each chunk and memory latency then
 * shows: weight stream and arithmetic take turns. So the first pass over a tile also pulls the bytes
 * PF_AHEAD further on (the next tile, for tiles up to that size) into L2, one line per line consumed.
 * ``next`` is that address for this tile, NULL on later passes over the same tile, which find it in
 * cache. */
#define PREFETCH_NEXT(next, offset)                                                          \
    if (next) __builtin_prefetch((next) + (offset), 0, 2) /* into L2 */
#define NEXT_TILE(W, tile_bytes)                                                              \
    (m == 0 && t + 1 < N / RT ? (const char *)(W) + (size_t)t * (tile_bytes) +              \
                                    ((tile_bytes) < PF_AHEAD ? (tile_bytes) : PF_AHEAD)      \
                              : NULL)

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) { /* to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
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

/* the block length for the activations' int8 rounding: 64 where K allows (one scale per 64, as int4) */
static inline int int8_block(int K) { return K % 64 == 0 ? 64 : K % 32 == 0 ? 32 : K % 16 == 0 ? 16 : 8; }

/* ---- rows of x in groups of G, tiles of W split over the threads ----------------------------------
 * A switch on the group's row count with a constant NM in each case gives one specialised tile copy per
 * count; TILE_CALL(NM) computes dot[4 * NM] for rows m .. m+NM-1 of x and tile t. */
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
#define GROUPS_OF(G) GROUPS_OF_EXPANDED(G) /* GROUPS_OF(3) -> GROUPS_OF_3, also through a macro */
#define GROUPS_OF_EXPANDED(G) GROUPS_OF_##G
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
