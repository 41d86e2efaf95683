// The calling thread's own thread count, kept through this library's first parallel region.
#pragma once
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// MKL's per-thread thread count (exported by torch's MKL builds; null elsewhere).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace consequential_ext::cpu {

// Call at each kernel entry, before at::get_num_threads() sizes per-thread state. Every
// at::parallel_for runs the inline at::internal::lazy_init_num_threads(), whose thread_local
// flag this library holds a copy of its own (libtorch_cpu does not export its one): on a
// thread's first parallel_for here it calls at::init_num_threads(), which sets the thread's
// OpenMP and MKL counts to the process-wide one (the last torch.set_num_threads of any
// thread). Mid-kernel, a team larger than the count read before wrote past the per-thread
// slots (tests/test_threads.py). Here that reset runs first, and the thread's counts are put back.
inline void keep_thread_count() {
#ifdef _OPENMP
  thread_local bool kept = false;
  if (kept) return;
  kept = true;
  const int threads = at::get_num_threads();  // torch's own per-thread initialisation first
  const int mkl = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(0) : 0;  // the previous
  at::internal::lazy_init_num_threads();
  omp_set_num_threads(threads);
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl);
#endif
}

}  // namespace consequential_ext::cpu
