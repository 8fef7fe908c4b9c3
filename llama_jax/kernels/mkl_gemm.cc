// fp32 matrix products for XLA:CPU through Intel MKL's sgemm: an XLA FFI custom call.
//
// C = op(A) op(B), op = identity or transpose, on row-major [..., rows, cols] buffers; leading
// axes are a batch (both operands carry the same batch). Each operand may be a window of rows
// [begin, begin + count) of its buffer (count -1: all rows), read in place: the blockwise
// attention's query blocks and key prefixes need no copy. Built and registered by
// llama_jax/mkl_gemm.py, which explains why it exists (docs/PERFORMANCE.md has the numbers).
//
// Threads: MKL runs sequentially (one thread per call). The product is cut into as many parts
// as XLA's intra-op thread pool has threads, and the parts run on that pool: the calling
// thread takes the first, the pool the rest, and the call completes (an asynchronous FFI
// future) when the last part is done. Nothing ever blocks waiting for a pool thread, so two
// such calls running side by side cannot deadlock, and MKL never starts threads of its own that
// would fight XLA's for the cores.
#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm (LP64: int sizes), found in libmkl_rt by mkl_gemm.py and handed over through
// llama_jax_set_sgemm before the first call.
using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
Sgemm sgemm = nullptr;

// Each part gets at least this many multiply-adds (64 x 64 x 64): smaller products are not
// worth a hand-off to another thread.
constexpr int64_t kMinPartWork = int64_t{1} << 18;

struct Product {
  const float* a;  // first used element of batch item 0; item i starts a_stride further on
  const float* b;
  float* c;
  int64_t a_stride, b_stride;
  int64_t batch;
  int m, n, k;
  bool ta, tb;

  // Rows [m0, m1) of product i of the batch: op(A)'s rows are A's rows, or A's columns when
  // A is stored transposed; B and the leading dimensions stay whole.
  void Rows(int64_t i, int m0, int m1) const {
    if (m0 >= m1) return;
    const float* ai = a + i * a_stride;
    const float* a0 = ta ? ai + m0 : ai + int64_t{m0} * k;
    sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m1 - m0, n, k, 1.0f, a0,
          ta ? m : k, b + i * b_stride, tb ? k : n, 0.0f, c + i * m * n + int64_t{m0} * n, n);
  }

  // Columns [n0, n1) of a single product, for short, wide products (few rows to split).
  void Cols(int n0, int n1) const {
    if (n0 >= n1) return;
    const float* b0 = tb ? b + int64_t{n0} * k : b + n0;
    sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n1 - n0, k, 1.0f, a,
          ta ? m : k, b0, tb ? k : n, 0.0f, c + n0, n);
  }

  // Part p of `parts`: whole products of the batch when there are enough of them, else a
  // share of every product's rows (or of a single product's columns when it has more of those).
  void Part(int p, int parts) const {
    if (batch >= parts) {
      for (int64_t i = batch * p / parts; i < batch * (p + 1) / parts; ++i) Rows(i, 0, m);
    } else if (batch == 1 && n > m) {
      Cols(int64_t{n} * p / parts, int64_t{n} * (p + 1) / parts);
    } else {
      const int m0 = int64_t{m} * p / parts, m1 = int64_t{m} * (p + 1) / parts;
      for (int64_t i = 0; i < batch; ++i) Rows(i, m0, m1);
    }
  }
};

ffi::Future MklGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b,
                        int64_t a_row_begin, int64_t a_rows, int64_t b_row_begin,
                        int64_t b_rows) {
  auto ad = a.dimensions(), bd = b.dimensions();
  const size_t r = ad.size();
  // The stored operands as used: [rows, cols] windows of [buffer rows, cols] buffers.
  const int64_t a_cols = ad[r - 1], b_cols = bd[r - 1];
  if (a_rows < 0) a_rows = ad[r - 2] - a_row_begin;
  if (b_rows < 0) b_rows = bd[r - 2] - b_row_begin;
  Product prod{a.typed_data() + a_row_begin * a_cols, b.typed_data() + b_row_begin * b_cols,
               c->typed_data(), ad[r - 2] * a_cols, bd[r - 2] * b_cols, 1,
               static_cast<int>(transpose_a ? a_cols : a_rows),
               static_cast<int>(transpose_b ? b_rows : b_cols),
               static_cast<int>(transpose_a ? a_rows : a_cols),
               transpose_a, transpose_b};
  for (size_t i = 0; i + 2 < r; ++i) prod.batch *= ad[i];

  const int64_t work = prod.batch * prod.m * prod.n * prod.k;
  const int parts = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(pool.num_threads(), work / kMinPartWork)));
  ffi::CountDownPromise done(parts);
  ffi::Future future(done);
  for (int p = 1; p < parts; ++p) {
    pool.Schedule([prod, p, parts, done]() mutable {
      prod.Part(p, parts);
      done.CountDown(1);
    });
  }
  prod.Part(0, parts);
  done.CountDown(1);
  return future;
}

}  // namespace

extern "C" void llama_jax_set_sgemm(void* fn) { sgemm = reinterpret_cast<Sgemm>(fn); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxMklGemm, MklGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<int64_t>("a_row_begin")
                                  .Attr<int64_t>("a_rows")
                                  .Attr<int64_t>("b_row_begin")
                                  .Attr<int64_t>("b_rows"));
