// Stride-1 im2col Gram for few taps (D ≤ kRowsMaxD: few channels), and G beside it, from a
// tap-major patch panel.
//
// The shift kernel pads channels to whole 16-wide vectors (a 3-channel stem used 9 of its
// 256 products per shift) and the tiled one gathers each patch as kh runs of kw·C floats (for
// a 3-channel stem the gather took longer than the products). Here the panel's rows are taps
// (c, i, j) — the Gram's own order — and its columns output pixels: at stride 1 each output
// row of a tap is one contiguous run of an input row (zeros where it leaves the image), so a
// chunk of output rows is a few long copies. The Gram is the panel's rows dotted with each
// other (row_dots: 3 × 4 tiles of dot products, lanes along the pixels, the upper triangle's
// tiles only; MKL's GEMM ran this shape at half the rate); with dZ's rows under the taps, as
// stored, G = dZ Xᵀ comes from the same panel (oneDNN's weight gradient over 3 input
// channels ran at a fifth of that rate).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "corr_kernel.h"
#include "gram_cpu.h"
#include "mirror.h"

namespace consequential_ext::cpu {
namespace {

// n elements `step` apart to consecutive ones, converted; unit steps as a vectorisable loop.
template <typename src_t, typename acc_t>
inline void copy_run(acc_t* dst, const src_t* src, int64_t n, int64_t step) {
  if (step == 1)
    for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<acc_t>(src[e]);
  else
    for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<acc_t>(src[e * step]);
}

template <typename src_t, typename acc_t>
void gram_rows_impl(const at::Tensor& x, const PatchGeometry& g, at::Tensor* gram,
                    const at::Tensor* gy, at::Tensor* grad) {
  const int64_t B = x.size(0), Cg = x.size(1) / g.groups, H = x.size(2), W = x.size(3);
  const int64_t Ho = g.out_h(H), Wo = g.out_w(W), kk = g.kh * g.kw, d0 = Cg * kk;
  const int64_t D = d0 + (g.bias ? 1 : 0), O = gy ? gy->size(1) / g.groups : 0;
  // Panel rows: the taps, padded to whole tiles of rows (Dg) and of columns (Dq), then dZ's
  // channels (padded to Og). Rows past the real ones are zeros or feed only entries that are
  // never read.
  const int64_t Dg = round_up(D, kDotRowAlign), Dq = round_up(D, kDotColAlign);
  const int64_t Og = round_up(O, kDotRowAlign), Rp = std::max(Dg + Og, Dq);
  const int64_t rows = B * Ho;  // output rows, every image's
  const int64_t per_chunk = std::max<int64_t>(1, kPanelElems / ((D + O) * Wo));
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  // Whole vectors per row; rows not a multiple of 4 KiB apart (a tile reads 7 in step).
  int64_t Kp = round_up(per_chunk * Wo, kCorrAlign);
  if (Kp % 1024 == 0) Kp += kCorrAlign;
  const src_t* src = x.const_data_ptr<src_t>();
  const int64_t sb = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
  const src_t* dz = gy ? gy->const_data_ptr<src_t>() : nullptr;
  const int64_t zb = gy ? gy->stride(0) : 0, zc = gy ? gy->stride(1) : 0,
                zy = gy ? gy->stride(2) : 0, zx = gy ? gy->stride(3) : 0;
  std::vector<std::vector<acc_t>> thread_acc(at::get_num_threads());

  for (int64_t grp = 0; grp < g.groups; ++grp) {
    // Each thread a contiguous range of chunks into its own (Dg + Og) × Dq products (the
    // Gram's rows, then G's), summed in thread order: bit-identical from run to run at one
    // thread count.
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t>& acc = thread_acc[at::get_thread_num()];
      acc.assign((Dg + Og) * Dq, acc_t(0));
      acc_t* const panel = scratch<acc_t, 12>(Rp * Kp);
      std::fill(panel, panel + Rp * Kp, acc_t(0));
      for (int64_t chunk = lo; chunk < hi; ++chunk) {
        const int64_t r0 = chunk * per_chunk, n = std::min(per_chunk, rows - r0);
        const int64_t K = n * Wo, Kv = round_up(K, kCorrAlign);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = (r0 + r) / Ho, oy = (r0 + r) % Ho;
          for (int64_t c = 0; c < Cg; ++c) {
            const src_t* plane = src + b * sb + (grp * Cg + c) * sc;
            for (int64_t i = 0; i < g.kh; ++i) {
              const int64_t y = oy + g.dh * i - g.ph;
              for (int64_t j = 0; j < g.kw; ++j) {
                acc_t* run = panel + (c * kk + i * g.kw + j) * Kp + r * Wo;
                // Output columns whose input column ox + dw·j − pw lies in the image.
                const int64_t shift = g.dw * j - g.pw;
                const int64_t x0 = std::clamp<int64_t>(-shift, 0, Wo);
                const int64_t x1 = std::clamp<int64_t>(W - shift, x0, Wo);
                if (y < 0 || y >= H) {
                  std::fill(run, run + Wo, acc_t(0));
                  continue;
                }
                std::fill(run, run + x0, acc_t(0));
                copy_run(run + x0, plane + y * sy + (x0 + shift) * sx, x1 - x0, sx);
                std::fill(run + x1, run + Wo, acc_t(0));
              }
            }
          }
          if (g.bias) std::fill(panel + d0 * Kp + r * Wo, panel + d0 * Kp + (r + 1) * Wo, acc_t(1));
          for (int64_t o = 0; o < O; ++o)
            copy_run(panel + (Dg + o) * Kp + r * Wo,
                     dz + b * zb + (grp * O + o) * zc + oy * zy, Wo, zx);
        }
        for (int64_t row = 0; row < Rp; ++row)  // a shorter last chunk: zeros past it
          std::fill(panel + row * Kp + K, panel + row * Kp + Kv, acc_t(0));
        if (gram) row_dots(acc.data(), Dq, panel, panel, Kp, Dg, Dq, Kv, /*upper=*/true);
        if (gy)
          row_dots(acc.data() + Dg * Dq, Dq, panel + Dg * Kp, panel, Kp, Og, Dq, Kv, false);
      }
    });
    std::vector<acc_t> total((Dg + Og) * Dq, acc_t(0));
    for (auto& acc : thread_acc) {
      for (size_t e = 0; e < acc.size(); ++e) total[e] += acc[e];
      std::vector<acc_t>().swap(acc);
    }
    if (gram) {
      acc_t* out = gram->data_ptr<acc_t>() + grp * D * D;
      for (int64_t p = 0; p < D; ++p)
        std::copy_n(total.data() + p * Dq + p, D - p, out + p * D + p);
      mirror_triangle(out, D, D, Mirror::kUpperToLower);
      if (g.bias) out[d0 * D + d0] = static_cast<acc_t>(B * Ho * Wo);  // exact past 2^24
    }
    if (gy)
      for (int64_t o = 0; o < O; ++o)
        std::copy_n(total.data() + (Dg + o) * Dq, D, grad->data_ptr<acc_t>() + (grp * O + o) * D);
  }
}

}  // namespace

bool rows_applies(const at::Tensor& x, const PatchGeometry& g, int64_t out) {
  // Each factor bounded first, so that the product below cannot overflow.
  if (g.sh != 1 || g.sw != 1 || g.kh > kPanelElems || g.kw > kPanelElems ||
      x.size(1) / g.groups > kPanelElems || out / g.groups > kPanelElems)
    return false;
  const int64_t rows = x.size(1) / g.groups * g.kh * g.kw + 1 + out / g.groups;
  return rows <= kPanelElems && rows * g.out_w(x.size(3)) <= kPanelElems;
}

void gram_rows_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor* gram,
                   const at::Tensor* grad_output, at::Tensor* grad) {
  TORCH_CHECK(rows_applies(x, g, grad_output ? grad_output->size(1) : 0),
              "im2col_gram: the rows algorithm needs stride 1 and an output row that fits a "
              "panel; got stride [", g.sh, ", ", g.sw, "], ", x.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "im2col_gram_cpu", [&] {
    gram_rows_impl<scalar_t, at::opmath_type<scalar_t>>(x, g, gram, grad_output, grad);
  });
}

}  // namespace consequential_ext::cpu
