/* param_monitor's one-pass statistics kernel (CPU), loaded by param_monitor/reduce.py through ctypes.

   Every sum is accumulated in double, so any finite fp32/bf16/fp16 input neither overflows nor
   underflows (squares of fp32 values stay within [1e-90, 1e77]) and 2^27 values add up to ~1e-14
   relative. Each tensor is cut into fixed chunks; a chunk's partial sums are 16 independent double
   lanes (vectorized without -ffast-math: NaN/inf propagate as they must); the chunks are added in
   order after the threads join, so the numbers do not depend on the thread count.

   A job is either one tensor (m == 1: out = [sum x^2, sum x]) or the uses of a shared parameter
   followed by its gradient (m >= 2, k = m - 1 uses: out = [|c_i|^2 (k), <c_i, c_j> (i < j),
   |sum c - g|^2, |g|^2]), all tensors of a job with the same number of values. */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };
#define CHUNK ((int64_t)1 << 16) /* values per chunk: the unit of work of a thread */
#define SUB 512                  /* gram: values converted to double at a time (L1-resident) */
#define MAXT 16                  /* gram: tensors per job (15 uses + the gradient) */

int pm_abi(void) { return 1; }

int pm_has_f16(void) {
#ifdef __FLT16_MAX__
  return 1;
#else
  return 0;
#endif
}

typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef uint16_t v4h __attribute__((vector_size(8)));
typedef uint32_t v4u __attribute__((vector_size(16)));

static inline double bf16_to_double(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* four values at x + i as doubles (unaligned loads; GCC/Clang vector extensions) */
static inline v4d load4_f32(const float* x) { v4f a; memcpy(&a, x, sizeof a); return __builtin_convertvector(a, v4d); }
static inline v4d load4_f64(const double* x) { v4d a; memcpy(&a, x, sizeof a); return a; }
static inline v4d load4_bf16(const uint16_t* x) {
  v4h h;
  memcpy(&h, x, sizeof h);
  v4u u = __builtin_convertvector(h, v4u) << 16;
  v4f f;
  memcpy(&f, &u, sizeof f);
  return __builtin_convertvector(f, v4d);
}
#ifdef __FLT16_MAX__
typedef _Float16 v4hf __attribute__((vector_size(8)));
static inline v4d load4_f16(const _Float16* x) {
  v4hf h;
  memcpy(&h, x, sizeof h);
  return __builtin_convertvector(__builtin_convertvector(h, v4f), v4d);
}
#endif

static inline double hsum(v4d a) { return (a[0] + a[1]) + (a[2] + a[3]); }

/* eight values as doubles: one AVX-512 register where the CPU has it, two AVX2 ones otherwise */
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
static inline v8d load8_f32(const float* x) { v8f a; memcpy(&a, x, sizeof a); return __builtin_convertvector(a, v8d); }
static inline v8d load8_f64(const double* x) { v8d a; memcpy(&a, x, sizeof a); return a; }
static inline v8d load8_bf16(const uint16_t* x) {
  v8h h;
  memcpy(&h, x, sizeof h);
  v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f f;
  memcpy(&f, &u, sizeof f);
  return __builtin_convertvector(f, v8d);
}
#ifdef __FLT16_MAX__
typedef _Float16 v8hf __attribute__((vector_size(16)));
static inline v8d load8_f16(const _Float16* x) {
  v8hf h;
  memcpy(&h, x, sizeof h);
  return __builtin_convertvector(__builtin_convertvector(h, v8f), v8d);
}
#endif
static inline double hsum8(v8d a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* sum x^2 and sum x over [lo, hi): 32 lanes, 4 vector accumulators of 8 doubles each */
#define MOMENTS(NAME, T, LOAD8, LOAD1)                                          \
  static void NAME(const void* p, int64_t lo, int64_t hi, double* out) {        \
    const T* x = (const T*)p;                                                   \
    v8d q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0}, s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}; \
    int64_t i = lo;                                                             \
    for (; i + 32 <= hi; i += 32) {                                             \
      v8d a = LOAD8(x + i), b = LOAD8(x + i + 8), c = LOAD8(x + i + 16), d = LOAD8(x + i + 24); \
      q0 += a * a; q1 += b * b; q2 += c * c; q3 += d * d;                       \
      s0 += a; s1 += b; s2 += c; s3 += d;                                       \
    }                                                                           \
    double tq = 0, ts = 0;                                                      \
    for (; i < hi; ++i) {                                                       \
      double v = LOAD1(x[i]);                                                   \
      tq += v * v;                                                              \
      ts += v;                                                                  \
    }                                                                           \
    out[0] = tq + (hsum8(q0) + hsum8(q1)) + (hsum8(q2) + hsum8(q3));            \
    out[1] = ts + (hsum8(s0) + hsum8(s1)) + (hsum8(s2) + hsum8(s3));            \
  }

#define AS_DOUBLE(v) ((double)(v))
MOMENTS(moments_f32, float, load8_f32, AS_DOUBLE)
MOMENTS(moments_f64, double, load8_f64, AS_DOUBLE)
MOMENTS(moments_bf16, uint16_t, load8_bf16, bf16_to_double)
#ifdef __FLT16_MAX__
MOMENTS(moments_f16, _Float16, load8_f16, AS_DOUBLE)
#endif

static void moments(int dt, const void* p, int64_t lo, int64_t hi, double* out) {
  switch (dt) {
    case F32: moments_f32(p, lo, hi, out); break;
    case F64: moments_f64(p, lo, hi, out); break;
    case BF16: moments_bf16(p, lo, hi, out); break;
#ifdef __FLT16_MAX__
    case F16: moments_f16(p, lo, hi, out); break;
#endif
    default: out[0] = out[1] = __builtin_nan("");
  }
}

static void to_double(int dt, const void* p, int64_t lo, int64_t n, double* dst) {
  switch (dt) {
    case F32: { const float* x = (const float*)p + lo; for (int64_t i = 0; i < n; ++i) dst[i] = x[i]; break; }
    case F64: memcpy(dst, (const double*)p + lo, (size_t)n * sizeof(double)); break;
    case BF16: { const uint16_t* x = (const uint16_t*)p + lo; for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_double(x[i]); break; }
#ifdef __FLT16_MAX__
    case F16: { const _Float16* x = (const _Float16*)p + lo; for (int64_t i = 0; i < n; ++i) dst[i] = x[i]; break; }
#endif
    default: for (int64_t i = 0; i < n; ++i) dst[i] = __builtin_nan("");
  }
}

static inline int gram_outputs(int m) { int k = m - 1; return k + k * (k - 1) / 2 + 2; }

/* dot of two L1-resident rows into 16 lanes (4 vector accumulators) */
static inline void dot_acc(const double* a, const double* b, int64_t n, v4d* acc) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 4; ++k) acc[k] += load4_f64(a + i + 4 * k) * load4_f64(b + i + 4 * k);
  double t = 0;
  for (; i < n; ++i) t += a[i] * b[i];
  acc[0][0] += t;
}

static void gram(int m, const int64_t* ptrs, const int64_t* dts, int64_t lo, int64_t hi, double* out) {
  int k = m - 1, nout = gram_outputs(m);
  double buf[MAXT + 1][SUB]; /* k uses, the gradient, the residual */
  v4d acc[MAXT + MAXT * (MAXT - 1) / 2 + 2][4];
  memset(acc, 0, sizeof(v4d) * 4 * (size_t)nout);
  double* res = buf[m];
  for (int64_t base = lo; base < hi; base += SUB) {
    int64_t n = hi - base < SUB ? hi - base : SUB;
    for (int t = 0; t < m; ++t) to_double((int)dts[t], (const void*)(intptr_t)ptrs[t], base, n, buf[t]);
    for (int64_t i = 0; i < n; ++i) res[i] = -buf[k][i];
    for (int t = 0; t < k; ++t)
      for (int64_t i = 0; i < n; ++i) res[i] += buf[t][i];
    int o = 0;
    for (int t = 0; t < k; ++t) dot_acc(buf[t], buf[t], n, acc[o++]);
    for (int a = 0; a < k; ++a)
      for (int b = a + 1; b < k; ++b) dot_acc(buf[a], buf[b], n, acc[o++]);
    dot_acc(res, res, n, acc[o++]);
    dot_acc(buf[k], buf[k], n, acc[o++]);
  }
  for (int o = 0; o < nout; ++o) out[o] = (hsum(acc[o][0]) + hsum(acc[o][1])) + (hsum(acc[o][2]) + hsum(acc[o][3]));
}

/* two uses a, b of one dtype and the gradient g: [|a|^2, |b|^2, <a, b>, |a + b - g|^2, |g|^2] in one loop
   (the tied embedding's case; the residual added in the general path's order, (a - g) + b) */
#define GRAM2(NAME, T, LOAD8, LOAD1)                                                       \
  static void NAME(const int64_t* ptrs, int64_t lo, int64_t hi, double* out) {             \
    const T *A = (const T*)(intptr_t)ptrs[0], *B = (const T*)(intptr_t)ptrs[1];           \
    const T* G = (const T*)(intptr_t)ptrs[2];                                             \
    v8d aa0 = {0}, aa1 = {0}, bb0 = {0}, bb1 = {0}, ab0 = {0}, ab1 = {0};                 \
    v8d rr0 = {0}, rr1 = {0}, gg0 = {0}, gg1 = {0};                                       \
    int64_t i = lo;                                                                        \
    for (; i + 16 <= hi; i += 16) {                                                        \
      v8d a0 = LOAD8(A + i), a1 = LOAD8(A + i + 8), b0 = LOAD8(B + i), b1 = LOAD8(B + i + 8); \
      v8d g0 = LOAD8(G + i), g1 = LOAD8(G + i + 8);                                        \
      v8d r0 = (a0 - g0) + b0, r1 = (a1 - g1) + b1;                                        \
      aa0 += a0 * a0; aa1 += a1 * a1; bb0 += b0 * b0; bb1 += b1 * b1;                      \
      ab0 += a0 * b0; ab1 += a1 * b1; rr0 += r0 * r0; rr1 += r1 * r1;                      \
      gg0 += g0 * g0; gg1 += g1 * g1;                                                      \
    }                                                                                      \
    double t[5] = {0, 0, 0, 0, 0};                                                         \
    for (; i < hi; ++i) {                                                                  \
      double a = LOAD1(A[i]), b = LOAD1(B[i]), g = LOAD1(G[i]), r = (a - g) + b;           \
      t[0] += a * a; t[1] += b * b; t[2] += a * b; t[3] += r * r; t[4] += g * g;           \
    }                                                                                      \
    out[0] = t[0] + (hsum8(aa0) + hsum8(aa1));                                             \
    out[1] = t[1] + (hsum8(bb0) + hsum8(bb1));                                             \
    out[2] = t[2] + (hsum8(ab0) + hsum8(ab1));                                             \
    out[3] = t[3] + (hsum8(rr0) + hsum8(rr1));                                             \
    out[4] = t[4] + (hsum8(gg0) + hsum8(gg1));                                             \
  }

GRAM2(gram2_f32, float, load8_f32, AS_DOUBLE)
GRAM2(gram2_bf16, uint16_t, load8_bf16, bf16_to_double)

static void gram_any(int m, const int64_t* ptrs, const int64_t* dts, int64_t lo, int64_t hi, double* out) {
  if (m == 3 && dts[0] == dts[1] && dts[1] == dts[2] && (dts[0] == F32 || dts[0] == BF16)) {
    (dts[0] == F32 ? gram2_f32 : gram2_bf16)(ptrs, lo, hi, out);
    return;
  }
  gram(m, ptrs, dts, lo, hi, out);
}

typedef struct {
  int64_t job, lo, hi, slot; /* slot: where its partial sums go in the scratch array */
} Chunk;

/* Shared by the caller and its helper threads; the last one out frees it. Helper threads are
   detached: the caller never waits for a thread that the OS has not scheduled yet (on a busy
   machine that is a scheduler slice, ~4 ms); a late thread finds no chunk left and leaves. */
typedef struct {
  int64_t *m, *first, *ptrs, *dts;
  Chunk* chunks;
  double* scratch;
  int64_t nchunks, next, done, refs; /* next, done, refs: atomic */
} Work;

static void release(Work* w) {
  if (__atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
  free(w->m); free(w->first); free(w->ptrs); free(w->dts); free(w->chunks); free(w->scratch); free(w);
}

static void run_chunks(Work* w) {
  for (;;) {
    int64_t c = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
    if (c >= w->nchunks) return;
    const Chunk* ch = &w->chunks[c];
    int64_t j = ch->job, f = w->first[j];
    if (w->m[j] == 1)
      moments((int)w->dts[f], (const void*)(intptr_t)w->ptrs[f], ch->lo, ch->hi, w->scratch + ch->slot);
    else
      gram_any((int)w->m[j], w->ptrs + f, w->dts + f, ch->lo, ch->hi, w->scratch + ch->slot);
    __atomic_fetch_add(&w->done, 1, __ATOMIC_RELEASE);
  }
}

static void* worker(void* arg) {
  run_chunks((Work*)arg);
  release((Work*)arg);
  return NULL;
}

static int64_t* copy64(const int64_t* src, int64_t n) {
  int64_t* dst = malloc(sizeof(int64_t) * (size_t)(n > 0 ? n : 1));
  if (dst && n > 0) memcpy(dst, src, sizeof(int64_t) * (size_t)n);
  return dst;
}

/* njobs jobs; job j reads m[j] tensors (their data pointers and dtype codes at ptrs/dts[first[j]...]),
   numel[j] values each, and writes its outputs at out[out_off[j]...]. Returns 0, or -1 (out of memory,
   or too many tensors in one job). */
int pm_reduce(int64_t njobs, const int64_t* m, const int64_t* ptrs, const int64_t* dts, const int64_t* numel,
              const int64_t* out_off, double* out, int64_t nthreads, int64_t parallel_min) {
  int64_t nchunks = 0, nslots = 0, total = 0, ntensors = 0;
  for (int64_t j = 0; j < njobs; ++j) {
    if (m[j] < 1 || m[j] > MAXT) return -1;
    int64_t c = numel[j] > 0 ? (numel[j] + CHUNK - 1) / CHUNK : 1;
    nchunks += c;
    nslots += c * (m[j] == 1 ? 2 : gram_outputs((int)m[j]));
    total += numel[j] * m[j];
    ntensors += m[j];
  }
  Work* w = calloc(1, sizeof(Work));
  if (!w) return -1;
  w->refs = 1;
  w->m = copy64(m, njobs);
  w->first = malloc(sizeof(int64_t) * (size_t)(njobs + 1));
  w->ptrs = copy64(ptrs, ntensors);
  w->dts = copy64(dts, ntensors);
  w->chunks = malloc(sizeof(Chunk) * (size_t)(nchunks > 0 ? nchunks : 1));
  w->scratch = malloc(sizeof(double) * (size_t)(nslots > 0 ? nslots : 1));
  w->nchunks = nchunks;
  if (!w->m || !w->first || !w->ptrs || !w->dts || !w->chunks || !w->scratch) { release(w); return -1; }
  for (int64_t j = 0, f = 0, c = 0, slot = 0; j < njobs; ++j) {
    int64_t r = m[j] == 1 ? 2 : gram_outputs((int)m[j]), lo = 0;
    w->first[j] = f;
    f += m[j];
    do {
      int64_t hi = numel[j] - lo > CHUNK ? lo + CHUNK : numel[j];
      w->chunks[c++] = (Chunk){j, lo, hi, slot};
      slot += r;
      lo = hi;
    } while (lo < numel[j]);
  }
  int64_t extra = total >= parallel_min && nthreads > 1 ? nthreads - 1 : 0;
  if (extra > nchunks - 1) extra = nchunks - 1;
  if (extra > 0) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int64_t t = 0; t < extra; ++t) {
      pthread_t thread;
      __atomic_add_fetch(&w->refs, 1, __ATOMIC_ACQ_REL);
      if (pthread_create(&thread, &attr, worker, w) != 0) {
        __atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL);
        break;
      }
    }
    pthread_attr_destroy(&attr);
  }
  run_chunks(w);
  while (__atomic_load_n(&w->done, __ATOMIC_ACQUIRE) < nchunks) sched_yield(); /* chunks still being read */
  /* fold the chunks of each job in order: the same sums whatever the thread count */
  for (int64_t c = 0; c < nchunks;) {
    int64_t j = w->chunks[c].job, r = m[j] == 1 ? 2 : gram_outputs((int)m[j]);
    double* dst = out + out_off[j];
    for (int64_t o = 0; o < r; ++o) dst[o] = 0;
    for (; c < nchunks && w->chunks[c].job == j; ++c)
      for (int64_t o = 0; o < r; ++o) dst[o] += w->scratch[w->chunks[c].slot + o];
  }
  release(w);
  return 0;
}
