// Stride-1 im2col Gram of one group through a 2-D Hartley transform (exact up to rounding).
//
// Maths. For kernel offsets a = (i, j), b = (i', j') and shift (s, t) = (i' − i, j' − j),
//   G[c, a; c', b] = Σ_{y ∈ Y_i, x ∈ X_j} Σ_n x[n, c, y, x] · x[n, c', y + dh·s, x + dw·t],
// Y_i = [dh·i − ph, dh·i − ph + Ho) ∩ [0, H) the rows offset i reads (padding adds nothing),
// X_j likewise. With E_i (F_j) the few rows (columns) Y_i (X_j) misses, by inclusion–exclusion
//   G = Full(s, t) − Σ_{y ∈ E_i} Row(y; s, t) − Σ_{x ∈ F_j} Col(x; s, t) + Σ_{y ∈ E_i, x ∈ F_j} Pix,
// Full the whole-image correlation of channels c, c' at lag (dh·s, dw·t); Row the same with the
// first factor on row y only (Col: column x; Pix: the one pixel).
//
// Full comes from the real 2-D Hartley transform Hf = Σ_{y,x} x[y, x]·cas(θ_f(y, x)),
// cas = cos + sin, of size lh × lw ≥ (H + dh·(kh−1)) × (W + dw·(kw−1)) (zero-padded, so no
// lag wraps onto a wanted one; odd, so every frequency but 0 has a distinct negative):
//   Full(l) = (1/L) [ Σ_f S_f cos θ_f(l) − Σ_{f ∈ half} (X_f − X_fᵀ) sin θ_f(l) ],
//   S_f = Σ_n H_f[n]ᵀ H_f[n],  X_f = Σ_n H_f[n]ᵀ H_{−f}[n]   (C × C each),
// from the DFT's Re X_f = (H_f + H_{−f})/2, Im X_f = (H_{−f} − H_f)/2 and the correlation
// theorem. Per image and channel pair that is 1.5·L multiply-adds against the shift form's
// (kh·(2kw−1) − kw + 1)·H·W (8×8 map, 3×3: 181 against 832), plus the transform: two small
// GEMMs (along x with cas(±θ_x), then along y: cas(a + b) = cos a·cas b + sin a·cas(−b)),
// whose cost per channel pair shrinks as C grows. The dispatch (gram_cpu.cpp) weighs both.
//
// Layout. A chunk of images is copied into Z[y][x][b][c] (channels padded to Cp): a row, a
// column strip or a pixel of every image is then one run of (batch × Cp) panels, so every
// correlation is corr_accumulate over contiguous runs, and the transform's GEMMs leave each
// frequency's (batch × Cp) panel contiguous for the per-frequency products. Work is split
// by output (frequency, piece, pixel) between threads, never by image, so no thread keeps a
// private Gram and the result is bit-identical from run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "corr_kernel.h"
#include "gram_cpu.h"

namespace consequential_ext::cpu {
namespace {

constexpr int64_t kSpectrumElems = int64_t{1} << 21;  // a chunk's spectrum: 8 MiB of float
// The transform's GEMMs have a short inner dimension (W, 2H) and run well below the
// correlation kernel's rate: their multiply-adds count this many times in the choice.
constexpr double kHartleyTransformWeight = 3.0;
// The counts above flatter the Hartley form (more, shorter passes over memory): it is chosen
// below this fraction of the shift form's count. Calibrated on 3×3 'same' layers (2 threads,
// median wall ms, shift vs hartley, 41 interleaved calls): 128×64×8×8 3.62 vs 2.78 (count
// ratio 0.52), 32×128×8×8 6.03 vs 4.67 (0.55), 32×128×16×16 16.2 vs 14.0 (0.48), 32×96×8×8
// 2.72 vs 2.78 (0.58), 32×64×16×16 3.62 vs 3.31 (0.61), 128×32×16×16 3.20 vs 3.31 (0.79),
// 32×64×32×32 13.5 vs 14.9 (0.77), 128×16×32×32 3.77 vs 6.69.
constexpr double kHartleyPrefer = 0.6;

// One spatial axis: which input positions each kernel offset's window misses.
struct Axis {
  int64_t n, k, d, p, out, len;
  std::vector<std::vector<int64_t>> missed;  // per offset
};

Axis make_axis(int64_t n, int64_t k, int64_t d, int64_t p, int64_t out) {
  Axis a{n, k, d, p, out, (n + d * (k - 1)) | 1, std::vector<std::vector<int64_t>>(k)};
  for (int64_t i = 0; i < k; ++i)
    for (int64_t pos = 0; pos < n; ++pos)
      if (pos < d * i - p || pos >= d * i - p + out) a.missed[i].push_back(pos);
  return a;
}

// The border pieces a geometry needs: Row(y; s, ·) over every t, Col(x; ·, t) over every s,
// Pix(y, x; s, t); only those whose partner row / column lies in the image (else zero).
struct Pieces {
  std::map<std::pair<int64_t, int64_t>, int64_t> row, col;   // (y, s) / (x, t) → index
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, int64_t> pix;
};

Pieces plan_pieces(const Axis& ry, const Axis& rx) {
  Pieces p;
  for (int64_t i = 0; i < ry.k; ++i)
    for (int64_t y : ry.missed[i])
      for (int64_t i2 = 0; i2 < ry.k; ++i2) {
        const int64_t s = i2 - i;
        if (y + ry.d * s >= 0 && y + ry.d * s < ry.n) p.row.emplace(std::make_pair(y, s), 0);
      }
  for (int64_t j = 0; j < rx.k; ++j)
    for (int64_t x : rx.missed[j])
      for (int64_t j2 = 0; j2 < rx.k; ++j2) {
        const int64_t t = j2 - j;
        if (x + rx.d * t >= 0 && x + rx.d * t < rx.n) p.col.emplace(std::make_pair(x, t), 0);
      }
  for (auto [key, _] : p.row)
    for (auto [ckey, __] : p.col) {
      const auto [y, s] = key;
      const auto [x, t] = ckey;
      p.pix.emplace(std::make_tuple(y, x, s, t), 0);
    }
  int64_t n = 0;
  for (auto& e : p.row) e.second = n++;
  n = 0;
  for (auto& e : p.col) e.second = n++;
  n = 0;
  for (auto& e : p.pix) e.second = n++;
  return p;
}

// The transform bases and lag tables of one geometry, built once (they cost more than a
// small Gram's GEMMs): along_x (2·lw × W), rows cas(θ_x) then cas(−θ_x); along_y
// (lh × 2H) on the (row, ±) pairs, [cos θ_y, sin θ_y]; cos (lags × L) and sin (lags × half),
// the latter −sin, both divided by L.
struct Tables {
  at::Tensor along_x, along_y, cos, sin;
};

std::vector<int64_t> half_set(int64_t lh, int64_t lw) {
  std::vector<int64_t> half;
  for (int64_t f2 = 1; f2 <= lw / 2; ++f2) half.push_back(f2);
  for (int64_t f = lw; f < (lh / 2 + 1) * lw; ++f) half.push_back(f);
  return half;
}

const Tables& tables(int64_t H, int64_t W, int64_t lh, int64_t lw, const PatchGeometry& g,
                     at::ScalarType dtype) {
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, Tables> cache;
  const std::vector<int64_t> key{H, W, lh, lw, g.kh, g.kw, g.dh, g.dw, int64_t(dtype)};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  auto along_x = at::empty({2, lw, W}, dbl), along_y = at::empty({lh, H, 2}, dbl);
  auto ax = along_x.accessor<double, 3>();
  for (int64_t f = 0; f < lw; ++f)
    for (int64_t p = 0; p < W; ++p) {
      const double th = 2 * M_PI * double(f * p % lw) / double(lw);
      ax[0][f][p] = std::cos(th) + std::sin(th);
      ax[1][f][p] = std::cos(th) - std::sin(th);
    }
  auto ay = along_y.accessor<double, 3>();
  for (int64_t f = 0; f < lh; ++f)
    for (int64_t p = 0; p < H; ++p) {
      const double th = 2 * M_PI * double(f * p % lh) / double(lh);
      ay[f][p][0] = std::cos(th);
      ay[f][p][1] = std::sin(th);
    }
  const int64_t S = 2 * g.kh - 1, T = 2 * g.kw - 1, L = lh * lw;
  const std::vector<int64_t> half = half_set(lh, lw);
  auto cos_t = at::empty({S * T, L}, dbl), sin_t = at::empty({S * T, int64_t(half.size())}, dbl);
  auto ct = cos_t.accessor<double, 2>();
  auto st = sin_t.accessor<double, 2>();
  for (int64_t li = 0; li < S * T; ++li) {
    const int64_t ls = (li / T - (g.kh - 1)) * g.dh, lt = (li % T - (g.kw - 1)) * g.dw;
    auto theta = [&](int64_t f) {
      return 2 * M_PI * (double(((f / lw * ls) % lh + lh) % lh) / double(lh) +
                         double(((f % lw * lt) % lw + lw) % lw) / double(lw));
    };
    for (int64_t f = 0; f < L; ++f) ct[li][f] = std::cos(theta(f)) / double(L);
    for (size_t h = 0; h < half.size(); ++h) st[li][h] = -std::sin(theta(half[h])) / double(L);
  }
  Tables t{along_x.reshape({2 * lw, W}).to(dtype), along_y.reshape({lh, 2 * H}).to(dtype),
           cos_t.to(dtype), sin_t.to(dtype)};
  return cache.emplace(key, std::move(t)).first->second;
}

template <typename src_t, typename acc_t>
void gram_hartley_impl(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cp = round_up(C, kCorrAlign), cell = Cp * Cp;
  const int64_t kk = g.kh * g.kw, d0 = C * kk, D = gram.size(-1);
  const Axis ry = make_axis(H, g.kh, g.dh, g.ph, g.out_h(H));
  const Axis rx = make_axis(W, g.kw, g.dw, g.pw, g.out_w(W));
  const int64_t lh = ry.len, lw = rx.len, L = lh * lw;
  const int64_t S = 2 * g.kh - 1, T = 2 * g.kw - 1, nlag = S * T;
  const auto opts = gram.options();

  const Tables& tab = tables(H, W, lh, lw, g, gram.scalar_type());

  // Accumulators, each owned by one thread per chunk: S_f for every frequency, X_f for the
  // half set f = (0, 1…lw/2), (1…lh/2, every f2) (flat index f1·lw + f2, negative
  // (−f1 mod lh)·lw + (−f2 mod lw)), and the border pieces.
  const std::vector<int64_t> half = half_set(lh, lw);
  auto negative = [&](int64_t f) {
    return ((lh - f / lw) % lh) * lw + (lw - f % lw) % lw;
  };
  const Pieces pieces = plan_pieces(ry, rx);
  const int64_t nrow = pieces.row.size(), ncol = pieces.col.size(), npix = pieces.pix.size();
  auto self_acc = at::zeros({L, cell}, opts);
  auto cross_acc = at::zeros({int64_t(half.size()), cell}, opts);
  auto border_acc = at::zeros({nrow * T + ncol * S + npix, cell}, opts);
  std::vector<double> sums(H * W * C, 0.0);      // Σ_n x per pixel and channel (bias row)

  struct Task {    // one border piece: L, R offsets into Z, run shape, output cell
    int64_t l, r, n_outer, outer_stride, n_inner, out;
  };
  const int64_t chunk = std::max<int64_t>(1, std::min(B, kSpectrumElems / (L * Cp)));
  auto z = at::empty({H, W, chunk, Cp}, opts);
  auto spec = at::empty({L * chunk * Cp}, opts);            // (lh, lw, n)
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t bc = std::min(chunk, B - b0), n = bc * Cp;
    auto zc = z.narrow(2, 0, bc);
    if (bc < chunk) zc = zc.contiguous();
    acc_t* Z = zc.data_ptr<acc_t>();
    // Copy in (converted to acc_t, channels zero-padded), one image row per task.
    const src_t* src = x.const_data_ptr<src_t>();
    const int64_t sb = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
    at::parallel_for(0, H * bc, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        const int64_t y = e / bc, b = e % bc;
        for (int64_t p = 0; p < W; ++p) {
          acc_t* dst = Z + ((y * W + p) * bc + b) * Cp;
          const src_t* s0 = src + (b0 + b) * sb + y * sy + p * sx;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(s0[c * sc]);
          std::fill(dst + C, dst + Cp, acc_t(0));
        }
      }
    });

    // The spectrum, (L, bc, Cp): along x (H GEMMs of 2lw × W × n), then along y (one GEMM).
    // Threads take column blocks (whole images), through both steps while cached.
    const acc_t* bx = tab.along_x.const_data_ptr<acc_t>();
    const acc_t* by = tab.along_y.const_data_ptr<acc_t>();
    acc_t* Hs = spec.data_ptr<acc_t>();
    const int64_t per_block = std::max<int64_t>(1, 64 / Cp) * Cp;
    at::parallel_for(0, (n + per_block - 1) / per_block, 1, [&](int64_t lo, int64_t hi) {
      // The block's (H, 2lw, block) intermediate, private and cache-resident.
      acc_t* A = scratch<acc_t, 0>(H * 2 * lw * per_block);
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t c0 = blk * per_block, w = std::min(n, c0 + per_block) - c0;
        for (int64_t y = 0; y < H; ++y)
          panel_product(A + y * 2 * lw * w, w, bx, W, Z + y * W * n + c0, n, 2 * lw, W, w);
        for (int64_t f2 = 0; f2 < lw; ++f2)   // rows (y, ±) of this f2: 2H rows lw·w apart
          panel_product(Hs + f2 * n + c0, lw * n, by, 2 * H, A + f2 * w, lw * w, lh, 2 * H, w);
      }
    });
    acc_t* Sa = self_acc.data_ptr<acc_t>();
    acc_t* Xa = cross_acc.data_ptr<acc_t>();
    const int64_t nhalf = half.size();
    at::parallel_for(0, L + nhalf, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        if (e < L) {    // S_f is symmetric: its blocks on and above the diagonal
          const acc_t* h = Hs + e * n;
          for (int64_t m0 = 0; m0 < Cp; m0 += kCorrAlign)
            corr_accumulate(Sa + e * cell + m0 * Cp + m0, Cp, h + m0, h + m0, kCorrAlign,
                            Cp - m0, 1, 0, bc, Cp);
        } else {
          const int64_t f = half[e - L];
          corr_accumulate(Xa + (e - L) * cell, Cp, Hs + f * n, Hs + negative(f) * n, Cp, Cp,
                          1, 0, bc, Cp);
        }
      }
    });

    // Border pieces straight from Z (partner positions clipped to the image).
    std::vector<Task> tasks;
    const int64_t row_len = W * n;
    for (auto [key, idx] : pieces.row) {
      const auto [y, s] = key;
      for (int64_t ti = s == 0 ? g.kw - 1 : 0; ti < T; ++ti) {   // s = 0: t < 0 mirrored
        const int64_t t = ti - (g.kw - 1);
        const int64_t x0 = std::max<int64_t>(0, -g.dw * t), x1 = std::min(W, W - g.dw * t);
        if (x0 >= x1) continue;
        tasks.push_back({y * row_len + x0 * n, (y + g.dh * s) * row_len + (x0 + g.dw * t) * n,
                         1, 0, (x1 - x0) * bc, idx * T + ti});
      }
    }
    for (auto [key, idx] : pieces.col) {
      const auto [p, t] = key;
      for (int64_t si = t == 0 ? g.kh - 1 : 0; si < S; ++si) {   // t = 0: s < 0 mirrored
        const int64_t s = si - (g.kh - 1);
        const int64_t y0 = std::max<int64_t>(0, -g.dh * s), y1 = std::min(H, H - g.dh * s);
        if (y0 >= y1) continue;
        tasks.push_back({y0 * row_len + p * n, (y0 + g.dh * s) * row_len + (p + g.dw * t) * n,
                         y1 - y0, row_len, bc, nrow * T + idx * S + si});
      }
    }
    for (auto [key, idx] : pieces.pix) {
      const auto [y, p, s, t] = key;
      tasks.push_back({y * row_len + p * n, (y + g.dh * s) * row_len + (p + g.dw * t) * n, 1, 0,
                       bc, nrow * T + ncol * S + idx});
    }
    acc_t* Ba = border_acc.data_ptr<acc_t>();
    at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        const Task& k = tasks[e];
        corr_accumulate(Ba + k.out * cell, Cp, Z + k.l, Z + k.r, Cp, Cp, k.n_outer,
                        k.outer_stride, k.n_inner, Cp);
      }
    });

    if (g.bias)
      at::parallel_for(0, H * W, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t e = lo; e < hi; ++e)
          for (int64_t b = 0; b < bc; ++b) {
            const acc_t* zp = Z + (e * bc + b) * Cp;
            for (int64_t c = 0; c < C; ++c) sums[e * C + c] += zp[c];
          }
      });
  }

  // Row(y; 0, −t) = Row(y; 0, t)ᵀ and Col(x; −s, 0) = Col(x; s, 0)ᵀ (the same pairs of
  // positions, factors swapped): filled by transposing.
  {
    std::vector<std::pair<int64_t, int64_t>> mirrors;  // (destination, source) cells
    for (auto [key, idx] : pieces.row)
      if (key.second == 0)
        for (int64_t t = 1; t < g.kw; ++t)
          mirrors.push_back({idx * T + g.kw - 1 - t, idx * T + g.kw - 1 + t});
    for (auto [key, idx] : pieces.col)
      if (key.second == 0)
        for (int64_t s = 1; s < g.kh; ++s)
          mirrors.push_back({nrow * T + idx * S + g.kh - 1 - s, nrow * T + idx * S + g.kh - 1 + s});
    acc_t* Ba = border_acc.data_ptr<acc_t>();
    for (auto [dst, src] : mirrors)
      for (int64_t c = 0; c < Cp; ++c)
        for (int64_t c2 = 0; c2 < Cp; ++c2) Ba[dst * cell + c * Cp + c2] = Ba[src * cell + c2 * Cp + c];
  }

  // Full at every lag (s, t), s-major, 1/L folded into the tables: Σ_f cos·S_f is
  // symmetric in (c, c') (only S_f's upper blocks were accumulated: mirrored after the
  // GEMM), Σ_half −sin·(X_f − X_fᵀ) antisymmetric (the GEMM on X_f, then minus its transpose).
  const auto even = at::mm(tab.cos, self_acc), odd = at::mm(tab.sin, cross_acc);
  auto lags = at::empty({nlag, cell}, opts);
  {
    const acc_t* ev = even.const_data_ptr<acc_t>();
    const acc_t* od = odd.const_data_ptr<acc_t>();
    acc_t* r = lags.data_ptr<acc_t>();
    // In 16 × 16 tiles, so the transposed reads stay cached.
    at::parallel_for(0, nlag, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t l = lo; l < hi; ++l)
        for (int64_t ct = 0; ct < Cp; ct += kCorrAlign)
          for (int64_t c2t = 0; c2t < Cp; c2t += kCorrAlign)
            for (int64_t c = ct; c < ct + kCorrAlign; ++c)
              for (int64_t c2 = c2t; c2 < c2t + kCorrAlign; ++c2) {
                const int64_t e = l * cell + c * Cp + c2, et = l * cell + c2 * Cp + c;
                r[e] = (c2 < c ? ev[et] : ev[e]) + od[e] - od[et];
              }
    });
  }
  const acc_t* lag = lags.const_data_ptr<acc_t>();
  const acc_t* border = border_acc.const_data_ptr<acc_t>();

  // Assembly, one output row (c, a) at a time: per block (a, b) the lag table minus the
  // pieces of the rows / columns window a misses.
  struct Source {
    const acc_t* table;
    acc_t sign;
  };
  std::vector<std::vector<Source>> block(kk * kk);
  for (int64_t a = 0; a < kk; ++a)
    for (int64_t b = 0; b < kk; ++b) {
      const int64_t i = a / g.kw, j = a % g.kw, s = b / g.kw - i, t = b % g.kw - j;
      auto& src = block[a * kk + b];
      src.push_back({lag + ((s + g.kh - 1) * T + t + g.kw - 1) * cell, acc_t(1)});
      for (int64_t y : ry.missed[i]) {
        auto it = pieces.row.find({y, s});
        if (it != pieces.row.end())
          src.push_back({border + (it->second * T + t + g.kw - 1) * cell, acc_t(-1)});
        for (int64_t p : rx.missed[j]) {
          auto ip = pieces.pix.find({y, p, s, t});
          if (ip != pieces.pix.end())
            src.push_back({border + (nrow * T + ncol * S + ip->second) * cell, acc_t(1)});
        }
      }
      for (int64_t p : rx.missed[j]) {
        auto it = pieces.col.find({p, t});
        if (it != pieces.col.end())
          src.push_back({border + (nrow * T + it->second * S + s + g.kh - 1) * cell, acc_t(-1)});
      }
    }
  acc_t* G = gram.data_ptr<acc_t>();
  // Upper triangle only (entry (c2, b) with c2·kk + b >= c·kk + a); the lower one is its
  // mirror, copied in 32 × 32 tiles so the column reads stay in cache.
  at::parallel_for(0, C, 1, [&](int64_t c_lo, int64_t c_hi) {
    for (int64_t c = c_lo; c < c_hi; ++c)
      for (int64_t a = 0; a < kk; ++a) {
        acc_t* row = G + (c * kk + a) * D;
        for (int64_t b = 0; b < kk; ++b) {
          const auto& src = block[a * kk + b];
          for (int64_t c2 = b < a ? c + 1 : c; c2 < C; ++c2) {
            acc_t v = 0;
            for (const Source& e : src) v += e.sign * e.table[c * Cp + c2];
            row[c2 * kk + b] = v;
          }
        }
      }
  });
  constexpr int64_t kTile = 32;
  const int64_t tiles = (d0 + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t pt = lo; pt < hi; ++pt)
      for (int64_t qt = 0; qt <= pt; ++qt)
        for (int64_t p = pt * kTile; p < std::min(d0, (pt + 1) * kTile); ++p)
          for (int64_t q = qt * kTile; q < std::min(p, (qt + 1) * kTile); ++q)
            G[p * D + q] = G[q * D + p];
  });

  if (g.bias) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          double sum = 0;
          for (int64_t y = std::max<int64_t>(0, g.dh * i - g.ph);
               y < std::min(H, g.dh * i - g.ph + ry.out); ++y)
            for (int64_t p = std::max<int64_t>(0, g.dw * j - g.pw);
                 p < std::min(W, g.dw * j - g.pw + rx.out); ++p)
              sum += sums[(y * W + p) * C + c];
          const int64_t q = c * kk + i * g.kw + j;
          G[q * D + d0] = G[d0 * D + q] = static_cast<acc_t>(sum);
        }
    G[d0 * D + d0] = static_cast<acc_t>(B * ry.out * rx.out);
  }
}

}  // namespace

bool gram_prefers_hartley(int64_t B, int64_t C, int64_t H, int64_t W, const PatchGeometry& g) {
  if (g.groups != 1 || g.sh != 1 || g.sw != 1) return false;
  const Axis ry = make_axis(H, g.kh, g.dh, g.ph, g.out_h(H));
  const Axis rx = make_axis(W, g.kw, g.dw, g.pw, g.out_w(W));
  const Pieces p = plan_pieces(ry, rx);
  const double Cp = double(round_up(C, kCorrAlign)), lh = double(ry.len), lw = double(rx.len);
  const double kk = double(g.kh * g.kw), lags = double((2 * g.kh - 1) * (2 * g.kw - 1));
  // Multiply-adds per image and channel pair: per-frequency products, the transform, the
  // border pieces, and (spread over the batch) the lag GEMMs and the assembly.
  const double hartley = 1.5 * lh * lw +
                         kHartleyTransformWeight * (2 * lw * W * H + 2 * H * lw * lh) / Cp +
                         double(p.row.size()) * (2 * g.kw - 1) * W +
                         double(p.col.size()) * (2 * g.kh - 1) * H + double(p.pix.size()) +
                         (lags * 1.5 * lh * lw + 3 * kk * kk) / double(B);
  // The shift form: one correlation over the image per shift plus border-column strips.
  int64_t border_cols = 0;
  for (int64_t x = 0; x < W; ++x)
    for (int64_t j = 0; j < g.kw; ++j)
      if (std::find(rx.missed[j].begin(), rx.missed[j].end(), x) != rx.missed[j].end()) {
        ++border_cols;
        break;
      }
  const double shifts = double(g.kh * (2 * g.kw - 1) - (g.kw - 1));
  return hartley < kHartleyPrefer * shifts * double(H * W + border_cols * H);
}

void gram_hartley_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  TORCH_CHECK(g.groups == 1 && g.sh == 1 && g.sw == 1,
              "im2col_gram: the Hartley algorithm needs stride 1 and groups 1");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "im2col_gram_cpu", [&] {
    gram_hartley_impl<scalar_t, at::opmath_type<scalar_t>>(x, g, gram);
  });
}

}  // namespace consequential_ext::cpu
