// ridge_solve on CUDA: launcher interface (plain C++; no torch, no kernels), shared by the
// ATen binding and the host-emulation entry points.
#pragma once

#ifndef CX_CUDA_EMULATION
#include <cuda_runtime_api.h>
#endif

#include "device_utils.cuh"

namespace consequential_ext {
namespace cuda {

// Largest D the in-house batched Cholesky factors (one block per system; the factor in
// shared memory where it fits, else in the global workspace, where each column's trailing
// update streams through L2 — O(D³) traffic per block). Larger systems go to cuSOLVER through
// ATen in the binding. Untuned: bench/gpu_suite.py times both sides of this choice.
constexpr int kMaxFactorDim = 512;

struct RidgeSolveParams {
  Dtype work;            // kFloat32 or kFloat64: dtype of gram, grad and factor
  Dtype out_dtype;       // dtype of out: the parameter's ("the rescale" is this cast)
  long long batch;       // number of systems
  int dim;               // D
  long long rows;        // M: rows of grad per system
  const void* gram;      // (batch, D, D) contiguous, symmetric (lower triangle is read)
  const void* grad;      // (batch, M, D) contiguous
  void* out;             // (batch, M, D) contiguous, out_dtype
  void* factor;          // (batch, D, D) workspace: the lower Cholesky factors
  int* status;           // (batch,) device workspace
  long long max_shared_bytes;  // the device's opt-in shared memory per block
};

enum class RidgeOutcome : int {
  kSolved = 0,
  kNonFinite = 1,            // some input was inf/NaN: out is all NaN
  kNotPositiveDefinite = 2,  // still failing after every escalation: out is unwritten
};

struct RidgeSolveResult {
  cudaError_t error;
  RidgeOutcome outcome;
  double ridge;              // the ridge the factorisation succeeded with
};

// out = grad · (gram + λI)⁻¹ for every system, λ = ridge·10^e with the smallest e < max_attempts
// for which every system factors (one λ for the whole batch, as the reference does).
// Synchronises `stream` once per attempt to read the factorisation status.
// Requires dim ≤ kMaxFactorDim and triangular_solve_fits().
RidgeSolveResult ridge_solve_cuda(const RidgeSolveParams& params, double ridge, int max_attempts,
                                  cudaStream_t stream);

// out = grad · (L Lᵀ)⁻¹ from lower factors already in params.factor, cast to out_dtype;
// all-NaN when `nonfinite`. Asynchronous.
cudaError_t triangular_solve_cuda(const RidgeSolveParams& params, bool nonfinite, cudaStream_t stream);

// Whether triangular_solve_cuda can run D = params.dim within params.max_shared_bytes.
bool triangular_solve_fits(const RidgeSolveParams& params);

// Whether triangular_solve_cuda should solve from a cuSOLVER factor: several systems, it fits,
// and the factor is small enough to stay L2-resident while every row streams it twice (else
// cuBLAS's blocked triangular solve, through ATen, wins). One system went to cuBLAS after an
// H200 timed it ahead (results/gpu_h200/timings: D = 289, 32 and 64 rows, 0.67 and 0.68 ms
// against our kernel's 0.76 and 0.89; D = 577, 64 rows, 0.75 against 1.99), while for 8
// systems of D = 289 ours led (0.96 against 1.42).
bool triangular_solve_preferred(const RidgeSolveParams& params);

// Whether ridge_solve_cuda (our batched Cholesky) should factor these systems: D within
// kMaxFactorDim, and either the factor fits in shared memory or there are enough systems to
// fill the GPU. Otherwise the binding factors with cuSOLVER and calls triangular_solve_cuda.
bool batched_cholesky_preferred(const RidgeSolveParams& params);

}  // namespace cuda
}  // namespace consequential_ext
