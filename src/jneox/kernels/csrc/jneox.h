/* The C API of jneox's CPU kernels: every function the Python side loads (jneox/kernels/__init__.py
 * declares the same signatures for ctypes), and the weight formats they take.
 *
 * Linear layers compute y[M][N] = x[M][K] . W[N][K]^T (+ bias) with W stored packed in tiles of four
 * output rows, interleaved along K (made by jneox/quantize.py; N is a multiple of 4):
 *   JNEOX_FLOAT32:  float  [N/4][K/8][4][8]
 *   JNEOX_BFLOAT16: uint16 [N/4][K/8][4][8]
 *   JNEOX_INT8:     int8   [N/4][K/8][4][8], fp32 scale[N] (symmetric, per output row)
 *   JNEOX_INT4:     uint8  [N/4][K/G][4][G/2], fp16 scale[N/4][K/G][4] (symmetric groups of G along K,
 *                   stored as q+8; byte j of a row's group holds element j (low nibble) and j+G/2 (high))
 * Every row of x is computed on its own, in one fixed order of float operations: a row's bits do not
 * depend on the rows that come with it, nor (for int8 and int4 in groups of 64) on the instruction set. */
#ifndef JNEOX_H
#define JNEOX_H

#include <stdint.h>

/* the order of jneox.quantize.FORMATS; the Python enum (jneox.kernels.Format) is tested against it */
enum jneox_format {
    JNEOX_FLOAT32 = 0,
    JNEOX_BFLOAT16 = 1,
    JNEOX_INT8 = 2,
    JNEOX_INT4 = 3,
};

/* decode: up to 16 rows of x (more work, but the same bits per row) */
void jneox_linear_f32(const float *x, const float *W, const float *bias, float *y, int M, int N, int K, int threads);
void jneox_linear_bf16(const float *x, const uint16_t *W, const float *bias, float *y, int M, int N, int K,
                       int threads);
/* scratch: at least 2*M*K + 12*M*(K/8) bytes */
void jneox_linear_int8(const float *x, const int8_t *W, const float *scale, const float *bias, float *y, int M, int N,
                       int K, void *scratch, int threads);
/* scratch: at least M*K + 12*M*(K/G) bytes */
void jneox_linear_int4(const float *x, const uint8_t *W, const uint16_t *scale, const float *bias, float *y, int M,
                       int N, int K, int G, void *scratch, int threads);

/* prompts with AVX-512 BF16 dot products (no-ops in other builds); xb: x rounded to bf16, [M][K] */
void jneox_prompt_bf16(const uint16_t *xb, const uint16_t *W, const float *bias, float *y, int M, int N, int K,
                       int threads);
void jneox_prompt_int8(const uint16_t *xb, const int8_t *W, const float *scale, const float *bias, float *y, int M,
                       int N, int K, int threads);

/* prompts with fp32 FMAs on fp32 or bf16 weights (AVX-512; a no-op in other builds and for other formats):
 * x [M][K] fp32, each output one running sum over k in order, then + bias; scratch: at least
 * jneox_prompt_fma_scratch(M, K, threads) bytes (0 without AVX-512) */
long jneox_prompt_fma_scratch(int M, int K, int threads);
void jneox_prompt_fma(enum jneox_format fmt, const float *x, const void *W, const float *bias, float *y, int M, int N,
                      int K, void *scratch, int threads);

/* tiles t0..t1-1 of W back to plain rows [4*(t1-t0)][K], fp32 (out_bf16 0) or bf16 (out_bf16 1, to nearest
 * even); int8 unscaled (the caller scales the output columns), int4 times its group scales */
void jneox_unpack_rows(enum jneox_format fmt, const void *W, const uint16_t *scale, int K, int G, int t0, int t1,
                       void *out, int out_bf16, int threads);

/* prompts as AMX tile multiplies (bf16, int8, int4; K % 32 == 0, int4: G % 32 == 0). jneox_amx: whether
 * they run here (built with AMX, and the OS grants the tile registers); jneox_prompt_amx_scratch: the bytes
 * of 64-byte aligned scratch jneox_prompt_amx needs (0 without AMX); scale: int8 fp32 per row, int4 fp16 */
int jneox_amx(void);
long jneox_prompt_amx_scratch(int M, int N, int K, int threads);
void jneox_prompt_amx(enum jneox_format fmt, const float *x, const void *W, const void *scale, const float *bias,
                      float *y, int M, int N, int K, int G, void *scratch, int threads);

/* attention of T new tokens per row against the KV cache, with rotary embedding and the cache writes:
 *   qkv: [B][T][H][3][D]; cos, sin: token t of row b reads R values at b * cs_b + t * cs_t;
 *   kc, vc: [B'][H][S][D] caches (B' >= B); pos: [B], the position of each row's first new token;
 *   out: [B][T][H*D]; scratch: B*H*(S + D) floats */
void jneox_decode_attention(const float *qkv, const float *cos, const float *sin, int R, int cs_b, int cs_t,
                            float *kc, float *vc, const int64_t *pos, int B, int T, int H, int S, int D, float *out,
                            float *scratch, int threads);

/* reads bytes (whole 64-byte lines; buf 64-byte aligned) with vector loads from threads and returns their
 * sum: timed, the memory's read bandwidth, the bound of decode */
uint64_t jneox_read_bytes(const void *buf, long bytes, int threads);

/* JSONL to the tokenizer's input (jsonl.c): the string field `field` (field_len UTF-8 bytes) of every line of
 * data[0..n) (whole lines), with newlines written as "<NL>" (nl 1) or refused (nl 0), each text followed by
 * '\n' in out; returns the number of lines, with *written the bytes of out used, or -1 where the chunk is
 * not plainly such lines (see jsonl.c): the caller reads it another way. cap >= 2 * n + 1 always suffices. */
long jneox_jsonl_texts(const void *data, long n, const void *field, long field_len, int nl, void *out, long cap,
                       long *written);

/* what this build runs: jneox.kernels.paths lists the levels (jneox_kernels_simd) and the int8
 * arithmetic (jneox_kernels_int8_dot: 3 dpbusd, 2 AVX2 maddubs/madd, 1 NEON, 0 scalar C) */
int jneox_kernels_simd(void);
int jneox_kernels_int8_dot(void);

#endif
