// Batched Cholesky solve straight through LAPACK (potrf, then potrs or, with many right-hand
// sides on one thread, the same triangular solves by blocks over BLAS GEMMs), in place.
#pragma once
#include <ATen/ATen.h>

namespace consequential_ext::cpu {

// Whether the LAPACK routines torch was linked with are reachable (MKL or OpenBLAS export
// them from libtorch_cpu; a torch without LAPACK leaves them null).
bool lapack_available();

// x ← x · a⁻¹ per system, overwriting a with its Cholesky factor: a
// (S, D, D) symmetric positive definite (the ridge already on its diagonal), x (S, M, D);
// both contiguous, float or double, of one dtype. Row-major x is column-major xᵀ, so potrs
// solves it where it lies, with no transpose copies. Returns false (x unspecified) when some
// system is not positive definite. serial: the caller runs LAPACK on one thread (one system
// at a time inside parallel regions either way when there are several).
bool lapack_ridge_solve(at::Tensor& a, at::Tensor& x, bool serial);

}  // namespace consequential_ext::cpu
