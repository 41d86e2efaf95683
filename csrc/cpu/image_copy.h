// One image of a conv input copied pixel-major (channels innermost), converted to the
// accumulation type: the layout the shift and tiled Gram kernels read.
#pragma once
#include <cstdint>
#include <type_traits>

#include "corr_kernel.h"

namespace consequential_ext::cpu {

// One image into a chunk copy: channel c of pixel (y, x) (src + c·sc + y·sy + x·sx) to
// dst[((y·Wz + x)·bc)·Cs + c], converted to acc_t. Contiguous float planes go n channels ×
// n pixels at a time through a register transpose (n = 16 on AVX-512, 8 on AVX2; reading
// each plane in order: element by element, the copy was a fifth of a stride-2 16-channel
// Gram on AVX2); the rest, and other layouts and dtypes, element by element, channels
// innermost (channels_last reads are contiguous then; channel-outer order wrote each channel
// across a row's pixels bc·Cs apart and took the Gram 9–20 % longer on ResNet-20's shapes,
// one thread, interleaved).
template <typename src_t, typename acc_t>
inline void copy_image(acc_t* dst, int64_t Wz, int64_t bc, int64_t Cs, const src_t* src,
                       int64_t C, int64_t H, int64_t W, int64_t sc, int64_t sy, int64_t sx) {
  auto pixel = [&](int64_t y, int64_t x) { return dst + (y * Wz + x) * bc * Cs; };
  int64_t c_fast = 0, p_fast = 0;  // channels [0, c_fast) of pixels [0, p_fast) done
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<acc_t, float>) {
    const int64_t n = transpose_width();
    if (n > 0 && sx == 1 && sy == W && C >= n && H * W >= n) {
      c_fast = C / n * n, p_fast = H * W / n * n;
      float* rows[16];
      for (int64_t p0 = 0; p0 < p_fast; p0 += n) {
        for (int64_t i = 0; i < n; ++i) rows[i] = pixel((p0 + i) / W, (p0 + i) % W);
        for (int64_t c0 = 0; c0 < c_fast; c0 += n) {
          transpose_block(src + c0 * sc + p0, sc, rows);
          for (int64_t i = 0; i < n; ++i) rows[i] += n;
        }
      }
    }
  }
  if (c_fast == C && p_fast == H * W) return;
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const src_t* s0 = src + y * sy + x * sx;
      acc_t* z = pixel(y, x);
      for (int64_t c = y * W + x < p_fast ? c_fast : 0; c < C; ++c)
        z[c] = static_cast<acc_t>(s0[c * sc]);
    }
}

}  // namespace consequential_ext::cpu
