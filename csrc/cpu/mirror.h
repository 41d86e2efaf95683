// Copying one triangle of a square row-major matrix onto the other. Done in tiles: element by
// element, one side walks a column, a cache line per element (D = 1281: half of a
// 32×1280×2×2 Gram's time, the GEMM being the other half).
#pragma once
#include <algorithm>
#include <cstdint>

namespace consequential_ext::cpu {

enum class Mirror { kLowerToUpper, kUpperToLower };

// a: n × n, row stride ld. kLowerToUpper: a[q][p] = a[p][q] for q < p; kUpperToLower the
// reverse.
template <typename T>
void mirror_triangle(T* a, int64_t n, int64_t ld, Mirror direction) {
  constexpr int64_t kTile = 64;  // a tile's column side: 64 cache lines, held in L1
  for (int64_t p0 = 0; p0 < n; p0 += kTile)
    for (int64_t q0 = 0; q0 <= p0; q0 += kTile) {
      const int64_t p1 = std::min(n, p0 + kTile);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t q1 = std::min(q0 + kTile, p);
        if (direction == Mirror::kLowerToUpper)
          for (int64_t q = q0; q < q1; ++q) a[q * ld + p] = a[p * ld + q];
        else
          for (int64_t q = q0; q < q1; ++q) a[p * ld + q] = a[q * ld + p];
      }
    }
}

// out[p][q] (row stride ldo) for p ≤ q < n from a Gram accumulated in another column order:
// entry (column[p], column[q]) of acc (row stride lda), whose upper triangle is the one
// computed (column[] need not be increasing, so either side of it is read). The tiled and runs
// kernels accumulate in kernel-offset-major order; the Gram is (channel, i, j).
template <typename T>
void upper_from_permuted(T* out, int64_t ldo, int64_t n, const T* acc, int64_t lda,
                         const int64_t* column) {
  for (int64_t p = 0; p < n; ++p)
    for (int64_t q = p; q < n; ++q) {
      const int64_t a = column[p], b = column[q];
      out[p * ldo + q] = a <= b ? acc[a * lda + b] : acc[b * lda + a];
    }
}

}  // namespace consequential_ext::cpu
