// Many small ridge solves at once (depthwise / grouped layers: hundreds of systems of
// D ≤ ~100), one system per SIMD lane: LAPACK factors one tiny matrix per call, where the
// call overhead and scalar code dominate; here 16 systems are factored and solved together
// by the same vector instructions, a block of 16 per thread task.
#include "ridge_solve_lanes.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

namespace consequential_ext::cpu {
namespace {

constexpr int64_t kLanes = 16;

// s −= Σ_{k < count} a[k·as] · b[k·bs] for the 16 lanes at s, a[·] and b[·], in W-byte
// vectors (16·sizeof(T)/W per lane group) and C independent chains: a single chain waits
// out the FMA latency at every step. C · vectors ≤ 8 keeps the accumulators and the loads
// in 16 registers. The chains are summed pairwise, (c0 + c1) + (c2 + c3), on every target.
template <typename T, int W>
__attribute__((always_inline)) inline void subtract_lane_dots(T* s, const T* a, int64_t as,
                                                              const T* b, int64_t bs,
                                                              int64_t count) {
  using V = typename Vec<T, W>::type;
  constexpr int L = W / sizeof(T), NV = kLanes / L, C = NV >= 8 ? 1 : NV >= 4 ? 2 : 4;
  V acc[C][NV];
  for (int c = 0; c < C; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = V{};
  // acc[c] += a[k·as] · b[k·bs] (loads through memcpy: no alignment assumed).
  auto fma_at = [&](int c, int64_t k) {
    for (int v = 0; v < NV; ++v) {
      V x, y;
      std::memcpy(&x, a + k * as + v * L, sizeof(V));
      std::memcpy(&y, b + k * bs + v * L, sizeof(V));
      acc[c][v] += x * y;
    }
  };
  int64_t k = 0;
  for (; k + C <= count; k += C)
    for (int c = 0; c < C; ++c) fma_at(c, k + c);
  for (; k < count; ++k) fma_at(0, k);
  for (int v = 0; v < NV; ++v) {
    V sum = acc[0][v];
    if constexpr (C == 2) sum = acc[0][v] + acc[1][v];
    if constexpr (C == 4) sum = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
    V out;
    std::memcpy(&out, s + v * L, sizeof(V));
    out -= sum;
    std::memcpy(s + v * L, &out, sizeof(V));
  }
}

// Systems [s0, s0 + 16) of a (n, d, d) + lam·I / g (n, m, d) into x (n, m, d); lanes past n
// are identity systems. Returns false when some system is not positive definite.
template <typename T, int W>
__attribute__((always_inline)) inline bool solve_block(const T* a, T lam, const T* g, T* x,
                                                       int64_t n, int64_t d, int64_t m,
                                                       int64_t s0) {
  const int64_t lanes = std::min(kLanes, n - s0);
  std::vector<T> A(d * d * kLanes, T(0)), inv(d * kLanes), y(d * kLanes);
  // Lower triangle, lane-innermost: A[(i·d + j)·16 + l], written one entry (16 lanes, one
  // cache line) at a time: lane by lane, every write would land on a line of its own (this
  // copy then took half of the block's time).
  const T* src[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) src[l] = a + (s0 + std::min(l, lanes - 1)) * d * d;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      T* dst = &A[(i * d + j) * kLanes];
      const T diag = i == j ? lam : T(0);
      for (int64_t l = 0; l < kLanes; ++l) dst[l] = l < lanes ? src[l][i * d + j] + diag : T(i == j);
    }
  // Left-looking Cholesky, row by row: L[i][j] = (A[i][j] − Σ_{k<j} L[i][k]·L[j][k]) / L[j][j].
  bool ok = true;
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      T s[kLanes];
      T* aij = &A[(i * d + j) * kLanes];
      for (int64_t l = 0; l < kLanes; ++l) s[l] = aij[l];
      subtract_lane_dots<T, W>(s, &A[i * d * kLanes], kLanes, &A[j * d * kLanes], kLanes, j);
      if (i == j) {
        for (int64_t l = 0; l < kLanes; ++l) {
          ok &= s[l] > T(0);  // false for NaN too
          aij[l] = std::sqrt(s[l]);
          inv[i * kLanes + l] = T(1) / aij[l];
        }
      } else {
        for (int64_t l = 0; l < kLanes; ++l) aij[l] = s[l] * inv[j * kLanes + l];
      }
    }
  }
  if (!ok) return false;
  // Per right-hand side: L y = g, then Lᵀ x = y.
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < d; ++i) {
      T s[kLanes];
      for (int64_t l = 0; l < kLanes; ++l)
        s[l] = l < lanes ? g[((s0 + l) * m + r) * d + i] : T(0);
      subtract_lane_dots<T, W>(s, &A[i * d * kLanes], kLanes, y.data(), kLanes, i);
      for (int64_t l = 0; l < kLanes; ++l) y[i * kLanes + l] = s[l] * inv[i * kLanes + l];
    }
    for (int64_t i = d - 1; i >= 0; --i) {
      T s[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) s[l] = y[i * kLanes + l];
      subtract_lane_dots<T, W>(s, &A[((i + 1) * d + i) * kLanes], d * kLanes,
                               &y[(i + 1) * kLanes], kLanes, d - 1 - i);
      for (int64_t l = 0; l < kLanes; ++l) y[i * kLanes + l] = s[l] * inv[i * kLanes + l];
    }
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t i = 0; i < d; ++i) x[((s0 + l) * m + r) * d + i] = y[i * kLanes + l];
  }
  return true;
}

#define CX_LANE_VARIANT(NAME, W, ATTR)                                                        \
  template <typename T>                                                                     \
  ATTR bool NAME(const T* a, T lam, const T* g, T* x, int64_t n, int64_t d, int64_t m,       \
                 int64_t s0) {                                                              \
    return solve_block<T, W>(a, lam, g, x, n, d, m, s0);                                    \
  }
CX_LANE_VARIANT(solve_block_avx512, 64, __attribute__((target("avx512f"))))
CX_LANE_VARIANT(solve_block_avx2, 32, __attribute__((target("avx2,fma"))))
CX_LANE_VARIANT(solve_block_portable, 16, )
#undef CX_LANE_VARIANT

template <typename T>
bool solve_all(const at::Tensor& a, double lam, const at::Tensor& g, at::Tensor& x) {
  const int64_t d = a.size(-1), m = g.size(-2), n = a.numel() / (d * d);
  const T* pa = a.const_data_ptr<T>();
  const T* pg = g.const_data_ptr<T>();
  T* px = x.data_ptr<T>();
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  std::vector<char> ok(blocks, 1);
  // One block is d³/3 · 16 flops; a thread hand-off costs more below a few blocks.
  const int64_t grain = std::max<int64_t>(1, 4096 / (d * d));
  const Isa isa = cpu_isa();
  const auto solve = isa == Isa::kAvx512 ? solve_block_avx512<T>
                     : isa == Isa::kAvx2 ? solve_block_avx2<T>
                                         : solve_block_portable<T>;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) ok[b] = solve(pa, T(lam), pg, px, n, d, m, b * kLanes);
  });
  for (char o : ok)
    if (!o) return false;
  return true;
}

}  // namespace

bool lane_ridge_solve(const at::Tensor& a, double ridge, const at::Tensor& g, at::Tensor& x) {
  if (a.scalar_type() == at::kDouble) return solve_all<double>(a, ridge, g, x);
  return solve_all<float>(a, ridge, g, x);
}

}  // namespace consequential_ext::cpu
