// ridge_solve kernels: a batched Cholesky of (gram + λI), one block per system, and the
// fused pair of triangular solves that turns each gradient row g into g·(L Lᵀ)⁻¹ and writes
// it straight in the parameter dtype.
//
// No tensor-core instructions: both kernels are latency-bound chains of small dot products.
#include <vector>

#include "ridge_solve_cuda.h"

namespace consequential_ext {
namespace cuda {
namespace {

enum SystemStatus : int { kFactored = 0, kNotPositive = 1, kNonFiniteInput = 2 };

constexpr int kMaxFactorThreads = 256;
constexpr int kSolveWarps = 4;
constexpr long long kStaticSharedSlack = 1024;  // the kernels' own small __shared__ variables
// With fewer systems than this, a factor in global memory leaves most SMs idle and one SM
// latency-bound: cuSOLVER's blocked factorisation is the better choice.
constexpr long long kMinBatchForGlobalFactor = 32;
// A factor read from global memory by every gradient row should stay in L2 (50 MB on an H100).
constexpr long long kMaxStreamedFactorBytes = 16ll << 20;

// Row stride of a factor held in shared memory: odd, so the column reads a[i·ld + k] of
// neighbouring i fall in different banks.
__host__ __device__ __forceinline__ int shared_ld(int n) { return n | 1; }

bool factor_fits_shared(Dtype work, int n, long long max_shared_bytes) {
  const long long element = work == Dtype::kFloat64 ? 8 : 4;
  return static_cast<long long>(n) * shared_ld(n) * element + kStaticSharedSlack <= max_shared_bytes;
}

// Right-looking Cholesky of gram[s] + λI in place, column by column: scale column k by
// 1/√a_kk, then a rank-1 update of the trailing lower triangle. The matrix lives in dynamic
// shared memory when `in_shared`, else in this system's slice of the global factor buffer.
// Also checks this system's gram and grad for inf/NaN, so one status read decides all.
template <typename T>
__global__ void __launch_bounds__(kMaxFactorThreads)
cholesky_ridge_kernel(const T* __restrict__ gram, const T* __restrict__ grad, T* __restrict__ factor,
                      int* __restrict__ status, int n, long long rows, T ridge, bool in_shared) {
  CX_DYNAMIC_SHARED(T, shared_factor);
  __shared__ int any_nonfinite;
  const long long s = blockIdx.x;
  const int tid = threadIdx.x, threads = blockDim.x;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize, warps = threads / kWarpSize;
  const long long nn = static_cast<long long>(n) * n;
  const T* g = gram + s * nn;
  const T* gr = grad + s * rows * n;
  T* f = factor + s * nn;

  if (tid == 0) any_nonfinite = 0;
  __syncthreads();
  bool bad = false;
  for (long long i = tid; i < nn; i += threads) bad |= !isfinite(g[i]);
  for (long long i = tid; i < rows * n; i += threads) bad |= !isfinite(gr[i]);
  if (bad) any_nonfinite = 1;  // benign race: every writer stores 1
  __syncthreads();
  if (any_nonfinite) {
    if (tid == 0) status[s] = kNonFiniteInput;
    return;
  }

  T* a = in_shared ? shared_factor : f;
  const int ld = in_shared ? shared_ld(n) : n;
  for (long long i = tid; i < nn; i += threads) {
    const int r = static_cast<int>(i / n), c = static_cast<int>(i % n);
    if (c <= r) a[r * ld + c] = g[i] + (r == c ? ridge : T(0));
  }
  __syncthreads();

  for (int k = 0; k < n; ++k) {
    const T pivot = a[k * ld + k];  // every thread reads the same value: a uniform branch
    if (!(pivot > T(0)) || !isfinite(pivot)) {
      if (tid == 0) status[s] = kNotPositive;
      return;
    }
    const T diag = sqrt(pivot), inv_diag = T(1) / diag;
    for (int i = k + 1 + tid; i < n; i += threads) a[i * ld + k] *= inv_diag;
    __syncthreads();  // column k of L complete; the pivot has been read by all
    if (tid == 0) a[k * ld + k] = diag;
    for (int i = k + 1 + warp; i < n; i += warps) {
      const T l_ik = a[i * ld + k];
      for (int j = k + 1 + lane; j <= i; j += kWarpSize) a[i * ld + j] -= l_ik * a[j * ld + k];
    }
    __syncthreads();
  }
  if (in_shared) {
    for (long long i = tid; i < nn; i += threads) {
      const int r = static_cast<int>(i / n), c = static_cast<int>(i % n);
      if (c <= r) f[i] = a[r * ld + c];
    }
  }
  if (tid == 0) status[s] = kFactored;
}

// x = g·(L Lᵀ)⁻¹ for each row g: forward substitution L y = g (row-i dot products, reduced
// across the warp), then back substitution Lᵀ x = y (column-oriented: after x_i is known,
// every y_j, j < i, drops L_ij·x_i — again reading row i of L, contiguous). One warp per row,
// the row in shared memory; the factor in shared memory too when `factor_in_shared`.
template <typename T, typename Out>
__global__ void __launch_bounds__(kSolveWarps * kWarpSize)
triangular_solve_kernel(const T* __restrict__ factor, const T* __restrict__ grad, Out* __restrict__ out,
                        int n, long long rows, bool factor_in_shared, bool nonfinite) {
  CX_DYNAMIC_SHARED(T, shared);
  const long long s = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const long long nn = static_cast<long long>(n) * n;
  const T* L = factor + s * nn;
  T* row_buffers = shared;
  if (factor_in_shared) {
    for (long long i = tid; i < nn; i += blockDim.x) shared[i] = L[i];
    __syncthreads();
    L = shared;
    row_buffers = shared + nn;
  }
  T* y = row_buffers + static_cast<long long>(warp) * n;

  for (long long r = static_cast<long long>(blockIdx.y) * warps + warp; r < rows;
       r += static_cast<long long>(gridDim.y) * warps) {  // warp-uniform loop
    const T* g = grad + (s * rows + r) * n;
    Out* o = out + (s * rows + r) * n;
    if (nonfinite) {
      for (int j = lane; j < n; j += kWarpSize) store_as<T>(o + j, quiet_nan<T>());
      continue;
    }
    for (int j = lane; j < n; j += kWarpSize) y[j] = g[j];
    __syncwarp();
    for (int i = 0; i < n; ++i) {
      T partial = T(0);
      for (int j = lane; j < i; j += kWarpSize) partial += L[i * static_cast<long long>(n) + j] * y[j];
      const T dot = warp_sum(partial);
      if (lane == i % kWarpSize) y[i] = (y[i] - dot) / L[i * static_cast<long long>(n) + i];
      __syncwarp();
    }
    for (int i = n - 1; i >= 0; --i) {
      const T x_i = y[i] / L[i * static_cast<long long>(n) + i];
      __syncwarp();  // all lanes have read y_i before its owner overwrites it
      for (int j = lane; j < i; j += kWarpSize) y[j] -= L[i * static_cast<long long>(n) + j] * x_i;
      if (lane == i % kWarpSize) y[i] = x_i;
      __syncwarp();
    }
    for (int j = lane; j < n; j += kWarpSize) store_as<T>(o + j, y[j]);
    __syncwarp();
  }
}

template <typename T>
long long solve_shared_bytes(int n, int warps, bool factor_in_shared) {
  return (static_cast<long long>(warps) * n + (factor_in_shared ? static_cast<long long>(n) * n : 0)) *
         static_cast<long long>(sizeof(T));
}

template <typename T, typename Out>
cudaError_t launch_triangular_solve(const RidgeSolveParams& p, bool nonfinite, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return cudaSuccess;
  int warps = p.rows < kSolveWarps ? static_cast<int>(p.rows) : kSolveWarps;
  const long long limit = p.max_shared_bytes - kStaticSharedSlack;
  while (warps > 1 && solve_shared_bytes<T>(p.dim, warps, false) > limit) --warps;
  if (solve_shared_bytes<T>(p.dim, warps, false) > limit) return cudaErrorInvalidValue;
  const bool factor_in_shared = solve_shared_bytes<T>(p.dim, warps, true) <= limit;
  const long long bytes = solve_shared_bytes<T>(p.dim, warps, factor_in_shared);
  auto kernel = triangular_solve_kernel<T, Out>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  // Enough row blocks to fill the GPU, but each block should reuse its staged factor.
  long long row_blocks = (p.rows + warps - 1) / warps;
  const long long wanted = (264 + p.batch - 1) / p.batch;
  row_blocks = row_blocks < wanted ? row_blocks : wanted;
  row_blocks = row_blocks > 65535 ? 65535 : row_blocks;
  const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(row_blocks));
  CX_LAUNCH(kernel, grid, dim3(warps * kWarpSize), bytes, stream, static_cast<const T*>(p.factor),
            static_cast<const T*>(p.grad), static_cast<Out*>(p.out), p.dim, p.rows, factor_in_shared,
            nonfinite);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_triangular_solve(const RidgeSolveParams& p, bool nonfinite, cudaStream_t stream) {
  switch (p.out_dtype) {
    case Dtype::kFloat32: return launch_triangular_solve<T, float>(p, nonfinite, stream);
    case Dtype::kFloat64: return launch_triangular_solve<T, double>(p, nonfinite, stream);
    case Dtype::kFloat16: return launch_triangular_solve<T, Half16>(p, nonfinite, stream);
    case Dtype::kBFloat16: return launch_triangular_solve<T, BFloat16>(p, nonfinite, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_cholesky(const RidgeSolveParams& p, double ridge, cudaStream_t stream) {
  const long long shared_bytes = static_cast<long long>(p.dim) * shared_ld(p.dim) * sizeof(T);
  const bool in_shared = factor_fits_shared(p.work, p.dim, p.max_shared_bytes);
  auto kernel = cholesky_ridge_kernel<T>;
  const long long bytes = in_shared ? shared_bytes : 0;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  // Threads: the trailing update has ~D/1 rows of work per column; small systems need few.
  int threads = (p.dim + kWarpSize - 1) / kWarpSize * kWarpSize;
  threads = threads > kMaxFactorThreads ? kMaxFactorThreads : threads;
  CX_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch)), dim3(threads), bytes, stream,
            static_cast<const T*>(p.gram), static_cast<const T*>(p.grad), static_cast<T*>(p.factor),
            p.status, p.dim, p.rows, static_cast<T>(ridge), in_shared);
  return cudaGetLastError();
}

template <typename T>
RidgeSolveResult ridge_solve_typed(const RidgeSolveParams& p, double ridge, int max_attempts,
                                   cudaStream_t stream) {
  std::vector<int> status(static_cast<size_t>(p.batch));
  double lam = ridge;
  for (int attempt = 0; attempt < max_attempts; ++attempt, lam *= 10.0) {
    cudaError_t err = launch_cholesky<T>(p, lam, stream);
    if (err == cudaSuccess)
      err = cudaMemcpyAsync(status.data(), p.status, status.size() * sizeof(int), cudaMemcpyDeviceToHost, stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
    if (err != cudaSuccess) return {err, RidgeOutcome::kSolved, lam};
    bool nonfinite = false, failed = false;
    for (int st : status) {
      nonfinite |= st == kNonFiniteInput;
      failed |= st == kNotPositive;
    }
    if (nonfinite) {
      return {dispatch_triangular_solve<T>(p, true, stream), RidgeOutcome::kNonFinite, lam};
    }
    if (!failed) return {dispatch_triangular_solve<T>(p, false, stream), RidgeOutcome::kSolved, lam};
  }
  return {cudaSuccess, RidgeOutcome::kNotPositiveDefinite, lam / 10.0};
}

}  // namespace

bool batched_cholesky_preferred(const RidgeSolveParams& p) {
  return p.dim <= kMaxFactorDim && triangular_solve_fits(p) &&
         (factor_fits_shared(p.work, p.dim, p.max_shared_bytes) || p.batch >= kMinBatchForGlobalFactor);
}

bool triangular_solve_preferred(const RidgeSolveParams& p) {
  const long long element = p.work == Dtype::kFloat64 ? 8 : 4;
  return p.batch > 1 && triangular_solve_fits(p) &&
         element * p.dim * p.dim <= kMaxStreamedFactorBytes;
}

bool triangular_solve_fits(const RidgeSolveParams& p) {
  const long long element = p.work == Dtype::kFloat64 ? 8 : 4;
  return element * p.dim + kStaticSharedSlack <= p.max_shared_bytes;
}

cudaError_t triangular_solve_cuda(const RidgeSolveParams& p, bool nonfinite, cudaStream_t stream) {
  if (p.work == Dtype::kFloat32) return dispatch_triangular_solve<float>(p, nonfinite, stream);
  if (p.work == Dtype::kFloat64) return dispatch_triangular_solve<double>(p, nonfinite, stream);
  return cudaErrorInvalidValue;
}

RidgeSolveResult ridge_solve_cuda(const RidgeSolveParams& p, double ridge, int max_attempts,
                                  cudaStream_t stream) {
  if (p.dim < 1 || p.dim > kMaxFactorDim || !triangular_solve_fits(p) || p.batch < 0 || p.rows < 0)
    return {cudaErrorInvalidValue, RidgeOutcome::kSolved, ridge};
  if (p.batch == 0) return {cudaSuccess, RidgeOutcome::kSolved, ridge};
  if (p.work == Dtype::kFloat32) return ridge_solve_typed<float>(p, ridge, max_attempts, stream);
  if (p.work == Dtype::kFloat64) return ridge_solve_typed<double>(p, ridge, max_attempts, stream);
  return {cudaErrorInvalidValue, RidgeOutcome::kSolved, ridge};
}

}  // namespace cuda
}  // namespace consequential_ext
