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
#include <memory>
#include <vector>

#include "corr_kernel.h"
#include "gram_cpu.h"

namespace consequential_ext::cpu {
namespace {

// Bound on one pass's prefix sums (per_pass tasks × H·W·16 doubles): about a core's L2.
constexpr int64_t kPassBytes = int64_t{512} << 10;
// Work items per thread wanted, so that uneven items still balance.
constexpr int64_t kItemsPerThread = 4;

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

  // Z[y][x][b][c][lane]. Not zero-filled (that alone cost more than the products on a
  // 32×96×32×32 map): every element is written once below, pad lanes with 0.
  std::unique_ptr<acc_t[]> zbuf(new acc_t[H * W * pix]);
  acc_t* const Z = zbuf.get();
  const src_t* src = x.const_data_ptr<src_t>();
  const int64_t sb = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
  // One (b, y) input row at a time. channels_last: read along the channels. Otherwise a
  // lanes × W transpose through a block of kCorrAlign rows (channel rows H·W apart, and Z's
  // pixels pix apart, are often a multiple of 4 KiB apart: one L1 set).
  const bool channels_fastest = sc < sx;
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> tile(kCorrAlign * W);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t y = r / B, b = r % B;  // y outer: a y's Z rows stay in cache till written
      for (int64_t c = 0; c < Cg; ++c) {
        const src_t* s = src + b * sb + c * sc + y * sy;
        acc_t* z = Z + y * W * pix + (b * Cg + c) * Lp;
        for (int64_t l0 = 0; l0 < Lp; l0 += kCorrAlign) {
          const int64_t nl = std::clamp<int64_t>(g.groups - l0, 0, kCorrAlign);
          acc_t* const t = tile.data();
          if (channels_fastest) {
            for (int64_t xx = 0; xx < W; ++xx)
              for (int64_t l = 0; l < nl; ++l)
                t[xx * kCorrAlign + l] = static_cast<acc_t>(s[xx * sx + (l0 + l) * Cg * sc]);
          } else {
            for (int64_t l = 0; l < nl; ++l) {
              const src_t* sl = s + (l0 + l) * Cg * sc;
              for (int64_t xx = 0; xx < W; ++xx)
                t[xx * kCorrAlign + l] = static_cast<acc_t>(sl[xx * sx]);
            }
          }
          for (int64_t xx = 0; xx < W; ++xx) {
            std::fill(t + xx * kCorrAlign + nl, t + (xx + 1) * kCorrAlign, acc_t(0));
            std::copy_n(t + xx * kCorrAlign, kCorrAlign, z + xx * pix + l0);
          }
        }
      }
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

  // Positions where some tap pair lies wholly in the image, per task (stride > 1: only the
  // input phases taps visit).
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  std::vector<std::vector<char>> rows_used(ntasks, std::vector<char>(H)),
      cols_used(ntasks, std::vector<char>(W));
  for (int64_t t = 0; t < ntasks; ++t) {
    const auto [a, b, c1, c2] = tasks[t];
    const bool bias_task = c2 < 0;
    for (int64_t i = 0; i + a < g.kh; ++i) {
      Lattice r = lattice(H, i, g.sh, g.dh, g.ph, Ho);
      if (!bias_task) r = r & lattice(H, i + a, g.sh, g.dh, g.ph, Ho);
      for (int64_t o = r.first; o <= r.last; ++o) rows_used[t][o * g.sh + g.dh * i - g.ph] = 1;
    }
    for (int64_t j = std::max<int64_t>(0, -b); j < g.kw && j + b < g.kw; ++j) {
      Lattice c = lattice(W, j, g.sw, g.dw, g.pw, Wo);
      if (!bias_task) c = c & lattice(W, j + b, g.sw, g.dw, g.pw, Wo);
      for (int64_t o = c.first; o <= c.last; ++o) cols_used[t][o * g.sw + g.dw * j - g.pw] = 1;
    }
  }

  // Work items: one block of kCorrAlign lanes × a pass over some of the tasks. A pass sweeps
  // the rows once, every task of the pass per row, so the few rows of the block's Z that a
  // row's products read stay in L2 for all of them (task after task over all of Z read
  // B·Cg·Lp floats per pixel twice per task from memory: 350 MB for a 32×96×32×32 3×3
  // stride-2 depthwise Gram). The passes bound the prefix sums' memory per thread, and split
  // the tasks where there are few lane blocks per thread.
  constexpr int64_t LB = kCorrAlign;
  const int64_t lane_blocks = Lp / LB, plane = H * W * LB;
  int64_t per_pass =
      std::clamp<int64_t>(kPassBytes / (plane * int64_t{sizeof(double)}), 1, ntasks);
  const int64_t threads = at::get_num_threads();
  const int64_t want = (kItemsPerThread * threads + lane_blocks - 1) / lane_blocks;
  const int64_t passes_wanted =
      std::min(ntasks, std::max((ntasks + per_pass - 1) / per_pass, want));
  per_pass = (ntasks + passes_wanted - 1) / passes_wanted;
  const int64_t passes = (ntasks + per_pass - 1) / per_pass;

  // out[p][q][lane], transposed into gram at the end.
  std::vector<acc_t> out(D * D * Lp, acc_t(0));
  const std::vector<acc_t> ones(LB, acc_t(1));  // the bias "partner", read with stride 0
  at::parallel_for(0, lane_blocks * passes, 1, [&](int64_t w0, int64_t w1) {
    // Prefix sums in double: a look-up is a difference of sums over up to the whole map,
    // and a corner tap's entry can be far smaller than those sums.
    // Not zero-filled: the row sweep writes every element.
    std::unique_ptr<double[]> S_buf(new double[per_pass * plane]);
    double* const S = S_buf.get();
    std::vector<acc_t> m_row(W * LB);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t l0 = (w / passes) * LB, t0 = (w % passes) * per_pass;
      const int64_t t1 = std::min(ntasks, t0 + per_pass);
      // M into S (zero where unused or where the partner is padding), row by row.
      for (int64_t y = 0; y < H; ++y)
        for (int64_t t = t0; t < t1; ++t) {
          const auto [a, b, c1, c2] = tasks[t];
          const bool bias_task = c2 < 0;
          const int64_t dy = g.dh * a, dx = g.dw * b;
          const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = std::min(W, W - dx);
          double* s_row = S + (t - t0) * plane + y * W * LB;
          std::fill(s_row, s_row + W * LB, 0.0);
          if (!rows_used[t][y] || y + dy >= H) continue;
          std::fill(m_row.begin(), m_row.end(), acc_t(0));
          for (int64_t xx = x_lo; xx < x_hi; ++xx) {
            if (!cols_used[t][xx]) continue;
            const acc_t* l = Z + (y * W + xx) * pix + c1 * Lp + l0;
            if (bias_task)
              lane_dot(m_row.data() + xx * LB, l, ones.data(), B, Cg * Lp, 0, LB);
            else
              lane_dot(m_row.data() + xx * LB, l, Z + ((y + dy) * W + xx + dx) * pix + c2 * Lp + l0,
                       B, Cg * Lp, Cg * Lp, LB);
          }
          for (int64_t e = x_lo * LB; e < x_hi * LB; ++e) s_row[e] = m_row[e];
        }
      for (int64_t t = t0; t < t1; ++t) {
        const auto [a, b, c1, c2] = tasks[t];
        const bool bias_task = c2 < 0;
        double* const St = S + (t - t0) * plane;
        // Strided prefix sums, rows then columns.
        for (int64_t y = g.sh; y < H; ++y) {
          double* cur = St + y * W * LB;
          const double* prev = cur - g.sh * W * LB;
          for (int64_t e = 0; e < W * LB; ++e) cur[e] += prev[e];
        }
        for (int64_t y = 0; y < H; ++y)
          for (int64_t xx = g.sw; xx < W; ++xx) {
            double* cur = St + (y * W + xx) * LB;
            const double* prev = cur - g.sw * LB;
            for (int64_t l = 0; l < LB; ++l) cur[l] += prev[l];
          }
        // Look-ups: Σ over the output indices at which tap (i, j) and its partner both lie
        // in the image (a strided rectangle of positions; entries the padding zeroes stay 0).
        auto at = [&](int64_t y, int64_t xx) -> const double* {
          return y < 0 || xx < 0 ? nullptr : St + (y * W + xx) * LB;
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
            acc_t* o = out.data() + (p * D + q) * Lp + l0;
            if (r.first <= r.last && c.first <= c.last) {
              const int64_t y0 = r.first * g.sh + g.dh * i - g.ph, y1 = r.last * g.sh + g.dh * i - g.ph;
              const int64_t x0 = c.first * g.sw + g.dw * j - g.pw, x1 = c.last * g.sw + g.dw * j - g.pw;
              const double* s11 = at(y1, x1);
              const double* s01 = at(y0 - g.sh, x1);
              const double* s10 = at(y1, x0 - g.sw);
              const double* s00 = at(y0 - g.sh, x0 - g.sw);
              for (int64_t l = 0; l < LB; ++l)
                o[l] = static_cast<acc_t>(s11[l] - (s01 ? s01[l] : 0.0) - (s10 ? s10[l] : 0.0) +
                                          (s00 ? s00[l] : 0.0));
            }
            if (p != q) std::copy(o, o + LB, out.data() + (q * D + p) * Lp + l0);
          }
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
