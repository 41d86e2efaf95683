// Batched ridge solve of many small systems, one per SIMD lane (ridge_solve_lanes.cpp).
#pragma once
#include <ATen/ATen.h>

namespace consequential_ext::cpu {

// Systems with D at most this are solved in lanes when there are at least kLaneMinBatch.
constexpr int64_t kLaneMaxD = 96;
constexpr int64_t kLaneMinBatch = 8;

// x = g · (a + ridge·I)⁻¹ per system: a (..., D, D) symmetric, read only (its lower
// triangle), g and x (..., M, D); all contiguous, float or double, of one dtype. Returns
// false, with x unspecified, when some system is not positive definite.
bool lane_ridge_solve(const at::Tensor& a, double ridge, const at::Tensor& g, at::Tensor& x);

}  // namespace consequential_ext::cpu
