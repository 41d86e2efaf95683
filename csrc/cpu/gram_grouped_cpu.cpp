// im2col Gram of convolutions with few channels per group (depthwise and small groups), any
// stride / dilation / padding, with the groups in SIMD lanes: hundreds of tiny systems are
// one vector loop, not a loop of tiny products.
//
// Maths. For a tap difference (a, b) and channels (c1, c2) of one group let
//   M(y, x) = Σ_batch x[c1](y, x) · x[c2](y + dh·a, x + dw·b)   (0 if the partner is padding).
// Gram entry ((c1, i, j), (c2, i + a, j + b)) is the sum of M over the positions the tap
// (i, j) visits: the lattice y = oy·sh + dh·i − ph, x = ox·sw + dw·j − pw clipped to the
// image, i.e. a strided rectangle. With strided prefix sums S(y, x) = M(y, x) + S(y − sh, x)
// + S(y, x − sw) − S(y − sh, x − sw) every such rectangle is four look-ups. So each (a, b,
// c1, c2) costs one pass of B·H·W products (stride 1: (2k−1)²/2 passes instead of the k⁴/2
// products per patch of im2col) plus D² look-ups; with stride s only the input phases some
// tap visits are multiplied. Differences with a < 0 (or a = 0, b < 0; or a = b = 0 and
// c1 > c2) are the mirrored entries and are not computed.
//
// Layout. The input is converted once into Z[y][x][batch][c][lane] (lane = group, padded
// to a whole number of vectors), so M at one pixel is a batch-long dot product per lane
// vector; the result is gathered into out[p][q][lane] and transposed to (groups, D, D) by
// one strided copy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "corr_kernel.h"
#include "gram_cpu.h"

namespace consequential_ext::cpu {
namespace {

struct Task {
  int64_t a, b, c1, c2;  // c2 < 0: the bias column (Σ x over each tap's positions)
};

// Output indices [first, last] at which tap i (along one axis) lies inside [0, n);
// first > last when it only ever sees padding.
struct Lattice {
  int64_t first, last;
  Lattice operator&(const Lattice& o) const { return {std::max(first, o.first), std::min(last, o.last)}; }
};
Lattice lattice(int64_t n, int64_t i, int64_t stride, int64_t dil, int64_t pad, int64_t out) {
  const int64_t base = dil * i - pad;  // position at output index 0
  const int64_t first = base >= 0 ? 0 : (-base + stride - 1) / stride;
  const int64_t last = n - 1 - base >= 0 ? std::min(out - 1, (n - 1 - base) / stride) : -1;
  return {first, last};
}

template <typename src_t, typename acc_t>
void gram_grouped_impl(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  const int64_t B = x.size(0), Cg = x.size(1) / g.groups, H = x.size(2), W = x.size(3);
  const int64_t Lp = round_up(g.groups, kCorrAlign), kk = g.kh * g.kw, d0 = Cg * kk;
  const int64_t D = gram.size(-1), Ho = g.out_h(H), Wo = g.out_w(W);
  const int64_t pix = B * Cg * Lp;  // Z elements per pixel

  // Z[y][x][b][c][lane]; pad lanes stay zero.
  std::vector<acc_t> zbuf(H * W * pix, acc_t(0));
  acc_t* Z = zbuf.data();
  const src_t* src = x.const_data_ptr<src_t>();
  const int64_t sb = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
  at::parallel_for(0, H, 1, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t xx = 0; xx < W; ++xx)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < Cg; ++c) {
            const src_t* s = src + b * sb + c * sc + y * sy + xx * sx;
            acc_t* z = Z + (y * W + xx) * pix + (b * Cg + c) * Lp;
            for (int64_t l = 0; l < g.groups; ++l) z[l] = static_cast<acc_t>(s[l * Cg * sc]);
          }
  });

  std::vector<Task> tasks;
  for (int64_t a = 0; a < g.kh; ++a)
    for (int64_t b = 1 - g.kw; b < g.kw; ++b) {
      if (a == 0 && b < 0) continue;
      for (int64_t c1 = 0; c1 < Cg; ++c1)
        for (int64_t c2 = (a == 0 && b == 0) ? c1 : 0; c2 < Cg; ++c2) tasks.push_back({a, b, c1, c2});
    }
  if (g.bias)
    for (int64_t c1 = 0; c1 < Cg; ++c1) tasks.push_back({0, 0, c1, -1});

  // out[p][q][lane], transposed into gram at the end.
  std::vector<acc_t> out(D * D * Lp, acc_t(0));
  const std::vector<acc_t> ones(Lp, acc_t(1));  // the bias "partner", read with stride 0
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    // Prefix sums in double: a look-up is a difference of sums over up to the whole map,
    // and a corner tap's entry can be far smaller than those sums.
    std::vector<double> S(H * W * Lp);
    std::vector<acc_t> m_row(W * Lp);
    std::vector<char> row_used(H), col_used(W);
    for (int64_t t = t0; t < t1; ++t) {
      const auto [a, b, c1, c2] = tasks[t];
      const bool bias_task = c2 < 0;
      const int64_t dy = g.dh * a, dx = g.dw * b;
      // Positions where some tap pair lies wholly in the image (stride > 1: only the input
      // phases taps visit).
      std::fill(row_used.begin(), row_used.end(), 0);
      std::fill(col_used.begin(), col_used.end(), 0);
      for (int64_t i = 0; i + a < g.kh; ++i) {
        Lattice r = lattice(H, i, g.sh, g.dh, g.ph, Ho);
        if (!bias_task) r = r & lattice(H, i + a, g.sh, g.dh, g.ph, Ho);
        for (int64_t o = r.first; o <= r.last; ++o) row_used[o * g.sh + g.dh * i - g.ph] = 1;
      }
      for (int64_t j = std::max<int64_t>(0, -b); j < g.kw && j + b < g.kw; ++j) {
        Lattice c = lattice(W, j, g.sw, g.dw, g.pw, Wo);
        if (!bias_task) c = c & lattice(W, j + b, g.sw, g.dw, g.pw, Wo);
        for (int64_t o = c.first; o <= c.last; ++o) col_used[o * g.sw + g.dw * j - g.pw] = 1;
      }
      // M into S (zero where unused or where the partner is padding).
      const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = std::min(W, W - dx);
      for (int64_t y = 0; y < H; ++y) {
        double* s_row = S.data() + y * W * Lp;
        std::fill(s_row, s_row + W * Lp, 0.0);
        if (!row_used[y] || y + dy >= H) continue;
        std::fill(m_row.begin(), m_row.end(), acc_t(0));
        for (int64_t xx = x_lo; xx < x_hi; ++xx) {
          if (!col_used[xx]) continue;
          const acc_t* l = Z + (y * W + xx) * pix + c1 * Lp;
          if (bias_task)
            lane_dot(m_row.data() + xx * Lp, l, ones.data(), B, Cg * Lp, 0, Lp);
          else
            lane_dot(m_row.data() + xx * Lp, l, Z + ((y + dy) * W + xx + dx) * pix + c2 * Lp, B,
                     Cg * Lp, Cg * Lp, Lp);
        }
        for (int64_t e = x_lo * Lp; e < x_hi * Lp; ++e) s_row[e] = m_row[e];
      }
      // Strided prefix sums, rows then columns.
      for (int64_t y = g.sh; y < H; ++y) {
        double* cur = S.data() + y * W * Lp;
        const double* prev = cur - g.sh * W * Lp;
        for (int64_t e = 0; e < W * Lp; ++e) cur[e] += prev[e];
      }
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = g.sw; xx < W; ++xx) {
          double* cur = S.data() + (y * W + xx) * Lp;
          const double* prev = cur - g.sw * Lp;
          for (int64_t l = 0; l < Lp; ++l) cur[l] += prev[l];
        }
      // Look-ups: Σ over the output indices at which tap (i, j) and its partner both lie
      // in the image (a strided rectangle of positions; entries the padding zeroes stay 0).
      auto at = [&](int64_t y, int64_t xx) -> const double* {
        return y < 0 || xx < 0 ? nullptr : S.data() + (y * W + xx) * Lp;
      };
      const int64_t b_pair = bias_task ? 0 : b;
      for (int64_t i = 0; i + a < g.kh; ++i) {
        Lattice r = lattice(H, i, g.sh, g.dh, g.ph, Ho);
        if (!bias_task) r = r & lattice(H, i + a, g.sh, g.dh, g.ph, Ho);
        for (int64_t j = std::max<int64_t>(0, -b_pair); j < g.kw && j + b_pair < g.kw; ++j) {
          Lattice c = lattice(W, j, g.sw, g.dw, g.pw, Wo);
          if (!bias_task) c = c & lattice(W, j + b, g.sw, g.dw, g.pw, Wo);
          const int64_t p = c1 * kk + i * g.kw + j;
          const int64_t q = bias_task ? d0 : c2 * kk + (i + a) * g.kw + (j + b);
          acc_t* o = out.data() + (p * D + q) * Lp;
          if (r.first <= r.last && c.first <= c.last) {
            const int64_t y0 = r.first * g.sh + g.dh * i - g.ph, y1 = r.last * g.sh + g.dh * i - g.ph;
            const int64_t x0 = c.first * g.sw + g.dw * j - g.pw, x1 = c.last * g.sw + g.dw * j - g.pw;
            const double* s11 = at(y1, x1);
            const double* s01 = at(y0 - g.sh, x1);
            const double* s10 = at(y1, x0 - g.sw);
            const double* s00 = at(y0 - g.sh, x0 - g.sw);
            for (int64_t l = 0; l < Lp; ++l)
              o[l] = static_cast<acc_t>(s11[l] - (s01 ? s01[l] : 0.0) - (s10 ? s10[l] : 0.0) +
                                        (s00 ? s00[l] : 0.0));
          }
          if (p != q) std::copy(o, o + Lp, out.data() + (q * D + p) * Lp);
        }
      }
    }
  });
  if (g.bias) {
    acc_t* o = out.data() + (d0 * D + d0) * Lp;
    std::fill(o, o + Lp, static_cast<acc_t>(B * Ho * Wo));
  }
  // (D, D, lanes) → (groups, D, D)
  const auto blocked = at::from_blob(out.data(), {D, D, Lp}, gram.options());
  gram.copy_(blocked.narrow(2, 0, g.groups).permute({2, 0, 1}));
}

}  // namespace

void gram_grouped_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "im2col_gram_cpu", [&] {
    gram_grouped_impl<scalar_t, at::opmath_type<scalar_t>>(x, g, gram);
  });
}

}  // namespace consequential_ext::cpu
