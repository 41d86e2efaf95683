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

}  // namespace consequential_ext::cpu
