// Strided and 1×1 im2col Gram with nothing gathered: in a zero-padded, pixel-major copy of an
// image, kernel row i of the patch at output (oy, ox) is one run of kw·Cg floats starting at
// ((oy·sh + i·dh)·Wp + ox·sw)·Cg. The runs of one output row are therefore the rows of a
// matrix whose row stride is sw·Cg (the rows overlap where sw < kw), and the Gram's block for
// kernel rows (i1, i2) is the correlation of two such matrices over every output row — the
// shape corr_accumulate takes. The tiled kernel copied each run into a patch tile first: a
// quarter of its time on ResNet-20's stride-2 16 → 32 Gram, and its tile re-read per block row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "corr_kernel.h"
#include "gram_cpu.h"
#include "image_copy.h"
#include "mirror.h"

namespace consequential_ext::cpu {
namespace {

// Pieces are copied and correlated in batches of up to this many elements (256 KiB of float:
// half of L2, beside the block being accumulated).
constexpr int64_t kBatchElems = int64_t{1} << 16;

// One run padded to whole vectors: the columns past kw·Cg read the next pixels (or the
// segment's zeroed slack) and land in Gram entries that are never read.
int64_t padded_run(const at::Tensor& x, const PatchGeometry& g) {
  return round_up(g.kw * (x.size(1) / g.groups), kCorrAlign);
}

template <typename src_t, typename acc_t>
void gram_runs_impl(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  const int64_t B = x.size(0), Cg = x.size(1) / g.groups, H = x.size(2), W = x.size(3);
  const int64_t Ho = g.out_h(H), Wo = g.out_w(W), kk = g.kh * g.kw, d0 = Cg * kk;
  const int64_t R = padded_run(x, g), Dp = g.kh * R, Wp = W + 2 * g.pw;
  // Pieces of work: whole images, or chunks of output rows where there are fewer than 4
  // images per thread (a piece copies the input rows it reads; neighbours share some).
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min(Ho, (4 * threads + B - 1) / B);
  const int64_t rows = (Ho + chunks - 1) / chunks, per_image = (Ho + rows - 1) / rows;
  const int64_t row_elems = Wp * Cg, run_step = g.sw * Cg, out_row_step = g.sh * row_elems;
  // A piece's segment: its padded input rows, then R elements of slack for the last run's
  // padding.
  const int64_t piece_elems = ((rows - 1) * g.sh + (g.kh - 1) * g.dh + 1) * row_elems + R;
  const src_t* src = x.const_data_ptr<src_t>();
  const int64_t sb = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
  auto out = gram.accessor<acc_t, 3>();
  // Per thread: the Gram's blocks (Dp × Dp, on and above the diagonal) and the bias row (Σ of
  // every run column), summed in thread order afterwards: bit-identical from run to run.
  std::vector<std::vector<acc_t>> blocks(threads), bias_rows(threads);
  // Gram row p's (channel c, offset o: p = c·kk + o) column in the blocks.
  std::vector<int64_t> column(d0);
  for (int64_t p = 0; p < d0; ++p) column[p] = p % kk / g.kw * R + p % kk % g.kw * Cg + p / kk;

  for (int64_t grp = 0; grp < g.groups; ++grp) {
    for (int64_t t = 0; t < threads; ++t) blocks[t].clear(), bias_rows[t].clear();
    at::parallel_for(0, B * per_image, 1, [&](int64_t lo, int64_t hi) {
      const int64_t tid = at::get_thread_num();
      if (blocks[tid].empty()) blocks[tid].assign(Dp * Dp, acc_t(0)), bias_rows[tid].assign(Dp, acc_t(0));
      acc_t* const acc = blocks[tid].data();
      acc_t* const sums = bias_rows[tid].data();
      const int64_t batch = std::max<int64_t>(1, kBatchElems / piece_elems);
      acc_t* const buffer = scratch<acc_t, 13>(std::min(batch, hi - lo) * piece_elems);
      std::vector<acc_t> row_sum(R);
      std::vector<int64_t> batch_rows(batch);
      for (int64_t first = lo; first < hi; first += batch) {
        const int64_t n_pieces = std::min(batch, hi - first);
        // Each piece's padded input rows y0 … y0 + used − 1 into its segment, zeros outside
        // the image.
        for (int64_t k = 0; k < n_pieces; ++k) {
          const int64_t piece = first + k, b = piece / per_image, oy0 = piece % per_image * rows;
          const int64_t n_rows = batch_rows[k] = std::min(rows, Ho - oy0);
          const int64_t y0 = oy0 * g.sh, used = (n_rows - 1) * g.sh + (g.kh - 1) * g.dh + 1;
          const int64_t in_lo = std::clamp(y0 - g.ph, int64_t{0}, H);
          const int64_t in_hi = std::clamp(y0 + used - g.ph, int64_t{0}, H);
          acc_t* const segment = buffer + k * piece_elems;
          std::fill(segment, segment + used * row_elems + R, acc_t(0));
          if (in_hi > in_lo)
            copy_image(segment + (in_lo + g.ph - y0) * row_elems + g.pw * Cg, Wp, 1, Cg,
                       src + b * sb + grp * Cg * sc + in_lo * sy, Cg, in_hi - in_lo, W, sc, sy, sx);
        }
        // Block by block, the batch's pieces in turn: a block stays cached over the batch (a
        // 576-wide Gram's blocks are more than L2 holds).
        auto correlate = [&](acc_t* o, int64_t left, int64_t right, int64_t M, int64_t N) {
          for (int64_t k = 0; k < n_pieces; ++k) {
            const acc_t* segment = buffer + k * piece_elems;
            corr_accumulate(o, Dp, segment + left, segment + right, M, N, batch_rows[k],
                            out_row_step, Wo, run_step);
          }
        };
        for (int64_t i1 = 0; i1 < g.kh; ++i1) {
          const int64_t top = i1 * g.dh * row_elems;  // kernel row i1's first run
          acc_t* const diagonal = acc + i1 * R * Dp + i1 * R;
          // The diagonal block: its 16-row block rows from the diagonal on.
          for (int64_t r0 = 0; r0 < R; r0 += kCorrAlign)
            correlate(diagonal + r0 * Dp + r0, top + r0, top + r0, kCorrAlign, R - r0);
          for (int64_t i2 = i1 + 1; i2 < g.kh; ++i2)
            correlate(diagonal + (i2 - i1) * R, top, i2 * g.dh * row_elems, R, R);
          for (int64_t k = 0; k < n_pieces; ++k)
            for (int64_t oy = 0; oy < batch_rows[k]; ++oy) {
              sum_rows(row_sum.data(), buffer + k * piece_elems + top + oy * out_row_step, Wo,
                       run_step, R);
              add_block(sums + i1 * R, R, row_sum.data(), R, 1, R);
            }
        }
      }
    });
    // Thread 0's blocks first, then the others', in thread order.
    std::vector<acc_t>& total = blocks[0];
    std::vector<acc_t>& total_sums = bias_rows[0];
    if (total.empty()) total.assign(Dp * Dp, acc_t(0)), total_sums.assign(Dp, acc_t(0));
    for (int64_t t = 1; t < threads; ++t) {
      if (blocks[t].empty()) continue;
      add_block(total.data(), Dp, blocks[t].data(), Dp, Dp, Dp);
      add_block(total_sums.data(), Dp, bias_rows[t].data(), Dp, 1, Dp);
    }
    const int64_t D = d0 + (g.bias ? 1 : 0);
    upper_from_permuted(&out[grp][0][0], D, d0, total.data(), Dp, column.data());
    if (g.bias) {
      for (int64_t p = 0; p < d0; ++p) out[grp][p][d0] = total_sums[column[p]];
      out[grp][d0][d0] = static_cast<acc_t>(B * Ho * Wo);
    }
    mirror_triangle(&out[grp][0][0], D, D, Mirror::kUpperToLower);
  }
}

}  // namespace

bool runs_applies(const at::Tensor& x, const PatchGeometry& g) {
  const int64_t cg = x.size(1) / g.groups, run = g.kw * cg;
  // The kernel's 64-row K blocks step sw·Cg floats a row: at most 64 keeps both sides' block
  // in L1 (32 KiB). Wider, the tiled kernel's packed rows won (one thread, interleaved: 3×3
  // stride 2 over 64 and 128 channels 1.05–1.07× faster, 1×1 stride 2 over 256 1.1×); within
  // it, this one did (ResNet-20's stride-2 16 and 32 channels 0.73, 0.85; 1×1 over 64 0.67).
  return g.dw == 1 && g.sw * cg <= 64 && 4 * padded_run(x, g) <= 5 * run;
}

void gram_runs_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  TORCH_CHECK(g.dw == 1, "im2col_gram: the runs algorithm needs dilation 1 along the width, got ",
              g.dw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "im2col_gram_cpu", [&] {
    gram_runs_impl<scalar_t, at::opmath_type<scalar_t>>(x, g, gram);
  });
}

}  // namespace consequential_ext::cpu
