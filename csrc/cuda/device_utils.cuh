// Small device helpers shared by the CUDA kernels: storage types and their conversions,
// a warp sum, and the launch macro.
//
// No torch headers and no cuda_fp16.h / cuda_bf16.h: the same sources are compiled by nvcc
// for the GPU and by g++ for the host emulation (csrc/emu/cuda_emu.h, force-included, which
// defines CX_CUDA_EMULATION and the CUDA built-ins). Half and bfloat16 are therefore carried
// as raw 16-bit words and converted here with integer arithmetic, identically on both.
#pragma once

#include <stdint.h>

#ifndef CX_CUDA_EMULATION
#include <cuda_runtime.h>
// Launch through one macro so the emulation can replace the <<<...>>> syntax.
#define CX_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
// Dynamically sized block-shared array (the emulation maps it to per-launch host storage).
#define CX_DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char cx_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(cx_dynamic_shared_)
#endif

namespace consequential_ext {
namespace cuda {

// IEEE binary16 and bfloat16 as their bit patterns (layout-compatible with at::Half /
// at::BFloat16, so the binding passes data pointers straight through).
struct Half16 { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

// dtype codes shared with the binding and the emulation entry points.
enum class Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

__host__ __device__ __forceinline__ float bits_to_float(uint32_t u) {
  union { uint32_t u; float f; } c;
  c.u = u;
  return c.f;
}

__host__ __device__ __forceinline__ uint32_t float_to_bits(float f) {
  union { uint32_t u; float f; } c;
  c.f = f;
  return c.u;
}

__host__ __device__ __forceinline__ float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2⁻²⁴, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest, ties to even, as __float2half_rn does.
__host__ __device__ __forceinline__ uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN / inf
  if (x >= 0x477ff000u) return sign | 0x7c00u;       // ≥ 65520 rounds to inf
  if (x >= 0x38800000u) {                            // normal half (≥ 2⁻¹⁴)
    uint32_t h = (x >> 13) - (112u << 10);
    const uint32_t rest = x & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  if (x <= 0x33000000u) return sign;                 // ≤ 2⁻²⁵ rounds to zero
  const uint32_t mantissa = (x & 0x7fffffu) | 0x800000u;  // subnormal half: units of 2⁻²⁴
  const uint32_t shift = 126u - (x >> 23);
  uint32_t h = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

__host__ __device__ __forceinline__ float bfloat16_to_float(uint16_t b) {
  return bits_to_float(static_cast<uint32_t>(b) << 16);
}

__host__ __device__ __forceinline__ uint16_t float_to_bfloat16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Load any storage type as the accumulation type Acc; store Acc into any storage type.
template <typename Acc> __host__ __device__ __forceinline__ Acc load_as(float v) { return static_cast<Acc>(v); }
template <typename Acc> __host__ __device__ __forceinline__ Acc load_as(double v) { return static_cast<Acc>(v); }
template <typename Acc> __host__ __device__ __forceinline__ Acc load_as(Half16 v) { return static_cast<Acc>(half_to_float(v.bits)); }
template <typename Acc> __host__ __device__ __forceinline__ Acc load_as(BFloat16 v) { return static_cast<Acc>(bfloat16_to_float(v.bits)); }

template <typename Acc> __host__ __device__ __forceinline__ void store_as(float* p, Acc v) { *p = static_cast<float>(v); }
template <typename Acc> __host__ __device__ __forceinline__ void store_as(double* p, Acc v) { *p = static_cast<double>(v); }
// Narrowing from double goes through float (double rounding; never reached with the
// float64 work dtype in practice, where the parameter is float64 too).
template <typename Acc> __host__ __device__ __forceinline__ void store_as(Half16* p, Acc v) { p->bits = float_to_half(static_cast<float>(v)); }
template <typename Acc> __host__ __device__ __forceinline__ void store_as(BFloat16* p, Acc v) { p->bits = float_to_bfloat16(static_cast<float>(v)); }

template <typename T> __host__ __device__ __forceinline__ T quiet_nan();
template <> __host__ __device__ __forceinline__ float quiet_nan<float>() { return bits_to_float(0x7fc00000u); }
template <> __host__ __device__ __forceinline__ double quiet_nan<double>() {
  union { unsigned long long u; double d; } c;
  c.u = 0x7ff8000000000000ull;
  return c.d;
}

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

// Sum over the 32 lanes of a warp; every lane gets the total. All lanes must call it.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

inline unsigned ceil_div(long long a, long long b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace consequential_ext
