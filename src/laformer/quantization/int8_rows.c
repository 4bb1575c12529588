/* The work around torch._int_mm for quantized layers over many rows (prefill): rounding each row of activations
 * to int8, rounding grouped weights to one int8 scale per output channel, and scaling the int32 products back to
 * float. Done in PyTorch these were ~15 passes over the activations and outputs, as long as the integer products
 * themselves; here each row is read once, while it is in cache. Built by laformer.native and called through
 * ctypes from quantization/kernels.py.
 */
#include <math.h>

#include "qgemm.c" /* hsum, hmax, and widening float16 scales, int8 and 4-bit weights */

/* The arguments of the three entry points below, one struct each (mirrored by ctypes in quantization/kernels.py
 * and checked at load through laformer_int8_rows_layout). */
typedef struct {
    const float *x, *keep; /* (M, K), (K,) */
    int8_t *q, *q2;        /* (M, K) each */
    float *scales, *scales2, *work; /* (M,), (M,), (threads, 2, K) */
    int64_t m, k, threads;
} RoundRows;

typedef struct {
    const void *weights;       /* int8 (N, K) or packed 4-bit (N, K / 2) */
    const half *scales, *mins; /* (N, K / group); mins NULL for int8 */
    int8_t *out;               /* (N, K) */
    float *row_scales, *work;  /* (N,), (threads, K) */
    int64_t bits, n, k, group, threads;
} WeightsToInt8;

typedef struct {
    const int32_t *a, *b;           /* (M, N) each; b may be NULL */
    const float *sa, *sb, *xo, *wo; /* (M,), (M,), (M, outliers), (outliers, N) */
    const float *w;                 /* (N,) */
    float *y;                       /* (M, N) */
    int64_t outliers, m, n, threads;
} ScaleProducts;

/* Bumped with every change to the meaning of an entry point or struct here; ROWS_ABI in quantization/kernels.py. */
int laformer_int8_rows_abi_version(void) { return 2; }

int laformer_int8_rows_layout(char *out, int capacity) {
    LAYOUT_BEGIN
    LAYOUT_STRUCT(RoundRows) LAYOUT_FIELD(RoundRows, x) LAYOUT_FIELD(RoundRows, keep) LAYOUT_FIELD(RoundRows, q)
    LAYOUT_FIELD(RoundRows, q2) LAYOUT_FIELD(RoundRows, scales) LAYOUT_FIELD(RoundRows, scales2)
    LAYOUT_FIELD(RoundRows, work) LAYOUT_FIELD(RoundRows, m) LAYOUT_FIELD(RoundRows, k)
    LAYOUT_FIELD(RoundRows, threads)
    LAYOUT_STRUCT(WeightsToInt8) LAYOUT_FIELD(WeightsToInt8, weights) LAYOUT_FIELD(WeightsToInt8, scales)
    LAYOUT_FIELD(WeightsToInt8, mins) LAYOUT_FIELD(WeightsToInt8, out) LAYOUT_FIELD(WeightsToInt8, row_scales)
    LAYOUT_FIELD(WeightsToInt8, work) LAYOUT_FIELD(WeightsToInt8, bits) LAYOUT_FIELD(WeightsToInt8, n)
    LAYOUT_FIELD(WeightsToInt8, k) LAYOUT_FIELD(WeightsToInt8, group) LAYOUT_FIELD(WeightsToInt8, threads)
    LAYOUT_STRUCT(ScaleProducts) LAYOUT_FIELD(ScaleProducts, a) LAYOUT_FIELD(ScaleProducts, b)
    LAYOUT_FIELD(ScaleProducts, sa) LAYOUT_FIELD(ScaleProducts, sb) LAYOUT_FIELD(ScaleProducts, xo)
    LAYOUT_FIELD(ScaleProducts, wo) LAYOUT_FIELD(ScaleProducts, w) LAYOUT_FIELD(ScaleProducts, y)
    LAYOUT_FIELD(ScaleProducts, outliers) LAYOUT_FIELD(ScaleProducts, m) LAYOUT_FIELD(ScaleProducts, n)
    LAYOUT_FIELD(ScaleProducts, threads)
    LAYOUT_END
}

/* out = round(v / scale) as int8 (all 0 when scale is 0); residual = v - out * scale and its max |.| in *rmax.
 * residual may be v itself. */
static void round_row(const float *v, int64_t K, float scale, int8_t *out, float *residual, float *rmax) {
    const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    const __m256 vinv = _mm256_set1_ps(inverse), vscale = _mm256_set1_ps(scale), sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 x = _mm256_loadu_ps(v + k);
        __m256 rounded = _mm256_round_ps(_mm256_mul_ps(x, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 rest = _mm256_fnmadd_ps(rounded, vscale, x);
        _mm256_storeu_ps(residual + k, rest);
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, rest));
        __m128i i32lo = _mm256_castsi256_si128(_mm256_cvtps_epi32(rounded));
        __m128i i32hi = _mm256_extracti128_si256(_mm256_cvtps_epi32(rounded), 1);
        __m128i i16 = _mm_packs_epi32(i32lo, i32hi);
        _mm_storel_epi64((__m128i *)(out + k), _mm_packs_epi16(i16, i16));
    }
    float m = hmax(vmax);
    for (; k < K; k++) {
        float rounded = rintf(v[k] * inverse);
        out[k] = (int8_t)rounded;
        residual[k] = v[k] - rounded * scale;
        m = fmaxf(m, fabsf(residual[k]));
    }
    *rmax = m;
}


/* Rounds each row of x (M x K) to int8 with its own scale max|x| / 127 (q, scales), after multiplying it by keep
 * (K values, 1 or 0: the caller multiplies the zeroed columns in float). The rounding residual of each row is
 * rounded the same way (q2, scales2). An all-zero row gets scale 0 and zeros. Returns the sum over rows of
 * max(x^2) / mean(x^2): large when a few values dominate the rows, which is when the residual's product is worth
 * adding. Rounding is to nearest, ties to even, as torch.round. */
double laformer_round_rows(const RoundRows *c) {
    const float *x = c->x, *keep = c->keep;
    int8_t *q = c->q, *q2 = c->q2;
    float *scales = c->scales, *scales2 = c->scales2, *work = c->work;
    const int64_t M = c->m, K = c->k;
    const int threads = (int)c->threads;
    double peaks = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : peaks)
    {
        float *v = work + (int64_t)omp_get_thread_num() * 2 * K, *r = v + K; /* a row and its residual */
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float *row = x + m * K;
            __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
            const __m256 sign = _mm256_set1_ps(-0.0f);
            int64_t k = 0;
            for (; k + 8 <= K; k += 8) {
                __m256 t = _mm256_mul_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(keep + k));
                _mm256_storeu_ps(v + k, t);
                vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, t));
                vsum = _mm256_fmadd_ps(t, t, vsum);
            }
            float amax = hmax(vmax), sumsq = hsum(vsum);
            for (; k < K; k++) {
                v[k] = row[k] * keep[k];
                amax = fmaxf(amax, fabsf(v[k]));
                sumsq += v[k] * v[k];
            }
            float scale = amax / 127.0f, rmax = 0.0f;
            round_row(v, K, scale, q + m * K, r, &rmax);
            float scale2 = rmax / 127.0f, unused;
            round_row(r, K, scale2, q2 + m * K, r, &unused);
            scales[m] = scale;
            scales2[m] = scale2;
            if (sumsq > 0.0f)
                peaks += (double)amax * amax / (sumsq / (float)K);
        }
    }
    return peaks;
}

/* Row n of a grouped int8 or 4-bit matrix (see laformer_weights_to_int8) as floats in w; returns max |w|. Scale
 * then minimum, multiply then add, as ggml's dequantization (and QuantizedLinear.dequantize) does. */
static float dequantize_row(int bits, const void *weights, const half *scale, const half *low, int64_t n, int64_t K,
                            int64_t group, float *w) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t c = 0; c < K; c += 32) { /* group sizes are multiples of 32 */
        const __m256 s = _mm256_set1_ps(widen(scale[c / group]));
        __m256 v[4];
        if (bits == 8)
            widen_q8((const int8_t *)weights + n * K + c, v);
        else
            widen_q4((const uint8_t *)weights + n * (K / 2) + c / 2, v);
        const __m256 m = _mm256_set1_ps(low == NULL ? 0.0f : widen(low[c / group]));
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_add_ps(_mm256_mul_ps(v[i], s), m);
            _mm256_storeu_ps(w + c + 8 * i, v[i]);
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v[i]));
        }
    }
    return hmax(vmax);
}

/* Each row of an int8 (bits 8: int8 values, one float16 scale per group) or 4-bit (bits 4: two values per byte
 * in ggml's order, see linear.pack_int4, float16 scale and minimum per group) weight matrix, dequantized and
 * rounded again to int8 with one scale per row (max |w| / 127): per-channel int8 weights for torch._int_mm,
 * built per call, so that grouped layers prefill through the integer products too. */
void laformer_weights_to_int8(const WeightsToInt8 *c) {
    const void *weights = c->weights;
    const half *scales = c->scales, *mins = c->mins;
    int8_t *out = c->out;
    float *row_scales = c->row_scales, *work = c->work;
    const int64_t N = c->n, K = c->k, group = c->group, groups = K / group;
    const int bits = (int)c->bits, threads = (int)c->threads;
#pragma omp parallel num_threads(threads)
    {
        float *w = work + (int64_t)omp_get_thread_num() * K;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float amax = dequantize_row(bits, weights, scales + n * groups, mins == NULL ? NULL : mins + n * groups,
                                        n, K, group, w);
            float unused;
            row_scales[n] = amax / 127.0f;
            round_row(w, K, amax / 127.0f, out + n * K, w, &unused);
        }
    }
}

#define TILE_ROWS 4 /* rows sharing each load of the outlier weights */

/* Rows m0 .. m0 + rows - 1 (rows <= TILE_ROWS) of laformer_scale_products, 8 columns at a time. Inlined where
 * rows is a constant, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void scale_rows(const int32_t *a, const float *sa, const int32_t *b,
                                                             const float *sb, const float *xo, const float *wo,
                                                             int64_t outliers, const float *w, float *y, int64_t m0,
                                                             int rows, int64_t N) {
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) {
        __m256 acc[TILE_ROWS];
        for (int r = 0; r < rows; r++) {
            int64_t at = (m0 + r) * N + n;
            acc[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(a + at))),
                                   _mm256_set1_ps(sa[m0 + r]));
            if (b != NULL)
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(b + at))),
                                         _mm256_set1_ps(sb[m0 + r]), acc[r]);
        }
        for (int64_t j = 0; j < outliers; j++) {
            __m256 weights = _mm256_loadu_ps(wo + j * N + n);
            for (int r = 0; r < rows; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(xo[(m0 + r) * outliers + j]), weights, acc[r]);
        }
        __m256 column_scales = _mm256_loadu_ps(w + n);
        for (int r = 0; r < rows; r++)
            _mm256_storeu_ps(y + (m0 + r) * N + n, _mm256_mul_ps(acc[r], column_scales));
    }
    for (; n < N; n++) {
        for (int r = 0; r < rows; r++) {
            int64_t m = m0 + r;
            float acc = (float)a[m * N + n] * sa[m];
            if (b != NULL)
                acc += (float)b[m * N + n] * sb[m];
            for (int64_t j = 0; j < outliers; j++)
                acc += xo[m * outliers + j] * wo[j * N + n];
            y[m * N + n] = acc * w[n];
        }
    }
}

/* y[m, n] = (a[m, n] * sa[m] + b[m, n] * sb[m] + sum_j xo[m, j] * wo[j, n]) * w[n], the b term only when b is
 * not NULL: the int8 products of a row (its rounding's and its residual's) back in float, plus the float product
 * of its columns kept out of the rounding (xo: M x outliers, wo: outliers x N, integer weights as floats), times
 * each output column's weight scale. */
void laformer_scale_products(const ScaleProducts *c) {
    const int32_t *a = c->a, *b = c->b;
    const float *sa = c->sa, *sb = c->sb, *xo = c->xo, *wo = c->wo, *w = c->w;
    float *y = c->y;
    const int64_t outliers = c->outliers, M = c->m, N = c->n;
    const int threads = (int)c->threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
        if (M - m0 >= TILE_ROWS)
            scale_rows(a, sa, b, sb, xo, wo, outliers, w, y, m0, TILE_ROWS, N);
        else
            for (int64_t m = m0; m < M; m++)
                scale_rows(a, sa, b, sb, xo, wo, outliers, w, y, m, 1, N);
    }
}
