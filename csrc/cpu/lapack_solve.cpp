// potrf/potrs (potri + GEMM for many right-hand sides) called directly: ATen's
// linalg_cholesky_ex + cholesky_solve pay for column-major copies, a tril of the factor and
// transposed right-hand sides, which cost more than the factorisation itself at D of a few
// hundred (docs/design.md §3, the solve).
#include "lapack_solve.h"
#include "mirror.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

// Weak: resolved from libtorch_cpu where torch exports its LAPACK, null otherwise.
extern "C" {
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info)
    __attribute__((weak));
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info)
    __attribute__((weak));
void spotrs_(const char* uplo, const int* n, const int* nrhs, const float* a, const int* lda,
             float* b, const int* ldb, int* info) __attribute__((weak));
void dpotrs_(const char* uplo, const int* n, const int* nrhs, const double* a, const int* lda,
             double* b, const int* ldb, int* info) __attribute__((weak));
void spotri_(const char* uplo, const int* n, float* a, const int* lda, int* info)
    __attribute__((weak));
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info)
    __attribute__((weak));
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace consequential_ext::cpu {
namespace {

// Column-major upper = row-major lower: the triangle the lane solver and the reference
// (torch.linalg.cholesky) read, so a Gram that is not bit-symmetric gets one answer on
// every path.
constexpr char kUplo = 'U';

void potrf(float* a, int n, int* info) {
  spotrf_(&kUplo, &n, a, &n, info);
}
void potrf(double* a, int n, int* info) {
  dpotrf_(&kUplo, &n, a, &n, info);
}
void potrs(const float* a, int n, float* b, int nrhs, int* info) {
  spotrs_(&kUplo, &n, &nrhs, a, &n, b, &n, info);
}
void potrs(const double* a, int n, double* b, int nrhs, int* info) {
  dpotrs_(&kUplo, &n, &nrhs, a, &n, b, &n, info);
}

void potri(float* a, int n, int* info) {
  spotri_(&kUplo, &n, a, &n, info);
}
void potri(double* a, int n, int* info) {
  dpotri_(&kUplo, &n, a, &n, info);
}
// c = a · b, column-major: a (m × k), b (k × n), c (m × n).
void gemm(const float* a, const float* b, float* c, int m, int n, int k) {
  const char no = 'N';
  const float one = 1, zero = 0;
  sgemm_(&no, &no, &m, &n, &k, &one, a, &m, b, &k, &zero, c, &m);
}
void gemm(const double* a, const double* b, double* c, int m, int n, int k) {
  const char no = 'N';
  const double one = 1, zero = 0;
  dgemm_(&no, &no, &m, &n, &k, &one, a, &m, b, &k, &zero, c, &m);
}

// Many right-hand sides (M ≥ kInverseRhs·D): A⁻¹ from the factor (potri, mirrored) and one
// GEMM instead of potrs, whose triangular solves ran at a fifth of GEMM's rate (MKL on an AMD
// EPYC, one thread: D = 193, M = 576 2.5 vs 0.9 ms; D = 321, M = 1280 11.0 vs 4.6 ms; the
// same error against float64). With fewer, potri's own cost loses (D = 577, M = 64: 1.7 vs
// 7.0 ms; D = 193, M = 192 about even).
constexpr int64_t kInverseRhs = 2;

// Whether potri and GEMM are exported too (torch's MKL builds do; otherwise potrs alone).
bool inverse_available() { return spotri_ && dpotri_ && sgemm_ && dgemm_; }

// x ← x · a⁻¹ from a's Cholesky factor (column-major upper), through the explicit inverse.
template <typename T>
bool solve_by_inverse(T* a, T* x, int n, int nrhs) {
  int info = 0;
  potri(a, n, &info);
  if (info != 0) return false;
  // potri leaves the lower triangle (column-major; row-major: the upper) as it was.
  mirror_triangle(a, n, n, Mirror::kLowerToUpper);
  // Row-major x (M × D) is column-major xᵀ (D × M): xᵀ ← A⁻¹ xᵀ, A⁻¹ symmetric.
  std::vector<T> product(static_cast<size_t>(n) * nrhs);
  gemm(a, x, product.data(), n, nrhs, n);
  std::copy(product.begin(), product.end(), x);
  return true;
}

template <typename T>
bool solve_all(T* a, T* x, int64_t systems, int n, int nrhs) {
  // The column-major upper factor of a row-major matrix reads its lower triangle (kUplo).
  // x's rows are the columns of the (D × M) right-hand side.
  std::atomic<bool> ok{true};
  auto one = [&](int64_t s) {
    int info = 0;
    potrf(a + s * n * n, n, &info);
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
