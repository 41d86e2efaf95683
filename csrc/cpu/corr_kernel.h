// Channel-correlation micro-kernel shared by the CPU im2col-Gram paths (no torch headers:
// it is plain loops over raw pointers, vectorised per CPU at run time).
#pragma once
#include <cstdint>

namespace consequential_ext::cpu {

// Width, in elements, that callers pad M and N to (one 64-byte vector of floats).
constexpr int64_t kCorrAlign = 16;

// out[m][n] += Σ_{o < n_outer} Σ_{k < n_inner} L[o·outer_stride + k·ld + m] · R[o·outer_stride + k·ld + n]
// for m < M, n < N: the correlation of two row-major (K × ·) panels, K split into n_outer
// runs of n_inner rows (a run per image row when the rows of a column strip are not
// evenly spaced). out is row-major with leading dimension ldo. M and N must be multiples
// of kCorrAlign. Accumulates in T; picks AVX-512 / AVX2 / portable code at run time.
void corr_accumulate(float* out, int64_t ldo, const float* L, const float* R, int64_t M, int64_t N,
                     int64_t n_outer, int64_t outer_stride, int64_t n_inner, int64_t ld);
void corr_accumulate(double* out, int64_t ldo, const double* L, const double* R, int64_t M,
                     int64_t N, int64_t n_outer, int64_t outer_stride, int64_t n_inner, int64_t ld);

// out[m·ldo + n] += in[m·ldi + n] for m < M, n < N: a correlation piece added into a block.
void add_block(float* out, int64_t ldo, const float* in, int64_t ldi, int64_t M, int64_t N);
void add_block(double* out, int64_t ldo, const double* in, int64_t ldi, int64_t M, int64_t N);

// out[m·ldo + n] += Σ_{k < K} A[m·ld + k] · B[n·ld + k] for m < M, n < N: dot products of
// rows, K a multiple of kCorrAlign (whole vectors: callers pad with zeros), M a multiple of
// kDotRowAlign, N of kDotColAlign. upper (A = B, M ≤ N): tiles wholly below the diagonal,
// whose entries are all m > n, are skipped.
constexpr int64_t kDotRowAlign = 3, kDotColAlign = 4;
void row_dots(float* out, int64_t ldo, const float* A, const float* B, int64_t ld, int64_t M,
              int64_t N, int64_t K, bool upper);
void row_dots(double* out, int64_t ldo, const double* A, const double* B, int64_t ld, int64_t M,
              int64_t N, int64_t K, bool upper);

// out[c] = Σ_{r < n} in[r·ld + c] for c < N: the sum of n rows. Overwrites out.
void sum_rows(float* out, const float* in, int64_t n, int64_t ld, int64_t N);
void sum_rows(double* out, const double* in, int64_t n, int64_t ld, int64_t N);

// out[l] = Σ_{k < n} L[k·ls + l] · R[k·rs + l] for l < lanes (a multiple of kCorrAlign):
// one dot product over k (the batch) per SIMD lane. Overwrites out.
void lane_dot(float* out, const float* L, const float* R, int64_t n, int64_t ls, int64_t rs,
              int64_t lanes);
void lane_dot(double* out, const double* L, const double* R, int64_t n, int64_t ls, int64_t rs,
              int64_t lanes);

// The side of the float blocks transpose_block moves in registers: 16 (AVX-512), 8 (AVX2),
// 0 where neither runs (callers then copy element by element).
int64_t transpose_width();
// dst[j][i] = src[i·ld + j] for i, j < transpose_width(): a square block of floats stored
// transposed, each dst[j] a row.
void transpose_block(const float* src, int64_t ld, float* const* dst);

}  // namespace consequential_ext::cpu
