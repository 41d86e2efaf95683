// General im2col Gram (any stride, dilation, padding): patches are gathered a cache-sized
// tile at a time (T patches × Dp, never the whole im2col matrix) and Σ patch·patchᵀ is
// accumulated for the upper triangle of 16 × 16 blocks only, then mirrored.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "corr_kernel.h"
#include "gram_cpu.h"
#include "image_copy.h"
#include "mirror.h"

namespace consequential_ext::cpu {
namespace {

// Patch tile: 128 KiB of float, well inside a 512 KiB L2 with the Gram beside it.
constexpr int64_t kTileElems = int64_t{1} << 15;

// A run of n elements, copied inline: a libc memcpy call costs more than a 9-float kernel row
// (3-channel stems: the gather took longer than the products). The attribute keeps GCC from
// turning the loop back into that call.
template <typename T>
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void copy_run(T* dst, const T* src,
                                                                              int64_t n) {
  for (int64_t e = 0; e < n; ++e) dst[e] = src[e];
}

template <typename src_t, typename acc_t>
void gram_tiled_impl(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  const int64_t B = x.size(0), Cg = x.size(1) / g.groups, H = x.size(2), W = x.size(3);
  const int64_t Ho = g.out_h(H), Wo = g.out_w(W), kk = g.kh * g.kw, d0 = Cg * kk;
  const int64_t D = d0 + (g.bias ? 1 : 0), Dp = round_up(D, kCorrAlign);
  // Tiles fit in L2, and there are at least 4 per thread to balance the threads.
  const int64_t P = B * Ho * Wo, per_thread = (P + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  const int64_t T = std::max<int64_t>(16, std::min(kTileElems / Dp, per_thread));
  const int64_t nb = Dp / kCorrAlign, tiles = (P + T - 1) / T;
  // Tile rows Ds floats apart: not a multiple of 512 bytes (see gram_shift_cpu.cpp's Cs).
  const int64_t Ds = Dp % 128 == 0 ? Dp + kCorrAlign : Dp;
  const src_t* src = x.const_data_ptr<src_t>();
  const int64_t sb = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
  auto out = gram.accessor<acc_t, 3>();
  std::vector<acc_t> acc(Dp * Dp);
  // Tile columns are offset-major, (i·kw + j)·Cg + c: a patch row is kk runs of Cg channels,
  // each one copy from a pixel-major copy of its image (reading x's channels a plane apart,
  // element by element, took as long as the products: a 128×16×32×32 stride-2 Gram on one
  // thread). column[p] is Gram row p's — channel c, offset o: p = c·kk + o — tile column.
  std::vector<int64_t> column(D);
  for (int64_t p = 0; p < D; ++p) column[p] = p < d0 ? p % kk * Cg + p / kk : p;
  std::vector<std::vector<acc_t>> thread_acc(at::get_num_threads());

  for (int64_t grp = 0; grp < g.groups; ++grp) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    // Threads take whole tiles with a private tile (no barrier per tile: on a shared machine
    // every barrier waits for the slowest thread). Thread 0 accumulates into acc, the
    // others into their own, summed in thread order: bit-identical from run to run.
    at::parallel_for(0, tiles, 1, [&](int64_t tile_lo, int64_t tile_hi) {
      const int64_t tid = at::get_thread_num();
      if (tid > 0) thread_acc[tid].assign(Dp * Dp, acc_t(0));
      acc_t* mine = tid > 0 ? thread_acc[tid].data() : acc.data();
      std::vector<acc_t> tile(T * Ds);  // pad columns [D, Dp) stay zero
      // Channels already contiguous in acc_t (channels_last float, say): read in place.
      // Else each image's pixel-major copy.
      bool in_place = false;
      if constexpr (std::is_same_v<src_t, acc_t>) in_place = sc == 1;
      acc_t* const image = in_place ? nullptr : scratch<acc_t, 10>(H * W * Cg);
      const acc_t* pixels = nullptr;  // pixel (y, x) of the current image at y·py + x·px
      const int64_t py = in_place ? sy : W * Cg, px = in_place ? sx : Cg;
      int64_t image_b = -1;  // the current image
      for (int64_t tile_index = tile_lo; tile_index < tile_hi; ++tile_index) {
        const int64_t p0 = tile_index * T, n = std::min(T, P - p0);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t pos = p0 + r, b = pos / (Ho * Wo), oy = pos / Wo % Ho, ox = pos % Wo;
          if (b != image_b) {
            const src_t* s0 = src + b * sb + grp * Cg * sc;
            pixels = image;
            if constexpr (std::is_same_v<src_t, acc_t>)
              if (in_place) pixels = s0;
            if (!in_place) copy_image(image, W, 1, Cg, s0, Cg, H, W, sc, sy, sx);
            image_b = b;
          }
          acc_t* row = tile.data() + r * Ds;
          const int64_t x0 = ox * g.sw - g.pw;  // the first kernel column's input column
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t y = oy * g.sh + g.dh * i - g.ph;
            // A kernel row inside the image, undilated, over pixels Cg apart, is one run of
            // kw·Cg in both.
            if (g.dw == 1 && px == Cg && y >= 0 && y < H && x0 >= 0 && x0 + g.kw <= W) {
              copy_run(row + i * g.kw * Cg, pixels + y * py + x0 * px, g.kw * Cg);
              continue;
            }
            for (int64_t j = 0; j < g.kw; ++j) {
              const int64_t xx = x0 + g.dw * j;
              acc_t* dst = row + (i * g.kw + j) * Cg;
              if (y < 0 || y >= H || xx < 0 || xx >= W)  // zero padding
                std::fill(dst, dst + Cg, acc_t(0));
              else
                copy_run(dst, pixels + y * py + xx * px, Cg);
            }
          }
          if (g.bias) row[d0] = acc_t(1);
        }
        // Upper triangle, one call per 16-row block row: the kernel then sweeps its column
        // strips per K-block with the block row's L rows cached (16 × 16 calls re-read them).
        // With 512 KiB tiles and 16 × 16 calls, stride-2 3×3 and 7×7 Grams took 11–30 % longer
        // on one thread (medians of 8 interleaved runs); on two, within this machine's noise.
        for (int64_t rb = 0; rb < nb; ++rb) {
          const int64_t r0 = rb * kCorrAlign;
          corr_accumulate(mine + r0 * Dp + r0, Dp, tile.data() + r0, tile.data() + r0,
                          kCorrAlign, Dp - r0, 1, 0, n, Ds);
        }
      }
    });
    for (auto& other : thread_acc) {
      for (size_t e = 0; e < other.size(); ++e) acc[e] += other[e];
      std::vector<acc_t>().swap(other);
    }
    // (channel, i, j) order from the tile's offset-major columns (acc's upper triangle is
    // computed in whole 16 × 16 blocks).
    upper_from_permuted(&out[grp][0][0], D, D, acc.data(), Dp, column.data());
    mirror_triangle(&out[grp][0][0], D, D, Mirror::kUpperToLower);
  }
}

}  // namespace

void gram_tiled_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "im2col_gram_cpu", [&] {
    gram_tiled_impl<scalar_t, at::opmath_type<scalar_t>>(x, g, gram);
  });
}

}  // namespace consequential_ext::cpu
