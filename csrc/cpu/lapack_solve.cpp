// potrf/potrs (potri + GEMM for many right-hand sides) called directly: ATen's
// linalg_cholesky_ex + cholesky_solve pay for column-major copies, a tril of the factor and
// transposed right-hand sides, which cost more than the factorisation itself at D of a few
// hundred (docs/design.md §4, the kernels). One large system on several threads goes to the
// blocked Cholesky of blocked_cholesky.cpp instead.
#include "lapack_solve.h"

#include "blocked_cholesky.h"
#include "lapack_calls.h"
#include "mirror.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace consequential_ext::cpu {
namespace {

using lapack::gemm;
using lapack::potrf;
using lapack::potri;
using lapack::potrs;

// Many right-hand sides (M ≥ kInverseRhs·D): A⁻¹ from the factor (potri, mirrored) and one
// GEMM instead of potrs, whose triangular solves ran at a fifth of GEMM's rate (MKL on an AMD
// EPYC, one thread: D = 193, M = 576 2.5 vs 0.9 ms; D = 321, M = 1280 11.0 vs 4.6 ms; the
// same error against float64). With fewer, potri's own cost loses (D = 577, M = 64: 1.7 vs
// 7.0 ms; D = 193, M = 192 about even).
constexpr int64_t kInverseRhs = 2;

// Whether potri and GEMM are exported too (torch's MKL builds do; otherwise potrs alone).
bool inverse_available() { return spotri_ && dpotri_ && sgemm_ && dgemm_; }

// x ← x · a⁻¹ from a's Cholesky factor (column-major lower), through the explicit inverse.
template <typename T>
bool solve_by_inverse(T* a, T* x, int n, int nrhs) {
  int info = 0;
  potri(a, n, &info);
  if (info != 0) return false;
  // potri leaves the upper triangle (column-major; row-major: the lower) as it was.
  mirror_triangle(a, n, n, Mirror::kUpperToLower);
  // Row-major x (M × D) is column-major xᵀ (D × M): xᵀ ← A⁻¹ xᵀ, A⁻¹ symmetric.
  std::vector<T> product(static_cast<size_t>(n) * nrhs);
  gemm('N', 'N', n, nrhs, n, T(1), a, n, x, n, T(0), product.data(), n);
  std::copy(product.begin(), product.end(), x);
  return true;
}

// One system of D in this range on several threads goes to blocked_cholesky.cpp (CPU time
// vs ATen's MKL Cholesky on 2 threads, bench/bench_solve.py: D = 769, 1153 0.84, 0.81; 577
// and 2305 about even; below, ridge_solve_cpu runs one thread anyway).
constexpr int kBlockedMinN = 256, kBlockedMaxN = 2048;

template <typename T>
bool solve_all(T* a, T* x, int64_t systems, int n, int nrhs) {
  // Column-major lower factor of a row-major symmetric matrix = its upper triangle: either
  // triangle holds the same numbers. x's rows are the columns of the (D × M) right-hand side.
  std::atomic<bool> ok{true};
  auto one = [&](int64_t s) {
    int info = 0;
    potrf(a + s * n * n, n, n, &info);
    if (info != 0) {
      ok = false;
      return;
    }
    if (nrhs == 0) return;
    if (nrhs >= kInverseRhs * n && inverse_available()) {
      if (!solve_by_inverse(a + s * n * n, x + s * n * nrhs, n, nrhs)) ok = false;
      return;
    }
    potrs(a + s * n * n, n, x + s * n * nrhs, nrhs, &info);
  };
  if (systems == 1 && n >= kBlockedMinN && n <= kBlockedMaxN &&
      at::get_num_threads() > 1 && blocked_cholesky_available()) {
    return blocked_cholesky_solve(a, x, n, nrhs);
  }
  if (systems == 1) {
    one(0);  // one system: LAPACK's own threads
  } else {
    // several: one system per thread (LAPACK runs single-threaded inside a parallel region)
    at::parallel_for(0, systems, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi && ok; ++s) one(s);
    });
  }
  return ok;
}

}  // namespace

bool lapack_available() { return spotrf_ && dpotrf_ && spotrs_ && dpotrs_; }

bool lapack_ridge_solve(at::Tensor& a, at::Tensor& x) {
  TORCH_INTERNAL_ASSERT(a.is_contiguous() && x.is_contiguous() && a.scalar_type() == x.scalar_type());
  const int64_t n = a.size(-1);
  if (n == 0) return true;
  const int64_t systems = a.numel() / (n * n);
  const int64_t nrhs = x.size(-2);
  TORCH_CHECK(n <= INT32_MAX && nrhs <= INT32_MAX && n * nrhs <= INT32_MAX,
              "ridge_solve: system too large for LAPACK's 32-bit sizes (D=", n, ", M=", nrhs, ")");
  if (a.scalar_type() == at::kDouble)
    return solve_all(a.data_ptr<double>(), x.data_ptr<double>(), systems, int(n), int(nrhs));
  return solve_all(a.data_ptr<float>(), x.data_ptr<float>(), systems, int(n), int(nrhs));
}

}  // namespace consequential_ext::cpu
