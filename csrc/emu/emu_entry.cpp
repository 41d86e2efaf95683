// C entry points of the host-emulation build (csrc/emu/cuda_emu.h + csrc/cuda/*.cu), called
// through ctypes by tests/test_cuda_emulation.py with torch CPU tensors' data pointers. They
// fill the same parameter structs the ATen binding fills and call the same launchers.
#include "../cuda/gram_cuda.h"
#include "../cuda/ridge_solve_cuda.h"

using namespace consequential_ext::cuda;

extern "C" {

// schedule: 0 serial (fibers, deterministic for a seed), 1 threads (for ThreadSanitizer).
void cx_emu_set_schedule(int schedule, unsigned long long seed) {
  cx_emu::set_schedule(static_cast<cx_emu::Schedule>(schedule), seed);
}

// sizes: B, C, H, W; strides: in elements; conv: kh, kw, sy, sx, py, px, dy, dx.
int cx_emu_im2col_gram(const void* x, int dtype, const long long* sizes, const long long* strides,
                       const int* conv, int groups, int bias, int algorithm, void* out) {
  GramParams p;
  p.x = x;
  p.dtype = static_cast<Dtype>(dtype);
  p.batch = sizes[0];
  p.channels = sizes[1];
  p.height = sizes[2];
  p.width = sizes[3];
  p.stride_b = strides[0];
  p.stride_c = strides[1];
  p.stride_h = strides[2];
  p.stride_w = strides[3];
  p.kernel_h = conv[0];
  p.kernel_w = conv[1];
  p.stride_y = conv[2];
  p.stride_x = conv[3];
  p.pad_y = conv[4];
  p.pad_x = conv[5];
  p.dil_y = conv[6];
  p.dil_x = conv[7];
  p.groups = groups;
  p.bias = bias != 0;
  p.out = out;
  p.algorithm = static_cast<GramAlgorithm>(algorithm);
  return im2col_gram_cuda(p, nullptr);
}

static RidgeSolveParams ridge_params(int work, int out_dtype, long long batch, int dim, long long rows,
                                     const void* gram, const void* grad, void* out, void* factor,
                                     int* status, long long max_shared_bytes) {
  RidgeSolveParams p;
  p.work = static_cast<Dtype>(work);
  p.out_dtype = static_cast<Dtype>(out_dtype);
  p.batch = batch;
  p.dim = dim;
  p.rows = rows;
  p.gram = gram;
  p.grad = grad;
  p.out = out;
  p.factor = factor;
  p.status = status;
  p.max_shared_bytes = max_shared_bytes;
  return p;
}

// Returns the cudaError_t; *outcome and *ridge_used describe the solve.
int cx_emu_ridge_solve(int work, int out_dtype, long long batch, int dim, long long rows, const void* gram,
                       const void* grad, void* out, void* factor, int* status, long long max_shared_bytes,
                       double ridge, int max_attempts, int* outcome, double* ridge_used) {
  const RidgeSolveResult r =
      ridge_solve_cuda(ridge_params(work, out_dtype, batch, dim, rows, gram, grad, out, factor, status,
                                    max_shared_bytes),
                       ridge, max_attempts, nullptr);
  *outcome = static_cast<int>(r.outcome);
  *ridge_used = r.ridge;
  return r.error;
}

// The solve from given lower factors (the binding's path after a cuSOLVER factorisation).
int cx_emu_triangular_solve(int work, int out_dtype, long long batch, int dim, long long rows,
                            const void* factor, const void* grad, void* out, long long max_shared_bytes,
                            int nonfinite) {
  return triangular_solve_cuda(ridge_params(work, out_dtype, batch, dim, rows, nullptr, grad, out,
                                            const_cast<void*>(factor), nullptr, max_shared_bytes),
                               nonfinite != 0, nullptr);
}

// The kernels' dtype conversions, for exhaustive checks against torch's.
void cx_emu_half_to_float(const uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = half_to_float(in[i]);
}
void cx_emu_float_to_half(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = float_to_half(in[i]);
}
void cx_emu_float_to_bfloat16(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = float_to_bfloat16(in[i]);
}

}  // extern "C"
