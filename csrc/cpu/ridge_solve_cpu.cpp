// CPU ridge_solve: grad · (gram + ridge·I)⁻¹ for a batch of systems by Cholesky (LAPACK
// potrf + potrs, lapack_solve.cpp), or, for many small systems, by the lane-parallel solver
// of ridge_solve_lanes.cpp; then the rescale (cast) into the requested dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "escalation.h"
#include "lapack_solve.h"
#include "ridge_solve_lanes.h"
#include "thread_count.h"

namespace consequential_ext::cpu {
namespace {

constexpr int kMaxEscalations = 12;  // ridge × 10 each: 1e-3 becomes 1e8 before giving up
constexpr double kSerialWork = 3e7;  // batch · D³ up to which one thread is as fast

// Runs a small solve on the calling thread only: ATen's loops (the OpenMP thread count is
// a per-thread setting) and MKL's LAPACK (its thread-local count). Threads do not speed up
// a Gram of up to ~300 rows, and on a busy machine every parallel region waits for a
// descheduled thread (measured with other jobs running: 144 × 144 potrf 0.05 ms on one
// thread, 124 ms on two). Above that they do (wall ms, 2 threads vs 1, after a parallel
// region: D = 577 0.93 vs 1.25, 769 2.23 vs 3.52), and one thread is not cheaper in CPU
// time either: the idle OpenMP threads of the backward's previous parallel region spin
// meanwhile.
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
  keep_thread_count();  // before SingleThreaded reads the count it restores
  std::optional<SingleThreaded> single;
  if (static_cast<double>(gram.numel()) * d <= kSerialWork) single.emplace();
  if (!all_finite(gram) || !all_finite(grad)) {
    // Non-finite in, non-finite out: GradScaler must see it; never throw inside backward.
    return at::full(grad.sizes(), NAN, grad.options().dtype(out_type));
  }
  // Many small systems (grouped / depthwise layers): one per SIMD lane, not one LAPACK call
  // each; otherwise LAPACK directly where torch exports it, else ATen's Cholesky.
  const int64_t systems = gram.size(-1) == 0 ? 0 : gram.numel() / (gram.size(-1) * gram.size(-1));
  const bool in_lanes = gram.size(-1) <= kLaneMaxD && systems >= kLaneMinBatch;
  const bool direct = !in_lanes && lapack_available();
  // LAPACK and ATen work in place on own contiguous copies, the ridge on a's diagonal; the
  // lane solver reads gram and grad as they are (converted only where dtype or layout
  // differ) and adds the ridge as it loads them.
  auto with_ridge = [&](double lam) {
    auto a = at::empty(gram.sizes(), gram.options().dtype(work)).copy_(gram);
    a.diagonal(0, -2, -1).add_(lam);
    return a;
  };
  auto fresh_grad = [&] { return at::empty(grad.sizes(), grad.options().dtype(work)).copy_(grad); };
  const auto g = in_lanes ? grad.to(work).contiguous() : fresh_grad();
  const auto gram_work = in_lanes ? gram.to(work).contiguous() : at::Tensor();
  double lam = ridge;
  for (int attempt = 0; attempt < kMaxEscalations; ++attempt, lam *= 10.0) {
    // Not positive definite on finite input: escalate the ridge ×10 for the whole batch (the
    // record makes ops.ridge_solve solve a batch that escalated again with the reference's
    // per-system escalation, so each system's ridge escalates alone).
    std::optional<at::Tensor> x;
    auto a = in_lanes ? at::Tensor() : with_ridge(lam);
    if (in_lanes) {
      auto out = at::empty_like(g);
      if (lane_ridge_solve(gram_work, lam, g, out)) x = out;
    } else if (direct) {
      auto out = attempt == 0 ? g : fresh_grad();  // a failed attempt may have written g
      if (lapack_ridge_solve(a, out, single.has_value())) x = out;
    } else {
      auto [chol, info] = at::linalg_cholesky_ex(a, /*upper=*/false, /*check_errors=*/false);
      // x (L Lᵀ) = g  ⇔  (L Lᵀ) xᵀ = gᵀ (A symmetric).
      if (!info.ne(0).any().item<bool>()) x = at::cholesky_solve(g.mT(), chol, false).mT();
    }
    if (!x) continue;
    if (attempt > 0) note_ridge_escalation(ridge, lam);  // ops.ridge_solve warns (once)
    return x->to(out_type);
  }
  // Still indefinite (finite but absurd input, e.g. a diverging run): NaN, never an exception
  // inside backward; the infinite "escalation" tells ops.ridge_solve to say so.
  note_ridge_escalation(ridge, INFINITY);
  return at::full(grad.sizes(), NAN, grad.options().dtype(out_type));
}

}  // namespace

TORCH_LIBRARY_IMPL(consequential_ext, CPU, m) { m.impl("ridge_solve", &ridge_solve_cpu); }

}  // namespace consequential_ext::cpu
