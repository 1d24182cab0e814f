/* Fused attention for decoding: one or a few new tokens per row against the KV cache. */

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

/* T new tokens per row of the batch, at positions pos[b] .. pos[b] + T - 1 (T == 1: decoding; T > 1:
 * the k + 1 rows that check speculative guesses): rotary on q and k, each token's keys and values written
 * to the cache first, then each token attends to the cache up to its own position (softmax(q.K^T /
 * sqrt(D)).V), in the same order of operations as when it comes alone. So a token's output is bit for bit
 * the same whether it was decoded alone or checked with others, which keeps speculative greedy decoding
 * identical to plain greedy (PyTorch's attention over T tokens sums in another order, and the int8
 * kernels' activation rounding can turn a last-bit difference into another token). One call replaces a
 * dozen small PyTorch ops per layer. Layouts: jneox.h. */
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

