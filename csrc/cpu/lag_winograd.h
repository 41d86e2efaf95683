// Lag correlations of a 3×3 stride-1 Gram's core region in Winograd form (gram_shift_cpu.cpp).
//
// Maths. Over a region of first-factor pixels q, the shift kernel needs, for its 13 shifts
// (s, t) (s ∈ {0, 1, 2}, t ∈ {−2 … 2}, s > 0 or t ≥ 0), L(s, t) = Σ_q x(q)·x(q + (s, t))ᵀ
// (C × C, summed over the images; zero where the partner lies outside the image). Directly that
// is 13 channel products per pixel. Over 2 × 2 tiles of q it is the transpose of Winograd's
// minimal filtering (Lavin & Gray, 2016; a weight gradient has the same form): with the 1-D
// F(2, 3) transforms
//   a-side  α = [a0, (a0 + a1)/2, (a0 − a1)/2, −a1],   b-side  β = [b0 − b2, b1 + b2, b2 − b1, b1 − b3],
//   lags    r0 = m0 + m1 + m2,  r1 = m1 − m2,  r2 = m1 + m2 + m3   (m_ξ = α_ξ·β_ξ),
// applied along rows and columns, 16 tile-point products give the 9 shifts s, t ∈ {0, 1, 2};
// F(2, 2) (a-side [a0, a0 + a1, a1], b-side [b0 − b1, b1, b2 − b1], r0 = m0 + m1,
// r1 = m1 + m2) on the b window moved by (+1, −2) gives the 4 shifts s ∈ {1, 2}, t ∈ {−2, −1}
// from 9 more: 25 products per 4 pixels instead of 52. Over 4 × 4 tiles the same with F(4, 3)
// in its weight-gradient form (Lavin & Gray's points 0, ±1, ±2, ∞; per axis a-side [a0,
// a0 + a1 + a2 + a3, a0 − a1 + a2 − a3, a0 + 2a1 + 4a2 + 8a3, a0 − 2a1 + 4a2 − 8a3, a3], b-side
// Bᵀ b, lags (1/24)·[6, −4, −4, 1, 1, 0], [0, −4, 4, 2, −2, 0], [0, −4, −4, 4, 4, 24]) for the 9
// and F(4, 2) (points 0, ±1, 2, ∞; the a-side F(4, 3)'s without −2; b-side rows [2, −1, −2, 1, 0],
// [0, 2, 1, −1, 0], [0, −2, 3, −1, 0], [0, −1, 0, 1, 0], [0, 2, −1, −2, 1]; lags (1/6)·[3, 3, 1, 1,
// 0], [0, 3, −1, 2, 6]) for the 4: 61 products per 16 pixels. The region is tiled 4 × 4 as far as
// it goes, the strips left 2 × 2. The 2 × 2 tiles' coefficients are 0, ±1, ±1/2; the 4 × 4 tiles'
// reach 8 and 1/24, so their rounding is a few times larger — about that of ATen's own float32
// weight gradient (tests/test_cpu_kernels.py, tests/test_conv_gram_grad.py).
// Each point's product over the tiles of a K-block is one correlation of two transformed
// panels (corr_kernel.h); the shifts come from the accumulated C × C point products once, at
// the end, separably (rows' lags of the columns' lags).
#pragma once
#include <cstdint>

namespace consequential_ext::cpu {

// 4 × 4 tiles: 6 × 6 (F(4, 3) ⊗ F(4, 3)) + 5 × 5 (F(4, 2) ⊗ F(4, 2)); 2 × 2 tiles: 4 × 4
// (F(2, 3) ⊗ F(2, 3)) + 3 × 3 (F(2, 2) ⊗ F(2, 2)).
constexpr int kLagPoints4 = 61, kLagPoints2 = 25;
constexpr int kLagPoints = kLagPoints4 + kLagPoints2;

// Adds into M (kLagPoints blocks of Cp × Cp, each row-major with leading dimension Cp: the 4 × 4
// tiles' 61 points, then the 2 × 2 tiles' 25) the point products of the tiles of pixels
// [y0, y1) × [x0, x1) (both even lengths, inside the image) of a chunk copy Z: pixel (y, x) of
// image b at Z + ((y·Wz + x)·bc + b)·Cs, Cp channels (the padding zero) of an H × W image;
// partners outside the image count as zero. Uses this thread's scratch slot 7.
void lag_points_accumulate(float* M, const float* Z, int64_t H, int64_t W, int64_t Wz,
                           int64_t bc, int64_t Cs, int64_t Cp, int64_t y0, int64_t y1,
                           int64_t x0, int64_t x1);
void lag_points_accumulate(double* M, const double* Z, int64_t H, int64_t W, int64_t Wz,
                           int64_t bc, int64_t Cs, int64_t Cp, int64_t y0, int64_t y1,
                           int64_t x0, int64_t x1);

// The point blocks [begin, end) that the tiles of a rows × cols region (even sides) add into:
// the 4 × 4 tiles' (from 0) where the region holds one, the 2 × 2 tiles' (up to the end)
// where a strip is left. The rest of M is neither read nor written: callers zero this range.
struct PointBlocks {
  int64_t begin, end;
};
PointBlocks lag_point_blocks(int64_t rows, int64_t cols);
PointBlocks grad_point_blocks(int64_t rows, int64_t cols);

// out[s][t + 2] (Cp × Cp, leading dimension Cp) = L(s, t) over the tiles M accumulated (its
// blocks lag_point_blocks of the region, cell = Cp² apart), for each of the 13 shifts whose out
// is not null: entries [0, n) of each block (offset pointers give a slice, so threads can
// share one). Overwrites those.
void lags_from_points(float* const (&out)[3][5], const float* M, int64_t cell, int64_t n,
                      PointBlocks used);
void lags_from_points(double* const (&out)[3][5], const double* M, int64_t cell, int64_t n,
                      PointBlocks used);

// The weight gradient's part over output tiles: G(i, j) = Σ_p dZ(p)·x(p + (i − ph, j − pw))ᵀ is
// the same bilinear form, on the b window moved by (−ph, −pw): over 4 × 4 output tiles
// F(4, 3) ⊗ F(4, 3), 36 products per 16 output pixels instead of 144; the strips a 4 × 4 tiling
// leaves in F(2, 3) ⊗ F(2, 3)'s 2 × 2 tiles (16 per 4).
constexpr int kGradPoints4 = 36, kGradPoints2 = 16;
constexpr int kGradPoints = kGradPoints4 + kGradPoints2;

// Adds into M (kGradPoints blocks of Op × Cp, leading dimension Cp: the 4 × 4 tiles' 36
// points, then the 2 × 2 tiles' 16) the point products of the output pixels [0, y1) × [0, x1)
// (even): dZ from Zy, x from Z (both laid out as for lag_points_accumulate, Op and Cp
// channels); x outside the H × W image counts as zero. Uses this thread's scratch slot 7.
void grad_points_accumulate(float* M, const float* Zy, const float* Z, int64_t H, int64_t W,
                            int64_t Wz, int64_t bc, int64_t Cs, int64_t Op, int64_t Cp,
                            int64_t ph, int64_t pw, int64_t y1, int64_t x1);
void grad_points_accumulate(double* M, const double* Zy, const double* Z, int64_t H, int64_t W,
                            int64_t Wz, int64_t bc, int64_t Cs, int64_t Op, int64_t Cp,
                            int64_t ph, int64_t pw, int64_t y1, int64_t x1);

// Adds the 9 kernel offsets' blocks (offset i·3 + j at (i·3 + j)·cell) recovered from M's
// blocks `used` (grad_point_blocks of the output region, cell apart): entries [0, n) of each.
void grad_from_points(float* g, const float* M, int64_t cell, int64_t n, PointBlocks used);
void grad_from_points(double* g, const double* M, int64_t cell, int64_t n, PointBlocks used);

}  // namespace consequential_ext::cpu
