// Right-looking blocked Cholesky, A = UᵀU on the column-major upper triangle, with the
// forward substitution folded into its updates, then a blocked backward substitution. Per
// panel of kPanel block rows: its diagonal block factored on one thread by kBlock blocks
// (LAPACK's potrf of each, small, and its inverse, a triangular solve of the identity); the
// block row right of it, U12 = U11⁻ᵀ A12, and the right-hand sides' rows y = U11⁻ᵀ x, by
// column tiles; the trailing update A22 −= U12ᵀ U12 (upper tiles only) with x[p1:] −= U12ᵀ y,
// all GEMM, split between threads; the substitutions apply the diagonal blocks' inverses by
// GEMM. Why: MKL's potrf and triangular solves run far below its GEMM's rate on AMD CPUs (a
// 2-core AMD EPYC, one system, wall: D = 289 with 32 right-hand sides 0.67 ms in potrf +
// potrs, 0.41 here; 577 with 64 on two threads 1.84–2.4 against 1.43–2.0). Narrow diagonal
// blocks: at 64 their potrf and trsm, MKL's slow paths, took the gain back (577: 1.77 ms).
// Panels: the trailing update's GEMMs 128 deep instead of 32, a quarter of the parallel
// regions (two threads, against one panel per block, interleaved, medians of
// 15 × 10 solves: D = 577 with 64 right-hand sides 1.58 against 1.65 ms, with 128 1.93
// against 2.14, 1153 with 128 8.97 against 10.16).
#include "blocked_cholesky.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lapack_calls.h"

namespace consequential_ext::cpu {
namespace {

using lapack::multiply_in_place;

constexpr int kBlock = 32;       // the diagonal blocks, factored by LAPACK and inverted
constexpr int kPanel = 128;      // block rows of the trailing update: its GEMMs' depth
constexpr int kColumnTile = 64;  // columns of a work item in the block row and the updates
constexpr int kRhsTile = 256;    // right-hand sides of a work item
constexpr int kMinBackwardColumns = 16;  // right-hand sides per thread in the backward sweep

// body(item) for every item, the items split into contiguous shares of about equal weight,
// one per thread (at::parallel_for's even split of the indices would not balance them).
template <typename F>
void for_shares(const std::vector<int64_t>& weight, F&& body) {
  const int count = static_cast<int>(weight.size());
  if (count == 0) return;  // no region to open (a last panel without right-hand sides)
  const int threads = std::max(1, std::min<int>(at::get_num_threads(), count));
  std::vector<int> bounds(threads + 1, count);
  bounds[0] = 0;
  int64_t total = 0, before = 0;  // before: the weight of items [0, i)
  for (int64_t w : weight) total += w;
  for (int t = 1, i = 0; t < threads; ++t) {
    for (; i < count && (before + weight[i]) * threads <= total * t; ++i) before += weight[i];
    bounds[t] = i;
  }
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t share = lo; share < hi; ++share)
      for (int i = bounds[share]; i < bounds[share + 1]; ++i) body(i);
  });
}

}  // namespace

template <typename T>
bool blocked_cholesky_solve(T* a, T* x, int n, int nrhs) {
  auto el = [&](int i, int j) { return a + i + static_cast<int64_t>(j) * n; };
  auto xel = [&](int i, int j) { return x + i + static_cast<int64_t>(j) * n; };
  const int blocks = (n + kBlock - 1) / kBlock;
  // U_kk⁻¹ of every diagonal block (upper, kb × kb, leading dimension kb).
  std::vector<T> inverses(static_cast<size_t>(blocks) * kBlock * kBlock);
  auto inverse = [&](int k0) { return inverses.data() + static_cast<int64_t>(k0) * kBlock; };
  std::vector<T> copy;
  std::vector<int64_t> weight;
  struct Item {
    bool rhs;
    int c0, c1;  // columns of the matrix, or of the right-hand sides
  };
  std::vector<Item> items;
  // Tiles of the columns [c0, n) and of the right-hand sides; weight(item) their work.
  auto tile = [&](int c0, auto&& work) {
    items.clear();
    weight.clear();
    for (; c0 < n; c0 += kColumnTile) {
      items.push_back({false, c0, std::min(c0 + kColumnTile, n)});
      weight.push_back(work(items.back()));
    }
    for (int r0 = 0; r0 < nrhs; r0 += kRhsTile) {
      items.push_back({true, r0, std::min(r0 + kRhsTile, nrhs)});
      weight.push_back(work(items.back()));
    }
  };
  for (int p0 = 0; p0 < n; p0 += kPanel) {
    const int p1 = std::min(p0 + kPanel, n), pw = p1 - p0;
    // The panel's diagonal block, on this thread (a few hundred kFLOP): by kBlock blocks,
    // right-looking, its upper tiles only.
    for (int k0 = p0; k0 < p1; k0 += kBlock) {
      const int k1 = std::min(k0 + kBlock, p1), kb = k1 - k0;
      int info = 0;
      lapack::potrf(el(k0, k0), kb, n, &info);
      if (info != 0) return false;
      lapack::upper_inverse(el(k0, k0), kb, n, inverse(k0));
      if (k1 == p1) break;
      multiply_in_place('T', kb, p1 - k1, inverse(k0), el(k0, k1), n, copy);
      for (int c0 = k1; c0 < p1; c0 += kBlock) {
        const int c1 = std::min(c0 + kBlock, p1);
        lapack::gemm('T', 'N', c1 - k1, c1 - c0, kb, T(-1), el(k0, k1), n, el(k0, c0), n, T(1),
                     el(k1, c0), n);
      }
    }
    // The block row right of the panel, U12 = U11⁻ᵀ A12, and the right-hand sides' panel
    // rows, y = U11⁻ᵀ x: one triangular solve per tile, its diagonal blocks applied as their
    // inverses, the rest GEMM.
    tile(p1, [&](const Item& t) { return static_cast<int64_t>(t.c1 - t.c0); });
    for_shares(weight, [&](int i) {
      thread_local std::vector<T> local;
      const Item& t = items[i];
      T* b = t.rhs ? xel(p0, t.c0) : el(p0, t.c0);
      for (int k0 = p0; k0 < p1; k0 += kBlock) {
        const int k1 = std::min(k0 + kBlock, p1), kb = k1 - k0;
        multiply_in_place('T', kb, t.c1 - t.c0, inverse(k0), b + (k0 - p0), n, local);
        if (k1 < p1)
          lapack::gemm('T', 'N', p1 - k1, t.c1 - t.c0, kb, T(-1), el(k0, k1), n, b + (k0 - p0),
                       n, T(1), b + (k1 - p0), n);
      }
    });
    if (p1 == n) break;
    // A22 −= U12ᵀ U12 on and above the diagonal (rows p1 … c1 of each column tile), and the
    // right-hand sides' rows below: x[p1:] −= U12ᵀ y; GEMMs of depth pw.
    tile(p1, [&](const Item& t) {
      return static_cast<int64_t>(t.rhs ? n - p1 : t.c1 - p1) * (t.c1 - t.c0);
    });
    for_shares(weight, [&](int i) {
      const Item& t = items[i];
      if (t.rhs)
        lapack::gemm('T', 'N', n - p1, t.c1 - t.c0, pw, T(-1), el(p0, p1), n, xel(p0, t.c0), n,
                     T(1), xel(p1, t.c0), n);
      else
        lapack::gemm('T', 'N', t.c1 - p1, t.c1 - t.c0, pw, T(-1), el(p0, p1), n,
                     el(p0, t.c0), n, T(1), el(p1, t.c0), n);
    });
  }
  if (nrhs == 0) return true;
  // Backward: x_k = U_kk⁻¹ (y_k − U_{k,>k} x_{>k}), block rows from the last; a sequence of
  // small steps, so split by right-hand sides rather than within a step.
  const int threads = std::max(1, at::get_num_threads());
  const int chunk = std::max(kMinBackwardColumns, (nrhs + threads - 1) / threads);
  at::parallel_for(0, nrhs, chunk, [&](int64_t c0, int64_t c1) {
    std::vector<T> local;
    const int cols = static_cast<int>(c1 - c0);
    for (int k0 = (blocks - 1) * kBlock; k0 >= 0; k0 -= kBlock) {
      const int k1 = std::min(k0 + kBlock, n), kb = k1 - k0;
      if (k1 < n)
        lapack::gemm('N', 'N', kb, cols, n - k1, T(-1), el(k0, k1), n, xel(k1, c0), n, T(1),
                     xel(k0, c0), n);
      multiply_in_place('N', kb, cols, inverse(k0), xel(k0, c0), n, local);
    }
  });
  return true;
}

template bool blocked_cholesky_solve<float>(float*, float*, int, int);
template bool blocked_cholesky_solve<double>(double*, double*, int, int);

}  // namespace consequential_ext::cpu
