// CPU ridge_solve: grad · (gram + ridge·I)⁻¹ for a batch of systems by one batched
// Cholesky (LAPACK potrf through ATen) and the two triangular solves (potrs), then the
// rescale (cast) into the requested dtype.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "escalation_warning.h"

namespace consequential_ext::cpu {
namespace {

constexpr int kMaxEscalations = 12;  // ridge × 10 each: 1e-3 becomes 1e8 before giving up

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
  for (int attempt = 0; attempt < kMaxEscalations; ++attempt) {
    auto [chol, info] = at::linalg_cholesky_ex(a, /*upper=*/false, /*check_errors=*/false);
    if (info.ne(0).any().item<bool>()) {
      // Not positive definite on finite input: escalate the ridge for the whole batch (as
      // the reference does), i.e. add the difference 9·lam to the diagonal.
      diag.add_(9.0 * lam);
      lam *= 10.0;
      continue;
    }
    if (attempt > 0) warn_ridge_escalated(ridge, lam);
    // x (L Lᵀ) = g  ⇔  (L Lᵀ) xᵀ = gᵀ (A symmetric).
    return at::cholesky_solve(g.mT(), chol, /*upper=*/false).mT().to(out_type);
  }
  TORCH_CHECK(false, "ridge_solve: (gram + ridge*I) is not positive definite even after escalating "
                     "the ridge to ", lam);
}

}  // namespace

TORCH_LIBRARY_IMPL(consequential_ext, CPU, m) { m.impl("ridge_solve", &ridge_solve_cpu); }

}  // namespace consequential_ext::cpu
