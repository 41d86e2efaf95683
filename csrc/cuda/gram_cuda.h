// im2col_gram on CUDA: launcher interface (plain C++; no torch, no kernels), shared by the
// ATen binding and the host-emulation entry points.
#pragma once

#ifndef CX_CUDA_EMULATION
#include <cuda_runtime_api.h>
#endif

#include "device_utils.cuh"

namespace consequential_ext {
namespace cuda {

enum class GramAlgorithm : int {
  kAuto = 0,   // shift-correlation for stride 1, kernels up to kShiftMaxKernel (not 1×1) and
               // up to kShiftMaxChannels channels a group; else tiled
  kTiled = 1,  // implicit-im2col SYRK on symmetric tiles: any stride, padding, dilation
  kShift = 2,  // stride-1 shift-correlation form
};

// The stride-1 shift-correlation kernel keeps a kh×kw accumulator per thread in registers.
constexpr int kShiftMaxKernel = 3;
// Measured on an H200 (results/gpu_h200/timings, ResNet-20's 3×3 convs at batch 128, float32):
// shift 1.53 vs tiled 1.66 ms with 16 channels, but 1.43 vs 0.94 with 32, 1.83 vs 0.71 with
// 64 and 37.0 vs 18.5 with 256 (its thread count grows with the channel pairs).
constexpr int kShiftMaxChannels = 16;

struct GramParams {
  const void* x;                  // (B, C, H, W) with the element strides below
  Dtype dtype;                    // of x; the output is float32 (float64 for float64 x)
  long long batch, channels, height, width;
  long long stride_b, stride_c, stride_h, stride_w;  // in elements: any memory format
  int kernel_h, kernel_w, stride_y, stride_x, pad_y, pad_x, dil_y, dil_x;
  int groups;
  bool bias;                      // append the constant-1 row (patch sums, patch count)
  void* out;                      // (groups, D, D) contiguous; zeroed by the launcher
  GramAlgorithm algorithm;
};

// D of one group's Gram (with the bias row when params.bias).
long long gram_dim(const GramParams& params);

// Σ over all patches of patch·patchᵀ into params.out, asynchronously on `stream`.
// Returns cudaErrorInvalidValue for a combination the kernels do not support (e.g.
// kShift with stride > 1), else the launch status.
cudaError_t im2col_gram_cuda(const GramParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace consequential_ext
