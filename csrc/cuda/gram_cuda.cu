// im2col_gram kernels: G[g] = Σ over every patch of every sample of patch·patchᵀ, with the
// patches (im2col columns) gathered on the fly from x — never materialised.
//
// Row p of a group's Gram is (channel c, kernel row ky, kernel column kx), p = (c·kh + ky)·kw + kx,
// the order of weight.reshape(out, -1). Only the lower triangle (p ≥ q) is accumulated;
// mirror_lower_kernel copies it up at the end, so the result is exactly symmetric even though
// partial sums arrive by atomics in any order.
//
// No tensor-core instructions: the tiled kernel's inner product loop (`accumulate_chunk`) is
// plain FMA on purpose — float32 inputs must keep float32 accuracy (TF32 mma would not), and
// the host emulation runs this very loop.
#include "gram_cuda.h"

namespace consequential_ext {
namespace cuda {
namespace {

// Shape facts every kernel needs, computed once on the host.
struct GramGeometry {
  long long batch, height, width;
  long long stride_b, stride_c, stride_h, stride_w;
  int kernel_h, kernel_w, stride_y, stride_x, pad_y, pad_x, dil_y, dil_x;
  int channels_per_group;
  long long out_h, out_w;        // patches per sample = out_h·out_w
  long long patch_dim;           // C/groups·kh·kw (without the bias row)
  long long dim;                 // patch_dim (+1 with bias): the output's D
};

// Value of row p (within group g) of the patch k (= (sample, out row, out column)).
template <typename Acc, typename In>
__device__ __forceinline__ Acc patch_value(const In* __restrict__ x, const GramGeometry& geo, int g,
                                           long long p, long long k) {
  const int taps = geo.kernel_h * geo.kernel_w;
  const long long c = p / taps;
  const int ky = static_cast<int>(p % taps) / geo.kernel_w, kx = static_cast<int>(p % taps) % geo.kernel_w;
  const long long per_sample = geo.out_h * geo.out_w;
  const long long b = k / per_sample, oy = (k % per_sample) / geo.out_w, ox = k % geo.out_w;
  const long long iy = oy * geo.stride_y - geo.pad_y + ky * geo.dil_y;
  const long long ix = ox * geo.stride_x - geo.pad_x + kx * geo.dil_x;
  if (iy < 0 || iy >= geo.height || ix < 0 || ix >= geo.width) return Acc(0);  // zero padding
  return load_as<Acc>(x[b * geo.stride_b + (g * geo.channels_per_group + c) * geo.stride_c +
                        iy * geo.stride_h + ix * geo.stride_w]);
}

// ---------------------------------------------------------------------------------------
// Tiled implicit-im2col SYRK: one block per (lower-triangle tile pair, K split, group).
constexpr int kTile = 64;          // Gram tile edge
constexpr int kChunk = 16;         // patches staged in shared memory per step
constexpr int kTiledThreads = 256; // 16×16 threads, each a 4×4 interleaved micro-tile
constexpr int kMicro = kTile / 16;
constexpr int kLoadsPerThread = kChunk * kTile / kTiledThreads;

// Tile pair (row tile ≥ column tile) of a linear lower-triangle index.
__device__ __forceinline__ void lower_tile_pair(int t, int& row_tile, int& col_tile) {
  int r = static_cast<int>((sqrtf(8.0f * t + 1.0f) - 1.0f) * 0.5f);
  while (r * (r + 1) / 2 > t) --r;           // guard float rounding either way
  while ((r + 1) * (r + 2) / 2 <= t) ++r;
  row_tile = r;
  col_tile = t - r * (r + 1) / 2;
}

template <typename In, typename Acc>
__global__ void __launch_bounds__(kTiledThreads)
gram_tiled_kernel(const In* __restrict__ x, Acc* __restrict__ out, GramGeometry geo,
                  long long patches_per_split) {
  __shared__ Acc rows_tile[kChunk][kTile + 1];  // +1: stagger banks for the column-wise stores
  __shared__ Acc cols_tile[kChunk][kTile + 1];
  int row_tile, col_tile;
  lower_tile_pair(blockIdx.x, row_tile, col_tile);
  const int g = blockIdx.z;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const long long total = geo.batch * geo.out_h * geo.out_w;
  const long long k_begin = blockIdx.y * patches_per_split;
  const long long k_end = k_begin + patches_per_split < total ? k_begin + patches_per_split : total;

  Acc acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = Acc(0);

  // Each thread stages patch (tid % kChunk) of rows tid / kChunk + i·(threads / kChunk): the
  // chunk's consecutive patches are consecutive output columns, i.e. neighbouring addresses.
  const int my_k = tid % kChunk;
  for (long long k0 = k_begin; k0 < k_end; k0 += kChunk) {
    const long long k = k0 + my_k;
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int local = tid / kChunk + i * (kTiledThreads / kChunk);
      const long long p = static_cast<long long>(row_tile) * kTile + local;
      const long long q = static_cast<long long>(col_tile) * kTile + local;
      rows_tile[my_k][local] = (k < k_end && p < geo.patch_dim) ? patch_value<Acc>(x, geo, g, p, k) : Acc(0);
      cols_tile[my_k][local] = (k < k_end && q < geo.patch_dim) ? patch_value<Acc>(x, geo, g, q, k) : Acc(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kChunk; ++kk) {
      Acc a[kMicro], b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = rows_tile[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) b[j] = cols_tile[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

  Acc* out_g = out + static_cast<long long>(g) * geo.dim * geo.dim;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const long long p = static_cast<long long>(row_tile) * kTile + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const long long q = static_cast<long long>(col_tile) * kTile + tx + 16 * j;
      if (p < geo.patch_dim && q <= p) atomicAdd(out_g + p * geo.dim + q, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Stride-1 shift-correlation form. With stride 1, the entry for rows (c, ky, kx) and
// (c', ky+Δy, kx+Δx) is the correlation of channel c with channel c' shifted by (Δy, Δx)·dilation,
// summed over the out_h × out_w window that starts at (ky, kx)·dilation. All entries of one
// (c, c', Δy, Δx) share the products, so one thread computes them together: per input row it
// forms the window sums of every kx from one shared "core" (the columns inside every kx window)
// plus short margins, and rows inside every ky window likewise go to a shared column
// accumulator. ~(2kh−1)(2kw−1)·H·W products per channel pair instead of (kh·kw)²·out_h·out_w.
constexpr int kShiftThreads = 128;

// Σ_{v ∈ [lo, hi)} row1[v + off1]·row2[v + off2] (element stride `sw`); empty when hi ≤ lo.
template <typename Acc, typename In>
__device__ __noinline__ Acc range_product_sum(const In* __restrict__ row1, const In* __restrict__ row2,
                                              long long sw, int off1, int off2, int lo, int hi) {
  Acc s = Acc(0);
  for (int v = lo; v < hi; ++v) s += load_as<Acc>(row1[(v + off1) * sw]) * load_as<Acc>(row2[(v + off2) * sw]);
  return s;
}

template <typename In, typename Acc>
__global__ void __launch_bounds__(kShiftThreads)
gram_shift_kernel(const In* __restrict__ x, Acc* __restrict__ out, GramGeometry geo,
                  long long samples_per_split) {
  const int kh = geo.kernel_h, kw = geo.kernel_w, dy = geo.dil_y, dx = geo.dil_x;
  const int shifts = (2 * kh - 1) * (2 * kw - 1);
  const long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long pair = t / shifts;
  const int shift = static_cast<int>(t % shifts);
  const long long cg = geo.channels_per_group;
  if (pair >= cg * (cg + 1) / 2) return;
  long long c = static_cast<long long>((sqrt(8.0 * pair + 1.0) - 1.0) * 0.5);
  while (c * (c + 1) / 2 > pair) --c;
  while ((c + 1) * (c + 2) / 2 <= pair) ++c;
  const long long c2 = pair - c * (c + 1) / 2;       // c2 ≤ c: rows of c are below those of c2
  const int shift_y = shift / (2 * kw - 1) - (kh - 1);
  const int shift_x = shift % (2 * kw - 1) - (kw - 1);
  // Within one channel only non-positive shifts (lexicographically) land in the lower triangle.
  if (c == c2 && (shift_y > 0 || (shift_y == 0 && shift_x > 0))) return;

  const int ky_lo = shift_y < 0 ? -shift_y : 0, ky_hi = shift_y > 0 ? kh - shift_y : kh;
  const int kx_lo = shift_x < 0 ? -shift_x : 0, kx_hi = shift_x > 0 ? kw - shift_x : kw;
  // Spatial coordinates fit in int (a single plane never has 2³¹ rows or columns).
  const int oh = static_cast<int>(geo.out_h), ow = static_cast<int>(geo.out_w);
  const int height = static_cast<int>(geo.height), width = static_cast<int>(geo.width);
  const int sy = shift_y * dy, sx = shift_x * dx;
  // Padded coordinates u (rows) / v (columns) of the first factor where both factors are
  // real data (not padding), intersected with the union of the windows.
  const int u_first = max(max(geo.pad_y, geo.pad_y - sy), ky_lo * dy);
  const int u_last = min(min(geo.pad_y + height, geo.pad_y + height - sy), (ky_hi - 1) * dy + oh);
  const int v_lo = max(geo.pad_x, geo.pad_x - sx), v_hi = min(geo.pad_x + width, geo.pad_x + width - sx);
  // Rows/columns inside every window of the valid ky / kx.
  const int row_core_lo = (ky_hi - 1) * dy, row_core_hi = ky_lo * dy + oh;
  const int col_core_lo = (kx_hi - 1) * dx, col_core_hi = kx_lo * dx + ow;
  const bool col_core = col_core_lo < col_core_hi;

  Acc acc[kShiftMaxKernel][kShiftMaxKernel], core_rows[kShiftMaxKernel];
#pragma unroll
  for (int i = 0; i < kShiftMaxKernel; ++i) {
    core_rows[i] = Acc(0);
#pragma unroll
    for (int j = 0; j < kShiftMaxKernel; ++j) acc[i][j] = Acc(0);
  }

  const int g = blockIdx.z;
  const long long b_begin = blockIdx.y * samples_per_split;
  const long long b_end = min(b_begin + samples_per_split, geo.batch);
  const long long ch1 = g * cg + c, ch2 = g * cg + c2;
  const long long sw = geo.stride_w;
  for (long long b = b_begin; b < b_end; ++b) {
    const In* plane1 = x + b * geo.stride_b + ch1 * geo.stride_c;
    const In* plane2 = x + b * geo.stride_b + ch2 * geo.stride_c;
    for (int u = u_first; u < u_last; ++u) {
      const In* row1 = plane1 + (u - geo.pad_y) * geo.stride_h;
      const In* row2 = plane2 + (u + sy - geo.pad_y) * geo.stride_h;
      // Padded column v is column v − pad_x of row1 and v + sx − pad_x of row2.
      auto products = [&](int lo, int hi) {
        return range_product_sum<Acc>(row1, row2, sw, -geo.pad_x, sx - geo.pad_x, max(lo, v_lo), min(hi, v_hi));
      };
      const Acc core = col_core ? products(col_core_lo, col_core_hi) : Acc(0);
      Acc row_sums[kShiftMaxKernel];
#pragma unroll
      for (int kx = 0; kx < kShiftMaxKernel; ++kx) {
        row_sums[kx] = Acc(0);
        if (kx < kx_lo || kx >= kx_hi) continue;
        const int lo = kx * dx, hi = lo + ow;
        row_sums[kx] = col_core ? core + products(lo, col_core_lo) + products(col_core_hi, hi) : products(lo, hi);
      }
      if (u >= row_core_lo && u < row_core_hi) {
#pragma unroll
        for (int kx = 0; kx < kShiftMaxKernel; ++kx) core_rows[kx] += row_sums[kx];
      } else {
#pragma unroll
        for (int ky = 0; ky < kShiftMaxKernel; ++ky) {
          const bool in_window = ky >= ky_lo && ky < ky_hi && u >= ky * dy && u < ky * dy + oh;
#pragma unroll
          for (int kx = 0; kx < kShiftMaxKernel; ++kx)
            if (in_window) acc[ky][kx] += row_sums[kx];
        }
      }
    }
  }

  Acc* out_g = out + static_cast<long long>(g) * geo.dim * geo.dim;
  const bool row_core = row_core_lo < row_core_hi;
#pragma unroll
  for (int ky = 0; ky < kShiftMaxKernel; ++ky) {
#pragma unroll
    for (int kx = 0; kx < kShiftMaxKernel; ++kx) {
      if (ky < ky_lo || ky >= ky_hi || kx < kx_lo || kx >= kx_hi) continue;
      const long long p = (c * kh + ky) * kw + kx;
      const long long q = (c2 * kh + ky + shift_y) * kw + kx + shift_x;
      atomicAdd(out_g + p * geo.dim + q, acc[ky][kx] + (row_core ? core_rows[kx] : Acc(0)));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Bias row: G[D−1][p] = Σ over patches of row p (patch sums), G[D−1][D−1] = patch count.
constexpr int kPatchSumThreads = 128;

template <typename In, typename Acc>
__global__ void __launch_bounds__(kPatchSumThreads)
patch_sum_kernel(const In* __restrict__ x, Acc* __restrict__ out, GramGeometry geo,
                 long long samples_per_split) {
  const long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int g = blockIdx.z;
  Acc* bias_row = out + static_cast<long long>(g) * geo.dim * geo.dim + (geo.dim - 1) * geo.dim;
  if (p == 0 && blockIdx.y == 0)
    atomicAdd(bias_row + geo.dim - 1, static_cast<Acc>(geo.batch * geo.out_h * geo.out_w));
  if (p >= geo.patch_dim) return;
  const long long per_sample = geo.out_h * geo.out_w;
  const long long k_begin = blockIdx.y * samples_per_split * per_sample;
  const long long k_end_split = k_begin + samples_per_split * per_sample;
  const long long k_end = k_end_split < geo.batch * per_sample ? k_end_split : geo.batch * per_sample;
  Acc s = Acc(0);
  for (long long k = k_begin; k < k_end; ++k) s += patch_value<Acc>(x, geo, g, p, k);
  atomicAdd(bias_row + p, s);
}

// Upper triangle ← lower triangle, for every group.
template <typename Acc>
__global__ void mirror_lower_kernel(Acc* __restrict__ out, long long dim, long long count) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = (i / dim) % dim, col = i % dim;
    if (col > row) out[i] = out[i + (col - row) * (dim - 1)];  // element [col][row]
  }
}

// Blocks / threads that comfortably fill a large GPU (132 SMs on an H100).
constexpr long long kTargetBlocks = 528;
constexpr long long kTargetThreads = 270336;

GramGeometry make_geometry(const GramParams& p) {
  GramGeometry geo;
  geo.batch = p.batch;
  geo.height = p.height;
  geo.width = p.width;
  geo.stride_b = p.stride_b;
  geo.stride_c = p.stride_c;
  geo.stride_h = p.stride_h;
  geo.stride_w = p.stride_w;
  geo.kernel_h = p.kernel_h;
  geo.kernel_w = p.kernel_w;
  geo.stride_y = p.stride_y;
  geo.stride_x = p.stride_x;
  geo.pad_y = p.pad_y;
  geo.pad_x = p.pad_x;
  geo.dil_y = p.dil_y;
  geo.dil_x = p.dil_x;
  geo.channels_per_group = static_cast<int>(p.channels / p.groups);
  geo.out_h = (p.height + 2 * p.pad_y - static_cast<long long>(p.dil_y) * (p.kernel_h - 1) - 1) / p.stride_y + 1;
  geo.out_w = (p.width + 2 * p.pad_x - static_cast<long long>(p.dil_x) * (p.kernel_w - 1) - 1) / p.stride_x + 1;
  geo.patch_dim = static_cast<long long>(geo.channels_per_group) * p.kernel_h * p.kernel_w;
  geo.dim = geo.patch_dim + (p.bias ? 1 : 0);
  return geo;
}

bool shift_form_applies(const GramParams& p) {
  return p.stride_y == 1 && p.stride_x == 1 && p.kernel_h <= kShiftMaxKernel &&
         p.kernel_w <= kShiftMaxKernel;
}

template <typename In, typename Acc>
cudaError_t launch_gram(const GramParams& params, const GramGeometry& geo, cudaStream_t stream) {
  const In* x = static_cast<const In*>(params.x);
  Acc* out = static_cast<Acc*>(params.out);
  const long long out_count = params.groups * geo.dim * geo.dim;
  cudaError_t err = cudaMemsetAsync(out, 0, out_count * sizeof(Acc), stream);
  if (err != cudaSuccess) return err;
  const long long patches = geo.batch * geo.out_h * geo.out_w;
  if (patches == 0 || geo.dim == 0) return cudaSuccess;
  if (geo.patch_dim == 0) {  // no channels: no products, but the bias row still counts the patches
    CX_LAUNCH((patch_sum_kernel<In, Acc>), dim3(1, 1, params.groups), dim3(kPatchSumThreads), 0, stream, x, out,
              geo, geo.batch);
    return cudaGetLastError();
  }

  const bool shift = params.algorithm == GramAlgorithm::kShift ||
                     (params.algorithm == GramAlgorithm::kAuto && shift_form_applies(params) &&
                      params.kernel_h * params.kernel_w > 1 &&  // 1×1: the tiled SYRK reuses better
                      geo.channels_per_group <= kShiftMaxChannels);
  if (shift) {
    const long long cg = geo.channels_per_group;
    const long long threads = cg * (cg + 1) / 2 * (2 * params.kernel_h - 1) * (2 * params.kernel_w - 1);
    long long splits = (kTargetThreads + threads * params.groups - 1) / (threads * params.groups);
    splits = splits < 1 ? 1 : (splits > geo.batch ? geo.batch : (splits > 65535 ? 65535 : splits));
    const long long per_split = (geo.batch + splits - 1) / splits;
    splits = (geo.batch + per_split - 1) / per_split;
    const dim3 grid(ceil_div(threads, kShiftThreads), static_cast<unsigned>(splits), params.groups);
    CX_LAUNCH((gram_shift_kernel<In, Acc>), grid, dim3(kShiftThreads), 0, stream, x, out, geo, per_split);
  } else {
    const long long tiles = (geo.patch_dim + kTile - 1) / kTile;
    const long long pairs = tiles * (tiles + 1) / 2;
    const long long chunks = (patches + kChunk - 1) / kChunk;
    long long splits = (kTargetBlocks + pairs * params.groups - 1) / (pairs * params.groups);
    const long long max_splits = (chunks + 3) / 4;  // keep ≥ 4 chunks of work per block
    splits = splits > max_splits ? max_splits : splits;
    splits = splits < 1 ? 1 : (splits > 65535 ? 65535 : splits);
    const long long per_split = (chunks + splits - 1) / splits * kChunk;
    splits = (patches + per_split - 1) / per_split;
    const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(splits), params.groups);
    CX_LAUNCH((gram_tiled_kernel<In, Acc>), grid, dim3(kTiledThreads), 0, stream, x, out, geo, per_split);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  if (params.bias) {
    long long splits = (kTargetThreads + geo.patch_dim * params.groups - 1) / (geo.patch_dim * params.groups);
    splits = splits < 1 ? 1 : (splits > geo.batch ? geo.batch : (splits > 65535 ? 65535 : splits));
    const long long per_split = (geo.batch + splits - 1) / splits;
    splits = (geo.batch + per_split - 1) / per_split;
    const dim3 grid(ceil_div(geo.patch_dim, kPatchSumThreads), static_cast<unsigned>(splits), params.groups);
    CX_LAUNCH((patch_sum_kernel<In, Acc>), grid, dim3(kPatchSumThreads), 0, stream, x, out, geo, per_split);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const unsigned mirror_blocks = ceil_div(out_count, 256) < 4096 ? ceil_div(out_count, 256) : 4096;
  CX_LAUNCH((mirror_lower_kernel<Acc>), dim3(mirror_blocks), dim3(256), 0, stream, out, geo.dim, out_count);
  return cudaGetLastError();
}

}  // namespace

long long gram_dim(const GramParams& params) {
  return params.channels / params.groups * params.kernel_h * params.kernel_w + (params.bias ? 1 : 0);
}

cudaError_t im2col_gram_cuda(const GramParams& params, cudaStream_t stream) {
  if (params.groups < 1 || params.groups > 65535 || params.channels % params.groups != 0 || params.kernel_h < 1 ||
      params.kernel_w < 1 || params.stride_y < 1 || params.stride_x < 1 || params.dil_y < 1 ||
      params.dil_x < 1 || params.pad_y < 0 || params.pad_x < 0)
    return cudaErrorInvalidValue;
  if (params.algorithm == GramAlgorithm::kShift && !shift_form_applies(params)) return cudaErrorInvalidValue;
  const GramGeometry geo = make_geometry(params);
  if (geo.out_h < 1 || geo.out_w < 1) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case Dtype::kFloat32: return launch_gram<float, float>(params, geo, stream);
    case Dtype::kFloat64: return launch_gram<double, double>(params, geo, stream);
    case Dtype::kFloat16: return launch_gram<Half16, float>(params, geo, stream);
    case Dtype::kBFloat16: return launch_gram<BFloat16, float>(params, geo, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace consequential_ext
