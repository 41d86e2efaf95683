// CPU ridge_solve: grad · (gram + ridge·I)⁻¹ for a batch of systems by one batched
// Cholesky (LAPACK potrf through ATen) and the two triangular solves (potrs), or, for many
// small systems, by the lane-parallel solver of ridge_solve_lanes.cpp; then the rescale
// (cast) into the requested dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "escalation.h"
#include "ridge_solve_lanes.h"

// MKL's per-thread thread count (exported by torch's MKL builds; null elsewhere).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace consequential_ext::cpu {
namespace {

constexpr int kMaxEscalations = 12;  // ridge × 10 each: 1e-3 becomes 1e8 before giving up
constexpr double kSerialWork = 1e9;  // batch · D³ below which one thread is fastest

// Runs a small solve on the calling thread only: ATen's loops (the OpenMP thread count is
// a per-thread setting) and MKL's LAPACK (its thread-local count). Threads do not speed up
// a Gram of a few hundred rows, and on a busy machine every parallel region waits for a
// descheduled thread (measured with other jobs running: 144 × 144 potrf 0.05 ms on one
// thread, 124 ms on two).
class SingleThreaded {
 public:
  SingleThreaded() {
#ifdef _OPENMP
    at::get_num_threads();  // torch's per-thread initialisation first, so it cannot undo ours
    previous_omp_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    if (MKL_Set_Num_Threads_Local) previous_mkl_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreaded() {
#ifdef _OPENMP
    omp_set_num_threads(previous_omp_);
#endif
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_mkl_);
  }
  SingleThreaded(const SingleThreaded&) = delete;
  SingleThreaded& operator=(const SingleThreaded&) = delete;

 private:
  int previous_omp_ = 1, previous_mkl_ = 0;
};

// Finite check without two boolean temporaries in the common case: a finite sum proves
// every entry finite; only an inf/NaN sum (non-finite input, or finite input that
// overflowed) needs the exact test.
bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0 || std::isfinite(t.sum().item<double>())) return true;
  return t.isfinite().all().item<bool>();
}

at::Tensor ridge_solve_cpu(const at::Tensor& gram, const at::Tensor& grad, double ridge,
                           std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(gram.dim() >= 2 && gram.size(-1) == gram.size(-2),
              "ridge_solve: gram must be (..., D, D), got ", gram.sizes());
  TORCH_CHECK(grad.dim() == gram.dim() && grad.size(-1) == gram.size(-1) &&
                  grad.sizes().slice(0, grad.dim() - 2) == gram.sizes().slice(0, gram.dim() - 2),
              "ridge_solve: grad must be (..., M, D) with the batch dims and D of gram ",
              gram.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(gram.is_floating_point() && grad.is_floating_point(),
              "ridge_solve: gram and grad must be floating point, got ", gram.scalar_type(),
              " and ", grad.scalar_type());
  TORCH_CHECK(std::isfinite(ridge) && ridge > 0,
              "ridge_solve: ridge must be a finite float > 0, got ", ridge);
  const auto out_type = out_dtype.value_or(grad.scalar_type());
  // Solve in float32 or better whatever the input dtype (bf16/fp16 Grams are too coarse).
  const auto work = gram.scalar_type() == at::kDouble || grad.scalar_type() == at::kDouble
                        ? at::kDouble
                        : at::kFloat;
  const double d = static_cast<double>(gram.size(-1));
  std::optional<SingleThreaded> single;
  if (static_cast<double>(gram.numel()) * d <= kSerialWork) single.emplace();
  // Own copy of gram: the ridge goes onto its diagonal in place.
  auto a = gram.to(work, /*non_blocking=*/false, /*copy=*/true);
  auto g = grad.to(work);
  if (!all_finite(a) || !all_finite(g)) {
    // Non-finite in, non-finite out: GradScaler must see it; never throw inside backward.
    return at::full(grad.sizes(), NAN, grad.options().dtype(out_type));
  }
  auto diag = a.diagonal(0, -2, -1);
  diag.add_(ridge);
  double lam = ridge;
  // Many small systems (grouped / depthwise layers): one per SIMD lane, not one LAPACK call each.
  const int64_t systems = gram.size(-1) == 0 ? 0 : gram.numel() / (gram.size(-1) * gram.size(-1));
  const bool in_lanes = gram.size(-1) <= kLaneMaxD && systems >= kLaneMinBatch;
  if (in_lanes) {
    a = a.contiguous();
    g = g.contiguous();
    diag = a.diagonal(0, -2, -1);
  }
  for (int attempt = 0; attempt < kMaxEscalations; ++attempt) {
    if (in_lanes) {
      auto x = at::empty_like(g);
      if (lane_ridge_solve(a, g, x)) {
        if (attempt > 0) note_ridge_escalation(ridge, lam);
        return x.to(out_type);
      }
      diag.add_(9.0 * lam);  // escalate for the whole batch, as below
      lam *= 10.0;
      continue;
    }
    auto [chol, info] = at::linalg_cholesky_ex(a, /*upper=*/false, /*check_errors=*/false);
    if (info.ne(0).any().item<bool>()) {
      // Not positive definite on finite input: escalate the ridge for the whole batch (as
      // the reference does), i.e. add the difference 9·lam to the diagonal.
      diag.add_(9.0 * lam);
      lam *= 10.0;
      continue;
    }
    if (attempt > 0) note_ridge_escalation(ridge, lam);  // ops.ridge_solve warns (once)
    // x (L Lᵀ) = g  ⇔  (L Lᵀ) xᵀ = gᵀ (A symmetric).
    return at::cholesky_solve(g.mT(), chol, /*upper=*/false).mT().to(out_type);
  }
  // Still indefinite (finite but absurd input, e.g. a diverging run): NaN, never an exception
  // inside backward; the infinite "escalation" tells ops.ridge_solve to say so.
  note_ridge_escalation(ridge, INFINITY);
  return at::full(grad.sizes(), NAN, grad.options().dtype(out_type));
}

}  // namespace

TORCH_LIBRARY_IMPL(consequential_ext, CPU, m) { m.impl("ridge_solve", &ridge_solve_cpu); }

}  // namespace consequential_ext::cpu
