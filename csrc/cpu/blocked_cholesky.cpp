// Right-looking blocked Cholesky, A = UᵀU on the column-major upper triangle, with the
// forward substitution folded into its updates, then a blocked backward substitution. Per
// block row of kBlock: the diagonal block's factor (LAPACK, small) and its inverse (a
// triangular solve of the identity); the block row right of it, U12 = U11⁻ᵀ A12, and the
// trailing update A22 −= U12ᵀ U12 (upper tiles only) with y[k1:] −= U12ᵀ y[k0:k1], all GEMM,
// split between threads; the substitutions apply the diagonal blocks' inverses by GEMM.
// Why: MKL's potrf and triangular solves run far below its GEMM's rate on AMD CPUs (a 2-core
// AMD EPYC, one system, wall: D = 289 with 32 right-hand sides 0.67 ms in potrf + potrs,
// 0.41 here; 577 with 64 on two threads 1.84–2.4 against 1.43–2.0). Narrow blocks: at 64 the
// diagonal blocks' potrf and trsm, MKL's slow paths, took the gain back (577: 1.77 ms).
#include "blocked_cholesky.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lapack_calls.h"

namespace consequential_ext::cpu {
namespace {

using lapack::multiply_in_place;

constexpr int kBlock = 32;       // the diagonal blocks, and GEMM's k in the updates
constexpr int kColumnTile = 64;  // columns of a work item in the block row and the updates
constexpr int kRhsTile = 256;    // right-hand sides of a work item
constexpr int kMinBackwardColumns = 16;  // right-hand sides per thread in the backward sweep

// body(item) for every item, the items split into contiguous shares of about equal weight,
// one per thread (at::parallel_for's even split of the indices would not balance them).
template <typename F>
void for_shares(const std::vector<int64_t>& weight, F&& body) {
  const int count = static_cast<int>(weight.size());
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
  for (int k0 = 0; k0 < n; k0 += kBlock) {
    const int k1 = std::min(k0 + kBlock, n), kb = k1 - k0;
    int info = 0;
    lapack::potrf(el(k0, k0), kb, n, &info);
    if (info != 0) return false;
    T* inv = inverse(k0);
    lapack::upper_inverse(el(k0, k0), kb, n, inv);
    multiply_in_place('T', kb, nrhs, inv, xel(k0, 0), n, copy);  // y_k = U_kk⁻ᵀ x_k
    if (k1 == n) break;
    // The block row: U12 = U11⁻ᵀ A12, by column tiles.
    items.clear();
    weight.clear();
    for (int c0 = k1; c0 < n; c0 += kColumnTile) {
      items.push_back({false, c0, std::min(c0 + kColumnTile, n)});
      weight.push_back(1);
    }
    for_shares(weight, [&](int i) {
      thread_local std::vector<T> local;
      multiply_in_place('T', kb, items[i].c1 - items[i].c0, inv, el(k0, items[i].c0), n, local);
    });
    // A22 −= U12ᵀ U12 on and above the diagonal (rows k1 … c1 of each column tile), and the
    // right-hand sides' rows below: x[k1:] −= U12ᵀ y_k.
    weight.clear();
    for (const Item& t : items)
      weight.push_back(static_cast<int64_t>(t.c1 - k1) * (t.c1 - t.c0));
    for (int c0 = 0; c0 < nrhs; c0 += kRhsTile) {
      items.push_back({true, c0, std::min(c0 + kRhsTile, nrhs)});
      weight.push_back(static_cast<int64_t>(n - k1) * (items.back().c1 - c0));
    }
    for_shares(weight, [&](int i) {
      const Item& t = items[i];
      if (t.rhs)
        lapack::gemm('T', 'N', n - k1, t.c1 - t.c0, kb, T(-1), el(k0, k1), n, xel(k0, t.c0), n,
                     T(1), xel(k1, t.c0), n);
      else
        lapack::gemm('T', 'N', t.c1 - k1, t.c1 - t.c0, kb, T(-1), el(k0, k1), n,
                     el(k0, t.c0), n, T(1), el(k1, t.c0), n);
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
