// prefprobe's native matmul: C = op(A) · op(B) for float32 A and C and a float32, BF16 or F16 B, by the
// machine's BLAS (OpenBLAS, or Accelerate on macOS), on memory that JavaScript owns: offsets into the wasm
// heap and into any other ArrayBuffer or SharedArrayBuffer (a streamed model's stored weights), never copied.
// A batched call gives one byte offset per batch entry for A, B and C, so any broadcast is the caller's choice.
#define NAPI_VERSION 8
#include <node_api.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#ifdef PREFPROBE_ACCELERATE
#include <Accelerate/Accelerate.h>
#else
#include <cblas.h>
extern void openblas_set_num_threads(int);
extern char *openblas_get_config(void);
extern char *openblas_get_corename(void);
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };

static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13); // inf, nan
  else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
  else if (!man) bits = sign;
  else { // subnormal: normalise
    int e = -1;
    do { man <<= 1; e++; } while (!(man & 0x400));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// `n` stored BF16 or F16 values from `src` as float32 into `dst`, reading element i at src[i * step].
static void widen(const uint8_t *src, int dtype, size_t n, size_t step, float *dst) {
  if (dtype == BF16) {
    const uint16_t *s = (const uint16_t *)src;
    uint32_t *d = (uint32_t *)dst;
    if (step == 1) for (size_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
    else for (size_t i = 0; i < n; i++) d[i] = (uint32_t)s[i * step] << 16;
  } else if (dtype == F16) {
    const uint16_t *s = (const uint16_t *)src;
    for (size_t i = 0; i < n; i++) dst[i] = half_to_float(s[i * step]);
  }
}

// Output columns per slice of a product: the power of two from 64 to 1024 nearest below 2 MiB of B as float32,
// so that a BF16/F16 B widened a slice at a time stays in cache for the sgemm. Every product is computed slice by
// slice, whatever B's dtype, because the BLAS's rounding depends on how many columns a call has: this way a
// float32 B and the same values stored as BF16 give the same bits, threads can take slices without changing them,
// and a product split by columns at multiples of 1024 (a streamed head's chunks) gives the bits of the whole.
static int slice_cols(int K) {
  int nb = 1024;
  while (nb > 64 && (size_t)nb * 4 * (size_t)K > (2u << 20)) nb /= 2;
  return nb;
}

// One batch entry of a product: C[M, N] = op(A) op(B); A float32 (transA: stored [K, M], else [M, K]), B of
// `dtype` (transB: stored [N, K], else [K, N]), C row-major [M, N].
typedef struct {
  int M, N, K, transA, transB, dtype;
  const float *A;
  const uint8_t *B;
  float *C;
} Job;

// Columns [j, j + w) of a job's C; `wide` holds a widened slice of B (slice_cols(K) * K floats).
//
// The bits of a row of C depend on where the row sits among the call's rows: OpenBLAS's sgemm kernel works on
// tiles of rows (12 on Haswell) and rounds by position within the tile, so a row's values move by float32 rounding
// when the rows around it change (the batch). They do not depend on the thread count: the slices are the same.
static void slice(const Job *b, int j, int w, float *wide) {
  const int M = b->M, N = b->N, K = b->K;
  const float *Bs;
  int ldb, tb = b->transB;
  if (b->dtype == F32) {
    Bs = (const float *)b->B + (tb ? (size_t)j * K : (size_t)j);
    ldb = tb ? K : N;
  } else { // widen the slice to float32 [w, K] (transB) or [K, w]
    size_t bw = 2;
    if (tb) widen(b->B + (size_t)j * K * bw, b->dtype, (size_t)w * K, 1, wide);
    else for (int k = 0; k < K; k++) widen(b->B + ((size_t)k * N + j) * bw, b->dtype, (size_t)w, 1, wide + (size_t)k * w);
    Bs = wide;
    ldb = tb ? K : w;
  }
  cblas_sgemm(CblasRowMajor, b->transA ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, w, K, 1.0f, b->A, b->transA ? M : K, Bs, ldb, 0.0f, b->C + j, N);
}

// The work of one call: every (job, slice) pair; thread t of `threads` takes items t, t + threads, ...
typedef struct {
  const Job *jobs;
  size_t njobs, per_job, t, threads;
  int nb, K, ok;
} Work;

static void *work(void *arg) {
  Work *wk = (Work *)arg;
  const int K = wk->K, nb = wk->nb;
  float *wide = wk->jobs[0].dtype == F32 ? NULL : malloc(sizeof(float) * (size_t)nb * K);
  if (wk->jobs[0].dtype != F32 && !wide) wk->ok = 0;
  else {
    wk->ok = 1;
    for (size_t item = wk->t; item < wk->njobs * wk->per_job; item += wk->threads) {
      const Job *b = &wk->jobs[item / wk->per_job];
      int j = (int)(item % wk->per_job) * nb;
      if (j < b->N) slice(b, j, b->N - j < nb ? b->N - j : nb, wide);
    }
  }
  free(wide);
  return NULL;
}

// Runs every job on up to `threads` threads (this one included); the bits do not depend on how many. 0 when out of memory.
static int run_jobs(const Job *jobs, size_t njobs, int threads) {
  if (!njobs) return 1;
  const int M = jobs[0].M, N = jobs[0].N, K = jobs[0].K;
  if (M == 0 || N == 0) return 1;
  if (K == 0) {
    for (size_t i = 0; i < njobs; i++) memset(jobs[i].C, 0, sizeof(float) * (size_t)M * N);
    return 1;
  }
  const int nb = slice_cols(K);
  const size_t per_job = ((size_t)N + nb - 1) / nb, items = per_job * njobs;
  // threads only where there is work for them: a thread costs tens of microseconds to start
  double flops = 2.0 * M * N * K * (double)njobs;
  size_t T = threads < 1 ? 1 : (size_t)threads;
  if (T > items) T = items;
  if (flops < 4e6) T = 1;
  Work wk[64];
  pthread_t th[64];
  if (T > 64) T = 64;
  for (size_t t = 0; t < T; t++) wk[t] = (Work){jobs, njobs, per_job, t, T, nb, K, 0};
  size_t started = 1;
  for (size_t t = 1; t < T; t++, started++)
    if (pthread_create(&th[t], NULL, work, &wk[t])) break;
  work(&wk[0]);
  int ok = wk[0].ok;
  for (size_t t = 1; t < started; t++) {
    pthread_join(th[t], NULL);
    ok &= wk[t].ok;
  }
  for (size_t t = started; t < T; t++) { // a thread that could not start: its items, here
    work(&wk[t]);
    ok &= wk[t].ok;
  }
  return ok;
}

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init_blas(void) {
#ifndef PREFPROBE_ACCELERATE
  openblas_set_num_threads(1); // threads are prefprobe's own (run_jobs), over slices whose bits do not depend on them
#endif
}

#define CHECK(call) do { if ((call) != napi_ok) { napi_throw_error(env, NULL, "prefprobe_blas: " #call " failed"); return NULL; } } while (0)

static int bytes_of(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is_ta = false;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) return 0;
  napi_typedarray_type type;
  size_t n, offset;
  napi_value ab;
  void *p;
  if (napi_get_typedarray_info(env, v, &type, &n, &p, &ab, &offset) != napi_ok || type != napi_uint8_array) return 0;
  *data = (uint8_t *)p;
  *len = n;
  return 1;
}

static int offsets_of(napi_env env, napi_value v, double **data, size_t *len) {
  bool is_ta = false;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) return 0;
  napi_typedarray_type type;
  napi_value ab;
  size_t offset;
  void *p;
  if (napi_get_typedarray_info(env, v, &type, len, &p, &ab, &offset) != napi_ok || type != napi_float64_array) return 0;
  *data = (double *)p;
  return 1;
}

// matmul(M, N, K, a: Uint8Array, aOffsets: Float64Array, transA, b: Uint8Array, bOffsets, transB, bDtype,
//        c: Uint8Array, cOffsets, threads): for each batch entry i, C at c + cOffsets[i] = op(A at a + aOffsets[i])
//        · op(B at b + bOffsets[i]); offsets in bytes, every range checked against its array; on up to `threads`
//        threads, with the same bits for any number.
static napi_value matmul(napi_env env, napi_callback_info info) {
  size_t argc = 13;
  napi_value argv[13];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc != 13) { napi_throw_type_error(env, NULL, "matmul takes 13 arguments"); return NULL; }
  int32_t M, N, K, dtype, threads;
  bool transA, transB;
  CHECK(napi_get_value_int32(env, argv[0], &M));
  CHECK(napi_get_value_int32(env, argv[1], &N));
  CHECK(napi_get_value_int32(env, argv[2], &K));
  CHECK(napi_get_value_bool(env, argv[5], &transA));
  CHECK(napi_get_value_bool(env, argv[8], &transB));
  CHECK(napi_get_value_int32(env, argv[9], &dtype));
  CHECK(napi_get_value_int32(env, argv[12], &threads));
  uint8_t *a, *b, *c;
  size_t aLen, bLen, cLen, na, nb, nc;
  double *ao, *bo, *co;
  if (!bytes_of(env, argv[3], &a, &aLen) || !bytes_of(env, argv[6], &b, &bLen) || !bytes_of(env, argv[10], &c, &cLen)) {
    napi_throw_type_error(env, NULL, "matmul: a, b and c must be Uint8Arrays");
    return NULL;
  }
  if (!offsets_of(env, argv[4], &ao, &na) || !offsets_of(env, argv[7], &bo, &nb) || !offsets_of(env, argv[11], &co, &nc) || na != nc || nb != nc) {
    napi_throw_type_error(env, NULL, "matmul: offsets must be Float64Arrays of one entry per batch");
    return NULL;
  }
  if (M < 0 || N < 0 || K < 0 || dtype < F32 || dtype > F16) { napi_throw_range_error(env, NULL, "matmul: bad sizes or dtype"); return NULL; }
  size_t bw = dtype == F32 ? 4 : 2;
  size_t aBytes = 4 * (size_t)M * K, bBytes = bw * (size_t)K * N, cBytes = 4 * (size_t)M * N;
  for (size_t i = 0; i < nc; i++) {
    if (!(ao[i] >= 0 && ao[i] + aBytes <= aLen && bo[i] >= 0 && bo[i] + bBytes <= bLen && co[i] >= 0 && co[i] + cBytes <= cLen) ||
        ((size_t)ao[i] & 3) || ((size_t)co[i] & 3) || ((size_t)bo[i] & (bw - 1))) {
      napi_throw_range_error(env, NULL, "matmul: an operand lies outside its array or is misaligned");
      return NULL;
    }
  }
  pthread_once(&init_once, init_blas);
  Job *jobs = malloc(sizeof(Job) * (nc ? nc : 1));
  if (!jobs) { napi_throw_error(env, NULL, "matmul: out of memory"); return NULL; }
  for (size_t i = 0; i < nc; i++)
    jobs[i] = (Job){M, N, K, transA, transB, dtype, (const float *)(a + (size_t)ao[i]), b + (size_t)bo[i], (float *)(c + (size_t)co[i])};
  int ok = run_jobs(jobs, nc, threads);
  free(jobs);
  if (!ok) napi_throw_error(env, NULL, "matmul: out of memory for its scratch blocks");
  return NULL;
}

// lse(x: Uint8Array, offset, rows, cols, out: Float32Array): out[r] = log Σ_j exp(x[r, j]) for float32 x at the byte
// offset, row-major [rows, cols]: the row's max, then the sum of exp(x − max) in double (one pass each).
static napi_value lse(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc != 5) { napi_throw_type_error(env, NULL, "lse takes 5 arguments"); return NULL; }
  uint8_t *x;
  size_t xLen, outLen;
  double off;
  int32_t rows, cols;
  CHECK(napi_get_value_double(env, argv[1], &off));
  CHECK(napi_get_value_int32(env, argv[2], &rows));
  CHECK(napi_get_value_int32(env, argv[3], &cols));
  bool is_ta = false;
  napi_typedarray_type type;
  void *op;
  napi_value ab;
  size_t boff;
  if (!bytes_of(env, argv[0], &x, &xLen) || napi_is_typedarray(env, argv[4], &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, argv[4], &type, &outLen, &op, &ab, &boff) != napi_ok || type != napi_float32_array) {
    napi_throw_type_error(env, NULL, "lse: x must be a Uint8Array and out a Float32Array");
    return NULL;
  }
  if (rows < 0 || cols < 1 || off < 0 || ((size_t)off & 3) || off + 4.0 * rows * cols > (double)xLen || (size_t)rows > outLen) {
    napi_throw_range_error(env, NULL, "lse: the rows lie outside their arrays");
    return NULL;
  }
  const float *v = (const float *)(x + (size_t)off);
  float *out = (float *)op;
  for (int r = 0; r < rows; r++) {
    const float *row = v + (size_t)r * cols;
    float m = row[0];
    for (int j = 1; j < cols; j++) m = row[j] > m ? row[j] : m;
    double sum = 0;
    if (m == INFINITY || m != m) { out[r] = m; continue; } // +inf or NaN: the result
    if (m == -INFINITY) { out[r] = -INFINITY; continue; }
    for (int j = 0; j < cols; j++) sum += expf(row[j] - m);
    out[r] = (float)(m + log(sum));
  }
  return NULL;
}

// describe(): which BLAS this is, as its own words.
static napi_value describe(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value out;
  pthread_once(&init_once, init_blas);
  char text[512];
#ifdef PREFPROBE_ACCELERATE
  snprintf(text, sizeof text, "Apple Accelerate");
#else
  snprintf(text, sizeof text, "%s (%s)", openblas_get_config(), openblas_get_corename());
#endif
  CHECK(napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &out));
  return out;
}

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
    {"matmul", NULL, matmul, NULL, NULL, NULL, napi_default, NULL},
    {"describe", NULL, describe, NULL, NULL, NULL, napi_default, NULL},
    {"lse", NULL, lse, NULL, NULL, NULL, napi_default, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return NULL;
  return exports;
}
