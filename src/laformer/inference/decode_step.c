/* One whole decode step of a LLaMA decoder in one call: embedding, every layer, final norm and output head.
 *
 * At batch 1 a step is ~120 small matrix-vector products; run from PyTorch, even compiled, the per-op work around
 * them (dispatch, the graph's wrapper, attention calls, one OpenMP fork/join per product) cost about as much as the
 * products. Here the step is one OpenMP parallel region: the threads split each product's output columns and meet
 * at a barrier between dependent phases (six per layer), as llama.cpp does; the barrier is our own (below). The
 * matrix products are qgemm.c's column kernels (int8, 4-bit and float32 weights), reading the model's own weights
 * in place: the q, k and v projections (and gate and up) share one phase, so they need no fused copy. Everything
 * else is small and written out below.
 *
 * Semantics are the PyTorch engine's (laformer.inference.engine): the static cache (B, Hkv, S, D) is written at
 * column slot[b], attention covers the columns where valid[b] is set (this one included), rotary positions come
 * from position[b], and slot and position advance by one. Layers are pre-norm, with RMSNorm, half-split rotary
 * embeddings and SwiGLU.
 */
#include <math.h>
#include <omp.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../quantization/qgemm.c"

typedef struct {
    const void *w;          /* int8 (N, K), packed 4-bit (N, K / 2) or float32 (N, K) */
    const half *scales;     /* float16 (N, K / G); NULL for float32 */
    const half *mins;       /* float16 (N, K / G) for 4-bit; else NULL */
    int64_t bits, n, k, g;  /* bits 4, 8 or 32; out features, in features, group size */
    int64_t int8_activations; /* quantized weights: 1 rounds the input to int8 blocks, 0 keeps it float */
} Linear;

typedef struct {
    Linear q, k, v, o, gate, up, down; /* q, k, v (and gate, up) share bits, group size and int8_activations */
    const float *input_norm, *post_norm;
    float *keys, *values; /* (B, Hkv, S, D) */
    int64_t sparse;       /* nonzero: the model's sparse attention (AMA) attends for this layer */
} Layer;

/* Another attention over the cache (AMA, ama/kernel.c's laformer_ama_step_attention): for rows in lockstep, each
   holding `length` columns (the new one included), q the rotated queries (B rows q_stride floats apart, heads of
   D), out (B, H, D). Every thread calls it with its number; it splits the work itself. */
typedef void (*SparseAttention)(const void *context, int64_t layer, const float *q, int64_t q_stride,
                                const uint8_t *valid, int64_t valid_stride, int64_t length, float *out, int thread,
                                int threads);

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, ffn, vocab, batch, cache_len;
    float eps;
    const float *embedding; /* (vocab, hidden) */
    const float *inv_freq;  /* (head_dim / 2) */
    const float *final_norm;
    Linear head;
    const Layer *layer;
    SparseAttention sparse; /* NULL unless a layer is sparse */
    const void *sparse_context;
} Model;

/* One call's per-row state: tokens (B,) in; slot, position (B,) advanced by one; valid (B, S) gains each row's new
   column; logits (B, vocab) out; scratch of laformer_decode_scratch_bytes(model, threads) bytes. */
typedef struct {
    const int64_t *tokens;
    int64_t *slot, *position;
    uint8_t *valid;
    float *logits;
    void *scratch;
    int64_t threads;
} Step;

/* Bumped with every change to the meaning of a struct or function here (their layout is checked at load as well);
   ABI_VERSION in inference/native_step.py. */
int laformer_decode_abi_version(void) { return 5; }

int laformer_decode_layout(char *out, int capacity) {
    LAYOUT_BEGIN
    LAYOUT_STRUCT(Linear) LAYOUT_FIELD(Linear, w) LAYOUT_FIELD(Linear, scales) LAYOUT_FIELD(Linear, mins)
    LAYOUT_FIELD(Linear, bits) LAYOUT_FIELD(Linear, n) LAYOUT_FIELD(Linear, k) LAYOUT_FIELD(Linear, g)
    LAYOUT_FIELD(Linear, int8_activations)
    LAYOUT_STRUCT(Layer) LAYOUT_FIELD(Layer, q) LAYOUT_FIELD(Layer, k) LAYOUT_FIELD(Layer, v)
    LAYOUT_FIELD(Layer, o) LAYOUT_FIELD(Layer, gate) LAYOUT_FIELD(Layer, up) LAYOUT_FIELD(Layer, down)
    LAYOUT_FIELD(Layer, input_norm) LAYOUT_FIELD(Layer, post_norm)
    LAYOUT_FIELD(Layer, keys) LAYOUT_FIELD(Layer, values) LAYOUT_FIELD(Layer, sparse)
    LAYOUT_STRUCT(Model) LAYOUT_FIELD(Model, layers) LAYOUT_FIELD(Model, hidden) LAYOUT_FIELD(Model, heads)
    LAYOUT_FIELD(Model, kv_heads) LAYOUT_FIELD(Model, head_dim) LAYOUT_FIELD(Model, ffn) LAYOUT_FIELD(Model, vocab)
    LAYOUT_FIELD(Model, batch) LAYOUT_FIELD(Model, cache_len) LAYOUT_FIELD(Model, eps)
    LAYOUT_FIELD(Model, embedding) LAYOUT_FIELD(Model, inv_freq) LAYOUT_FIELD(Model, final_norm)
    LAYOUT_FIELD(Model, head) LAYOUT_FIELD(Model, layer) LAYOUT_FIELD(Model, sparse) LAYOUT_FIELD(Model, sparse_context)
    LAYOUT_STRUCT(Step) LAYOUT_FIELD(Step, tokens) LAYOUT_FIELD(Step, slot) LAYOUT_FIELD(Step, position)
    LAYOUT_FIELD(Step, valid) LAYOUT_FIELD(Step, logits) LAYOUT_FIELD(Step, scratch) LAYOUT_FIELD(Step, threads)
    LAYOUT_END
}

/* The team's barrier between phases. A waiting thread spins (pause) for a while, then sleeps on a futex until the
   last thread arrives, which wakes sleepers only if there are any. An OpenMP barrier under OMP_WAIT_POLICY=PASSIVE
   sleeps at once, and ~180 sleeps and wake-ups per step cost as much as the step's arithmetic on an idle machine;
   one that only spins (ACTIVE, llama.cpp's) burns the core that the awaited thread needs on a loaded one. So the
   spin adapts: a wait that the spin covered lets the next spin be longer (up to SPIN_MAX cycles, ~20 us, about a
   phase's imbalance), one that had to sleep halves it. */
enum { SPIN_MAX = 60000, SPIN_MIN = 500 };
static atomic_int spin_budget = SPIN_MAX; /* shared by every team: the machine's load is what it tracks */

typedef struct {
    atomic_int arrived, phase, sleepers;
    int threads;
} Barrier;

static void barrier_wait(Barrier *b) {
    if (b->threads == 1) return;
    const int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->arrived, 1) == b->threads - 1) {
        atomic_store(&b->arrived, 0);
        atomic_store(&b->phase, phase + 1);
        if (atomic_load(&b->sleepers)) syscall(SYS_futex, &b->phase, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
        return;
    }
    const int budget = atomic_load_explicit(&spin_budget, memory_order_relaxed);
    const uint64_t start = __rdtsc();
    while (atomic_load_explicit(&b->phase, memory_order_acquire) == phase) {
        if (__rdtsc() - start < (uint64_t)budget) {
            _mm_pause();
            continue;
        }
        atomic_store_explicit(&spin_budget, budget / 2 > SPIN_MIN ? budget / 2 : SPIN_MIN, memory_order_relaxed);
        atomic_fetch_add(&b->sleepers, 1); /* seq_cst: either the last thread sees it, or we see the new phase */
        while (atomic_load(&b->phase) == phase)
            syscall(SYS_futex, &b->phase, FUTEX_WAIT_PRIVATE, phase, NULL, NULL, 0);
        atomic_fetch_sub(&b->sleepers, 1);
        return;
    }
    if (budget < SPIN_MAX)
        atomic_store_explicit(&spin_budget, budget + SPIN_MAX / 16 < SPIN_MAX ? budget + SPIN_MAX / 16 : SPIN_MAX,
                              memory_order_relaxed);
}

/* This thread's share [*u0, *u1) of n work items. */
static void share(int64_t n, int64_t *u0, int64_t *u1) {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    *u0 = n * t / T;
    *u1 = n * (t + 1) / T;
}

enum { STORE, ADD_TO, SWIGLU };

/* Every thread normalises all rows into its own buffer: cheaper than sharing one behind a barrier. */
static void norm_rows(const float *x, const float *weight, float *out, int64_t rows, int64_t d, float eps) {
    for (int64_t b = 0; b < rows; b++) {
        const float *xb = x + b * d;
        float ss = 0.f;
        for (int64_t i = 0; i < d; i++) ss += xb[i] * xb[i];
        const float r = 1.f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) out[b * d + i] = weight[i] * (xb[i] * r);
    }
}

/* y = x @ [W_0; W_1; ...]^T for the `count` linears of one phase (q, k, v; gate, up; or one), side by side in y
   (row stride the sum of their widths), each split by output column across the team (a contiguous range per
   thread), with the consumer of each column fused in: STORE leaves y; ADD_TO adds y to out (the residual stream,
   one linear); SWIGLU takes the two linears as gate and up and writes silu(gate) * up to out. Ends at a barrier. */
static void project(const Linear *const *L, int count, const float *x, int64_t rows, float *y, float *out, int how,
                    void *scratch, Barrier *barrier) {
    /* Quantized weights multiply int8 activations (qgemm.c) or, without int8_activations, the float x (4-bit
       weights with its group sums); each thread rounds or sums its own copy, which costs less than a barrier. Float
       weights read x. The linears of one phase share bits, K, G and int8_activations (native_step.py checks). */
    const Linear *first = L[0];
    Blocks a = {0};
    float *xsum = NULL;
    if (first->bits != 32 && first->int8_activations) {
        a = quantize_rows(x, rows, first->k, first->g, scratch);
    } else if (first->mins) {
        xsum = (float *)scratch; /* rows * K / G floats: fits, G >= 32 */
        group_sums(x, rows, first->k, first->g, xsum);
    }
    int64_t N = 0;
    for (int i = 0; i < count; i++) N += L[i]->n;
    for (int i = 0, offset = 0; i < count; offset += (int)L[i]->n, i++) {
        int64_t n0, n1;
        share(L[i]->n, &n0, &n1);
        qgemm_columns((int)L[i]->bits, x, xsum, a, L[i]->w, L[i]->scales, L[i]->mins, y + offset, rows, n0, n1, N,
                      L[i]->k, L[i]->g);
    }
    int64_t n0, n1;
    share(L[0]->n, &n0, &n1);
    if (how == SWIGLU) {
        const int64_t F = L[0]->n;
        for (int64_t b = 0; b < rows; b++)
            for (int64_t n = n0; n < n1; n++) {
                const float gate = y[b * N + n], up = y[b * N + n + F];
                out[b * F + n] = gate / (1.f + expf(-gate)) * up;
            }
    } else if (how == ADD_TO) {
        for (int64_t b = 0; b < rows; b++)
            for (int64_t n = n0; n < n1; n++) out[b * N + n] += y[b * N + n];
    }
    barrier_wait(barrier);
}

/* Half-split rotary embedding (Hugging Face layout) of one head. */
static void rotate(const float *x, const float *cos_, const float *sin_, float *out, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        out[i] = a * cos_[i] - b * sin_[i];
        out[i + half] = b * cos_[i] + a * sin_[i];
    }
}

static inline float dot(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
}

/* out = softmax(q . K[s] / sqrt(D) over the valid columns s < limit) . V, for one query head. */
static void attend(const float *q, const float *K, const float *V, const uint8_t *valid, int64_t limit, int64_t D,
                   float *scores, float *out) {
    const float scale = 1.f / sqrtf((float)D);
    float top = -INFINITY;
    for (int64_t s = 0; s < limit; s++) {
        if (!valid[s]) continue;
        scores[s] = dot(q, K + s * D, D) * scale;
        if (scores[s] > top) top = scores[s];
    }
    float total = 0.f;
    for (int64_t s = 0; s < limit; s++)
        if (valid[s]) total += scores[s] = expf(scores[s] - top);
    __m256 acc[32]; /* D <= 256 */
    for (int64_t i = 0; i < D / 8; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t s = 0; s < limit; s++) {
        if (!valid[s]) continue;
        const __m256 p = _mm256_set1_ps(scores[s] / total);
        for (int64_t i = 0; i < D / 8; i++) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(V + s * D + 8 * i), acc[i]);
    }
    for (int64_t i = 0; i < D / 8; i++) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

static int64_t max3(int64_t a, int64_t b, int64_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* The step's scratch in floats: shared buffers (x, qkv, attention output, SwiGLU activation, projection output,
   rotary cos|sin per row) and one private set per thread (normalised rows, attention scores, one rotated query,
   the input's int8 blocks). */
static void scratch_layout(const Model *m, int64_t *shared, int64_t *own, int64_t *widest) {
    const int64_t B = m->batch, d = m->hidden, D = m->head_dim, H = m->heads, Hkv = m->kv_heads;
    const Layer *first = &m->layer[0];
    /* the widest phase's output; o and down give d */
    *widest = max3(m->head.n, first->q.n + first->k.n + first->v.n, first->gate.n + first->up.n);
    *shared = B * (d + (H + 2 * Hkv) * D + H * D + m->ffn + *widest + D);
    *own = B * d + m->cache_len + D + (blocks_bytes(B, max3(d, m->ffn, H * D)) + 3) / 4;
}

/* Bytes of scratch laformer_decode_step needs with ``threads`` threads: the caller allocates it once, so a step
   allocates nothing. */
int64_t laformer_decode_scratch_bytes(const Model *m, int threads) {
    int64_t shared, own, widest;
    scratch_layout(m, &shared, &own, &widest);
    return sizeof(int64_t) * m->batch + sizeof(float) * (shared + threads * own);
}

/* One token for every row of the batch (any size: the column kernels take the rows in blocks of 8, 4 and 1).
   Returns 0; or, changing nothing, 2 for a token id outside the vocabulary, 3 for a row whose cache is full. */
int laformer_decode_step(const Model *m, const Step *step) {
    const int64_t *tokens = step->tokens;
    int64_t *slot = step->slot, *position = step->position;
    uint8_t *valid = step->valid;
    float *logits = step->logits;
    const int threads = (int)step->threads;
    const int64_t B = m->batch, d = m->hidden, D = m->head_dim, H = m->heads, Hkv = m->kv_heads, S = m->cache_len;
    const int64_t QKV = (H + 2 * Hkv) * D, group = H / Hkv;
    for (int64_t b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return 2;
        if (slot[b] < 0 || slot[b] >= S) return 3;
    }
    int64_t shared, own, widest;
    scratch_layout(m, &shared, &own, &widest);
    int64_t *limit = (int64_t *)step->scratch; /* per row: one past the last valid column */
    float *scratch = (float *)(limit + B);
    float *x = scratch, *qkv = x + B * d, *attn = qkv + B * QKV, *act = attn + B * H * D, *y = act + B * m->ffn;
    float *rope = y + B * widest;
    int64_t lockstep = 0; /* the sparse attention's length: the widest row (a parked row sits at column 0) */

    for (int64_t b = 0; b < B; b++) {
        lockstep = slot[b] + 1 > lockstep ? slot[b] + 1 : lockstep;
        memcpy(x + b * d, m->embedding + tokens[b] * d, sizeof(float) * d);
        for (int64_t i = 0; i < D / 2; i++) {
            const float angle = (float)position[b] * m->inv_freq[i];
            rope[b * D + i] = cosf(angle);
            rope[b * D + D / 2 + i] = sinf(angle);
        }
        valid[b * S + slot[b]] = 1;
        limit[b] = S;
        while (limit[b] > 0 && !valid[b * S + limit[b] - 1]) limit[b]--;
    }

    Barrier barrier = {0, 0, 0, threads};
#pragma omp parallel num_threads(threads)
    {
        float *h = scratch + shared + omp_get_thread_num() * own;
        float *scores = h + B * d, *q = scores + S, *own_blocks = q + D;
        int64_t u0, u1;
        if (omp_get_thread_num() == 0) barrier.threads = omp_get_num_threads(); /* the team OpenMP gave us */
#pragma omp barrier
        for (int64_t l = 0; l < m->layers; l++) {
            const Layer *L = &m->layer[l];
            const Linear *qkv_[] = {&L->q, &L->k, &L->v}, *o_[] = {&L->o}, *gate_up_[] = {&L->gate, &L->up},
                         *down_[] = {&L->down};
            norm_rows(x, L->input_norm, h, B, d, m->eps);
            project(qkv_, 3, h, B, qkv, NULL, STORE, own_blocks, &barrier);
            share(B * Hkv, &u0, &u1);
            for (int64_t u = u0; u < u1; u++) { /* the new key (rotated) and value into the cache */
                const int64_t b = u / Hkv, g = u % Hkv, column = ((b * Hkv + g) * S + slot[b]) * D;
                rotate(qkv + b * QKV + (H + g) * D, rope + b * D, rope + b * D + D / 2, L->keys + column, D);
                memcpy(L->values + column, qkv + b * QKV + (H + Hkv + g) * D, sizeof(float) * D);
            }
            barrier_wait(&barrier);
            share(B * H, &u0, &u1);
            if (L->sparse) { /* queries rotated in place, then the sparse attention over the lockstep rows */
                for (int64_t u = u0; u < u1; u++) {
                    float *qh = qkv + (u / H) * QKV + (u % H) * D;
                    rotate(qh, rope + (u / H) * D, rope + (u / H) * D + D / 2, qh, D);
                }
                barrier_wait(&barrier);
                m->sparse(m->sparse_context, l, qkv, QKV, valid, S, lockstep, attn, omp_get_thread_num(),
                          omp_get_num_threads());
            } else {
                for (int64_t u = u0; u < u1; u++) {
                    const int64_t b = u / H, head = u % H, cache = (b * Hkv + head / group) * S * D;
                    rotate(qkv + b * QKV + head * D, rope + b * D, rope + b * D + D / 2, q, D);
                    attend(q, L->keys + cache, L->values + cache, valid + b * S, limit[b], D, scores,
                           attn + (b * H + head) * D);
                }
            }
            barrier_wait(&barrier);
            project(o_, 1, attn, B, y, x, ADD_TO, own_blocks, &barrier);
            norm_rows(x, L->post_norm, h, B, d, m->eps);
            project(gate_up_, 2, h, B, y, act, SWIGLU, own_blocks, &barrier);
            project(down_, 1, act, B, y, x, ADD_TO, own_blocks, &barrier);
        }
        const Linear *head_[] = {&m->head};
        norm_rows(x, m->final_norm, h, B, d, m->eps);
        project(head_, 1, h, B, logits, NULL, STORE, own_blocks, &barrier);
    }

    for (int64_t b = 0; b < B; b++) {
        slot[b]++;
        position[b]++;
    }
    return 0;
}
