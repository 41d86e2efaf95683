// The LAPACK/BLAS routines torch was linked with (MKL or OpenBLAS export them from
// libtorch_cpu), declared weak so that a torch without them leaves them null, and wrapped in
// float/double overloads. All column-major, lower triangle.
#pragma once

extern "C" {
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info)
    __attribute__((weak));
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info)
    __attribute__((weak));
void spotrs_(const char* uplo, const int* n, const int* nrhs, const float* a, const int* lda,
             float* b, const int* ldb, int* info) __attribute__((weak));
void dpotrs_(const char* uplo, const int* n, const int* nrhs, const double* a, const int* lda,
             double* b, const int* ldb, int* info) __attribute__((weak));
void spotri_(const char* uplo, const int* n, float* a, const int* lda, int* info)
    __attribute__((weak));
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info)
    __attribute__((weak));
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

inline void potrf(float* a, int n, int lda, int* info) {
  const char lo = 'L';
  spotrf_(&lo, &n, a, &lda, info);
}
inline void potrf(double* a, int n, int lda, int* info) {
  const char lo = 'L';
  dpotrf_(&lo, &n, a, &lda, info);
}
inline void potrs(const float* a, int n, float* b, int nrhs, int* info) {
  const char lo = 'L';
  spotrs_(&lo, &n, &nrhs, a, &n, b, &n, info);
}
inline void potrs(const double* a, int n, double* b, int nrhs, int* info) {
  const char lo = 'L';
  dpotrs_(&lo, &n, &nrhs, a, &n, b, &n, info);
}
inline void potri(float* a, int n, int* info) {
  const char lo = 'L';
  spotri_(&lo, &n, a, &n, info);
}
inline void potri(double* a, int n, int* info) {
  const char lo = 'L';
  dpotri_(&lo, &n, a, &n, info);
}
// c ← beta·c + alpha·op(a)·op(b); op = transpose where ta / tb is 'T'.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
// b ← op(a)⁻¹·b (side 'L') or b·op(a)⁻¹ (side 'R'), a lower triangular, non-unit diagonal.
inline void trsm(char side, char ta, int m, int n, const float* a, int lda, float* b, int ldb) {
  const char lo = 'L', diag = 'N';
  const float one = 1;
  strsm_(&side, &lo, &ta, &diag, &m, &n, &one, a, &lda, b, &ldb);
}
inline void trsm(char side, char ta, int m, int n, const double* a, int lda, double* b,
                 int ldb) {
  const char lo = 'L', diag = 'N';
  const double one = 1;
  dtrsm_(&side, &lo, &ta, &diag, &m, &n, &one, a, &lda, b, &ldb);
}

}  // namespace consequential_ext::cpu::lapack
