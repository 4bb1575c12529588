/* Matrix products with quantized weights for small batches (decode): y[M,N] = x[M,K] @ dequant(W)^T, M up to 8.
 *
 * Two families of column kernels, one per treatment of the activations:
 *
 * - float activations (laformer_qgemm, the PyTorch operator laformer::qgemm): weights are widened to float32 in
 *   registers, so the result equals the float product with the dequantized weights up to summation order. The
 *   PyTorch decode step (eager or compiled) uses these: exact weight-only quantization.
 * - int8 activations (the native decode step, inference/decode_step.c): as llama.cpp does, activations are rounded
 *   to int8 in blocks of 32 values with a float scale each (ggml's Q8_0: scale = max |x| / 127, round to nearest
 *   even) and AVX2's maddubs multiplies 32 weight bytes by 32 activation bytes, adding neighbouring pairs, in one
 *   instruction: about half the instructions of widening every weight, and a batch-1 SmolLM2 step is
 *   instruction-bound on this CPU (1.8x faster per thread). The rounding costs decode perplexity (+0.0% with int8
 *   weights, +1.1% with 4-bit on SmolLM2; docs/quantization.md).
 *
 * Layouts (the module buffers, unchanged):
 *   bits 8: w int8 [N, K]; value = w * scales[n, k / G]
 *   bits 4: w uint8 [N, K / 2] in chunks of 32 values: byte j of a chunk holds value j (low nibble) and value
 *           j + 16 (high nibble), as ggml's Q4_0/Q4_1 blocks do; value = q * scales[n, k / G] + mins[n, k / G]
 *   scales and mins are float16 (as ggml's blocks), read as uint16 and widened with F16C
 *   bits 32: w float32 [N, K], no scales or mins (the native decode step's unquantized layers)
 * K and G are multiples of 32, G divides K. mins may be NULL (symmetric). Built with AVX2, FMA and F16C.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "abi.h"

typedef uint16_t half; /* IEEE float16 bits */

static inline float widen(half h) { return _cvtsh_ss(h); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* The sum of n accumulators. */
static inline __m256 add_all(const __m256 *acc, int n) {
    __m256 t = acc[0];
    for (int j = 1; j < n; j++) t = _mm256_add_ps(t, acc[j]);
    return t;
}

/* ------------------------------------------------------------------ float activations */

static inline void widen_f32(const float *p, __m256 w[4]) {
    for (int j = 0; j < 4; j++) w[j] = _mm256_loadu_ps(p + 8 * j);
}

static inline void widen_q8(const int8_t *p, __m256 w[4]) {
    for (int j = 0; j < 4; j++)
        w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * j))));
}

static inline void widen_q4(const uint8_t *p, __m256 w[4]) {
    const __m256i low = _mm256_set1_epi32(0x0F);
    __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));        /* bytes 0..7 */
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));  /* bytes 8..15 */
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, low));  /* values 0..7 */
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));  /* values 8..15 */
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));   /* values 16..23 */
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));   /* values 24..31 */
}

/* ACC[r][.] += the 32 float weights V times row m0 + r of x at column k, for the R rows (inside a column kernel). */
#define FMA_ROWS(ACC, V, R, A)                                                                                        \
    for (int r = 0; r < R; r++) {                                                                                     \
        const float *xr = x + (m0 + r) * K + k;                                                                       \
        for (int j = 0; j < 4; j++) ACC[r][j % A] = _mm256_fmadd_ps(V[j], _mm256_loadu_ps(xr + 8 * j), ACC[r][j % A]); \
    }

/* One output column n for R consecutive rows of x: each weight chunk is widened once and used R times, and the
   scale (and min, through the group sums of x) is applied once per group and row. A (4 or 2) accumulators per row
   keep the FMA chains independent within the 16 vector registers. */
#define DEFINE_COLUMN(NAME, BITS, R, A)                                                                               \
    static inline void NAME(const float *x, const void *w, const half *scales, const half *mins, const float *xsum,   \
                            float *y, int64_t m0, int64_t n, int64_t N, int64_t K, int64_t G) {                       \
        const int64_t groups = K / G;                                                                                 \
        __m256 out[R];                                                                                                \
        float offset[R];                                                                                              \
        for (int r = 0; r < R; r++) { out[r] = _mm256_setzero_ps(); offset[r] = 0.f; }                                \
        for (int64_t g = 0; g < groups; g++) {                                                                        \
            __m256 acc[R][A];                                                                                         \
            for (int r = 0; r < R; r++)                                                                               \
                for (int j = 0; j < A; j++) acc[r][j] = _mm256_setzero_ps();                                          \
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {                                                       \
                __m256 v[4];                                                                                          \
                if (BITS == 8) widen_q8((const int8_t *)w + n * K + k, v);                                            \
                else widen_q4((const uint8_t *)w + n * (K / 2) + k / 2, v);                                           \
                FMA_ROWS(acc, v, R, A);                                                                               \
            }                                                                                                         \
            const __m256 s = _mm256_set1_ps(widen(scales[n * groups + g]));                                           \
            for (int r = 0; r < R; r++) {                                                                             \
                out[r] = _mm256_fmadd_ps(s, add_all(acc[r], A), out[r]);                                              \
                if (mins) offset[r] += widen(mins[n * groups + g]) * xsum[(m0 + r) * groups + g];                     \
            }                                                                                                         \
        }                                                                                                             \
        for (int r = 0; r < R; r++) y[(m0 + r) * N + n] = hsum(out[r]) + offset[r];                                   \
    }

DEFINE_COLUMN(column_q8_1, 8, 1, 4)
DEFINE_COLUMN(column_q8_4, 8, 4, 2)
DEFINE_COLUMN(column_q4_4, 4, 4, 2)

/* One output column n for R consecutive rows, dequantizing each weight chunk (q * scale + min) once in registers
   and using it for all R rows, with A accumulators per row. This moves the per-group work (scale, min) from every
   row to the chunk, which pays where that work is a large share: at 8 rows (FMA-bound; 8 + 4 weights + scale, min
   and x fill 15 of the 16 registers; 1.2-1.5x faster than two passes of 4 rows for 4-bit weights, 1.0-1.1x for
   int8) and for single rows of 4-bit weights in groups of 32 (ggml's Q4_0/Q4_1; 1.1x, equal at group 64). */
#define DEFINE_DEQUANT_COLUMN(NAME, BITS, R, A)                                                                       \
    static inline void NAME(const float *x, const void *w, const half *scales, const half *mins, const float *xsum,   \
                            float *y, int64_t m0, int64_t n, int64_t N, int64_t K, int64_t G) {                       \
        const int64_t groups = K / G;                                                                                 \
        __m256 out[R][A];                                                                                             \
        for (int r = 0; r < R; r++)                                                                                   \
            for (int j = 0; j < A; j++) out[r][j] = _mm256_setzero_ps();                                              \
        for (int64_t g = 0; g < groups; g++) {                                                                        \
            const __m256 s = _mm256_set1_ps(BITS == 32 ? 1.f : widen(scales[n * groups + g]));                        \
            const __m256 b = _mm256_set1_ps(mins ? widen(mins[n * groups + g]) : 0.f);                                \
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {                                                       \
                __m256 v[4];                                                                                          \
                if (BITS == 8) widen_q8((const int8_t *)w + n * K + k, v);                                            \
                else if (BITS == 4) widen_q4((const uint8_t *)w + n * (K / 2) + k / 2, v);                            \
                else widen_f32((const float *)w + n * K + k, v);                                                      \
                if (BITS != 32)                                                                                       \
                    for (int j = 0; j < 4; j++) v[j] = _mm256_fmadd_ps(v[j], s, b);                                   \
                FMA_ROWS(out, v, R, A);                                                                               \
            }                                                                                                         \
        }                                                                                                             \
        for (int r = 0; r < R; r++) y[(m0 + r) * N + n] = hsum(add_all(out[r], A));                                   \
    }

DEFINE_DEQUANT_COLUMN(column_q8_8, 8, 8, 1)
DEFINE_DEQUANT_COLUMN(column_q4_8, 4, 8, 1)
DEFINE_DEQUANT_COLUMN(column_q4_1, 4, 1, 4)
DEFINE_DEQUANT_COLUMN(column_f32_8, 32, 8, 1)
DEFINE_DEQUANT_COLUMN(column_f32_4, 32, 4, 2)
DEFINE_DEQUANT_COLUMN(column_f32_1, 32, 1, 4)

/* sum_k (q*s + m) x_k = s * sum_k q x_k + m * sum_k x_k: the group sums of x (M, K / G) are shared by all columns. */
static void group_sums(const float *x, int64_t M, int64_t K, int64_t G, float *xsum) {
    for (int64_t i = 0; i < M * (K / G); i++) {
        float s = 0.f;
        for (int64_t k = 0; k < G; k++) s += x[i * G + k];
        xsum[i] = s;
    }
}

/* ------------------------------------------------------------------ int8 activations */

/* The activations of one call: per block of 32 values the int8 vector and its scale, and per group of G values
   the float sum (for the min term of 4-bit weights: sum_k (q s + m) x_k = s sum_k q x_k + m sum_k x_k). */
typedef struct {
    int8_t *q;    /* (M, K) */
    float *scale; /* (M, K / 32) */
    float *sum;   /* (M, K / G) */
} Blocks;

static inline int64_t blocks_bytes(int64_t M, int64_t K) { return M * K + 2 * sizeof(float) * M * (K / 32); }

/* Quantize x (M, K) into blocks carved from ``buffer`` (blocks_bytes(M, K) bytes). */
static inline Blocks quantize_rows(const float *x, int64_t M, int64_t K, int64_t G, void *buffer) {
    Blocks a = {(int8_t *)buffer, (float *)((int8_t *)buffer + M * K), NULL};
    a.sum = a.scale + M * (K / 32);
    const __m256 sign = _mm256_set1_ps(-0.f);
    const int64_t per_group = G / 32;
    for (int64_t i = 0; i < M * K / 32; i++) {
        __m256 v[4], top = _mm256_setzero_ps(), total = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 32 * i + 8 * j);
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[j]));
            total = _mm256_add_ps(total, v[j]);
        }
        const float amax = hmax(top);
        const __m256 inverse = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i n[4];
        for (int j = 0; j < 4; j++)
            n[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inverse),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* the packs work within 128-bit lanes; the permute puts the 32 bytes back in order */
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(a.q + 32 * i), bytes);
        a.scale[i] = amax / 127.f;
        const float block_sum = hsum(total);
        if (i % per_group == 0) a.sum[i / per_group] = 0.f; /* groups never straddle rows: G divides K */
        a.sum[i / per_group] += block_sum;
    }
    return a;
}

/* 32 4-bit weights as bytes 0..15 in value order: low nibbles are values 0..15, high nibbles 16..31. */
static inline __m256i unpack_q4(const uint8_t *p) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
}

/* The 32 products of unsigned weight bytes and signed activation bytes, summed into 8 floats. A pair of products
   fits int16 (2 * 128 * 127), so maddubs never saturates. */
static inline __m256 dot_bytes(__m256i unsigned_w, __m256i signed_x) {
    const __m256i pairs = _mm256_maddubs_epi16(unsigned_w, signed_x);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* sum_g mins[g] * sums[g] in vectors of 8 groups: a scalar loop would be one long dependency chain per column. */
static inline float min_terms(const half *mins, const float *sums, int64_t groups) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + g))),
                              _mm256_loadu_ps(sums + g), acc);
    float total = hsum(acc);
    for (; g < groups; g++) total += widen(mins[g]) * sums[g];
    return total;
}

/* Output column n for R consecutive rows: each 32-weight chunk is unpacked once and used for all R rows, its
   integer dot product scaled by (weight scale x activation scale). A accumulators per row, rotated each chunk,
   keep the FMA chains independent (a runtime index such as acc[c % A] would keep them in memory, 1.4x slower).
   int8 weights use the sign trick: |w| (unsigned) times x with the sign of w. */
#define DEFINE_INT8_COLUMN(NAME, BITS, R, A)                                                                          \
    static inline void NAME(Blocks a, const void *w, const half *scales, const half *mins, float *y, int64_t m0,      \
                            int64_t n, int64_t N, int64_t K, int64_t G) {                                             \
        const int64_t groups = K / G, chunks = K / 32, per_group = G / 32; /* no division inside the loops */         \
        __m256 acc[R][A];                                                                                             \
        for (int r = 0; r < R; r++)                                                                                   \
            for (int j = 0; j < A; j++) acc[r][j] = _mm256_setzero_ps();                                              \
        for (int64_t g = 0, c = 0; g < groups; g++) {                                                                 \
            const float s = widen(scales[n * groups + g]);                                                            \
            for (const int64_t end = c + per_group; c < end; c++) {                                                   \
                __m256i wv, wabs;                                                                                     \
                if (BITS == 4) {                                                                                      \
                    wv = wabs = unpack_q4((const uint8_t *)w + n * (K / 2) + c * 16);                                 \
                } else {                                                                                              \
                    wv = _mm256_loadu_si256((const __m256i *)((const int8_t *)w + n * K + c * 32));                   \
                    wabs = _mm256_sign_epi8(wv, wv);                                                                  \
                }                                                                                                     \
                for (int r = 0; r < R; r++) {                                                                         \
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(a.q + (m0 + r) * K + c * 32));                  \
                    if (BITS == 8) xv = _mm256_sign_epi8(xv, wv);                                                     \
                    const __m256 scale = _mm256_set1_ps(s * a.scale[(m0 + r) * chunks + c]);                          \
                    const __m256 sum = _mm256_fmadd_ps(dot_bytes(wabs, xv), scale, acc[r][A - 1]);                    \
                    for (int j = A - 1; j > 0; j--) acc[r][j] = acc[r][j - 1]; /* rotate: no runtime index */         \
                    acc[r][0] = sum;                                                                                  \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
        for (int r = 0; r < R; r++) {                                                                                 \
            float out = hsum(add_all(acc[r], A));                                                                     \
            if (mins) out += min_terms(mins + n * groups, a.sum + (m0 + r) * groups, groups);                         \
            y[(m0 + r) * N + n] = out;                                                                                \
        }                                                                                                             \
    }

DEFINE_INT8_COLUMN(int8_column_q8_8, 8, 8, 1)
DEFINE_INT8_COLUMN(int8_column_q8_4, 8, 4, 1)
DEFINE_INT8_COLUMN(int8_column_q8_1, 8, 1, 2)
DEFINE_INT8_COLUMN(int8_column_q4_8, 4, 8, 1)
DEFINE_INT8_COLUMN(int8_column_q4_4, 4, 4, 1)
DEFINE_INT8_COLUMN(int8_column_q4_1, 4, 1, 2)

/* Output columns [n0, n1) for all M rows: blocks of 8 rows, then 4, then single rows. The kernel is chosen once per
   range, not per column: a column of a SmolLM2 projection takes ~25 ns, a call with its dispatch ~20. Quantized
   weights read the int8 activation blocks a when a.q is set, else the float x (with its group sums xsum for
   4-bit weights); float32 weights (bits 32) read x. */
static void qgemm_columns(int bits, const float *x, const float *xsum, Blocks a, const void *w, const half *scales,
                          const half *mins, float *y, int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K,
                          int64_t G) {
    int64_t m = 0;
#define ROW_BLOCKS(R)                                                                                                 \
    for (; m + R <= M; m += R) {                                                                                      \
        if (bits == 32)                                                                                               \
            for (int64_t n = n0; n < n1; n++) column_f32_##R(x, w, NULL, NULL, NULL, y, m, n, N, K, K);               \
        else if (a.q && bits == 8)                                                                                    \
            for (int64_t n = n0; n < n1; n++) int8_column_q8_##R(a, w, scales, mins, y, m, n, N, K, G);               \
        else if (a.q)                                                                                                 \
            for (int64_t n = n0; n < n1; n++) int8_column_q4_##R(a, w, scales, mins, y, m, n, N, K, G);               \
        else if (bits == 8)                                                                                           \
            for (int64_t n = n0; n < n1; n++) column_q8_##R(x, w, scales, mins, xsum, y, m, n, N, K, G);              \
        else                                                                                                          \
            for (int64_t n = n0; n < n1; n++) column_q4_##R(x, w, scales, mins, xsum, y, m, n, N, K, G);              \
    }
    ROW_BLOCKS(8)
    ROW_BLOCKS(4)
    ROW_BLOCKS(1)
#undef ROW_BLOCKS
}

/* One call of laformer_qgemm: y (M, N) = x (M, K) @ dequant(w)^T, w laid out as above. int8_activations selects
   the native decode step's arithmetic (int8 activation blocks; for tests and benchmarks). */
typedef struct {
    const float *x;
    const void *w;
    const half *scales, *mins; /* mins NULL for symmetric weights */
    float *y;
    int64_t bits, m, n, k, g, threads, int8_activations;
} Qgemm;

/* Bumped with every change to the meaning of an exported function or struct here (their layout is checked at load
   as well); QGEMM_ABI in quantization/kernels.py. */
int laformer_qgemm_abi_version(void) { return 2; }

int laformer_qgemm_layout(char *out, int capacity) {
    LAYOUT_BEGIN
    LAYOUT_STRUCT(Qgemm) LAYOUT_FIELD(Qgemm, x) LAYOUT_FIELD(Qgemm, w) LAYOUT_FIELD(Qgemm, scales)
    LAYOUT_FIELD(Qgemm, mins) LAYOUT_FIELD(Qgemm, y) LAYOUT_FIELD(Qgemm, bits) LAYOUT_FIELD(Qgemm, m)
    LAYOUT_FIELD(Qgemm, n) LAYOUT_FIELD(Qgemm, k) LAYOUT_FIELD(Qgemm, g) LAYOUT_FIELD(Qgemm, threads)
    LAYOUT_FIELD(Qgemm, int8_activations)
    LAYOUT_END
}

/* Returns 0, or 1 when scratch memory could not be allocated. */
int laformer_qgemm(const Qgemm *c) {
    const int64_t M = c->m, N = c->n, K = c->k, G = c->g;
    const int bits = (int)c->bits;
    void *buffer = malloc(c->int8_activations ? blocks_bytes(M, K) : sizeof(float) * M * (K / G));
    if (!buffer) return 1;
    const Blocks none = {0};
    const Blocks a = c->int8_activations ? quantize_rows(c->x, M, K, G, buffer) : none;
    float *xsum = c->int8_activations ? NULL : (float *)buffer;
    if (!c->int8_activations && c->mins) group_sums(c->x, M, K, G, xsum);
    if (c->threads <= 1) { /* even a one-thread OpenMP region costs ~10 us and slowed the columns ~25% here */
        qgemm_columns(bits, c->x, xsum, a, c->w, c->scales, c->mins, c->y, M, 0, N, N, K, G);
    } else {
#pragma omp parallel num_threads((int)c->threads)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            qgemm_columns(bits, c->x, xsum, a, c->w, c->scales, c->mins, c->y, M, N * t / T, N * (t + 1) / T, N, K, G);
        }
    }
    free(buffer);
    return 0;
}
