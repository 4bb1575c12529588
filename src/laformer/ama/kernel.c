/* One AMA decode step of one layer in a single call: the fused form of AMAAttention._decode (attention.py),
 * which stays the reference. Per (batch row, KV head), with the G query heads of the group sharing the choice:
 *
 *   0. summarise the slices that filled since the last step, when the caller keeps no summaries of its own
 *      (the engine's native step: the same numbers as cache.py's summarize);
 *   1. score every candidate slice: scan (the attention mass of its tokens, estimated from a 4-bit copy of the
 *      keys and int8 queries, summed over the group; scan.py is its reference), or from its summary (bound:
 *      q.center + |q|.radius of the key min/max box, summed over the group; or q . mean key), in float32;
 *   2. keep the sink slices and the local window, and pick the best candidates until the budget is spent
 *      (a quickselect, no sort);
 *   3. attend exactly to the tokens of the chosen slices and of the partial last slice, reading them in place
 *      from the slice-blocked cache, with an online softmax (running max, rescaled once per slice);
 *   4. mediation: every unselected candidate is one pseudo-token (mean key, mean value, logit bias
 *      log(count)) folded into the same online softmax, i.e. the log-sum-exp merge of the two partitions.
 *
 * The decode step allocates nothing: its scratch comes from the caller (laformer_ama_scratch_floats says how
 * much) and the summaries live in the caller's tensors. The arguments travel in structs (Settings, Layer, Scan)
 * whose layout the Python side checks at load (laformer_ama_abi_version, laformer_ama_layout), so a library built
 * from other sources is refused instead of read wrongly. A caller splits the (batch row, KV head) units between
 * threads (thread, threads); the PyTorch backend calls it on one thread: a layer's step is a fraction of a
 * millisecond, less than waking a thread team costs on a loaded machine.
 * Plain C called through ctypes (no torch headers), so it builds in about a second.
 */
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "../quantization/abi.h"

typedef struct {
    float *m;     /* (G) running max logit per query head */
    float *l;     /* (G) running sum of exp(logit - m) */
    float *acc;   /* (G, D) running sum of exp(logit - m) * value */
    float *s;     /* (G, n) scratch: the logits of the current block */
} Softmax;

static float dot(const float *a, const float *b, int D) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int d = 0; d < D; d++) sum += a[d] * b[d];
    return sum;
}

/* exp(x) for x <= 0, 0 for x = -inf; Cephes' expf polynomial (about 1 ulp), branch-free so that the loops
 * calling it vectorise, which libm's expf does not. n = round(x / ln 2) by adding and removing 1.5 * 2^23
 * (floorf is a libm call that stops the vectoriser). */
static inline float exp_nonpositive(float x) {
    float clamped = x < -87.0f ? -87.0f : x;
    float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return x < -87.0f ? 0.0f : p * two_n.f;
}

/* s[t] = exp(s[t] - m) for t < n (s[t] <= m, or -inf); returns their sum. The loop calling exp_nonpositive does
 * not vectorise (gcc sees control flow), so AVX2 builds run the same polynomial eight lanes at a time. */
static float exp_shifted_sum(float *s, int n, float m) {
    float sum = 0.0f;
    int t = 0;
#ifdef __AVX2__
    const __m256 lowest = _mm256_set1_ps(-87.0f), shift = _mm256_set1_ps(m), magic = _mm256_set1_ps(12582912.0f);
    __m256 total = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(s + t), shift);
        const __m256 clamped = _mm256_max_ps(x, lowest);
        const __m256 k = _mm256_sub_ps(_mm256_fmadd_ps(clamped, _mm256_set1_ps(1.44269504088896341f), magic), magic);
        __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), clamped);
        r = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f), r);
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
        const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        const __m256 w = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_cmp_ps(x, lowest, _CMP_GE_OQ));
        _mm256_storeu_ps(s + t, w);
        total = _mm256_add_ps(total, w);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, total);
    for (int i = 0; i < 8; i++) sum += lanes[i];
#endif
    for (; t < n; t++) {
        s[t] = exp_nonpositive(s[t] - m);
        sum += s[t];
    }
    return sum;
}

/* Fold n keys/values (rows `stride` floats apart) into the online softmax of the G heads. A token is skipped
 * when valid[t] == 0 or bias[t] == -inf (either may be NULL). */
static void attend(Softmax *st, const float *q, int G, int D, float scale, const float *k, const float *v,
                   int64_t stride, int n, const uint8_t *valid, const float *bias) {
    for (int g = 0; g < G; g++) {
        const float *qh = q + (int64_t)g * D;
        float *s = st->s + (int64_t)g * n;
        int t = 0;
        for (; t + 4 <= n; t += 4) {
            const float *k0 = k + t * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int d = 0; d < D; d++) {
                s0 += qh[d] * k0[d];
                s1 += qh[d] * k1[d];
                s2 += qh[d] * k2[d];
                s3 += qh[d] * k3[d];
            }
            s[t] = s0, s[t + 1] = s1, s[t + 2] = s2, s[t + 3] = s3;
        }
        for (; t < n; t++) s[t] = dot(qh, k + t * stride, D);
        for (t = 0; t < n; t++) {
            const int skip = (valid && !valid[t]) || (bias && bias[t] == -INFINITY);
            s[t] = skip ? -INFINITY : s[t] * scale + (bias ? bias[t] : 0.0f);
        }
    }
    for (int g = 0; g < G; g++) {
        float *s = st->s + (int64_t)g * n;
        float block_max = -INFINITY;
        for (int t = 0; t < n; t++) block_max = s[t] > block_max ? s[t] : block_max;
        if (block_max == -INFINITY) { /* nothing to add: weights stay 0 */
            for (int t = 0; t < n; t++) s[t] = 0.0f;
            continue;
        }
        const float m = st->m[g] > block_max ? st->m[g] : block_max;
        const float c = exp_nonpositive(st->m[g] - m); /* 0 on the first block (m was -inf) */
        float *acc = st->acc + (int64_t)g * D;
        for (int d = 0; d < D; d++) acc[d] *= c;
        const float l = exp_shifted_sum(s, n, m); /* s[t]: the weight of token t */
        st->m[g] = m;
        st->l[g] = st->l[g] * c + l;
    }
    for (int t = 0; t < n; t++) {
        const float *vt = v + t * stride;
        for (int g = 0; g < G; g++) {
            const float p = st->s[(int64_t)g * n + t];
            float *acc = st->acc + (int64_t)g * D;
            if (p == 0.0f) continue;
#pragma omp simd
            for (int d = 0; d < D; d++) acc[d] += p * vt[d];
        }
    }
}

/* Integer products of G int8 queries with n tokens' 4-bit codes (D/2 bytes per token, channels 2i and 2i+1 in the
 * low and high half of byte i, stored + 8), written as G rows of n int32 to dots. qi holds the queries, G rows
 * of D; qsum their sums (the + 8 of the codes is taken back as 8 * qsum). */
static void code_products(const int8_t *qi, const int32_t *qsum, int G, int D, const uint8_t *codes, int n,
                          int32_t *dots) {
    const int row = D / 2;
    int t = 0;
#ifdef __AVX2__
    if (D % 64 == 0) { /* 32 bytes (64 channels) per step; 8 tokens' sums reduced together */
        const int chunks = D / 64;
        int8_t qe[G * row], qo[G * row]; /* the even and odd channels, matching the low and high nibbles */
        for (int g = 0; g < G; g++)
            for (int i = 0; i < row; i++) qe[g * row + i] = qi[g * D + 2 * i], qo[g * row + i] = qi[g * D + 2 * i + 1];
        const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
        for (; t + 8 <= n; t += 8) {
            __m256i acc[G][8];
            for (int u = 0; u < 8; u++) {
                const uint8_t *c = codes + (int64_t)(t + u) * row;
                for (int g = 0; g < G; g++) acc[g][u] = _mm256_setzero_si256();
                for (int ch = 0; ch < chunks; ch++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(c + 32 * ch));
                    const __m256i lo = _mm256_and_si256(x, nibble);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
                    for (int g = 0; g < G; g++) {
                        const __m256i e = _mm256_loadu_si256((const __m256i *)(qe + g * row + 32 * ch));
                        const __m256i o = _mm256_loadu_si256((const __m256i *)(qo + g * row + 32 * ch));
                        const __m256i pairs =
                            _mm256_add_epi16(_mm256_maddubs_epi16(lo, e), _mm256_maddubs_epi16(hi, o));
                        acc[g][u] = _mm256_add_epi32(acc[g][u], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            for (int g = 0; g < G; g++) { /* 8 vectors of 8 partial sums -> one vector of the 8 tokens' sums */
                const __m256i *a = acc[g];
                const __m256i b0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
                const __m256i b1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
                const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20),
                                                      _mm256_permute2x128_si256(b0, b1, 0x31));
                _mm256_storeu_si256((__m256i *)(dots + (int64_t)g * n + t),
                                    _mm256_sub_epi32(sums, _mm256_set1_epi32(8 * qsum[g])));
            }
        }
    }
#endif
    for (; t < n; t++) {
        const uint8_t *c = codes + (int64_t)t * row;
        for (int g = 0; g < G; g++) {
            const int8_t *qg = qi + g * D;
            int32_t sum = 0;
            for (int i = 0; i < row; i++) sum += ((c[i] & 15) - 8) * qg[2 * i] + ((c[i] >> 4) - 8) * qg[2 * i + 1];
            dots[(int64_t)g * n + t] = sum;
        }
    }
}

/* The scan score (scan.py's slice_log_mass, without the log): per query head, q rounded to int8, logits of the
 * first n tokens (whole slices of L) from their 4-bit codes, softmax over the real ones; mass[j] = the mass of
 * slice j summed over the G heads. work: G * n floats (and as many int32). */
static void scan_mass(const float *q, int G, int D, const uint8_t *codes, const float *key_scales, int n, int L,
                      const uint8_t *valid, float *work, float *mass) {
    int8_t qi[G * D];
    int32_t qsum[G];
    float qscale[G];
    const float root = sqrtf((float)D);
    for (int g = 0; g < G; g++) {
        float amax = 0.0f;
        for (int d = 0; d < D; d++) amax = fabsf(q[g * D + d]) > amax ? fabsf(q[g * D + d]) : amax;
        const float inv = 127.0f / amax;
        qsum[g] = 0;
        for (int d = 0; d < D; d++) {
            qi[g * D + d] = amax > 0.0f ? (int8_t)nearbyintf(q[g * D + d] * inv) : 0;
            qsum[g] += qi[g * D + d];
        }
        qscale[g] = amax / 127.0f / root;
    }
    int32_t *dots = (int32_t *)work; /* converted to logits in place */
    code_products(qi, qsum, G, D, codes, n, dots);
    for (int j = 0; j < n / L; j++) mass[j] = 0.0f;
    for (int g = 0; g < G; g++) {
        float *s = work + (int64_t)g * n, m = -INFINITY;
        const int32_t *dg = dots + (int64_t)g * n;
        const float qs = qscale[g];
        if (valid) {
#pragma omp simd reduction(max : m)
            for (int t = 0; t < n; t++) {
                s[t] = valid[t] ? (float)dg[t] * key_scales[t] * qs : -INFINITY;
                m = s[t] > m ? s[t] : m;
            }
        } else {
#pragma omp simd reduction(max : m)
            for (int t = 0; t < n; t++) {
                s[t] = (float)dg[t] * key_scales[t] * qs;
                m = s[t] > m ? s[t] : m;
            }
        }
        if (m == -INFINITY || qs == 0.0f) continue; /* nothing visible, or an all-zero query (as scan.py) */
        const float inv_z = 1.0f / exp_shifted_sum(s, n, m);
        for (int j = 0; j < n / L; j++) {
            float part = 0.0f;
#pragma omp simd reduction(+ : part)
            for (int t = j * L; t < (j + 1) * L; t++) part += s[t];
            mass[j] += part * inv_z;
        }
    }
}

typedef struct {
    float score;
    int index;
} Scored;

/* Reorder a[0:n] so that its `k` highest scores come first (in no particular order). */
static void select_top(Scored *a, int n, int k) {
    int lo = 0, hi = n - 1;
    while (lo < hi) { /* Hoare partition, descending: [lo, j] >= pivot >= [i, hi] */
        float pivot = a[lo + (hi - lo) / 2].score;
        int i = lo, j = hi;
        while (i <= j) {
            while (a[i].score > pivot) i++;
            while (a[j].score < pivot) j--;
            if (i <= j) {
                Scored tmp = a[i];
                a[i++] = a[j];
                a[j--] = tmp;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

#define AMA_ABI_VERSION 2

enum { SCORE_BOUND, SCORE_MEAN, SCORE_SCAN };

/* AMAConfig and the model's shapes (kernel.py's settings): fixed per backend. budget_slices counts the partial
 * last slice, which is always attended. */
typedef struct {
    int64_t batch, heads, kv_heads, head_dim;
    int64_t slice_len, sink_slices, local_slices, budget_slices;
    int64_t score, mediate;
} Settings;

/* One layer's cache and slice summaries. Keys and values are rows of head_dim floats with the given batch/head
 * strides (in floats). Per (b, h) row the summaries hold `capacity` slices: kmean, vmean (and kmin, kmax for
 * SCORE_BOUND, else NULL) (B, Hkv, capacity, D); key_codes (B, Hkv, capacity * L, D / 2) and key_scales
 * (B, Hkv, capacity * L) for SCORE_SCAN, else NULL; log_count at b * count_batch_stride + h * count_head_stride
 * (a head stride of 0 shares one row between the heads). summarised (B * Hkv): slices already summarised per row,
 * which decode brings up to date; NULL when the caller summarises (the PyTorch backend). */
typedef struct {
    const float *keys, *values;
    int64_t key_batch_stride, key_head_stride, value_batch_stride, value_head_stride;
    float *kmean, *vmean, *kmin, *kmax, *log_count, *key_scales;
    uint8_t *key_codes;
    int64_t capacity, count_batch_stride, count_head_stride;
    int64_t *summarised;
} Layer;

/* The prefill scan's arguments: q (B, Hkv, Q, R, D) rows per query block, key_codes (B, Hkv, N * L, D / 2),
 * key_scales (B, Hkv, N * L), own (Q) the slice of each block (slices before it are scored), valid (B, S) rows
 * valid_stride apart, or NULL; mass (B, Hkv, Q, N) out, zero for slices not scored. */
typedef struct {
    const float *q;
    const uint8_t *key_codes;
    const float *key_scales;
    const int64_t *own;
    const uint8_t *valid;
    float *mass;
    int64_t batch, kv_heads, queries, rows, head_dim, slices, slice_len, valid_stride;
} Scan;

/* What the engine's native decode step calls for each AMA layer (inference/decode_step.c's sparse hook):
 * settings, one Layer per model layer, and scratch_floats of scratch for each of `threads` threads. */
typedef struct {
    const Settings *settings;
    const Layer *layers;
    float *scratch;
    int64_t scratch_floats, threads;
} Step;

int laformer_ama_abi_version(void) { return AMA_ABI_VERSION; }

int laformer_ama_layout(char *out, int capacity) {
    LAYOUT_BEGIN
    LAYOUT_STRUCT(Settings) LAYOUT_FIELD(Settings, batch) LAYOUT_FIELD(Settings, heads)
    LAYOUT_FIELD(Settings, kv_heads) LAYOUT_FIELD(Settings, head_dim) LAYOUT_FIELD(Settings, slice_len)
    LAYOUT_FIELD(Settings, sink_slices) LAYOUT_FIELD(Settings, local_slices) LAYOUT_FIELD(Settings, budget_slices)
    LAYOUT_FIELD(Settings, score) LAYOUT_FIELD(Settings, mediate)
    LAYOUT_STRUCT(Layer) LAYOUT_FIELD(Layer, keys) LAYOUT_FIELD(Layer, values) LAYOUT_FIELD(Layer, key_batch_stride)
    LAYOUT_FIELD(Layer, key_head_stride) LAYOUT_FIELD(Layer, value_batch_stride)
    LAYOUT_FIELD(Layer, value_head_stride) LAYOUT_FIELD(Layer, kmean) LAYOUT_FIELD(Layer, vmean)
    LAYOUT_FIELD(Layer, kmin) LAYOUT_FIELD(Layer, kmax) LAYOUT_FIELD(Layer, log_count) LAYOUT_FIELD(Layer, key_scales)
    LAYOUT_FIELD(Layer, key_codes) LAYOUT_FIELD(Layer, capacity) LAYOUT_FIELD(Layer, count_batch_stride)
    LAYOUT_FIELD(Layer, count_head_stride) LAYOUT_FIELD(Layer, summarised)
    LAYOUT_STRUCT(Scan) LAYOUT_FIELD(Scan, q) LAYOUT_FIELD(Scan, key_codes) LAYOUT_FIELD(Scan, key_scales)
    LAYOUT_FIELD(Scan, own) LAYOUT_FIELD(Scan, valid) LAYOUT_FIELD(Scan, mass) LAYOUT_FIELD(Scan, batch)
    LAYOUT_FIELD(Scan, kv_heads) LAYOUT_FIELD(Scan, queries) LAYOUT_FIELD(Scan, rows) LAYOUT_FIELD(Scan, head_dim)
    LAYOUT_FIELD(Scan, slices) LAYOUT_FIELD(Scan, slice_len) LAYOUT_FIELD(Scan, valid_stride)
    LAYOUT_STRUCT(Step) LAYOUT_FIELD(Step, settings) LAYOUT_FIELD(Step, layers) LAYOUT_FIELD(Step, scratch)
    LAYOUT_FIELD(Step, scratch_floats) LAYOUT_FIELD(Step, threads)
    LAYOUT_END
}

/* Returns 0, or 1 when its work buffer cannot be allocated (nothing is written then). */
int laformer_ama_scan(const Scan *a) {
    const int64_t B = a->batch, Hkv = a->kv_heads, Q = a->queries, R = a->rows, D = a->head_dim, N = a->slices,
                  L = a->slice_len;
    float *work = malloc(sizeof(float) * (size_t)(R * N * L > 0 ? R * N * L : 1));
    if (work == NULL) return 1;
    for (int64_t unit = 0; unit < B * Hkv; unit++) {
        const int64_t b = unit / Hkv;
        const uint8_t *codes = a->key_codes + unit * N * L * (D / 2);
        const float *scales = a->key_scales + unit * N * L;
        for (int64_t i = 0; i < Q; i++) {
            const int slices = a->own[i] < N ? (int)a->own[i] : (int)N;
            float *out = a->mass + (unit * Q + i) * N;
            if (slices > 0)
                scan_mass(a->q + (unit * Q + i) * R * D, (int)R, (int)D, codes, scales, slices * (int)L, (int)L,
                          a->valid ? a->valid + b * a->valid_stride : NULL, work, out);
            for (int64_t j = slices > 0 ? slices : 0; j < N; j++) out[j] = 0.0f;
        }
    }
    free(work);
    return 0;
}

/* Scratch floats one thread's decode needs for rows of up to `slices` full slices. */
int64_t laformer_ama_scratch_floats(const Settings *s, int64_t slices) {
    const int64_t G = s->heads / s->kv_heads, D = s->head_dim, N = slices > 0 ? slices : 1;
    const int64_t widest = N > s->slice_len ? N : s->slice_len;
    const int64_t scanned = s->score == SCORE_SCAN ? N * s->slice_len : 0;
    /* softmax state and block logits, qsum, qabs, pseudo-token biases, masses, scan logits, candidates, choices */
    return G * (2 + D + widest) + 2 * D + 2 * N + G * scanned + 2 * N + (N + 3) / 4;
}

/* Slice j of row (b, h): the same numbers as cache.py's summarize (mean key and value over the real tokens, their
 * count and its log, the key min/max or the 4-bit key copy). valid: row b's validity, or NULL. */
static void summarise(const Settings *s, const Layer *y, int64_t b, int64_t h, int64_t j, const uint8_t *valid) {
    const int64_t D = s->head_dim, L = s->slice_len, u = b * s->kv_heads + h, at = (u * y->capacity + j) * D;
    const float *k = y->keys + b * y->key_batch_stride + h * y->key_head_stride + j * L * D;
    const float *v = y->values + b * y->value_batch_stride + h * y->value_head_stride + j * L * D;
    float *kmean = y->kmean + at, *vmean = y->vmean + at, count = 0.0f;
    for (int64_t d = 0; d < D; d++) kmean[d] = vmean[d] = 0.0f;
    for (int64_t t = 0; t < L; t++) {
        if (valid && !valid[j * L + t]) continue;
        count += 1.0f;
        for (int64_t d = 0; d < D; d++) kmean[d] += k[t * D + d], vmean[d] += v[t * D + d];
    }
    const float divisor = count > 1.0f ? count : 1.0f;
    for (int64_t d = 0; d < D; d++) kmean[d] /= divisor, vmean[d] /= divisor;
    y->log_count[b * y->count_batch_stride + h * y->count_head_stride + j] = logf(count);
    if (s->score == SCORE_BOUND) {
        float *lo = y->kmin + at, *hi = y->kmax + at;
        for (int64_t d = 0; d < D; d++) lo[d] = INFINITY, hi[d] = -INFINITY;
        for (int64_t t = 0; t < L; t++) {
            if (valid && !valid[j * L + t]) continue;
            for (int64_t d = 0; d < D; d++) {
                lo[d] = k[t * D + d] < lo[d] ? k[t * D + d] : lo[d];
                hi[d] = k[t * D + d] > hi[d] ? k[t * D + d] : hi[d];
            }
        }
        if (count == 0.0f)
            for (int64_t d = 0; d < D; d++) lo[d] = hi[d] = 0.0f;
    } else if (s->score == SCORE_SCAN) { /* every token, padding too, as key_copy: scale = max |k| / 7 */
        for (int64_t t = 0; t < L; t++) {
            const float *kt = k + t * D;
            float amax = 0.0f;
            for (int64_t d = 0; d < D; d++) amax = fabsf(kt[d]) > amax ? fabsf(kt[d]) : amax;
            const float scale = amax / 7.0f, divide = scale > 1e-30f ? scale : 1e-30f;
            uint8_t *codes = y->key_codes + ((u * y->capacity + j) * L + t) * (D / 2);
            for (int64_t i = 0; i < D / 2; i++) {
                float lo = nearbyintf(kt[2 * i] / divide), hi = nearbyintf(kt[2 * i + 1] / divide);
                lo = lo < -7.0f ? -7.0f : lo > 7.0f ? 7.0f : lo;
                hi = hi < -7.0f ? -7.0f : hi > 7.0f ? 7.0f : hi;
                codes[i] = (uint8_t)((int)lo + 8) | (uint8_t)(((int)hi + 8) << 4);
            }
            y->key_scales[(u * y->capacity + j) * L + t] = scale;
        }
    }
}

/* One decode query per row: q (B, H, D), rows q_batch_stride floats apart; valid (B, length) rows valid_stride
 * apart, or NULL; `length` cached tokens (the new one included) per row; out (B, H, D) contiguous. This call
 * does the units (b, h) of `thread` out of `threads`; scratch: laformer_ama_scratch_floats(s, capacity) floats. */
void laformer_ama_decode(const Settings *s, const Layer *layer, const float *q, int64_t q_batch_stride,
                         const uint8_t *valid, int64_t valid_stride, int64_t length, float *out, float *scratch,
                         int thread, int threads) {
    const int G = (int)(s->heads / s->kv_heads), D = (int)s->head_dim, L = (int)s->slice_len;
    const int Hkv = (int)s->kv_heads, S = (int)length, N = S / L, own = (S - 1) / L, cap = (int)layer->capacity;
    const int local_start = own - (int)s->local_slices + 1 > 0 ? own - (int)s->local_slices + 1 : 0;
    const int sink_end = local_start < s->sink_slices ? local_start : (int)s->sink_slices;
    const int n_pick = (int)s->budget_slices - (S % L != 0); /* the partial last slice pays one slice */
    const float scale = 1.0f / sqrtf((float)D);
    const int widest = N > L ? N : L;
    const int scanned = s->score == SCORE_SCAN ? (own < N ? own : N) * L : 0; /* tokens of full slices before own */
    const int64_t units = s->batch * Hkv, first = units * thread / threads, last = units * (thread + 1) / threads;

    for (int64_t unit = first; unit < last; unit++) {
        const int b = (int)(unit / Hkv), h = (int)(unit % Hkv);
        const float *qg = q + b * q_batch_stride + (int64_t)h * G * D;
        const float *kh = layer->keys + b * layer->key_batch_stride + h * layer->key_head_stride;
        const float *vh = layer->values + b * layer->value_batch_stride + h * layer->value_head_stride;
        const int64_t summary = unit * cap * D;
        const float *lc = layer->log_count + b * layer->count_batch_stride + h * layer->count_head_stride;
        const uint8_t *vb = valid ? valid + b * valid_stride : NULL;
        if (layer->summarised) { /* 0. the slices that filled since the last step */
            for (int64_t j = layer->summarised[unit]; j < N; j++) summarise(s, layer, b, h, j, vb);
            layer->summarised[unit] = N > layer->summarised[unit] ? N : layer->summarised[unit];
        }

        Softmax st = {scratch, scratch + G, scratch + 2 * G, scratch + G * (2 + D)};
        float *qsum = st.s + (int64_t)G * widest, *qabs = qsum + D, *pseudo_bias = qabs + D;
        float *mass = pseudo_bias + N, *work = mass + N;
        Scored *cands = (Scored *)(work + (int64_t)G * scanned);
        uint8_t *chosen = (uint8_t *)(cands + N);
        for (int g = 0; g < G; g++) st.m[g] = -INFINITY, st.l[g] = 0.0f;
        memset(st.acc, 0, sizeof(float) * G * D);
        memset(chosen, 0, N);

        /* 1. scores of the candidates: full slices between the sinks and the local window, not all padding */
        for (int d = 0; d < D; d++) {
            float sum = 0.0f, a = 0.0f;
            for (int g = 0; g < G; g++) sum += qg[g * D + d], a += fabsf(qg[g * D + d]);
            qsum[d] = sum, qabs[d] = a;
        }
        int n_cand = 0, n_forced = 0;
        for (int j = 0; j < N; j++) {
            if (j < sink_end || (j >= local_start && j <= own)) chosen[j] = 1, n_forced++;
            else if (j < local_start && lc[j] != -INFINITY) cands[n_cand++].index = j;
        }
        /* 2. the best candidates fill the budget; scores are needed only when not all of them fit */
        int n_sel = n_pick - n_forced < n_cand ? n_pick - n_forced : n_cand;
        if (n_sel > 0 && n_sel < n_cand) {
            if (s->score == SCORE_SCAN)
                scan_mass(qg, G, D, layer->key_codes + unit * cap * L * (D / 2), layer->key_scales + unit * cap * L,
                          scanned, L, vb, work, mass);
            for (int i = 0; i < n_cand; i++) {
                const int j = cands[i].index;
                float value = 0.0f;
                if (s->score == SCORE_SCAN) {
                    value = mass[j];
                } else if (s->score == SCORE_MEAN) {
                    value = dot(qsum, layer->kmean + summary + (int64_t)j * D, D);
                } else {
                    const float *lo = layer->kmin + summary + (int64_t)j * D, *hi = layer->kmax + summary + (int64_t)j * D;
                    for (int d = 0; d < D; d++)
                        value += qsum[d] * (hi[d] + lo[d]) * 0.5f + qabs[d] * (hi[d] - lo[d]) * 0.5f;
                }
                cands[i].score = value;
            }
            select_top(cands, n_cand, n_sel);
        }
        for (int i = 0; i < n_sel; i++) chosen[cands[i].index] = 1;
        /* 3. exact attention: chosen full slices, then the partial last slice */
        for (int j = 0; j < N; j++) {
            if (!chosen[j]) continue;
            const int64_t at = (int64_t)j * L * D;
            attend(&st, qg, G, D, scale, kh + at, vh + at, D, L, vb ? vb + (int64_t)j * L : NULL, NULL);
        }
        if (S > N * L) {
            const int64_t at = (int64_t)N * L * D;
            attend(&st, qg, G, D, scale, kh + at, vh + at, D, S - N * L, vb ? vb + (int64_t)N * L : NULL, NULL);
        }
        /* 4. mediation: one pseudo-token per unselected candidate */
        if (s->mediate && n_cand > n_sel) {
            for (int j = 0; j < N; j++) pseudo_bias[j] = -INFINITY;
            for (int i = n_sel; i < n_cand; i++) pseudo_bias[cands[i].index] = lc[cands[i].index];
            for (int j0 = 0; j0 < N; j0 += widest) {
                int n = N - j0 < widest ? N - j0 : widest;
                attend(&st, qg, G, D, scale, layer->kmean + summary + (int64_t)j0 * D,
                       layer->vmean + summary + (int64_t)j0 * D, D, n, NULL, pseudo_bias + j0);
            }
        }
        for (int g = 0; g < G; g++) {
            float *o = out + ((int64_t)b * s->heads + (int64_t)h * G + g) * D;
            const float inv = st.l[g] > 0.0f ? 1.0f / st.l[g] : 0.0f;
            for (int d = 0; d < D; d++) o[d] = st.acc[g * D + d] * inv;
        }
    }
}

/* The engine's native step's sparse-attention hook (decode_step.c's SparseAttention): layer `layer` of the
 * Step `context`, for the units of `thread`; threads beyond the Step's scratch do nothing. */
void laformer_ama_step_attention(const void *context, int64_t layer, const float *q, int64_t q_stride,
                                 const uint8_t *valid, int64_t valid_stride, int64_t length, float *out, int thread,
                                 int threads) {
    const Step *step = (const Step *)context;
    const int workers = threads < step->threads ? threads : (int)step->threads;
    if (thread >= workers) return;
    laformer_ama_decode(step->settings, &step->layers[layer], q, q_stride, valid, valid_stride, length, out,
                        step->scratch + thread * step->scratch_floats, thread, workers);
}
