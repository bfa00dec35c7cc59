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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };
#define CHUNK ((int64_t)1 << 16) /* values per chunk: the unit of work of a thread */
#define LANES 16                 /* independent accumulators (4 AVX2 registers of doubles) */
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

static inline double bf16_to_double(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

#define MOMENTS(NAME, T, LOAD)                                                  \
  static void NAME(const void* p, int64_t lo, int64_t hi, double* out) {        \
    const T* x = (const T*)p;                                                   \
    double q[LANES] = {0}, s[LANES] = {0};                                      \
    int64_t i = lo;                                                             \
    for (; i + LANES <= hi; i += LANES)                                         \
      for (int k = 0; k < LANES; ++k) {                                         \
        double v = LOAD(x[i + k]);                                              \
        q[k] += v * v;                                                          \
        s[k] += v;                                                              \
      }                                                                         \
    for (int k = 0; i < hi; ++i, ++k) {                                         \
      double v = LOAD(x[i]);                                                    \
      q[k] += v * v;                                                            \
      s[k] += v;                                                                \
    }                                                                           \
    double tq = 0, ts = 0;                                                      \
    for (int k = 0; k < LANES; ++k) {                                           \
      tq += q[k];                                                               \
      ts += s[k];                                                               \
    }                                                                           \
    out[0] = tq;                                                                \
    out[1] = ts;                                                                \
  }

#define AS_DOUBLE(v) ((double)(v))
MOMENTS(moments_f32, float, AS_DOUBLE)
MOMENTS(moments_f64, double, AS_DOUBLE)
MOMENTS(moments_bf16, uint16_t, bf16_to_double)
#ifdef __FLT16_MAX__
MOMENTS(moments_f16, _Float16, AS_DOUBLE)
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

/* dot of two L1-resident rows into LANES accumulators */
static inline void dot_acc(const double* a, const double* b, int64_t n, double* acc) {
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int k = 0; k < LANES; ++k) acc[k] += a[i + k] * b[i + k];
  for (int k = 0; i < n; ++i, ++k) acc[k] += a[i] * b[i];
}

static void gram(int m, const int64_t* ptrs, const int64_t* dts, int64_t lo, int64_t hi, double* out) {
  int k = m - 1, nout = gram_outputs(m);
  double buf[MAXT + 1][SUB]; /* k uses, the gradient, the residual */
  double acc[MAXT + MAXT * (MAXT - 1) / 2 + 2][LANES];
  memset(acc, 0, sizeof(double) * LANES * (size_t)nout);
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
  for (int o = 0; o < nout; ++o) {
    double t = 0;
    for (int l = 0; l < LANES; ++l) t += acc[o][l];
    out[o] = t;
  }
}

typedef struct {
  int64_t job, lo, hi, slot; /* slot: where its partial sums go in the scratch array */
} Chunk;

typedef struct {
  const int64_t *m, *first, *ptrs, *dts;
  const Chunk* chunks;
  int64_t nchunks;
  double* scratch;
  int64_t next; /* the next chunk to take (atomic) */
} Work;

static void* worker(void* arg) {
  Work* w = (Work*)arg;
  for (;;) {
    int64_t c = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
    if (c >= w->nchunks) return NULL;
    const Chunk* ch = &w->chunks[c];
    int64_t j = ch->job, f = w->first[j];
    if (w->m[j] == 1)
      moments((int)w->dts[f], (const void*)(intptr_t)w->ptrs[f], ch->lo, ch->hi, w->scratch + ch->slot);
    else
      gram((int)w->m[j], w->ptrs + f, w->dts + f, ch->lo, ch->hi, w->scratch + ch->slot);
  }
}

/* njobs jobs; job j reads m[j] tensors (their data pointers and dtype codes at ptrs/dts[first[j]...]),
   numel[j] values each, and writes its outputs at out[out_off[j]...]. Returns 0, or -1 (out of memory,
   or too many tensors in one job). */
int pm_reduce(int64_t njobs, const int64_t* m, const int64_t* ptrs, const int64_t* dts, const int64_t* numel,
              const int64_t* out_off, double* out, int64_t nthreads, int64_t parallel_min) {
  int64_t* first = malloc(sizeof(int64_t) * (size_t)(njobs + 1));
  int64_t nchunks = 0, nslots = 0, total = 0;
  if (!first) return -1;
  for (int64_t j = 0, f = 0; j < njobs; ++j) {
    if (m[j] < 1 || m[j] > MAXT) { free(first); return -1; }
    first[j] = f;
    f += m[j];
    int64_t c = numel[j] > 0 ? (numel[j] + CHUNK - 1) / CHUNK : 1;
    nchunks += c;
    nslots += c * (m[j] == 1 ? 2 : gram_outputs((int)m[j]));
    total += numel[j] * m[j];
  }
  Chunk* chunks = malloc(sizeof(Chunk) * (size_t)nchunks);
  double* scratch = malloc(sizeof(double) * (size_t)(nslots > 0 ? nslots : 1));
  if (!chunks || !scratch) { free(first); free(chunks); free(scratch); return -1; }
  for (int64_t j = 0, c = 0, slot = 0; j < njobs; ++j) {
    int64_t r = m[j] == 1 ? 2 : gram_outputs((int)m[j]), lo = 0;
    do {
      int64_t hi = numel[j] - lo > CHUNK ? lo + CHUNK : numel[j];
      chunks[c++] = (Chunk){j, lo, hi, slot};
      slot += r;
      lo = hi;
    } while (lo < numel[j]);
  }
  Work w = {m, first, ptrs, dts, chunks, nchunks, scratch, 0};
  int64_t extra = total >= parallel_min && nthreads > 1 ? nthreads - 1 : 0;
  pthread_t threads[64];
  if (extra > 63) extra = 63;
  int64_t started = 0;
  for (; started < extra; ++started)
    if (pthread_create(&threads[started], NULL, worker, &w) != 0) break;
  worker(&w);
  for (int64_t t = 0; t < started; ++t) pthread_join(threads[t], NULL);
  /* fold the chunks of each job in order: the same sums whatever the thread count */
  for (int64_t c = 0; c < nchunks;) {
    int64_t j = chunks[c].job, r = m[j] == 1 ? 2 : gram_outputs((int)m[j]);
    double* dst = out + out_off[j];
    for (int64_t o = 0; o < r; ++o) dst[o] = 0;
    for (; c < nchunks && chunks[c].job == j; ++c)
      for (int64_t o = 0; o < r; ++o) dst[o] += scratch[chunks[c].slot + o];
  }
  free(first);
  free(chunks);
  free(scratch);
  return 0;
}
