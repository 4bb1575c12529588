/* One AMA decode step of one layer in a single call: the fused form of AMAAttention._decode (attention.py),
 * which stays the reference. Per (batch row, KV head), with the G query heads of the group sharing the choice:
 *
 *   1. score every candidate slice from its summary (bound: q.center + |q|.radius of the key min/max box,
 *      summed over the group; or q . mean key), in float32;
 *   2. keep the sink slices and the local window, and pick the best candidates until the budget is spent
 *      (a quickselect, no sort);
 *   3. attend exactly to the tokens of the chosen slices and of the partial last slice, reading them in place
 *      from the slice-blocked cache, with an online softmax (running max, rescaled once per slice);
 *   4. mediation: every unselected candidate is one pseudo-token (mean key, mean value, logit bias
 *      log(count)) folded into the same online softmax, i.e. the log-sum-exp merge of the two partitions.
 *
 * Nothing here allocates per token; the only memory read is the summaries, the chosen slices and q. It runs
 * on one thread: a layer's step is a fraction of a millisecond, less than waking a thread team costs on a
 * loaded machine.
 * Plain C called through ctypes (no torch headers), so it builds in about a second.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
 * calling it vectorise, which libm's expf does not. */
static inline float exp_nonpositive(float x) {
    float clamped = x < -87.0f ? -87.0f : x;
    float n = floorf(clamped * 1.44269504088896341f + 0.5f);
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
        float *acc = st->acc + (int64_t)g * D, l = 0.0f;
        for (int d = 0; d < D; d++) acc[d] *= c;
#pragma omp simd reduction(+ : l)
        for (int t = 0; t < n; t++) {
            s[t] = exp_nonpositive(s[t] - m); /* the weight of token t */
            l += s[t];
        }
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

/* q (B, H, D); k, v (B, Hkv, S, D) with the given batch/head strides and rows of D contiguous floats;
 * valid (B, S) or NULL; kmin, kmax, kmean, vmean (B, Hkv, N, D) contiguous, N = S / L full slices;
 * log_count (B, N); out (B, H, D). n_pick: slices attended besides the partial last one. */
void laformer_ama_decode(const float *q, const float *k, const float *v, int64_t k_sb, int64_t k_sh,
                         int64_t v_sb, int64_t v_sh, const uint8_t *valid, const float *kmin, const float *kmax,
                         const float *kmean, const float *vmean, const float *log_count, float *out, int B, int H,
                         int Hkv, int S, int D, int L, int sink_slices, int local_slices, int n_pick, int score_mean,
                         int mediate) {
    const int G = H / Hkv, N = S / L, own = (S - 1) / L;
    const int local_start = own - local_slices + 1 > 0 ? own - local_slices + 1 : 0;
    const int sink_end = local_start < sink_slices ? local_start : sink_slices;
    const float scale = 1.0f / sqrtf((float)D);
    const int scratch = N > L ? N : L;

    for (int unit = 0; unit < B * Hkv; unit++) {
        const int b = unit / Hkv, h = unit % Hkv;
        const float *qg = q + ((int64_t)b * H + (int64_t)h * G) * D;
        const float *kh = k + b * k_sb + h * k_sh, *vh = v + b * v_sb + h * v_sh;
        const int64_t summary = ((int64_t)b * Hkv + h) * N * D;
        const float *lc = log_count + (int64_t)b * N;
        const uint8_t *vb = valid ? valid + (int64_t)b * S : NULL;

        float *buffer = malloc(sizeof(float) * ((size_t)G * (2 + D + scratch) + 2 * D + N));
        Scored *cands = malloc(sizeof(Scored) * (N > 0 ? N : 1));
        uint8_t *chosen = calloc(N > 0 ? N : 1, 1);
        Softmax st = {buffer, buffer + G, buffer + 2 * G, buffer + G * (2 + D)};
        float *qsum = st.s + (int64_t)G * scratch, *qabs = qsum + D, *pseudo_bias = qabs + D;
        for (int g = 0; g < G; g++) st.m[g] = -INFINITY, st.l[g] = 0.0f;
        memset(st.acc, 0, sizeof(float) * G * D);

        /* 1. scores of the candidates: full slices between the sinks and the local window, not all padding */
        for (int d = 0; d < D; d++) {
            float s = 0.0f, a = 0.0f;
            for (int g = 0; g < G; g++) s += qg[g * D + d], a += fabsf(qg[g * D + d]);
            qsum[d] = s, qabs[d] = a;
        }
        int n_cand = 0, n_forced = 0;
        for (int j = 0; j < N; j++) {
            if (j < sink_end || (j >= local_start && j <= own)) {
                chosen[j] = 1, n_forced++;
            } else if (j < local_start && lc[j] != -INFINITY) {
                const float *lo = kmin + summary + (int64_t)j * D, *hi = kmax + summary + (int64_t)j * D;
                float score = 0.0f;
                if (score_mean) {
                    score = dot(qsum, kmean + summary + (int64_t)j * D, D);
                } else {
                    for (int d = 0; d < D; d++)
                        score += qsum[d] * (hi[d] + lo[d]) * 0.5f + qabs[d] * (hi[d] - lo[d]) * 0.5f;
                }
                cands[n_cand].score = score, cands[n_cand].index = j, n_cand++;
            }
        }
        /* 2. the best candidates fill the budget */
        int n_sel = n_pick - n_forced < n_cand ? n_pick - n_forced : n_cand;
        if (n_sel > 0) {
            select_top(cands, n_cand, n_sel);
            for (int i = 0; i < n_sel; i++) chosen[cands[i].index] = 1;
        }
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
        if (mediate && n_cand > n_sel) {
            for (int j = 0; j < N; j++) pseudo_bias[j] = -INFINITY;
            for (int i = n_sel; i < n_cand; i++) pseudo_bias[cands[i].index] = lc[cands[i].index];
            for (int j0 = 0; j0 < N; j0 += scratch) {
                int n = N - j0 < scratch ? N - j0 : scratch;
                attend(&st, qg, G, D, scale, kmean + summary + (int64_t)j0 * D, vmean + summary + (int64_t)j0 * D,
                       D, n, NULL, pseudo_bias + j0);
            }
        }
        for (int g = 0; g < G; g++) {
            float *o = out + ((int64_t)b * H + (int64_t)h * G + g) * D;
            const float inv = st.l[g] > 0.0f ? 1.0f / st.l[g] : 0.0f;
            for (int d = 0; d < D; d++) o[d] = st.acc[g * D + d] * inv;
        }
        free(buffer);
        free(cands);
        free(chosen);
    }
}
