// ATen binding of the CUDA kernels: argument checks, dtype/layout conversion to what the
// launchers take, the current stream, and the cuSOLVER fallback for large D. The kernels
// themselves (gram_cuda.cu, ridge_solve_cuda.cu) never see a torch header.
// Only c10's stream and guard headers: ATen/cuda/CUDAContext.h would pull in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a bare CUDA toolkit need not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include "escalation.h"
#include "gram_cuda.h"
#include "ridge_solve_cuda.h"

namespace consequential_ext {
namespace {

constexpr int kMaxRidgeAttempts = 12;  // as the reference and the CPU kernel

cuda::Dtype dtype_code(at::ScalarType type, const char* what) {
  switch (type) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kDouble: return cuda::Dtype::kFloat64;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    default: TORCH_CHECK(false, what, " must be float16, bfloat16, float32 or float64, got ", type);
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

// CX_CUDA_GRAM_ALGORITHM=auto|tiled|shift picks the Gram kernel (benchmarks compare them).
cuda::GramAlgorithm gram_algorithm() {
  const char* env = std::getenv("CX_CUDA_GRAM_ALGORITHM");
  const std::string name = env ? env : "auto";
  if (name.empty() || name == "auto") return cuda::GramAlgorithm::kAuto;
  if (name == "tiled") return cuda::GramAlgorithm::kTiled;
  if (name == "shift") return cuda::GramAlgorithm::kShift;
  TORCH_CHECK(false, "CX_CUDA_GRAM_ALGORITHM must be auto, tiled or shift, got '", name, "'");
}

at::Tensor im2col_gram_cuda(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias) {
  TORCH_CHECK(x.is_cuda(), "im2col_gram: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "im2col_gram: x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "im2col_gram: kernel_size, stride, padding and dilation must have 2 entries each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel_size[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0,
                "im2col_gram: need kernel_size, stride, dilation >= 1 and padding >= 0, got kernel_size=",
                kernel_size, ", stride=", stride, ", padding=", padding, ", dilation=", dilation);
    // The kernels take the geometry as int: a larger value would wrap to another conv.
    TORCH_CHECK(std::max({kernel_size[i], stride[i], dilation[i], padding[i]}) <=
                    std::numeric_limits<int>::max(),
                "im2col_gram: kernel_size, stride, padding and dilation must be below 2^31, got "
                "kernel_size=", kernel_size, ", stride=", stride, ", padding=", padding,
                ", dilation=", dilation);
    TORCH_CHECK(x.size(2 + i) + 2 * padding[i] >= dilation[i] * (kernel_size[i] - 1) + 1,
                "im2col_gram: kernel_size ", kernel_size, " (dilation ", dilation,
                ") does not fit the padded input ", x.sizes());
  }
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "im2col_gram: groups must divide C=", x.size(1),
              ", got ", groups);
  const cuda::Dtype dtype = dtype_code(x.scalar_type(), "im2col_gram: x");
  const c10::cuda::CUDAGuard guard(x.device());

  cuda::GramParams p;
  p.x = x.data_ptr();
  p.dtype = dtype;
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.height = x.size(2);
  p.width = x.size(3);
  p.stride_b = x.stride(0);  // any memory format: the kernels gather through strides
  p.stride_c = x.stride(1);
  p.stride_h = x.stride(2);
  p.stride_w = x.stride(3);
  p.kernel_h = static_cast<int>(kernel_size[0]);
  p.kernel_w = static_cast<int>(kernel_size[1]);
  p.stride_y = static_cast<int>(stride[0]);
  p.stride_x = static_cast<int>(stride[1]);
  p.pad_y = static_cast<int>(padding[0]);
  p.pad_x = static_cast<int>(padding[1]);
  p.dil_y = static_cast<int>(dilation[0]);
  p.dil_x = static_cast<int>(dilation[1]);
  p.groups = static_cast<int>(groups);
  p.bias = bias;
  p.algorithm = gram_algorithm();
  if (p.algorithm == cuda::GramAlgorithm::kShift && (p.stride_y != 1 || p.stride_x != 1 ||
                                                     p.kernel_h > cuda::kShiftMaxKernel ||
                                                     p.kernel_w > cuda::kShiftMaxKernel))
    p.algorithm = cuda::GramAlgorithm::kTiled;  // the shift form only exists for stride 1
  const int64_t d = cuda::gram_dim(p);
  auto out = at::empty({groups, d, d}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble
                                                                                      : at::kFloat));
  p.out = out.data_ptr();
  check_cuda(cuda::im2col_gram_cuda(p, c10::cuda::getCurrentCUDAStream()), "im2col_gram");
  return out;
}

long long max_shared_bytes(const at::Device& device) {
  int bytes = 0;
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()),
             "ridge_solve");
  return bytes;
}

// Large D, or few medium systems: cuSOLVER (through ATen) factors; our kernel still does both
// triangular solves and the rescale unless the factor is too big to stream (then cuBLAS).
at::Tensor ridge_solve_large(const at::Tensor& a, const at::Tensor& g, double ridge, cuda::RidgeSolveParams p,
                             at::Tensor out, at::IntArrayRef grad_sizes, at::ScalarType out_type) {
  // One device-to-host read per attempt (each is a stream synchronisation) decides it all: the
  // inputs' finiteness rides along with the factorisation's status.
  const auto finite = at::logical_and(a.isfinite().all(), g.isfinite().all());
  const auto eye = at::eye(a.size(-1), a.options());
  double lam = ridge;
  for (int attempt = 0; attempt < kMaxRidgeAttempts; ++attempt, lam *= 10.0) {
    auto [chol, info] = at::linalg_cholesky_ex(a + lam * eye, /*upper=*/false, /*check_errors=*/false);
    const auto flags = at::stack({finite, info.eq(0).all()}).to(at::kCPU);
    if (!flags[0].item<bool>()) return out.fill_(NAN);
    if (!flags[1].item<bool>()) continue;
    if (attempt > 0) note_ridge_escalation(ridge, lam);
    if (!cuda::triangular_solve_preferred(p)) {
      return at::cholesky_solve(g.transpose(-1, -2), chol, /*upper=*/false)
          .transpose(-1, -2).to(out_type).reshape(grad_sizes);
    }
    chol = chol.contiguous();
    p.factor = chol.data_ptr();
    check_cuda(cuda::triangular_solve_cuda(p, /*nonfinite=*/false, c10::cuda::getCurrentCUDAStream()),
               "ridge_solve");
    return out;
  }
  // Still indefinite: NaN, never an exception inside backward (see ridge_solve_cpu.cpp).
  note_ridge_escalation(ridge, INFINITY);
  return out.fill_(NAN);
}

at::Tensor ridge_solve_cuda(const at::Tensor& gram, const at::Tensor& grad, double ridge,
                            std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(gram.is_cuda() && grad.is_cuda() && gram.device() == grad.device(),
              "ridge_solve: gram and grad must be on the same CUDA device, got ", gram.device(), " and ",
              grad.device());
  TORCH_CHECK(gram.dim() >= 2 && gram.size(-1) == gram.size(-2), "ridge_solve: gram must be (..., D, D), got ",
              gram.sizes());
  TORCH_CHECK(grad.dim() == gram.dim() && grad.size(-1) == gram.size(-1) &&
                  grad.sizes().slice(0, grad.dim() - 2) == gram.sizes().slice(0, gram.dim() - 2),
              "ridge_solve: grad must be (..., M, D) with the batch dims and D of gram ", gram.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(std::isfinite(ridge) && ridge > 0, "ridge_solve: ridge must be a finite float > 0, got ", ridge);
  dtype_code(gram.scalar_type(), "ridge_solve: gram");
  dtype_code(grad.scalar_type(), "ridge_solve: grad");
  const at::ScalarType out_type = out_dtype.value_or(grad.scalar_type());
  const c10::cuda::CUDAGuard guard(gram.device());

  // Work in float32 or better whatever the input dtype; the kernels take contiguous batches.
  const auto work = gram.scalar_type() == at::kDouble || grad.scalar_type() == at::kDouble ? at::kDouble
                                                                                          : at::kFloat;
  const int64_t d = gram.size(-1), m = grad.size(-2);
  const auto a = gram.to(work).contiguous().reshape({-1, d, d});
  const auto g = grad.to(work).contiguous().reshape({-1, m, d});
  auto out = at::empty(grad.sizes(), grad.options().dtype(out_type));
  if (out.numel() == 0) return out;

  cuda::RidgeSolveParams p;
  p.work = dtype_code(work, "ridge_solve: work dtype");
  p.out_dtype = dtype_code(out_type, "ridge_solve: out_dtype");
  p.batch = a.size(0);
  p.dim = static_cast<int>(d);
  p.rows = m;
  p.gram = a.data_ptr();
  p.grad = g.data_ptr();
  p.out = out.data_ptr();
  p.factor = nullptr;
  p.status = nullptr;
  p.max_shared_bytes = max_shared_bytes(gram.device());

  if (!cuda::batched_cholesky_preferred(p)) return ridge_solve_large(a, g, ridge, p, out, grad.sizes(), out_type);

  auto factor = at::empty_like(a);
  auto status = at::empty({a.size(0)}, a.options().dtype(at::kInt));
  p.factor = factor.data_ptr();
  p.status = status.data_ptr<int>();
  const auto result = cuda::ridge_solve_cuda(p, ridge, kMaxRidgeAttempts, c10::cuda::getCurrentCUDAStream());
  check_cuda(result.error, "ridge_solve");
  if (result.outcome == cuda::RidgeOutcome::kNotPositiveDefinite) {
    note_ridge_escalation(ridge, INFINITY);  // NaN out, never an exception inside backward
    return out.fill_(NAN);
  }
  if (result.outcome == cuda::RidgeOutcome::kSolved && result.ridge != ridge)
    note_ridge_escalation(ridge, result.ridge);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(consequential_ext, CUDA, m) {
  m.impl("im2col_gram", &im2col_gram_cuda);
  m.impl("ridge_solve", &ridge_solve_cuda);
}

}  // namespace consequential_ext
