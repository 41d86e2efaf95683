// Register-tiled outer-product accumulation: each tile keeps MR × (NV vectors) partial sums
// in registers over the whole K run, so every loaded R vector feeds MR FMAs and every L
// scalar (broadcast) feeds NV. BLAS handles this skinny, huge-K shape (C × C output,
// K = pixels·batch) poorly, which is the shape every shifted channel correlation has.
#include "corr_kernel.h"

#include <cstring>

namespace consequential_ext::cpu {
namespace {

template <typename T>
struct Vec;  // one 64-byte vector: 16 floats or 8 doubles (split into halves/quarters by
             // the compiler on targets without 512-bit registers)
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename T, int MR, int NV>
__attribute__((always_inline)) inline void corr_tiles(T* out, int64_t ldo, const T* L, const T* R,
                                                      int64_t M, int64_t N, int64_t n_outer,
                                                      int64_t outer_stride, int64_t n_inner,
                                                      int64_t ld) {
  using vec = typename Vec<T>::type;
  constexpr int V = 64 / sizeof(T);
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    for (int64_t n0 = 0; n0 < N; n0 += NV * V) {
      vec acc[MR][NV];
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v) acc[m][v] = vec{};
      for (int64_t o = 0; o < n_outer; ++o) {
        const T* l = L + o * outer_stride + m0;
        const T* r = R + o * outer_stride + n0;
        for (int64_t k = 0; k < n_inner; ++k, l += ld, r += ld) {
          vec rv[NV];
          for (int v = 0; v < NV; ++v) std::memcpy(&rv[v], r + v * V, sizeof(vec));
          for (int m = 0; m < MR; ++m) {
            const T lm = l[m];
            for (int v = 0; v < NV; ++v) acc[m][v] += lm * rv[v];
          }
        }
      }
      for (int m = 0; m < MR; ++m) {
        T* o_row = out + (m0 + m) * ldo + n0;
        for (int v = 0; v < NV; ++v) {
          vec cur;
          std::memcpy(&cur, o_row + v * V, sizeof(vec));
          cur += acc[m][v];
          std::memcpy(o_row + v * V, &cur, sizeof(vec));
        }
      }
    }
  }
}

// Two vectors wide when N allows (more FMAs per broadcast), else one vector and taller
// tiles; M is a multiple of 16, so MR ∈ {8, 16} always divides it.
template <typename T>
__attribute__((always_inline)) inline void corr_any(T* out, int64_t ldo, const T* L, const T* R,
                                                    int64_t M, int64_t N, int64_t n_outer,
                                                    int64_t os, int64_t n_inner, int64_t ld) {
  constexpr int V = 64 / sizeof(T);
  if (N % (2 * V) == 0)
    corr_tiles<T, 8, 2>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
  else
    corr_tiles<T, 16, 1>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
}

// Up to NV lane vectors at once, two accumulators each (the FMA latency, not the loads,
// bounds a single chain over a short batch).
template <typename T, int NV>
__attribute__((always_inline)) inline void lane_tile(T* out, const T* L, const T* R, int64_t n,
                                                     int64_t ls, int64_t rs) {
  using vec = typename Vec<T>::type;
  constexpr int V = 64 / sizeof(T);
  vec acc0[NV], acc1[NV];
  for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = vec{};
  int64_t k = 0;
  for (; k + 1 < n; k += 2) {
    for (int v = 0; v < NV; ++v) {
      vec l0, r0, l1, r1;
      std::memcpy(&l0, L + k * ls + v * V, sizeof(vec));
      std::memcpy(&r0, R + k * rs + v * V, sizeof(vec));
      std::memcpy(&l1, L + (k + 1) * ls + v * V, sizeof(vec));
      std::memcpy(&r1, R + (k + 1) * rs + v * V, sizeof(vec));
      acc0[v] += l0 * r0;
      acc1[v] += l1 * r1;
    }
  }
  for (; k < n; ++k)
    for (int v = 0; v < NV; ++v) {
      vec l0, r0;
      std::memcpy(&l0, L + k * ls + v * V, sizeof(vec));
      std::memcpy(&r0, R + k * rs + v * V, sizeof(vec));
      acc0[v] += l0 * r0;
    }
  for (int v = 0; v < NV; ++v) {
    const vec sum = acc0[v] + acc1[v];
    std::memcpy(out + v * V, &sum, sizeof(vec));
  }
}

template <typename T>
__attribute__((always_inline)) inline void lane_any(T* out, const T* L, const T* R, int64_t n,
                                                    int64_t ls, int64_t rs, int64_t lanes) {
  constexpr int V = 64 / sizeof(T);
  int64_t l = 0;
  for (; l + 4 * V <= lanes; l += 4 * V) lane_tile<T, 4>(out + l, L + l, R + l, n, ls, rs);
  for (; l < lanes; l += V) lane_tile<T, 1>(out + l, L + l, R + l, n, ls, rs);
}

template <typename T>
__attribute__((always_inline)) inline void add_any(T* out, int64_t ldo, const T* in, int64_t ldi,
                                                   int64_t M, int64_t N) {
  for (int64_t m = 0; m < M; ++m) {
    T* __restrict o = out + m * ldo;
    const T* __restrict i = in + m * ldi;
    for (int64_t n = 0; n < N; ++n) o[n] += i[n];
  }
}

#define CX_CORR_VARIANT(NAME, ATTR)                                                             \
  template <typename T>                                                                          \
  ATTR void NAME(T* out, int64_t ldo, const T* L, const T* R, int64_t M, int64_t N,              \
                 int64_t n_outer, int64_t os, int64_t n_inner, int64_t ld) {                     \
    corr_any<T>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);                                 \
  }                                                                                              \
  template <typename T>                                                                          \
  ATTR void NAME##_lanes(T* out, const T* L, const T* R, int64_t n, int64_t ls, int64_t rs,      \
                         int64_t lanes) {                                                        \
    lane_any<T>(out, L, R, n, ls, rs, lanes);                                                    \
  }                                                                                              \
  template <typename T>                                                                          \
  ATTR void NAME##_add(T* out, int64_t ldo, const T* in, int64_t ldi, int64_t M, int64_t N) {    \
    add_any<T>(out, ldo, in, ldi, M, N);                                                         \
  }
CX_CORR_VARIANT(corr_avx512, __attribute__((target("avx512f"))))
CX_CORR_VARIANT(corr_avx2, __attribute__((target("avx2,fma"))))
CX_CORR_VARIANT(corr_portable, )
#undef CX_CORR_VARIANT

enum class Isa { kAvx512, kAvx2, kPortable };

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

template <typename T>
void corr_dispatch(T* out, int64_t ldo, const T* L, const T* R, int64_t M, int64_t N,
                   int64_t n_outer, int64_t os, int64_t n_inner, int64_t ld) {
  static const Isa isa = detect_isa();
  switch (isa) {
    case Isa::kAvx512: return corr_avx512<T>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
    case Isa::kAvx2: return corr_avx2<T>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
    default: return corr_portable<T>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
  }
}

template <typename T>
void lane_dispatch(T* out, const T* L, const T* R, int64_t n, int64_t ls, int64_t rs,
                   int64_t lanes) {
  static const Isa isa = detect_isa();
  switch (isa) {
    case Isa::kAvx512: return corr_avx512_lanes<T>(out, L, R, n, ls, rs, lanes);
    case Isa::kAvx2: return corr_avx2_lanes<T>(out, L, R, n, ls, rs, lanes);
    default: return corr_portable_lanes<T>(out, L, R, n, ls, rs, lanes);
  }
}

template <typename T>
void add_dispatch(T* out, int64_t ldo, const T* in, int64_t ldi, int64_t M, int64_t N) {
  static const Isa isa = detect_isa();
  switch (isa) {
    case Isa::kAvx512: return corr_avx512_add<T>(out, ldo, in, ldi, M, N);
    case Isa::kAvx2: return corr_avx2_add<T>(out, ldo, in, ldi, M, N);
    default: return corr_portable_add<T>(out, ldo, in, ldi, M, N);
  }
}

}  // namespace

void add_block(float* out, int64_t ldo, const float* in, int64_t ldi, int64_t M, int64_t N) {
  add_dispatch<float>(out, ldo, in, ldi, M, N);
}
void add_block(double* out, int64_t ldo, const double* in, int64_t ldi, int64_t M, int64_t N) {
  add_dispatch<double>(out, ldo, in, ldi, M, N);
}

void lane_dot(float* out, const float* L, const float* R, int64_t n, int64_t ls, int64_t rs,
              int64_t lanes) {
  lane_dispatch<float>(out, L, R, n, ls, rs, lanes);
}
void lane_dot(double* out, const double* L, const double* R, int64_t n, int64_t ls, int64_t rs,
              int64_t lanes) {
  lane_dispatch<double>(out, L, R, n, ls, rs, lanes);
}

void corr_accumulate(float* out, int64_t ldo, const float* L, const float* R, int64_t M, int64_t N,
                     int64_t n_outer, int64_t os, int64_t n_inner, int64_t ld) {
  corr_dispatch<float>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
}
void corr_accumulate(double* out, int64_t ldo, const double* L, const double* R, int64_t M,
                     int64_t N, int64_t n_outer, int64_t os, int64_t n_inner, int64_t ld) {
  corr_dispatch<double>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
}

}  // namespace consequential_ext::cpu
