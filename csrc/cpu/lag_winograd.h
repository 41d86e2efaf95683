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
// from 9 more: 25 products per 4 pixels instead of 52. Every coefficient is 0, ±1 or ±1/2, so
// the rounding stays within a few units of the direct sums' (tests/test_cpu_kernels.py).
// Each point's product over the tiles of a K-block is one correlation of two transformed
// panels (corr_kernel.h); the shifts come from the 25 accumulated C × C point products once,
// at the end.
#pragma once
#include <cstdint>

namespace consequential_ext::cpu {

constexpr int kLagPoints = 25;  // 4 × 4 (F(2, 3) ⊗ F(2, 3)) + 3 × 3 (F(2, 2) ⊗ F(2, 2))

// Adds into M (kLagPoints blocks of Cp × Cp, each row-major with leading dimension Cp) the
// point products of the 2 × 2 tiles of pixels [y0, y1) × [x0, x1) (both even lengths, inside
// the image) of a chunk copy Z: pixel (y, x) of image b at Z + ((y·Wz + x)·bc + b)·Cs, Cp
// channels (the padding zero) of an H × W image; partners outside the image count as zero.
// Uses this thread's scratch slot 7.
void lag_points_accumulate(float* M, const float* Z, int64_t H, int64_t W, int64_t Wz,
                           int64_t bc, int64_t Cs, int64_t Cp, int64_t y0, int64_t y1,
                           int64_t x0, int64_t x1);
void lag_points_accumulate(double* M, const double* Z, int64_t H, int64_t W, int64_t Wz,
                           int64_t bc, int64_t Cs, int64_t Cp, int64_t y0, int64_t y1,
                           int64_t x0, int64_t x1);

// out (Cp × Cp, leading dimension Cp) = L(s, t) over the tiles M accumulated, for one of the
// 13 shifts. Overwrites out.
void lag_from_points(float* out, const float* M, int64_t Cp, int64_t s, int64_t t);
void lag_from_points(double* out, const double* M, int64_t Cp, int64_t s, int64_t t);

// The weight gradient's part over output tiles: G(i, j) = Σ_p dZ(p)·x(p + (i − ph, j − pw))ᵀ is
// the same bilinear form, F(2, 3) ⊗ F(2, 3) on the b window moved by (−ph, −pw): 16 products
// per 4 output pixels instead of 36.
constexpr int kGradPoints = 16;

// Adds into M (kGradPoints blocks of Op × Cp, leading dimension Cp) the point products of the
// 2 × 2 tiles of output pixels [0, y1) × [0, x1) (even): dZ from Zy, x from Z (both laid out
// as for lag_points_accumulate, Op and Cp channels); x outside the H × W image counts as zero.
// Uses this thread's scratch slot 7.
void grad_points_accumulate(float* M, const float* Zy, const float* Z, int64_t H, int64_t W,
                            int64_t Wz, int64_t bc, int64_t Cs, int64_t Op, int64_t Cp,
                            int64_t ph, int64_t pw, int64_t y1, int64_t x1);
void grad_points_accumulate(double* M, const double* Zy, const double* Z, int64_t H, int64_t W,
                            int64_t Wz, int64_t bc, int64_t Cs, int64_t Op, int64_t Cp,
                            int64_t ph, int64_t pw, int64_t y1, int64_t x1);

// Adds the 9 kernel offsets' blocks (offset i·3 + j at (i·3 + j)·cell) recovered from M.
void grad_from_points(float* g, const float* M, int64_t cell);
void grad_from_points(double* g, const double* M, int64_t cell);

}  // namespace consequential_ext::cpu
