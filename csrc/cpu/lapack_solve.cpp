// potrf/potrs called directly: ATen's linalg_cholesky_ex + cholesky_solve pay for
// column-major copies, a tril of the factor and transposed right-hand sides, which cost more
// than the factorisation itself at D of a few hundred (docs/design.md §3, the solve). From
// D = 128 on, blocked_cholesky.cpp instead.
#include "lapack_solve.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "blocked_cholesky.h"
#include "lapack_calls.h"

namespace consequential_ext::cpu {
namespace {

using lapack::gemm;
using lapack::potrs;

// Many right-hand sides: potrs' two triangular solves by blocks, each diagonal block applied
// as its explicit inverse (kInverseBlock wide, from a triangular solve of the identity) and
// everything else as GEMM updates: substitution's products and sums, so its accuracy (not
// that of a formed A⁻¹, below), at GEMM's rate. MKL's triangular solves ran 2–5× below its
// GEMM's rate there (AMD EPYC, one thread: D = 161 with 640 right-hand sides, a 160 → 640
// Linear's, potrs 2.2 ms against 0.83 for two GEMMs as large).
constexpr int kInverseBlock = 64;

template <typename T>
void blocked_potrs(const T* a, int n, T* b, int nrhs) {
  // a's upper triangle: U, A = UᵀU (column-major); b: n × nrhs, column-major. x = U⁻¹ U⁻ᵀ b.
  const int nb = (n + kInverseBlock - 1) / kInverseBlock;
  std::vector<T> inverse(static_cast<size_t>(nb) * kInverseBlock * kInverseBlock);
  std::vector<T> work;
  auto start = [](int k) { return k * kInverseBlock; };
  auto width = [&](int k) { return std::min(kInverseBlock, n - start(k)); };
  // S_k = U_kk⁻¹ (upper, width × width, leading dimension width) in block k's slot.
  auto inverse_of = [&](int k) {
    return inverse.data() + static_cast<size_t>(k) * kInverseBlock * kInverseBlock;
  };
  // b_k ← op(S_k) b_k (op: 'T' transposes), through a copy (GEMM's output may not alias).
  auto apply_inverse = [&](int k, char op) {
    lapack::multiply_in_place(op, width(k), nrhs, inverse_of(k), b + start(k), n, work);
  };
  for (int k = 0; k < nb; ++k)
    lapack::upper_inverse(a + start(k) + static_cast<int64_t>(start(k)) * n, width(k), n,
                          inverse_of(k));
  // Uᵀ y = b, forward: y_k = S_kᵀ (b_k − U_{<k,k}ᵀ y_{<k}).
  for (int k = 0; k < nb; ++k) {
    const int k0 = start(k), kb = width(k);
    if (k0 > 0)
      gemm('T', 'N', kb, nrhs, k0, T(-1), a + static_cast<int64_t>(k0) * n, n, b, n, T(1),
           b + k0, n);
    apply_inverse(k, 'T');
  }
  // U x = y, backward: x_k = S_k (y_k − U_{k,>k} x_{>k}).
  for (int k = nb - 1; k >= 0; --k) {
    const int k0 = start(k), k1 = k0 + width(k);
    if (k1 < n)
      gemm('N', 'N', width(k), nrhs, n - k1, T(-1), a + k0 + static_cast<int64_t>(k1) * n, n,
           b + k1, n, T(1), b + k0, n);
    apply_inverse(k, 'N');
  }
}

// No explicit-inverse route (potri + GEMM) for many right-hand sides, though MKL's GEMM outran
// its triangular solves (on an AMD EPYC, one thread, 2.4–2.8×): x = G·A⁻¹ through a formed
// A⁻¹ errs by ~eps·cond(A)·‖A⁻¹‖‖G‖ instead of potrs' ~eps·cond(A)·‖x‖, and G = dZ Xᵀ lies
// along A's large directions, where ‖x‖ ≪ ‖A⁻¹‖‖G‖: ΔW·X was 7 % off float64 (potrs 1e-6)
// for a 96 → 384 CLinear after a LayerNorm ×100, 2e-5 (5e-7) already after a plain
// LayerNorm. On the Intel Xeon that measured this, potrs costs 1.15–1.3× that route.

// From this D on a system goes to blocked_cholesky.cpp (measured, one system, wall, 2-core
// AMD EPYC, the two interleaved: D = 145 with 16 right-hand sides 0.13 against LAPACK's
// 0.16–0.18 ms, 289 with 32 0.43 against 0.67, 577 with 64 on two threads 1.7 against 1.9;
// with another process busy on one core 1.8–2.0 against 4.0, on both 6.6–7.1 against 37–48:
// MKL's threaded potrf waits far longer for a descheduled thread; 73 about even).
constexpr int kBlockedMinN = 128;

template <typename T>
bool solve_all(T* a, T* x, int64_t systems, int n, int nrhs, bool serial) {
  // The column-major upper factor of a row-major matrix reads its lower triangle (kUplo).
  // x's rows are the columns of the (D × M) right-hand side.
  std::atomic<bool> ok{true};
  // blocked_potrs on one thread only: threaded, its many small GEMMs each wait for every
  // thread, and on a busy machine that took 8× potrs' time (D = 577, 600 right-hand sides).
  // Measured (one thread, AMD EPYC): 1.3–3× potrs' speed from nrhs ≥ D/2 on (at D ≤ 64, a
  // single block, only from nrhs ≥ D), 0.6–0.9× with fewer right-hand sides.
  const bool blocked = (nrhs >= n || (2 * nrhs >= n && n > kInverseBlock)) &&
                       (serial || systems > 1);
  auto one = [&](int64_t s) {
    if (n >= kBlockedMinN) {  // the whole solve by blocks, on this thread or ATen's threads
      if (!blocked_cholesky_solve(a + s * n * n, x + s * n * nrhs, n, nrhs)) ok = false;
      return;
    }
    int info = 0;
    lapack::potrf(a + s * n * n, n, n, &info);
    if (info != 0) {
      ok = false;
      return;
    }
    if (nrhs == 0) return;
    if (blocked)
      blocked_potrs(a + s * n * n, n, x + s * n * nrhs, nrhs);
    else
      potrs(a + s * n * n, n, x + s * n * nrhs, nrhs, &info);
  };
  if (systems == 1) {
    one(0);  // one system: its own threads (LAPACK's or blocked_cholesky's)
  } else {
    // several: one system per thread (LAPACK runs single-threaded inside a parallel region)
    at::parallel_for(0, systems, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi && ok; ++s) one(s);
    });
  }
  return ok;
}

}  // namespace

bool lapack_available() {
  return spotrf_ && dpotrf_ && spotrs_ && dpotrs_ && sgemm_ && dgemm_ && strsm_ && dtrsm_;
}

bool lapack_ridge_solve(at::Tensor& a, at::Tensor& x, bool serial) {
  TORCH_INTERNAL_ASSERT(a.is_contiguous() && x.is_contiguous() && a.scalar_type() == x.scalar_type());
  const int64_t n = a.size(-1);
  if (n == 0) return true;
  const int64_t systems = a.numel() / (n * n);
  const int64_t nrhs = x.size(-2);
  TORCH_CHECK(n <= INT32_MAX && nrhs <= INT32_MAX && n * nrhs <= INT32_MAX,
              "ridge_solve: system too large for LAPACK's 32-bit sizes (D=", n, ", M=", nrhs, ")");
  if (a.scalar_type() == at::kDouble)
    return solve_all(a.data_ptr<double>(), x.data_ptr<double>(), systems, int(n), int(nrhs), serial);
  return solve_all(a.data_ptr<float>(), x.data_ptr<float>(), systems, int(n), int(nrhs), serial);
}

}  // namespace consequential_ext::cpu
