// What the memory system and the core allow a fused loss pass, measured outside the crate: plain
// C loops over 51.2M f32 (8x128x50000: 205 MB read, 205 MB written), each timed in turn with the
// others (medians, and each against the streaming copy of the same run):
//   1. read, exp(x - r) for one fixed r, streaming store: the least per-logit work of any pass
//      that writes a gradient; it needs no row sum, which a real pass does;
//   2. read, streaming store: a copy (the crate's floor is the fastest copy it finds);
//   3. read, exp; 4. read: what the stores and the arithmetic add;
//   5. the crate's own schedule, plainly: rows of 50000, each row's exponentials into one of two
//      scratch rows while the previous row's kept ones, times a factor, are streamed out in the
//      same loop (cpu/pass.rs does this in chunks of 2048, with the target, the reference's
//      moves and the options around it).
// The exp is the crate's: 2^n p(f) with its degree-6 polynomial, `vscalefps` at AVX-512, the
// exponent's bits at AVX2; the source is prefetched into L2 32 KiB ahead, as the crate does.
// BENCHMARKS.md (2026-12-04, thirty-fifth session) has what it showed on a Xeon.
//
//   gcc -O2 -fopenmp -mavx512f -mfma benches/exp_stream_probe.c -o /tmp/probe512   (or -mavx2 -mfma)
//   OMP_WAIT_POLICY=passive OMP_NUM_THREADS=2 /tmp/probe512 [iterations, default 15]
// (passive: OpenMP's idle threads otherwise spin after each call and slow whatever runs next)
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define P6 1.535332e-4f
#define P5 1.339993e-3f
#define P4 9.61846e-3f
#define P3 5.5503286e-2f
#define P2 0.24022648f
#define P1 0.6931472f
#define LOG2E 1.4426950f
#define MAGIC 12582912.0f

#if defined(__AVX512F__)
#define W 16
typedef __m512 V;
#define LOAD _mm512_load_ps
#define STREAM _mm512_stream_ps
#define ADD _mm512_add_ps
#define SUB _mm512_sub_ps
#define MUL _mm512_mul_ps
#define SET1 _mm512_set1_ps
#define ZERO _mm512_setzero_ps
#define FMA _mm512_fmadd_ps
static inline V vexp(V x) {
    x = _mm512_max_ps(SET1(-110.f), x);
    V t = FMA(x, SET1(LOG2E), SET1(MAGIC)), n = SUB(t, SET1(MAGIC));
    V f = _mm512_fmsub_ps(x, SET1(LOG2E), n);
    V p = FMA(SET1(P6), f, SET1(P5));
    p = FMA(p, f, SET1(P4)); p = FMA(p, f, SET1(P3)); p = FMA(p, f, SET1(P2)); p = FMA(p, f, SET1(P1));
    return _mm512_scalef_ps(FMA(p, f, SET1(1.f)), n);
}
static float hsum(V v) { return _mm512_reduce_add_ps(v); }
#define _mm_store_ps_any _mm512_store_ps
#define LEVEL "avx512"
#else
#define W 8
typedef __m256 V;
#define LOAD _mm256_load_ps
#define STREAM _mm256_stream_ps
#define ADD _mm256_add_ps
#define SUB _mm256_sub_ps
#define MUL _mm256_mul_ps
#define SET1 _mm256_set1_ps
#define ZERO _mm256_setzero_ps
#define FMA _mm256_fmadd_ps
static inline V vexp(V x) {
    x = _mm256_min_ps(SET1(88.f), _mm256_max_ps(SET1(-87.f), x));
    V t = FMA(x, SET1(LOG2E), SET1(MAGIC)), n = SUB(t, SET1(MAGIC));
    V f = _mm256_fmsub_ps(x, SET1(LOG2E), n);
    V p = FMA(SET1(P6), f, SET1(P5));
    p = FMA(p, f, SET1(P4)); p = FMA(p, f, SET1(P3)); p = FMA(p, f, SET1(P2)); p = FMA(p, f, SET1(P1));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return MUL(FMA(p, f, SET1(1.f)), _mm256_castsi256_ps(e));
}
static float hsum(V v) {
    float a[8];
    _mm256_storeu_ps(a, v);
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}
#define _mm_store_ps_any _mm256_store_ps
#define LEVEL "avx2"
#endif

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    const size_t n = 51200000;
    int iters = argc > 1 ? atoi(argv[1]) : 15;
    if (iters < 1 || iters > 1000) iters = 15;
    float *a = aligned_alloc(64, n * 4), *b = aligned_alloc(64, n * 4);
    if (!a || !b) return 1;
    // logits in [-5, 5) (no zeros), and every page of the destination touched before timing
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        a[i] = (float)((i * 2654435761u) % 1000) / 100.f - 5.f;
        b[i] = 1.f;
    }
    const char *what[5] = {"read, exp, stream store", "read, stream store (copy)", "read, exp", "read",
                           "two-phase rows (the crate's)"};
    double med[5], t[1000];
    double sink = 0;
    // modes in turn, each iteration, so that drift hits them alike
    double *runs = malloc(sizeof(double) * 5 * iters);
    // the two-phase schedule's scratch rows: two per thread
    const size_t VOCAB = 50000, rows = n / VOCAB;
#ifdef _OPENMP
    const size_t threads = (size_t)omp_get_max_threads();
#else
    const size_t threads = 1;
#endif
    float *work = aligned_alloc(64, sizeof(float) * 2 * VOCAB * threads);
    if (!runs || !work) return 1;
    for (int it = -2; it < iters; it++) {
        for (int mode = 0; mode < 5; mode++) {
            double t0 = now(), tot = 0;
            if (mode == 4) {
                // rows of VOCAB: each row's exps into a scratch row while the previous row's kept
                // exps, times a factor, are streamed out in the same loop (the crate's schedule)
#pragma omp parallel reduction(+ : tot)
                {
#ifdef _OPENMP
                    float *w = work + 2 * VOCAB * (size_t)omp_get_thread_num();
#else
                    float *w = work;
#endif
                    V acc = ZERO(), r = SET1(5.f), fac = SET1(0.5f);
                    size_t prev = (size_t)-1;
                    int k = 0;
#pragma omp for schedule(static)
                    for (size_t row = 0; row < rows; row++) {
                        float *cur = w + VOCAB * (size_t)k, *old = w + VOCAB * (size_t)(1 - k);
                        const float *x = a + row * VOCAB;
                        for (size_t i = 0; i + W <= VOCAB; i += W) {
                            if (row * VOCAB + i + 8192 < n) _mm_prefetch((const char *)(x + i + 8192), _MM_HINT_T1);
                            V e = vexp(SUB(LOAD(x + i), r));
                            acc = ADD(acc, e);
                            _mm_store_ps_any(cur + i, e);
                            if (prev != (size_t)-1) STREAM(b + prev * VOCAB + i, MUL(LOAD(old + i), fac));
                        }
                        prev = row;
                        k = 1 - k;
                    }
                    if (prev != (size_t)-1)
                        for (size_t i = 0; i + W <= VOCAB; i += W) STREAM(b + prev * VOCAB + i, MUL(LOAD(w + VOCAB * (size_t)(1 - k) + i), fac));
                    _mm_sfence();
                    tot += hsum(acc);
                }
                if (it >= 0) runs[mode * iters + it] = now() - t0;
                sink += tot;
                continue;
            }
#pragma omp parallel reduction(+ : tot)
            {
                V acc = ZERO(), r = SET1(5.f);
#pragma omp for schedule(static)
                for (size_t i = 0; i < n; i += W) {
                    if (i + 8192 < n) _mm_prefetch((const char *)(a + i + 8192), _MM_HINT_T1);
                    V v = LOAD(a + i);
                    if (mode == 0) {
                        V e = vexp(SUB(v, r));
                        acc = ADD(acc, e);
                        STREAM(b + i, e);
                    } else if (mode == 1) {
                        STREAM(b + i, v);
                    } else if (mode == 2) {
                        acc = ADD(acc, vexp(SUB(v, r)));
                    } else {
                        acc = ADD(acc, v);
                    }
                }
                _mm_sfence();
                tot += hsum(acc);
            }
            if (it >= 0) runs[mode * iters + it] = now() - t0;
            sink += tot;
        }
    }
    printf("level %s, %zu threads, %d iterations, 51.2M f32 (median ms, x the copy)\n", LEVEL, threads, iters);
    for (int mode = 0; mode < 5; mode++) {
        for (int i = 0; i < iters; i++) t[i] = runs[mode * iters + i];
        qsort(t, iters, sizeof(double), cmp);
        med[mode] = t[iters / 2] * 1e3;
    }
    for (int mode = 0; mode < 5; mode++) printf("%-28s %8.2f  %5.2f\n", what[mode], med[mode], med[mode] / med[1]);
    fprintf(stderr, "(checksum %g)\n", sink);
    free(runs);
    free(work);
    free(a);
    free(b);
    return 0;
}
