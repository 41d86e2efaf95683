// potrf/potrs called directly: ATen's linalg_cholesky_ex + cholesky_solve pay for
// column-major copies, a tril of the factor and transposed right-hand sides, which cost more
// than the factorisation itself at D of a few hundred (docs/design.md §3, the solve).
#include "lapack_solve.h"

#include <ATen/Parallel.h>

#include <atomic>

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

// No explicit-inverse route (potri + GEMM) for many right-hand sides, though MKL's GEMM outran
// its triangular solves (on an AMD EPYC, one thread, 2.4–2.8×): x = G·A⁻¹ through a formed
// A⁻¹ errs by ~eps·cond(A)·‖A⁻¹‖‖G‖ instead of potrs' ~eps·cond(A)·‖x‖, and G = dZ Xᵀ lies
// along A's large directions, where ‖x‖ ≪ ‖A⁻¹‖‖G‖: ΔW·X was 7 % off float64 (potrs 1e-6)
// for a 96 → 384 CLinear after a LayerNorm ×100, 2e-5 (5e-7) already after a plain
// LayerNorm. On the Intel Xeon that measured this, potrs costs 1.15–1.3× that route.

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
