// Host emulation of the CUDA subset used by csrc/cuda/*.cu, so CI can *run* the kernels
// without a GPU: g++ -std=c++20 -x c++ -include csrc/emu/cuda_emu.h csrc/cuda/<op>_cuda.cu
//
// A launch runs the grid's blocks one after another on blockDim host threads (std::thread).
// __syncthreads is a barrier over the block's threads, __syncwarp one over the 32 threads of a
// warp, __shfl_xor_sync exchanges values through a per-thread slot between two warp barriers.
// __shared__ becomes `static`: with blocks run one at a time, a function-local static array is
// exactly one block's shared storage (uninitialised contents are not relied upon, as on a GPU).
// A thread that returns early from the kernel leaves every barrier of that block, as an exited
// GPU thread does. Launches are serialised. "Device" memory is host memory.
#pragma once
#define CX_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

// ---- qualifiers and built-in types ----------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))  // after the std headers, which use the name
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using std::isfinite;
using std::max;
using std::min;
using std::sqrt;

// ---- runtime API subset -----------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = void*;

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

namespace cx_emu {

// A reusable barrier whose party count shrinks when a thread leaves (returns from the
// kernel), and is restored for the next block. Parties and arrivals share one atomic word so
// exactly one of the last arrival / the last leave releases a phase; waiters sleep on the
// generation counter (a futex: no mutex hand-off when many threads wake at once).
class Barrier {
 public:
  void reset(int parties) {
    state_.store(static_cast<uint64_t>(parties) << 32);
  }
  void wait() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    uint64_t state = state_.load();
    for (;;) {
      const uint64_t parties = state >> 32, arrived = (state & 0xffffffffu) + 1;
      const uint64_t next = arrived == parties ? parties << 32 : (parties << 32) | arrived;
      if (state_.compare_exchange_weak(state, next)) {
        if (arrived == parties) return release();
        break;
      }
    }
    while (generation_.load(std::memory_order_acquire) == generation)
      generation_.wait(generation, std::memory_order_acquire);
  }
  void leave() {
    uint64_t state = state_.load();
    for (;;) {
      const uint64_t parties = (state >> 32) - 1, arrived = state & 0xffffffffu;
      const bool completes = parties > 0 && arrived == parties;
      const uint64_t next = completes ? parties << 32 : (parties << 32) | arrived;
      if (state_.compare_exchange_weak(state, next)) {
        if (completes) release();
        return;
      }
    }
  }

 private:
  void release() {
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
  }
  std::atomic<uint64_t> state_{0};         // parties << 32 | arrived
  std::atomic<uint32_t> generation_{0};
};

constexpr int kWarp = 32;

struct Launch {
  int threads = 0;
  Barrier block, block_end;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> exchange[2];          // shuffle slots per thread, used alternately
  std::vector<std::max_align_t> dynamic_shared;
};

inline Launch*& current() {
  static Launch* launch = nullptr;
  return launch;
}
inline thread_local int thread_rank = 0;  // linear thread index within the block
inline thread_local unsigned shuffle_count = 0;

inline int warp_parties(int warp, int threads) { return std::min(kWarp, threads - warp * kWarp); }

inline void sync_threads() { current()->block.wait(); }
inline void sync_warp() { current()->warps[thread_rank / kWarp]->wait(); }

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
  Launch& l = *current();
  assert(mask == 0xffffffffu && l.threads % kWarp == 0 && "emulated shuffles need full warps");
  (void)mask;
  // Alternating slot sets need one barrier per shuffle: a lane can only come back to this
  // set after the next shuffle's barrier, which every lane reaches after reading this one.
  std::vector<uint64_t>& slots = l.exchange[shuffle_count++ % 2];
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  slots[thread_rank] = slot;
  sync_warp();
  const int partner = (thread_rank / kWarp) * kWarp + ((thread_rank % kWarp) ^ lane_mask);
  slot = slots[partner];
  T out;
  std::memcpy(&out, &slot, sizeof(T));
  return out;
}

inline void* dynamic_shared() { return current()->dynamic_shared.data(); }

// Run `kernel` over `grid` × `block` on the host.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  static std::mutex serial;
  std::lock_guard<std::mutex> lock(serial);
  Launch l;
  l.threads = static_cast<int>(block.x * block.y * block.z);
  assert(l.threads >= 1 && l.threads <= 1024);
  const int warp_count = (l.threads + kWarp - 1) / kWarp;
  for (int w = 0; w < warp_count; ++w) l.warps.push_back(std::make_unique<Barrier>());
  l.exchange[0].assign(l.threads, 0);
  l.exchange[1].assign(l.threads, 0);
  l.dynamic_shared.resize(shared_bytes / sizeof(std::max_align_t) + 1);
  auto reset_barriers = [&] {
    l.block.reset(l.threads);
    for (int w = 0; w < warp_count; ++w) l.warps[w]->reset(warp_parties(w, l.threads));
  };
  reset_barriers();
  l.block_end.reset(l.threads);
  current() = &l;
  gridDim = grid;
  blockDim = block;
  std::tuple<std::decay_t<Params>...> converted(std::forward<Args>(args)...);

  auto body = [&](int rank) {
    thread_rank = rank;
    shuffle_count = 0;
    threadIdx = dim3(rank % block.x, (rank / block.x) % block.y, rank / (block.x * block.y));
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          std::apply(kernel, converted);
          l.block.leave();
          l.warps[rank / kWarp]->leave();
          // Everyone is done with this block: rank 0 restores the barriers, then all go on.
          l.block_end.wait();
          if (rank == 0) reset_barriers();
          l.block_end.wait();
        }
  };
  std::vector<std::thread> pool;
  pool.reserve(l.threads);
  for (int rank = 0; rank < l.threads; ++rank) pool.emplace_back(body, rank);
  for (auto& t : pool) t.join();
  current() = nullptr;
}

}  // namespace cx_emu

#define __syncthreads() cx_emu::sync_threads()
#define __syncwarp(...) cx_emu::sync_warp()
#define __shfl_xor_sync(mask, value, lane_mask) cx_emu::shfl_xor((mask), (value), (lane_mask))

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

#define CX_LAUNCH(kernel, grid, block, smem, stream, ...) \
  cx_emu::launch(kernel, (grid), (block), (smem), __VA_ARGS__)
#define CX_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(cx_emu::dynamic_shared())
