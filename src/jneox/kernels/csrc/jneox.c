/* The kernels as ONE compilation unit: the compiler flags (-march=native, and the -mno-* caps that
 * JNEOX_SIMD adds) decide which instruction sets exist, and the dispatch below picks, for each tile, the
 * best version this build has. jneox/kernels/build.py compiles this file only; the files it includes are
 * not compiled on their own.
 *
 * Weights are read once per decoded token, so they are stored pre-packed in tiles of four output rows,
 * interleaved along K (jneox.h): each tile is one contiguous stream that the hardware prefetcher (helped
 * by a software prefetch) keeps ahead of the arithmetic. fp32, bf16 and int4 (groups other than 64)
 * weights are widened to fp32 in registers only; x, y and the accumulation are fp32. int8 (and int4 in
 * groups of 64) round the activations to int8 per block and multiply in integers, as llama.cpp's Q8_0 x
 * Q8_0 (Q4_0 x Q8_0) does. OpenMP splits the tiles over the cores (jneox loads this library after torch,
 * so it shares torch's libgomp). */
#include "common.h"

#include "generic.c"
#include "x86.c"
#include "arm.c"

/* ---- dispatch: the tile each entry point runs in this build, and the rows of x per pass ---------- */
#if defined(__AVX2__)
#define f32_tile f32_tile_avx2
#define bf16_tile bf16_tile_avx2
#define int8_tile int8_tile_avx2
#define int4_tile int4_tile_avx2
#define dot_f32 dot_f32_avx2
#define axpy_f32 axpy_f32_avx2
#if defined(__AVX512F__)
#define quantize_group quantize_group_avx512
#else
#define quantize_group quantize_group_avx2
#endif
#define INT8_ROWS X86_INT8_ROWS
#elif defined(NEON)
#define f32_tile f32_tile_neon
#define bf16_tile bf16_tile_neon
#define int8_tile int8_tile_neon
#define int4_tile int4_tile_neon
#define dot_f32 dot_f32_neon
#define axpy_f32 axpy_f32_neon
#define quantize_group quantize_group_generic
#define INT8_ROWS NEON_INT8_ROWS
#else
#define f32_tile f32_tile_generic
#define bf16_tile bf16_tile_generic
#define int8_tile int8_tile_generic
#define int4_tile int4_tile_generic
#define dot_f32 dot_f32_generic
#define axpy_f32 axpy_f32_generic
#define quantize_group quantize_group_generic
#define INT8_ROWS GENERIC_ROWS
#endif
/* int4 in groups of 64 on int8 activations: from AVX2 up (elsewhere int4_tile on fp32 activations) */
#if defined(__AVX512BW__)
#define int4x8_tile int4x8_tile_avx512
#define INT4_INT8_DOT 1
#elif defined(__AVX2__)
#define int4x8_tile int4x8_tile_avx2
#define INT4_INT8_DOT 1
#endif
/* fp32 and bf16: AVX-512 takes 1-2 rows with the tiles above and AVX512_FROM rows or more AVX512_ROWS at
 * a time with its own tiles; AVX2 takes AVX2_F32_ROWS / AVX2_BF16_ROWS rows per pass with the same tile
 * function (the same bits per row); the others two rows per pass */
#if defined(__AVX512F__)
#define BY_ROW_COUNT(WIDE_CALL, ROWS_CALL, AVX2_ROWS)                                          \
    if (M >= AVX512_FROM) { FOR_TILES_AND_GROUPS_OF(AVX512_ROWS, GROUPS_OF(AVX512_ROWS), WIDE_CALL) } \
    else { FOR_TILES_AND_ROW_PAIRS(ROWS_CALL) }
#elif defined(__AVX2__)
#define BY_ROW_COUNT(WIDE_CALL, ROWS_CALL, AVX2_ROWS) FOR_TILES_AND_GROUPS_OF(AVX2_ROWS, GROUPS_OF(AVX2_ROWS), ROWS_CALL)
#else
#define BY_ROW_COUNT(WIDE_CALL, ROWS_CALL, AVX2_ROWS) FOR_TILES_AND_ROW_PAIRS(ROWS_CALL)
#endif

#include "linear.c"
#include "prompt.c"
#include "amx.c"
#include "attention.c"
#include "jsonl.c"

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

int jneox_kernels_int8_dot(void) {
#ifdef DPBUSD
    return 3;
#else
    return jneox_kernels_simd() >= 2 ? 2 : jneox_kernels_simd();
#endif
}
