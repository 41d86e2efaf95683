// What the CPU kernels share about SIMD: the instruction sets their variants are built for,
// the one this CPU runs, and a vector type of one target's register width.
#pragma once
#include <cstdint>

namespace consequential_ext::cpu {

enum class Isa { kAvx512, kAvx2, kPortable };

// The widest variant this CPU runs, or a narrower one named by CX_CPU_ISA (portable, avx2,
// avx512; std::invalid_argument for another name or one the CPU cannot run), decided once
// per process: the tests run every variant a machine can (tests/test_cpu_isa.py).
Isa cpu_isa();

// One W-byte vector of T, W the target's register width: generic vectors wider than the
// registers are split by the compiler, but GCC then keeps the accumulators on the stack
// (64-byte vectors under AVX2: the 128×64×8×8 Gram 26× slower than 32-byte ones there, the
// lane solver's systems 3–4× slower).
template <typename T, int W>
struct Vec {
  typedef T type __attribute__((vector_size(W)));
};

// One such vector loaded from / stored to memory aligned only to T, as one vector move. (A
// std::memcpy of a vector in a loop GCC compiled to a byte copy, 16 bytes at a time, through
// an array on the stack: in the Winograd transforms those copies took about half of their
// time.)
template <typename T, int W>
struct UnalignedVec {
  typedef T type __attribute__((vector_size(W), aligned(sizeof(T)), may_alias));
};
template <typename T, int W>
__attribute__((always_inline)) inline void load_vec(typename Vec<T, W>::type& v, const T* p) {
  v = *reinterpret_cast<const typename UnalignedVec<T, W>::type*>(p);
}
template <typename T, int W>
__attribute__((always_inline)) inline void store_vec(T* p, const typename Vec<T, W>::type& v) {
  *reinterpret_cast<typename UnalignedVec<T, W>::type*>(p) = v;
}

}  // namespace consequential_ext::cpu
