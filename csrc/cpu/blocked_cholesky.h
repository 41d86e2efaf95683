// One large Cholesky ridge solve on all of ATen's threads, blocked so that nearly all of its
// work is GEMM: MKL's own threaded potrf/potrs on a 2-core AMD EPYC took 3× the CPU time of
// one thread at D = 577 (5.2 vs 1.7 ms; the idle thread spins either way).
#pragma once

namespace consequential_ext::cpu {

// Whether the routines it needs (potrf, trsm, GEMM) are exported by torch's LAPACK.
bool blocked_cholesky_available();

// Column-major, in place: a (n × n, lower triangle read) becomes its Cholesky factor L, and
// x (n × nrhs, leading dimension n) becomes (L Lᵀ)⁻¹ x. False (a, x unspecified) when a is
// not positive definite.
template <typename T>
bool blocked_cholesky_solve(T* a, T* x, int n, int nrhs);

}  // namespace consequential_ext::cpu
