// CPU ridge_solve: batched Cholesky of (gram + ridge·I), then grad·(L Lᵀ)⁻¹.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "escalation.h"

namespace consequential_ext {
namespace {

at::Tensor ridge_solve_cpu(const at::Tensor& gram, const at::Tensor& grad, double ridge,
                           std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(gram.dim() >= 2 && gram.size(-1) == gram.size(-2),
              "ridge_solve: gram must be (..., D, D), got ", gram.sizes());
  TORCH_CHECK(grad.dim() == gram.dim() && grad.size(-1) == gram.size(-1) &&
                  grad.sizes().slice(0, grad.dim() - 2) == gram.sizes().slice(0, gram.dim() - 2),
              "ridge_solve: grad must be (..., M, D) with the batch dims and D of gram ",
              gram.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(std::isfinite(ridge) && ridge > 0, "ridge_solve: ridge must be a finite float > 0, got ",
              ridge);
  const auto out_type = out_dtype.value_or(grad.scalar_type());
  // Solve in float32 or better whatever the input dtype (bf16/fp16 Grams are too coarse).
  const auto work = gram.scalar_type() == at::kDouble || grad.scalar_type() == at::kDouble
                        ? at::kDouble
                        : at::kFloat;
  auto a = gram.to(work);
  auto g = grad.to(work);
  const auto d = a.size(-1);
  auto eye = at::eye(d, a.options());

  if (!a.isfinite().all().item<bool>() || !g.isfinite().all().item<bool>()) {
    // Non-finite in, non-finite out: GradScaler must see it; never throw inside backward.
    return at::full_like(g, NAN, g.options().dtype(out_type));
  }
  double lam = ridge;
  for (int attempt = 0; attempt < 12; ++attempt, lam *= 10.0) {
    auto [chol, info] = at::linalg_cholesky_ex(a + lam * eye, /*upper=*/false, /*check_errors=*/false);
    if (info.ne(0).any().item<bool>()) continue;
    // x (A) = g  ⇔  A xᵀ = gᵀ (A symmetric).
    auto x = at::cholesky_solve(g.transpose(-1, -2), chol, /*upper=*/false).transpose(-1, -2);
    if (attempt > 0) note_ridge_escalation(ridge, lam);
    return x.to(out_type);
  }
  TORCH_CHECK(false, "ridge_solve: (gram + ridge*I) is not positive definite even after escalating "
                     "the ridge to ", lam);
}

}  // namespace

TORCH_LIBRARY_IMPL(consequential_ext, CPU, m) {
  m.impl("ridge_solve", &ridge_solve_cpu);
}

}  // namespace consequential_ext
