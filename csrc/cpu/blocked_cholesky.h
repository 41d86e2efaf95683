// One system's Cholesky ridge solve by blocks, nearly all of it GEMM.
#pragma once

namespace consequential_ext::cpu {

// Column-major, in place: a (n × n, upper triangle read: A = UᵀU) becomes U (its lower
// triangle overwritten), and x (n × nrhs, leading dimension n) becomes A⁻¹ x. On ATen's
// threads (one inside a parallel region). False (a, x unspecified) when A is not positive
// definite.
template <typename T>
bool blocked_cholesky_solve(T* a, T* x, int n, int nrhs);

}  // namespace consequential_ext::cpu
