// Right-looking blocked Cholesky with the forward substitution folded into its trailing
// updates (the right-hand sides are extra rows below the matrix), then a blocked backward
// substitution; everything but the diagonal blocks' potrf is GEMM. Per block column: the
// panel L21 = A21 L11⁻ᵀ by rows, the trailing update in GEMM tiles split between threads.
// The thread that updates the next diagonal block factors and inverts it at once, so that
// this serial step overlaps the other threads' tiles. Triangular solves by the diagonal
// blocks' explicit inverses: MKL's trsm ran at a fifth of GEMM's rate (lapack_solve.cpp).
#include "blocked_cholesky.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "lapack_calls.h"

namespace consequential_ext::cpu {
namespace {

constexpr int kBlock = 64;      // rows and columns of a tile: GEMM's k, the serial potrf's n
constexpr int kRhsChunk = 256;  // right-hand-side columns per work item
constexpr int kMinBackwardColumns = 16;  // per thread in the backward substitution

// A rectangle of work: rows [r0, r1) of columns [col0, col1) of the matrix or (rhs) of the
// right-hand sides. Consecutive tiles of one column block merge into one GEMM.
struct Tile {
  bool rhs;
  int col0, col1, r0, r1;
};

// body(run) for each run of consecutive mergeable tiles in each thread's share; shares are
// contiguous and of about equal weight, the first `heavy` tiles weighing double.
template <typename F>
void for_tiles(const std::vector<Tile>& tiles, int heavy, F&& body) {
  const int count = static_cast<int>(tiles.size());
  const int threads = std::max(1, std::min(at::get_num_threads(), count));
  const int64_t total = count + heavy;
  auto weight_before = [&](int i) { return i + std::min(i, heavy); };
  std::vector<int> bounds(threads + 1, count);
  bounds[0] = 0;
  for (int t = 1, i = 0; t < threads; ++t) {
    while (i < count && weight_before(i) * threads < total * t) ++i;
    bounds[t] = i;
  }
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t share = first; share < last; ++share) {
      for (int i = bounds[share]; i < bounds[share + 1];) {
        Tile run = tiles[i++];
        while (i < bounds[share + 1] && tiles[i].rhs == run.rhs && tiles[i].col0 == run.col0 &&
               tiles[i].r0 == run.r1) {
          run.r1 = tiles[i++].r1;
        }
        body(run);
      }
    }
  });
}

// Rows [r0, r1) of one column block, in tiles of kBlock rows.
void add_rows(std::vector<Tile>& tiles, bool rhs, int col0, int col1, int r0, int r1) {
  for (int r = r0; r < r1; r += kBlock) {
    tiles.push_back({rhs, col0, col1, r, std::min(r + kBlock, r1)});
  }
}

// Rows [r0, r1) of the right-hand sides, every column chunk.
void add_rhs(std::vector<Tile>& tiles, int nrhs, int r0, int r1) {
  for (int c = 0; c < nrhs; c += kRhsChunk) {
    add_rows(tiles, true, c, std::min(c + kRhsChunk, nrhs), r0, r1);
  }
}

// b (rows × cols, leading dimension ldb) ← op(inv) · b (side 'L') or b · op(inv) (side 'R'),
// inv kb × kb; in place through a copy, as GEMM cannot overwrite its input.
template <typename T>
void multiply_in_place(char side, char op, int rows, int cols, const T* inv, int kb, T* b,
                       int ldb, std::vector<T>& scratch) {
  scratch.resize(static_cast<size_t>(rows) * cols);
  for (int j = 0; j < cols; ++j) {
    std::copy(b + static_cast<int64_t>(j) * ldb, b + static_cast<int64_t>(j) * ldb + rows,
              scratch.data() + static_cast<int64_t>(j) * rows);
  }
  if (side == 'L') {  // b ← op(inv) · b, inv kb × kb with kb == rows
    lapack::gemm(op, 'N', rows, cols, kb, T(1), inv, kb, scratch.data(), rows, T(0), b, ldb);
  } else {            // b ← b · op(inv), kb == cols
    lapack::gemm('N', op, rows, cols, kb, T(1), scratch.data(), rows, inv, kb, T(0), b, ldb);
  }
}

}  // namespace

bool blocked_cholesky_available() {
  return spotrf_ && dpotrf_ && strsm_ && dtrsm_ && sgemm_ && dgemm_;
}

template <typename T>
bool blocked_cholesky_solve(T* a, T* x, int n, int nrhs) {
  auto el = [&](int i, int j) { return a + i + static_cast<int64_t>(j) * n; };
  auto xel = [&](int i, int j) { return x + i + static_cast<int64_t>(j) * n; };
  const int blocks = (n + kBlock - 1) / kBlock;
  // L_kk⁻¹ of every diagonal block k (kBlock × kBlock each, leading dimension its size).
  std::vector<T> inverses(static_cast<size_t>(blocks) * kBlock * kBlock);
  auto inverse = [&](int k0) { return inverses.data() + static_cast<int64_t>(k0) * kBlock; };
  // Factors diagonal block k0 and inverts its factor; false if not positive definite.
  auto factor_diagonal = [&](int k0) {
    const int kb = std::min(kBlock, n - k0);
    int info = 0;
    lapack::potrf(el(k0, k0), kb, n, &info);
    if (info != 0) return false;
    T* inv = inverse(k0);
    std::fill(inv, inv + kb * kb, T(0));
    for (int i = 0; i < kb; ++i) inv[i + i * kb] = T(1);
    lapack::trsm('L', 'N', kb, kb, el(k0, k0), n, inv, kb);
    return true;
  };
  // Panel rows [r0, r1) of block column k0: L21 ← A21 L11⁻ᵀ.
  auto panel = [&](int k0, int r0, int r1, std::vector<T>& scratch) {
    const int kb = std::min(kBlock, n - k0);
    if (r1 > r0) {
      multiply_in_place('R', 'T', r1 - r0, kb, inverse(k0), kb, el(r0, k0), n, scratch);
    }
  };
  auto panel_by_rows = [&](int k0) {
    const int r0 = std::min(k0 + kBlock, n);
    at::parallel_for(r0, n, kBlock, [&](int64_t lo, int64_t hi) {
      std::vector<T> scratch;
      panel(k0, static_cast<int>(lo), static_cast<int>(hi), scratch);
    });
  };
  if (!factor_diagonal(0)) return false;
  panel_by_rows(0);
  std::atomic<bool> ok{true};
  std::vector<Tile> tiles;
  std::vector<T> scratch;
  for (int k0 = 0; k0 < n; k0 += kBlock) {
    const int k1 = std::min(k0 + kBlock, n), kb = k1 - k0;
    // The right-hand sides' rows k0..k1 ← L11⁻¹ (·) (small: on this thread).
    multiply_in_place('L', 'N', kb, nrhs, inverse(k0), kb, xel(k0, 0), n, scratch);
    if (k1 == n) break;
    // Trailing update A22 -= L21 L21ᵀ (tiles on and below the diagonal) and
    // x[k1:] -= L21 x[k0:k1]. The thread whose share holds all of the next block column
    // (listed first) also factors its diagonal block and computes its panel, so that the
    // next step needs no region of its own for them; those tiles weigh double.
    tiles.clear();
    for (int j0 = k1; j0 < n; j0 += kBlock) {
      add_rows(tiles, false, j0, std::min(j0 + kBlock, n), j0, n);
    }
    const int next_column_tiles = (n - k1 + kBlock - 1) / kBlock;
    add_rhs(tiles, nrhs, k1, n);
    std::atomic<bool> panel_done{false};
    for_tiles(tiles, next_column_tiles, [&](const Tile& t) {
      const int rows = t.r1 - t.r0, cols = t.col1 - t.col0;
      if (t.rhs) {
        lapack::gemm('N', 'N', rows, cols, kb, T(-1), el(t.r0, k0), n, xel(k0, t.col0), n, T(1),
                     xel(t.r0, t.col0), n);
        return;
      }
      lapack::gemm('N', 'T', rows, cols, kb, T(-1), el(t.r0, k0), n, el(t.col0, k0), n, T(1),
                   el(t.r0, t.col0), n);
      if (t.col0 != k1 || t.r0 != k1) return;
      if (!factor_diagonal(k1)) {
        ok = false;
      } else if (t.r1 == n) {
        std::vector<T> local;
        panel(k1, std::min(k1 + kBlock, n), n, local);
        panel_done = true;
      }
    });
    if (!ok) return false;
    if (!panel_done) panel_by_rows(k1);  // the next block column was split between threads
  }
  // Backward: x ← L⁻ᵀ x by block rows from the last, each solved block updating those
  // above; a sequence of small steps, so split by right-hand-side columns, not per step.
  const int threads = std::max(1, at::get_num_threads());
  const int chunk = std::max(kMinBackwardColumns, (nrhs + threads - 1) / threads);
  at::parallel_for(0, nrhs, chunk, [&](int64_t c0, int64_t c1) {
    std::vector<T> copy;
    const int cols = static_cast<int>(c1 - c0);
    for (int k0 = (blocks - 1) * kBlock; k0 >= 0; k0 -= kBlock) {
      const int kb = std::min(kBlock, n - k0);
      multiply_in_place('L', 'T', kb, cols, inverse(k0), kb, xel(k0, c0), n, copy);
      if (k0 > 0) {
        lapack::gemm('T', 'N', k0, cols, kb, T(-1), el(k0, 0), n, xel(k0, c0), n, T(1),
                     xel(0, c0), n);
      }
    }
  });
  return true;
}

template bool blocked_cholesky_solve<float>(float*, float*, int, int);
template bool blocked_cholesky_solve<double>(double*, double*, int, int);

}  // namespace consequential_ext::cpu
