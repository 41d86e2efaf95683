// The LAPACK/BLAS routines torch was linked with, called directly on row-major buffers: a
// row-major matrix is the column-major transpose, and a symmetric one's row-major lower
// triangle its column-major upper one ('U' below).
#pragma once

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

}  // namespace consequential_ext::cpu::lapack
