// The LAPACK/BLAS routines torch was linked with, called directly on row-major buffers: a
// row-major matrix is the column-major transpose, and a symmetric one's row-major lower
// triangle its column-major upper one ('U' below).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

// Weak: resolved from libtorch_cpu where torch exports its LAPACK, null otherwise.
extern "C" {
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info)
    __attribute__((weak));
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info)
    __attribute__((weak));
void spotrs_(const char* uplo, const int* n, const int* nrhs, const float* a, const int* lda,
             float* b, const int* ldb, int* info) __attribute__((weak));
void dpotrs_(const char* uplo, const int* n, const int* nrhs, const double* a, const int* lda,
             double* b, const int* ldb, int* info) __attribute__((weak));
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
void strsm_(const char* side, const char* uplo, const char* ta, const char* diag, const int* m,
            const int* n, const float* alpha, const float* a, const int* lda, float* b,
            const int* ldb) __attribute__((weak));
void dtrsm_(const char* side, const char* uplo, const char* ta, const char* diag, const int* m,
            const int* n, const double* alpha, const double* a, const int* lda, double* b,
            const int* ldb) __attribute__((weak));
}

namespace consequential_ext::cpu::lapack {

// Column-major upper = row-major lower: the triangle the lane solver and the reference
// (torch.linalg.cholesky) read, so a Gram that is not bit-symmetric gets one answer on
// every path.
constexpr char kUplo = 'U';

// The upper factor of the n × n block at a (leading dimension lda), in place.
inline void potrf(float* a, int n, int lda, int* info) {
  spotrf_(&kUplo, &n, a, &lda, info);
}
inline void potrf(double* a, int n, int lda, int* info) {
  dpotrf_(&kUplo, &n, a, &lda, info);
}
inline void potrs(const float* a, int n, float* b, int nrhs, int* info) {
  spotrs_(&kUplo, &n, &nrhs, a, &n, b, &n, info);
}
inline void potrs(const double* a, int n, double* b, int nrhs, int* info) {
  dpotrs_(&kUplo, &n, &nrhs, a, &n, b, &n, info);
}

// c ← alpha·op(a)·op(b) + beta·c, op 'N' or 'T'.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                 int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
// b ← U⁻¹ b, U upper (column-major, leading dimension lda), b n × m (leading dimension ldb).
inline void upper_solve(const float* u, int n, int lda, float* b, int m, int ldb) {
  const char side = 'L', uplo = 'U', ta = 'N', diag = 'N';
  const float one = 1;
  strsm_(&side, &uplo, &ta, &diag, &n, &m, &one, u, &lda, b, &ldb);
}
inline void upper_solve(const double* u, int n, int lda, double* b, int m, int ldb) {
  const char side = 'L', uplo = 'U', ta = 'N', diag = 'N';
  const double one = 1;
  dtrsm_(&side, &uplo, &ta, &diag, &n, &m, &one, u, &lda, b, &ldb);
}

// inv (kb × kb, leading dimension kb) ← U⁻¹ of the upper block at u (leading dimension ldu):
// a triangular solve of the identity, for the blocked substitutions' diagonal blocks.
template <typename T>
void upper_inverse(const T* u, int kb, int ldu, T* inv) {
  std::fill(inv, inv + kb * kb, T(0));
  for (int i = 0; i < kb; ++i) inv[i + i * kb] = T(1);
  upper_solve(u, kb, ldu, inv, kb, kb);
}
// b (rows × cols, leading dimension ldb) ← op(inv) · b, inv rows × rows (leading dimension
// rows); through `copy`, as GEMM's output may not alias its input.
template <typename T>
void multiply_in_place(char op, int rows, int cols, const T* inv, T* b, int ldb,
                       std::vector<T>& copy) {
  if (rows == 0 || cols == 0) return;
  copy.resize(static_cast<size_t>(rows) * cols);
  for (int j = 0; j < cols; ++j)
    std::copy_n(b + static_cast<int64_t>(j) * ldb, rows, copy.data() + static_cast<int64_t>(j) * rows);
  gemm(op, 'N', rows, cols, rows, T(1), inv, rows, copy.data(), rows, T(0), b, ldb);
}

}  // namespace consequential_ext::cpu::lapack
