/* moe_kernels CPU kernel: one expert linear layer over routed slots.

   out[s, :] = x[slot_row[s], :] @ W[e]^T (+ b[e, :]),  e = slot_expert[s],
   and a zero row for a slot whose expert is outside [0, E) (a dropped slot).

   Why it exists: at decode and small batches each expert sees 1-8 rows, and the BLAS
   libraries torch calls (MKL, oneDNN) pack the weight before multiplying: on cold weights
   that moves every byte twice and streams it at ~15 GB/s where one core reads ~40 GB/s.
   Here each weight element is loaded once per block of up to ROWS slots, straight from
   memory into fused multiply-adds, so the layer runs at the speed of reading its weights.

   Pipeline (one call, no allocation visible to the caller):
   1. counting sort of the slots by expert (stable: slots of one expert in slot order),
      so each expert's weight is read once per ROWS slots however the slots are ordered;
   2. the output columns split into `nthreads` ranges (multiples of 16), one per thread
      of the process's OpenMP pool (torch's libgomp, found at run time), else of
      pthreads started for the call;
   3. per thread, per expert, per block of ROWS slots: the dot products over K in a fixed
      order, written once to out (no atomics, nothing accumulated across threads).

   Weight layouts (both contiguous): "nk" W is [E, N, K] (PyTorch's Linear layout: each
   output column is a contiguous row of K), "kn" W is [E, K, N] (stored transposed, as
   GPT-OSS does: each k is a contiguous row of N); float32, or bfloat16 widened to float32
   as it loads (half the bytes to stream). x, the bias and out are float32.

   Determinism: every output element is reduced in an order fixed by K, ROWS and LANES
   alone, never by the thread count or the slot order: the same inputs give bitwise the
   same outputs on one machine. Whether the compiler fuses multiply-adds depends on the
   instruction set of the clone the CPU selects, so results may differ across machines in
   the last bits (as BLAS results do).

   Plain C99 with no Python or torch headers: built in about 10 s by setup.py and
   loaded with ctypes (moe_kernels/cpu_kernel.py), so it ties to no torch or Python ABI.
   Index arithmetic is 64-bit throughout. */

#define _GNU_SOURCE /* RTLD_DEFAULT, RTLD_NOLOAD */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define ROWS 4      /* slots sharing each weight load */
#define NTILE 512   /* kn: output columns per accumulator tile, ROWS x 2 KiB in L1 */
#define LANES 16    /* nk: independent partial sums per dot product (one 512-bit vector) */
#define COLS 4      /* nk: output columns computed together (ROWS x COLS = LANES vectors of sums) */
/* Software prefetch distance, in weight rows ahead of the one being read: the hardware
   prefetcher alone left one core at 12-20 GB/s on cold weights; this about doubles it
   (measured, both layouts). A prefetch past the weight's end never faults. */
#define PREFETCH_ROWS 4   /* kn */
#define PREFETCH_COLS 8   /* nk */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* One build for every x86-64 CPU: the loader picks the widest clone the CPU runs. */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define API __attribute__((visibility("default")))

/* The vector type below never crosses a call that is not inlined: no ABI to warn about. */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef struct {
    const float *x;          /* [*, K] input rows, row stride ldx */
    int64_t ldx;
    const void *w;           /* [E, N, K] (nk) or [E, K, N] (kn), float32 or bfloat16 */
    int64_t w_bf16;
    const float *bias;       /* [E, N] or NULL */
    float *out;              /* [S, N] contiguous */
    int64_t K, N, kn;
    const int32_t *slot_row; /* [S] row of x for each slot, or NULL: slot s reads row s */
    const int64_t *order;    /* [S] valid slots grouped by expert */
    const int64_t *start;    /* [E + 1] expert e's slots: order[start[e] : start[e + 1]] */
    int64_t E;
    int64_t n0, n1;          /* this thread's output columns */
} job_t;

/* Weights are float32 (BF = 0) or bfloat16 (BF = 1, widened to float32 as they load:
   the upper half of a float32). BF is a constant in every call, so each block is
   compiled once per weight type. */
static inline __attribute__((always_inline)) const void *w_at(const void *w, int64_t i, int BF)
{
    return (const char *)w + i * (BF ? 2 : 4);
}

static inline __attribute__((always_inline)) float w_load(const void *w, int64_t i, int BF)
{
    if (BF) {
        const uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof(f));
        return f;
    }
    return ((const float *)w)[i];
}

/* kn: R slots x output columns [nb, nb + nn) of expert weight we [K, N]. The column loop
   is contiguous in both the weight row and the accumulators: it vectorizes as written. */
static inline __attribute__((always_inline)) void
kn_block(int R, int BF, const float *const *xr, const void *we, const float *be, int64_t K, int64_t N,
         int64_t nb, int64_t nn, float *const *outr)
{
    float acc[ROWS][NTILE] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++)
        for (int64_t j = 0; j < nn; j++)
            acc[r][j] = be ? be[nb + j] : 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const void *wk = w_at(we, k * N + nb, BF);
        for (int64_t j = 0; j < nn; j += BF ? 32 : 16) /* one 64-byte line each */
            __builtin_prefetch(w_at(wk, PREFETCH_ROWS * N + j, BF), 0, 0);
        for (int r = 0; r < R; r++) {
            const float s = xr[r][k];
            for (int64_t j = 0; j < nn; j++)
                acc[r][j] += s * w_load(wk, j, BF);
        }
    }
    for (int r = 0; r < R; r++)
        memcpy(outr[r] + nb, acc[r], (size_t)nn * sizeof(float));
}

/* nk: R slots x C output columns starting at n of expert weight we [N, K]: LANES partial
   sums per (slot, column) in one vector each (GCC vector extensions: lowered to whatever
   width the clone has), the K % LANES tail through zero-padded copies, then the lanes
   summed in a fixed tree (reduce_lanes). */
typedef float vec_t __attribute__((vector_size(LANES * sizeof(float))));
typedef uint16_t half_vec_t __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef uint32_t bits_vec_t __attribute__((vector_size(LANES * sizeof(uint32_t))));

static inline __attribute__((always_inline)) vec_t load_vec(const void *p, int BF)
{
    vec_t v;
    if (BF) {
        half_vec_t h;
        memcpy(&h, p, sizeof(h));
        const bits_vec_t u = __builtin_convertvector(h, bits_vec_t) << 16;
        memcpy(&v, &u, sizeof(v));
    } else {
        memcpy(&v, p, sizeof(v)); /* an unaligned vector load */
    }
    return v;
}

/* The lanes of each of 16 vectors summed by one fixed tree (lane l + lane l + 8, then
   + 4, + 2, + 1), lane i of the result the sum of v[i]. Done on pairs of vectors at each
   level (two shuffles and an add for two vectors' halves), 45 vector operations for 16
   sums instead of 15 scalar adds each: at small K the reduction costs as much as the
   dot products. Every sum takes the same tree whatever the block's shape: bitwise the
   same result for a slot in any block. */
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
_Static_assert(LANES == 16 && ROWS * COLS == LANES, "reduce_lanes sums 16 vectors of 16 lanes");
static inline __attribute__((always_inline)) vec_t reduce_lanes(const vec_t *v)
{
    vec_t l1[8], l2[4], l3[2];
    for (int i = 0; i < 8; i++)
        l1[i] = SHUF(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
              + SHUF(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        l2[i] = SHUF(l1[2 * i], l1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
              + SHUF(l1[2 * i], l1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        l3[i] = SHUF(l2[2 * i], l2[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
              + SHUF(l2[2 * i], l2[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUF(l3[0], l3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SHUF(l3[0], l3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static inline __attribute__((always_inline)) void
nk_block(int R, int C, int BF, const float *const *xr, const void *we, const float *be, int64_t K, int64_t n,
         float *const *outr)
{
    vec_t acc[ROWS][COLS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            acc[r][c] = (vec_t){0};
    const int64_t kv = K - K % LANES;
    for (int64_t k = 0; k < kv; k += LANES) {
        vec_t xv[ROWS];
        for (int r = 0; r < R; r++)
            xv[r] = load_vec(xr[r] + k, 0);
        for (int c = 0; c < C; c++) {
            const vec_t wv = load_vec(w_at(we, (n + c) * K + k, BF), BF);
            __builtin_prefetch(w_at(we, (n + c + PREFETCH_COLS) * K + k, BF), 0, 0);
            for (int r = 0; r < R; r++)
                acc[r][c] += xv[r] * wv;
        }
    }
    if (kv < K) {
        float pad[LANES];
        vec_t xv[ROWS];
        for (int r = 0; r < R; r++) {
            memset(pad, 0, sizeof(pad));
            memcpy(pad, xr[r] + kv, (size_t)(K - kv) * sizeof(float));
            xv[r] = load_vec(pad, 0);
        }
        for (int c = 0; c < C; c++) {
            memset(pad, 0, sizeof(pad));
            memcpy(pad, w_at(we, (n + c) * K + kv, BF), (size_t)(K - kv) * (BF ? 2 : 4));
            const vec_t wv = load_vec(pad, BF);
            for (int r = 0; r < R; r++)
                acc[r][c] += xv[r] * wv;
        }
    }
    vec_t all[ROWS * COLS];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < COLS; c++)
            all[r * COLS + c] = r < R && c < C ? acc[r][c] : (vec_t){0};
    float sums[LANES];
    const vec_t total = reduce_lanes(all);
    memcpy(sums, &total, sizeof(sums));
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            outr[r][n + c] = sums[r * COLS + c] + (be ? be[n + c] : 0.0f);
}

/* R (1..ROWS) slots of one expert over this thread's columns; R, C and BF are constants
   in each call below, so every block is compiled for its exact shape and weight type. */
static inline __attribute__((always_inline)) void
slots_block(int R, int BF, const job_t *j, const float *const *xr, const void *we, const float *be,
            float *const *outr)
{
    if (j->kn) {
        for (int64_t nb = j->n0; nb < j->n1; nb += NTILE)
            kn_block(R, BF, xr, we, be, j->K, j->N, nb, j->n1 - nb < NTILE ? j->n1 - nb : NTILE, outr);
    } else {
        int64_t n = j->n0;
        for (; n + COLS <= j->n1; n += COLS)
            nk_block(R, COLS, BF, xr, we, be, j->K, n, outr);
        for (; n < j->n1; n++)
            nk_block(R, 1, BF, xr, we, be, j->K, n, outr);
    }
}

#define SLOTS_BLOCK(R)                                          \
    do {                                                        \
        if (j->w_bf16)                                          \
            slots_block(R, 1, j, xr, we, be, outr);             \
        else                                                    \
            slots_block(R, 0, j, xr, we, be, outr);             \
    } while (0)

CLONES static void run_job(const job_t *j)
{
    const int64_t K = j->K, N = j->N;
    for (int64_t e = 0; e < j->E; e++) {
        const void *we = (const char *)j->w + e * N * K * (j->w_bf16 ? 2 : 4);
        const float *be = j->bias ? j->bias + e * N : NULL;
        for (int64_t p = j->start[e]; p < j->start[e + 1]; p += ROWS) {
            const int64_t left = j->start[e + 1] - p;
            const int R = left < ROWS ? (int)left : ROWS;
            const float *xr[ROWS];
            float *outr[ROWS];
            for (int r = 0; r < R; r++) {
                const int64_t s = j->order[p + r];
                xr[r] = j->x + (j->slot_row ? j->slot_row[s] : s) * j->ldx;
                outr[r] = j->out + s * N;
            }
            switch (R) {
            case 1: SLOTS_BLOCK(1); break;
            case 2: SLOTS_BLOCK(2); break;
            case 3: SLOTS_BLOCK(3); break;
            default: SLOTS_BLOCK(4); break;
            }
        }
    }
}

static void *run_thread(void *arg)
{
    run_job((const job_t *)arg);
    return NULL;
}

/* Threads from the OpenMP runtime the process already has (torch's libgomp), found at
   run time rather than linked: its pool is warm, and no second pool of spinning threads
   competes with it for the cores (a pthread team started per call measured slower at
   two threads than one, right after a torch op). GOMP_parallel is libgomp's stable entry
   point for `#pragma omp parallel` (GCC >= 4.9). Without a loaded libgomp: pthreads. */
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_query_t)(void);
static gomp_parallel_t gomp_parallel;
static omp_query_t omp_thread_num, omp_num_threads;
static pthread_once_t gomp_once = PTHREAD_ONCE_INIT;

static void find_gomp(void)
{
    void *lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    void *where = lib ? lib : RTLD_DEFAULT;
    gomp_parallel_t par = (gomp_parallel_t)dlsym(where, "GOMP_parallel");
    omp_query_t num = (omp_query_t)dlsym(where, "omp_get_thread_num");
    omp_query_t size = (omp_query_t)dlsym(where, "omp_get_num_threads");
    if (par && num && size) {
        omp_thread_num = num;
        omp_num_threads = size;
        gomp_parallel = par;
    }
}

typedef struct {
    const job_t *jobs;
    int64_t n;
} team_t;

static void team_body(void *arg)
{
    const team_t *team = arg;
    /* The runtime may grant fewer threads than asked: each takes every size-th job. */
    const int64_t size = omp_num_threads();
    for (int64_t t = omp_thread_num(); t < team->n; t += size)
        run_job(&team->jobs[t]);
}

static int run_on_openmp(const job_t *jobs, int64_t nt)
{
    pthread_once(&gomp_once, find_gomp);
    if (!gomp_parallel)
        return 0;
    team_t team = {jobs, nt};
    gomp_parallel(team_body, &team, (unsigned)nt, 0);
    return 1;
}

/* Returns 0, or -1 when the scratch could not be allocated (nothing written). */
API int moe_expert_linear(const float *x, int64_t ldx, const int32_t *slot_row, const int32_t *slot_expert,
                          int64_t S, const void *w, int64_t w_bf16, int64_t E, int64_t K, int64_t N, int64_t kn,
                          const float *bias, float *out, int64_t nthreads)
{
    /* start [E + 1], fill [E], order [S] */
    int64_t *start = malloc((2 * (size_t)E + 1 + (size_t)S) * sizeof(int64_t));
    if (!start)
        return -1;
    int64_t *fill = start + E + 1, *order = fill + E;
    memset(start, 0, ((size_t)E + 1) * sizeof(int64_t));
    /* Counting sort, stable: start[e + 1] counts expert e, then prefix sums. A dropped
       slot gets its zero row here and takes no part in it. */
    for (int64_t s = 0; s < S; s++) {
        const int64_t e = slot_expert[s];
        if (e >= 0 && e < E)
            start[e + 1]++;
        else
            memset(out + s * N, 0, (size_t)N * sizeof(float));
    }
    for (int64_t e = 0; e < E; e++) {
        start[e + 1] += start[e];
        fill[e] = start[e];
    }
    for (int64_t s = 0; s < S; s++) {
        const int64_t e = slot_expert[s];
        if (e >= 0 && e < E)
            order[fill[e]++] = s;
    }

    /* Each thread a range of output columns, a multiple of 16 wide (whole cache lines). */
    int64_t nt = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    const int64_t per = ((N + nt - 1) / nt + 15) / 16 * 16;
    nt = per > 0 ? (N + per - 1) / per : 1;
    if (nt < 1)
        nt = 1;
    job_t jobs[MAX_THREADS];
    for (int64_t t = 0; t < nt; t++) {
        const job_t j = {x, ldx, w, w_bf16, bias, out, K, N, kn, slot_row, order, start, E, t * per,
                         (t + 1) * per < N ? (t + 1) * per : N};
        jobs[t] = j;
    }
    if (nt == 1 || !run_on_openmp(jobs, nt)) {
        pthread_t threads[MAX_THREADS];
        int started[MAX_THREADS] = {0};
        for (int64_t t = 1; t < nt; t++)
            started[t] = pthread_create(&threads[t], NULL, run_thread, &jobs[t]) == 0;
        run_job(&jobs[0]);
        for (int64_t t = 1; t < nt; t++) {
            if (started[t])
                pthread_join(threads[t], NULL);
            else
                run_job(&jobs[t]); /* no thread to be had: run its columns here */
        }
    }
    free(start);
    return 0;
}

/* The ABI version moe_kernels/cpu_kernel.py expects: bump on any signature change. */
API int moe_cpu_kernels_abi(void) { return 2; }

/* 1 when calls with threads run on the process's OpenMP pool (libgomp loaded), 0 when
   on pthreads started per call. */
API int moe_cpu_kernels_openmp(void)
{
    pthread_once(&gomp_once, find_gomp);
    return gomp_parallel != NULL;
}
