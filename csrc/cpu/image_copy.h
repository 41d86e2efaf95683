// One image of a conv input copied pixel-major (channels innermost), converted to the
// accumulation type: the layout the shift and tiled Gram kernels read.
#pragma once
#include <cstdint>
#include <type_traits>

#include "corr_kernel.h"

namespace consequential_ext::cpu {

// One image into a chunk copy: channel c of pixel (y, x) (src + c·sc + y·sy + x·sx) to
// dst[((y·Wz + x)·bc)·Cs + c], converted to acc_t. Contiguous float planes go 16 channels ×
// 16 pixels at a time through a register transpose (reading each plane in order); the rest,
// and other layouts and dtypes, element by element, channels innermost (channels_last reads
// are contiguous then; channel-outer order wrote each channel across a row's pixels bc·Cs
// apart and took the Gram 9–20 % longer on ResNet-20's shapes, one thread, interleaved).
template <typename src_t, typename acc_t>
inline void copy_image(acc_t* dst, int64_t Wz, int64_t bc, int64_t Cs, const src_t* src,
                       int64_t C, int64_t H, int64_t W, int64_t sc, int64_t sy, int64_t sx) {
  auto pixel = [&](int64_t y, int64_t x) { return dst + (y * Wz + x) * bc * Cs; };
  int64_t c_fast = 0, p_fast = 0;  // channels [0, c_fast) of pixels [0, p_fast) done
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<acc_t, float>) {
    if (sx == 1 && sy == W && C >= 16 && H * W >= 16) {
      const int64_t p16 = H * W / 16 * 16, c16 = C / 16 * 16;
      float* rows[16];
      bool done = true;
      for (int64_t p0 = 0; p0 < p16 && done; p0 += 16) {
        for (int i = 0; i < 16; ++i) rows[i] = pixel((p0 + i) / W, (p0 + i) % W);
        for (int64_t c0 = 0; c0 < c16 && done; c0 += 16) {
          done = transpose16(src + c0 * sc + p0, sc, rows);
          for (auto& r : rows) r += 16;
        }
      }
      if (done) c_fast = c16, p_fast = p16;
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
