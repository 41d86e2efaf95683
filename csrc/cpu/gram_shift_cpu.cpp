// Stride-1 im2col Gram from shifted channel correlations (exact; no im2col matrix).
//
// Maths. For a shift (s, t) let π(y, x) = Σ_b x_b[:, y, x] · x_b[:, y + dh·s, x + dw·t]ᵀ
// (C × C; zero where the partner pixel lies outside the image: the zero padding). The Gram
// block of kernel offsets (i, j) and (i + s, j + t) is Σ π(y, x) over the first factor's
// positions y ∈ Y_i = [dh·i − ph, dh·i − ph + Ho), x ∈ X_j (clipped to the image). All
// windows Y_i contain one core range of rows; the ≤ 2·dh·(kh−1) rows outside it are "border
// rows", each a row class of its own, the core is one more (likewise for columns). With
//   S[rc][core] = Σ_{y ∈ rc, core x} π     one contiguous correlation per row class,
//   S[rc][x]    = Σ_{y ∈ rc} π(y, x)       a thin strip per border column x,
// every block is  Σ_{rc ⊆ Y_i} ( S[rc][core] + Σ_{border x ∈ X_j} S[rc][x] ). A strip whose
// partner column x + dw·t lies outside the image is zero and never computed, so each pixel
// pair with both pixels in the image is multiplied once (3×3 'same' on 8×8: 610 products
// per image and channel pair, Σ (8 − s)(8 − |t|) over the 13 shifts). Each piece is
// added into the blocks it belongs to as soon as it is computed, so the only memory beyond
// the output is the chunk copy below and a few pieces per thread.
// Blocks with s < 0 (or s = 0, t < 0) are transposes of blocks with the opposite shift, so
// only kh·(2kw−1) − (kw−1) shifts are correlated (13 for 3×3, instead of 81 blocks).
//
// Layout. A chunk of Bc images of one group is copied (converted to acc_t) into
// Z[y][x][b][c]: pixel-major, then batch, then channels padded to Cp (zeros), pixels Cs ≥ Cp
// apart. Each row is followed by dw·(kw−1) unused columns, so that rows are not a power of two
// of bytes apart (measured: a 128×32×16×16 Gram took 1.3–1.5× as long without them, the
// shifted panels evicting each other from cache). A shift is one constant flat offset
// δ = (dh·s·Wz + dw·t)·Bc pixels, and every run correlated has its partners inside the image
// (rows and columns are clipped to that), so no padding is read: each correlation is a
// (K × Cp)ᵀ·(K × Cp) product over evenly spaced runs.
//
// Weight gradient. Given the output gradient dZ, G = dZ Xᵀ comes from the same chunks: dZ is
// copied like x (Zy, the same strides; rows at least Wo wide), and G's block of kernel offset
// (i, j) is Σ over output pixels p of dZ(p) · x(p + (dh·i − ph, dw·j − pw))ᵀ — per output row
// one correlation of its run with the input run it multiplies, clipped to pixels whose partner
// is in the image (3×3 'same' on 8×8: 484 products per image and channel pair). Without a
// Gram (gram undefined) only G is computed: the chunk copies and these correlations.
//
// 3×3, dilation 1. The core rows × core columns piece of every shift and G over the output
// pixels come from 2 × 2 tiles in Winograd form (lag_winograd.h: 25 products per 4 pixels
// for the 13 shifts instead of 52, 16 for G's 9 offsets instead of 36); an odd last core (or
// output) row or column, and the border classes, stay direct. Measured in one process, the
// two forms interleaved (1 thread, CPU time, ×128): the Gram and G 0.96× on 16 channels
// 32×32, 0.86× on 32 on 16×16, 0.81× on 64 on 8×8 — on 16 channels the transforms cost
// nearly what the products save.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "corr_kernel.h"
#include "gram_cpu.h"
#include "image_copy.h"
#include "lag_winograd.h"

namespace consequential_ext::cpu {
namespace {

constexpr int64_t kChunkElems = int64_t{1} << 18;  // bound on one thread's chunk copy
constexpr int64_t kBlockElems = int64_t{1} << 14;  // K-block: L2-resident with its shifts

struct Range {
  int64_t begin, end;
};

// First-factor positions along one axis, grouped into classes that lie wholly inside or
// wholly outside each kernel offset's window.
struct AxisClasses {
  std::vector<Range> classes;   // in order, covering [0, n)
  std::vector<char> is_core;    // per class: inside every window
  std::vector<int64_t> border;  // border positions (each one class)
  int64_t core0 = 0, core1 = 0;  // the core class [core0, core1), empty when there is none
  int64_t d, p, out;             // dilation, padding, output size

  bool inside(int64_t pos, int64_t i) const { return pos >= d * i - p && pos < d * i - p + out; }
  bool class_inside(size_t cls, int64_t i) const {
    return is_core[cls] || inside(classes[cls].begin, i);
  }
};

AxisClasses axis_classes(int64_t n, int64_t k, int64_t d, int64_t p, int64_t out) {
  AxisClasses a;
  a.d = d;
  a.p = p;
  a.out = out;
  const int64_t core0 = std::clamp(d * (k - 1) - p, int64_t{0}, n);
  const int64_t core1 = std::clamp(n + p - d * (k - 1), int64_t{0}, n);
  auto add_border = [&](int64_t pos) {
    a.classes.push_back({pos, pos + 1});
    a.is_core.push_back(0);
    a.border.push_back(pos);
  };
  if (core0 < core1) {
    for (int64_t pos = 0; pos < core0; ++pos) add_border(pos);
    a.core0 = core0;
    a.core1 = core1;
    a.classes.push_back({core0, core1});
    a.is_core.push_back(1);
    for (int64_t pos = core1; pos < n; ++pos) add_border(pos);
  } else {
    for (int64_t pos = 0; pos < n; ++pos) add_border(pos);
  }
  return a;
}

template <typename src_t, typename acc_t>
void gram_shift_impl(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram,
                     const at::Tensor* gy, at::Tensor* grad) {
  const int64_t B = x.size(0), Cg = x.size(1) / g.groups, H = x.size(2), W = x.size(3);
  const int64_t Og = gy ? gy->size(1) / g.groups : 0;
  const int64_t Cp = round_up(Cg, kCorrAlign), Op = round_up(Og, kCorrAlign), cell = Cp * Cp;
  // Pixels Cs floats apart in Z (and in Zy, the output gradient's copy, which the G
  // correlations read with the same strides): a multiple of 512 bytes would put a K-block's
  // column strip in a few L1 sets (corr_kernel.cpp; 128 × 128 × 128: 2–6× the L1 misses).
  const int64_t Cmax = std::max(Cp, Op);
  const int64_t Cs = Cmax % 128 == 0 ? Cmax + kCorrAlign : Cmax;
  const int64_t Ho = g.out_h(H), Wo = g.out_w(W), kk = g.kh * g.kw, d0 = Cg * kk;
  const AxisClasses rows = axis_classes(H, g.kh, g.dh, g.ph, Ho);
  const AxisClasses cols = axis_classes(W, g.kw, g.dw, g.pw, Wo);

  struct Shift {
    int64_t s, t;
  };
  std::vector<Shift> shifts;
  for (int64_t s = 0; s < g.kh; ++s)
    for (int64_t t = 1 - g.kw; t < g.kw; ++t)
      if (s > 0 || t >= 0) shifts.push_back({s, t});
  const int64_t nsh = shifts.size(), nrc = rows.classes.size();
  const int64_t nxb = cols.border.size();
  const bool with_gram = gram.defined();
  // A 3×3 kernel's core rows × core columns in Winograd form (lag_winograd.h): the even part
  // [rows.core0, wy1) × [cols.core0, wx1); an odd last core row or column stays direct.
  const bool lag_tiles = with_gram && g.kh == 3 && g.kw == 3 && g.dh == 1 && g.dw == 1 &&
                         rows.core1 - rows.core0 >= 2 && cols.core1 - cols.core0 >= 2;
  const int64_t wy1 = lag_tiles ? rows.core0 + (rows.core1 - rows.core0) / 2 * 2 : rows.core0;
  const int64_t wx1 = lag_tiles ? cols.core0 + (cols.core1 - cols.core0) / 2 * 2 : cols.core0;
  // G's output rows × columns likewise: the even part [0, gy1) × [0, gx1) in tiles.
  const bool grad_tiles = gy && g.kh == 3 && g.kw == 3 && g.dh == 1 &&
                          g.dw == 1 && Ho >= 2 && Wo >= 2;
  const int64_t gy1 = grad_tiles ? Ho / 2 * 2 : 0, gx1 = grad_tiles ? Wo / 2 * 2 : 0;
  // The point blocks the tiles use (zeroed and read back only those: wide layers on small maps
  // would otherwise clear and sum tens of MiB of unused blocks per call).
  const PointBlocks lag_used = lag_point_blocks(wy1 - rows.core0, wx1 - cols.core0);
  const PointBlocks g_used = grad_point_blocks(gy1, gx1);
  const int64_t core_rc = std::find(rows.is_core.begin(), rows.is_core.end(), 1) - rows.is_core.begin();
  const int64_t D = with_gram ? gram.size(-1) : grad->size(-1);

  // While accumulating, the group's output memory holds the Gram in offset-major order,
  // block (i·kw + j, i2·kw + j2) of Cg × Cg entries, so adding a piece is a contiguous
  // sweep; it is permuted to (channel, i, j) order at the end.
  // scatter adds piece — the correlation of shift sh over row class rc and the core columns
  // (cc = 0) or border column cols.border[cc − 1] (cc > 0) — to every block
  // (i, j) × (i + s, j + t) whose window holds it. Only shifts with s > 0 or s = 0, t ≥ 0
  // are accumulated; the rest are mirrored at the end.
  auto scatter = [&](acc_t* G, const acc_t* piece, int64_t sh, int64_t rc, int64_t cc) {
    const auto [s, t] = shifts[sh];
    for (int64_t i = 0; i + s < g.kh; ++i) {
      if (!rows.class_inside(rc, i)) continue;
      for (int64_t j = std::max<int64_t>(0, -t); j < g.kw && j + t < g.kw; ++j) {
        if (cc > 0 && !cols.inside(cols.border[cc - 1], j)) continue;
        acc_t* dst = G + ((i * g.kw + j) * kk + (i + s) * g.kw + (j + t)) * Cg * Cg;
        add_block(dst, Cg, piece, Cp, Cg, Cg);
      }
    }
  };

  // Bias row: Σ_b x over each row y and column slot (the core columns, then each border
  // column), per channel; a chunk's sums in acc_t, across chunks in double.
  const int64_t q_size = g.bias && with_gram ? H * (1 + nxb) * Cg : 0;
  std::vector<double> Q(q_size);

  // Threads take whole chunks of images (a private copy each, no barrier inside a chunk:
  // on a shared machine every barrier waits for the slowest thread). The chunk count is a
  // multiple of the thread count where the batch allows, so the threads stay balanced.
  // Thread 0 adds into the output, the others into their own offset-major Gram, summed in
  // thread order afterwards: the result is bit-identical from run to run.
  const int64_t Wz = std::max(W + g.dw * (g.kw - 1), gy ? Wo : int64_t{0});
  const int64_t threads = at::get_num_threads(), per_image = H * Wz * Cs;
  const int64_t per_grad_image = gy ? Ho * Wz * Cs : 0;
  int64_t chunks = std::max(threads, (B * per_image + kChunkElems - 1) / kChunkElems);
  chunks = std::min(B, round_up(chunks, threads));
  const int64_t Bc = (B + chunks - 1) / chunks;
  chunks = (B + Bc - 1) / Bc;
  const src_t* src = x.const_data_ptr<src_t>();
  const int64_t sb = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
  const src_t* gsrc = gy ? gy->const_data_ptr<src_t>() : nullptr;
  const int64_t gsb = gy ? gy->stride(0) : 0, gsc = gy ? gy->stride(1) : 0;
  const int64_t gsy = gy ? gy->stride(2) : 0, gsx = gy ? gy->stride(3) : 0;
  const int64_t gcell = Op * Cp;  // one kernel offset's block of G: (out channel, in channel)

  std::vector<acc_t*> thread_gram(threads, nullptr), thread_g(threads, nullptr);
  int64_t grp = 0;  // the group being accumulated (the loop below)

  // G = dZ Xᵀ of one chunk, into g_acc (kernel offset, out channel, in channel): the chunk's
  // output gradient copied like x (Zy: output pixel, image, channel; Z's strides), then per
  // kernel offset (i, j) one correlation of each output row's run with the input run it
  // multiplies, clipped to the pixels whose partner is inside the image (the zero padding
  // adds nothing), in K-blocks of rows like the Gram's. Σ dZ (the bias column) per output row
  // over the chunk's images in acc_t, across rows and chunks in double.
  auto grad_chunk = [&](int64_t b0, int64_t bc, const acc_t* Z, acc_t* Zy, acc_t* g_acc,
                        acc_t* g_points, std::vector<double>& bias_sum, acc_t* row_sum) {
    if (Op > Og) std::fill(Zy, Zy + bc * per_grad_image, acc_t(0));
    for (int64_t b = 0; b < bc; ++b)
      copy_image(Zy + b * Cs, Wz, bc, Cs, gsrc + (b0 + b) * gsb + grp * Og * gsc, Og, Ho, Wo,
                 gsc, gsy, gsx);
    if (g.bias)
      for (int64_t y = 0; y < Ho; ++y) {  // an output row's pixels: one run of Wo·bc
        sum_rows(row_sum, Zy + y * Wz * bc * Cs, Wo * bc, Cs, Og);
        for (int64_t c = 0; c < Og; ++c) bias_sum[c] += row_sum[c];
      }
    if (grad_tiles)
      grad_points_accumulate(g_points, Zy, Z, H, W, Wz, bc, Cs, Op, Cp, g.ph, g.pw, gy1, gx1);
    const int64_t run = Wo * bc, kb = std::max(kBlockElems / Cs, bc);
    const int64_t rows_per_block = run >= kb ? 1 : kb / run;
    // rows [y_begin, y_end) from column x_begin on: the tiles' rows only from an odd last column
    struct Segment {
      int64_t y_begin, y_end, x_begin;
    };
    const Segment segments[2] = {{0, gy1, gx1}, {gy1, Ho, 0}};
    for (const auto [y_begin, y_end, x_begin] : segments)
    for (int64_t y0 = y_begin; y0 < y_end && x_begin < Wo; y0 += rows_per_block)
      for (int64_t q0 = x_begin * bc; q0 < run; q0 += kb) {
        const int64_t q1 = std::min(q0 + kb, run);
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t dy = g.dh * i - g.ph;  // input row = output row + dy
          const int64_t ya = std::max(y0, -dy);
          const int64_t yb = std::min({y0 + rows_per_block, y_end, H - dy});
          if (ya >= yb) continue;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t dx = g.dw * j - g.pw;
            const int64_t qa = std::max(q0, std::max<int64_t>(0, -dx) * bc);
            const int64_t qb = std::min(q1, std::min(Wo, W - dx) * bc);
            if (qa >= qb) continue;
            const acc_t* L = Zy + (ya * Wz * bc + qa) * Cs;
            const acc_t* R = Z + ((ya + dy) * Wz * bc + qa + dx * bc) * Cs;
            corr_accumulate(g_acc + (i * g.kw + j) * gcell, Cp, L, R, Op, Cp, yb - ya,
                            Wz * bc * Cs, qb - qa, Cs);
          }
        }
      }
  };
  std::vector<std::vector<double>> thread_q(threads), thread_gb(threads);
  // The threads' G blocks summed in thread order (bit-identical run to run) into grad's
  // (out channel, in channel · kk + offset) layout, the bias column from the sums of dZ.
  auto write_grad = [&](int64_t group) {
    acc_t* out = grad->data_ptr<acc_t>() + group * Og * D;
    for (int64_t o = 0; o < Og; ++o) {
      acc_t* row = out + o * D;
      for (int64_t off = 0; off < kk; ++off)
        for (int64_t c = 0; c < Cg; ++c) {
          acc_t sum = 0;
          for (int64_t t = 0; t < threads; ++t)
            if (thread_g[t]) sum += thread_g[t][off * gcell + o * Cp + c];
          row[c * kk + off] = sum;
        }
      if (g.bias) {
        double sum = 0;
        for (int64_t t = 0; t < threads; ++t)
          if (!thread_gb[t].empty()) sum += thread_gb[t][o];
        row[d0] = static_cast<acc_t>(sum);
      }
    }
    std::fill(thread_g.begin(), thread_g.end(), nullptr);
    for (auto& v : thread_gb) v.clear();
  };

  // The tiles' point products of every thread summed in thread order into the first's, then
  // turned into the shifts' lags (scattered into that thread's Gram) and G's kernel offsets
  // once, each thread a slice of every block's rows: once per thread, the conversion grew
  // with the thread count (128×64×8×8 on two threads: its perf samples 830, 763 → 422, 436).
  std::vector<acc_t*> thread_points(threads, nullptr), thread_gpoints(threads, nullptr);
  std::vector<acc_t*> thread_lags(threads, nullptr);
  auto finish_tiles = [&](acc_t* G) {
    auto holders = [&](const std::vector<acc_t*>& of) {
      std::vector<int64_t> ts;
      for (int64_t t = 0; t < threads; ++t)
        if (of[t]) ts.push_back(t);
      return ts;
    };
    const std::vector<int64_t> lag_ts = holders(thread_points), g_ts = holders(thread_gpoints);
    if (lag_ts.empty() && g_ts.empty()) return;
    // Rows [r0, r1) of every block (blocks `stride` apart, rows Cp wide) of the holders'
    // points `of`, summed into the first holder's.
    auto sum_rows_of = [&](const std::vector<acc_t*>& of, const std::vector<int64_t>& ts,
                           PointBlocks used, int64_t stride, int64_t r0, int64_t r1) {
      acc_t* const into = of[ts[0]];
      for (size_t k = 1; k < ts.size(); ++k)
        for (int64_t b = used.begin; b < used.end; ++b) {
          acc_t* const dst = into + b * stride;
          const acc_t* const src = of[ts[k]] + b * stride;
          for (int64_t e = r0 * Cp; e < r1 * Cp; ++e) dst[e] += src[e];
        }
    };
    at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        if (!lag_ts.empty()) {
          const int64_t r0 = Cp * k / threads, r1 = Cp * (k + 1) / threads;
          sum_rows_of(thread_points, lag_ts, lag_used, cell, r0, r1);
          acc_t* by_shift[3][5] = {};
          for (int64_t sh = 0; sh < nsh; ++sh)
            by_shift[shifts[sh].s][shifts[sh].t + 2] =
                thread_lags[lag_ts[0]] + sh * cell + r0 * Cp;
          lags_from_points(by_shift, thread_points[lag_ts[0]] + r0 * Cp, cell, (r1 - r0) * Cp,
                           lag_used);
        }
        if (!g_ts.empty()) {
          const int64_t r0 = Op * k / threads, r1 = Op * (k + 1) / threads;
          sum_rows_of(thread_gpoints, g_ts, g_used, gcell, r0, r1);
          grad_from_points(thread_g[g_ts[0]] + r0 * Cp, thread_gpoints[g_ts[0]] + r0 * Cp, gcell,
                           (r1 - r0) * Cp, g_used);
        }
      }
    });
    if (!lag_ts.empty())  // shifts fill disjoint blocks
      at::parallel_for(0, nsh, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t sh = lo; sh < hi; ++sh)
          scatter(lag_ts[0] == 0 ? G : thread_gram[lag_ts[0]], thread_lags[lag_ts[0]] + sh * cell,
                  sh, core_rc, 0);
      });
    for (auto* v : {&thread_points, &thread_gpoints, &thread_lags})
      std::fill(v->begin(), v->end(), nullptr);
  };

  for (grp = 0; grp < g.groups; ++grp) {
    acc_t* G = with_gram ? gram.data_ptr<acc_t>() + grp * D * D : nullptr;
    if (with_gram) std::fill(G, G + D * D, acc_t(0));
    std::fill(Q.begin(), Q.end(), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_lo, int64_t chunk_hi) {
      const int64_t tid = at::get_thread_num();
      if (tid > 0 && with_gram) {
        thread_gram[tid] = scratch<acc_t, 0>(d0 * d0);
        std::fill(thread_gram[tid], thread_gram[tid] + d0 * d0, acc_t(0));
      }
      acc_t* mine = tid > 0 ? thread_gram[tid] : G;
      std::vector<double>& q_local = thread_q[tid];
      q_local.assign(q_size, 0.0);
      acc_t* const Z = scratch<acc_t, 1>(Bc * per_image);
      acc_t* const row_sum = g.bias ? scratch<acc_t, 11>(std::max(Cg, Og)) : nullptr;
      acc_t* const local = with_gram ? scratch<acc_t, 2>(nsh * cell) : nullptr;
      acc_t* const piece = with_gram ? scratch<acc_t, 3>(cell) : nullptr;
      acc_t* const Zy = gy ? scratch<acc_t, 5>(Bc * per_grad_image) : nullptr;
      acc_t* const g_mine = gy ? scratch<acc_t, 6>(kk * gcell) : nullptr;
      acc_t* const g_points = grad_tiles ? scratch<acc_t, 9>(kGradPoints * gcell) : nullptr;
      if (grad_tiles)
        std::fill(g_points + g_used.begin * gcell, g_points + g_used.end * gcell, acc_t(0));
      acc_t* const points = lag_tiles ? scratch<acc_t, 8>(kLagPoints * cell) : nullptr;
      if (lag_tiles)
        std::fill(points + lag_used.begin * cell, points + lag_used.end * cell, acc_t(0));
      if (gy) {
        std::fill(g_mine, g_mine + kk * gcell, acc_t(0));
        thread_g[tid] = g_mine;
        thread_gb[tid].assign(g.bias ? Og : 0, 0.0);
      }
      for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
        const int64_t b0 = chunk * Bc, bc = std::min(Bc, B - b0);
        // Only the channel padding needs zeros; every real entry is written below.
        if (Cp > Cg) std::fill(Z, Z + bc * per_image, acc_t(0));
        for (int64_t b = 0; b < bc; ++b)
          copy_image(Z + b * Cs, Wz, bc, Cs, src + (b0 + b) * sb + grp * Cg * sc, Cg, H, W, sc,
                     sy, sx);
        if (!with_gram) {
          grad_chunk(b0, bc, Z, Zy, g_mine, g_points, thread_gb[tid], row_sum);
          continue;
        }

        // Core columns: per row, the run of real pixels (x-major, so the core columns are
        // one contiguous stretch of it), in K-blocks of whole rows or of row pieces, all
        // shifts per block while it is cached; a row class's sums are then added into the Gram.
        const int64_t run = W * bc, kb = std::max(kBlockElems / Cs, bc);
        const int64_t rows_per_block = run >= kb ? 1 : kb / run;
        if (lag_tiles)
          lag_points_accumulate(points, Z, H, W, Wz, bc, Cs, Cp, rows.core0, wy1, cols.core0, wx1);
        for (int64_t rc = 0; rc < nrc; ++rc) {
          std::fill(local, local + nsh * cell, acc_t(0));
          // Row segments [y_begin, y_end) from core column x_begin on: the Winograd tiles'
          // rows only from the odd last core column, if any.
          struct Segment {
            int64_t y_begin, y_end, x_begin;
          };
          const bool tiled = lag_tiles && rc == core_rc;
          const Segment segments[2] = {
              tiled ? Segment{rows.core0, wy1, wx1}
                    : Segment{rows.classes[rc].begin, rows.classes[rc].end, cols.core0},
              tiled ? Segment{wy1, rows.core1, cols.core0} : Segment{0, 0, 0}};
          for (const auto [y_begin, y_end, x_begin] : segments)
          for (int64_t y0 = y_begin; y0 < y_end && x_begin < cols.core1; y0 += rows_per_block)
            for (int64_t q0 = 0; q0 < run; q0 += kb) {
              const int64_t q1 = std::min(q0 + kb, run);
              for (int64_t sh = 0; sh < nsh; ++sh) {
                const auto [s, t] = shifts[sh];
                // core columns and rows whose partner y + dh·s, x + dw·t is inside the image
                const int64_t y1 = std::min({y0 + rows_per_block, y_end, H - g.dh * s});
                const int64_t qa = std::max(q0, std::max(x_begin, -g.dw * t) * bc);
                const int64_t qb = std::min(q1, std::min(cols.core1, W - g.dw * t) * bc);
                if (y0 >= y1 || qa >= qb) continue;
                const acc_t* L = Z + (y0 * Wz * bc + qa) * Cs;
                const int64_t delta = (g.dh * s * Wz + g.dw * t) * bc;
                corr_accumulate(local + sh * cell, Cp, L, L + delta * Cs, Cp, Cp, y1 - y0,
                                Wz * bc * Cs, qb - qa, Cs);
              }
            }
          for (int64_t sh = 0; sh < nsh; ++sh) scatter(mine, local + sh * cell, sh, rc, 0);
        }

        // Border columns: per row y a run of bc pixels, rows Wz·bc pixels apart; none where
        // the partner column is outside the image (a zero strip).
        for (int64_t sh = 0; sh < nsh; ++sh)
          for (int64_t xi = 0; xi < nxb; ++xi) {
            const auto [s, t] = shifts[sh];
            const int64_t partner = cols.border[xi] + g.dw * t;
            if (partner < 0 || partner >= W) continue;
            const int64_t delta = (g.dh * s * Wz + g.dw * t) * bc;
            for (int64_t rc = 0; rc < nrc; ++rc) {
              const int64_t y0 = rows.classes[rc].begin;
              const int64_t y1 = std::min(rows.classes[rc].end, H - g.dh * s);
              if (y0 >= y1) continue;
              std::fill(piece, piece + cell, acc_t(0));
              const acc_t* L = Z + (y0 * Wz + cols.border[xi]) * bc * Cs;
              corr_accumulate(piece, Cp, L, L + delta * Cs, Cp, Cp, y1 - y0, Wz * bc * Cs,
                              bc, Cs);
              scatter(mine, piece, sh, rc, 1 + xi);
            }
          }

        if (g.bias) {  // per row: its core columns (one run), then each border column's bc
          for (int64_t y = 0; y < H; ++y) {
            double* q = q_local.data() + y * (1 + nxb) * Cg;
            if (cols.core1 > cols.core0) {
              sum_rows(row_sum, Z + (y * Wz + cols.core0) * bc * Cs,
                       (cols.core1 - cols.core0) * bc, Cs, Cg);
              for (int64_t c = 0; c < Cg; ++c) q[c] += row_sum[c];
            }
            for (int64_t xi = 0; xi < nxb; ++xi) {
              sum_rows(row_sum, Z + (y * Wz + cols.border[xi]) * bc * Cs, bc, Cs, Cg);
              for (int64_t c = 0; c < Cg; ++c) q[(1 + xi) * Cg + c] += row_sum[c];
            }
          }
        }
        if (gy) grad_chunk(b0, bc, Z, Zy, g_mine, g_points, thread_gb[tid], row_sum);
      }
      if (grad_tiles) thread_gpoints[tid] = g_points;
      if (lag_tiles) {  // turned into lags by finish_tiles (local is free by now)
        thread_points[tid] = points;
        thread_lags[tid] = local;
      }
    });
    finish_tiles(G);
    for (int64_t t = 0; t < threads; ++t) {
      for (size_t e = 0; e < thread_q[t].size(); ++e) Q[e] += thread_q[t][e];
      thread_q[t].clear();
    }
    if (gy) write_grad(grp);
    if (!with_gram) continue;
    // The threads' offset-major Grams summed in thread order (bit-identical run to run), then
    // permuted to (channel, i, j) order. Blocks of shifts (s < 0) or (s = 0, t < 0) are
    // transposes of accumulated ones; within s = t = 0 blocks the c ≤ c2 entry is used on both
    // sides, so the result is exactly symmetric.
    // The sum goes into the first helper thread's Gram, one vectorised pass per helper
    // (((G + T1) + T2) + …, the order an entry-by-entry sum had): a third d0² buffer would
    // take the Gram's extra peak memory past a tenth of unfold's at 64 channels on 8×8
    // (bench/bench_gram.py).
    std::vector<acc_t*> helpers;
    for (int64_t t = 1; t < threads; ++t)
      if (thread_gram[t]) helpers.push_back(thread_gram[t]);
    acc_t* const blocked = helpers.empty() ? scratch<acc_t, 4>(d0 * d0) : helpers[0];
    at::parallel_for(0, d0 * d0, kChunkElems, [&](int64_t lo, int64_t hi) {
      acc_t* const out = blocked;  // local copies: the captured pointers would be reloaded
      const acc_t* const own = G;   // after every store (they might alias it)
      if (helpers.empty())
        std::copy(own + lo, own + hi, out + lo);
      else
        for (int64_t e = lo; e < hi; ++e) out[e] = own[e] + out[e];
      for (size_t h = 1; h < helpers.size(); ++h) {
        const acc_t* const src = helpers[h];
        for (int64_t e = lo; e < hi; ++e) out[e] += src[e];
      }
    });
    std::fill(thread_gram.begin(), thread_gram.end(), nullptr);
    // Entry (c, c2) of block (o, o2) goes to G[(c·kk + o)·D + c2·kk + o2]: each block read
    // along its rows, so a transposed one is written a column at a time (entries of the
    // thread's rows, one line each, reused as c2 advances) — read along its columns, its
    // Cg-strided loads missed L1 (half the permutation's time on 64 channels, 8×8).
    const int64_t cell_g = Cg * Cg;
    at::parallel_for(0, Cg, 1, [&](int64_t c_lo, int64_t c_hi) {
      for (int64_t o = 0; o < kk; ++o)
        for (int64_t o2 = 0; o2 < kk; ++o2) {
          const int64_t s = o2 / g.kw - o / g.kw, t = o2 % g.kw - o % g.kw;
          acc_t* const dst = G + o * D + o2;  // entry (c, c2) at dst[c·kk·D + c2·kk]
          const int64_t row = kk * D;
          if (s > 0 || (s == 0 && t > 0)) {
            const acc_t* b = blocked + (o * kk + o2) * cell_g;
            for (int64_t c = c_lo; c < c_hi; ++c)
              for (int64_t c2 = 0; c2 < Cg; ++c2) dst[c * row + c2 * kk] = b[c * Cg + c2];
          } else if (s < 0 || t < 0) {
            const acc_t* b = blocked + (o2 * kk + o) * cell_g;
            for (int64_t c2 = 0; c2 < Cg; ++c2)
              for (int64_t c = c_lo; c < c_hi; ++c) dst[c * row + c2 * kk] = b[c2 * Cg + c];
          } else {
            const acc_t* b = blocked + (o * kk + o) * cell_g;
            for (int64_t c = c_lo; c < c_hi; ++c)
              for (int64_t c2 = 0; c2 < Cg; ++c2)
                dst[c * row + c2 * kk] = c <= c2 ? b[c * Cg + c2] : b[c2 * Cg + c];
          }
        }
    });

    if (g.bias) {
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < g.kw; ++j) {
            double sum = 0;
            for (int64_t y = std::max<int64_t>(0, g.dh * i - g.ph);
                 y < std::min(H, g.dh * i - g.ph + Ho); ++y) {
              // Only additions of what the window holds: the row minus the columns outside
              // it lost small windows to cancellation against a large rest of the row.
              const double* q = Q.data() + y * (1 + nxb) * Cg;
              sum += q[c];
              for (int64_t xi = 0; xi < nxb; ++xi)
                if (cols.inside(cols.border[xi], j)) sum += q[(1 + xi) * Cg + c];
            }
            const int64_t p = c * kk + i * g.kw + j;
            G[p * D + d0] = G[d0 * D + p] = static_cast<acc_t>(sum);
          }
      G[d0 * D + d0] = static_cast<acc_t>(B * Ho * Wo);
    }
  }
}

}  // namespace

void gram_shift_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram,
                    const at::Tensor* grad_output, at::Tensor* grad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "im2col_gram_cpu", [&] {
    gram_shift_impl<scalar_t, at::opmath_type<scalar_t>>(x, g, gram, grad_output, grad);
  });
}

}  // namespace consequential_ext::cpu
