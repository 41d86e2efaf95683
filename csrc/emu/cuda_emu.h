// Host emulation of the CUDA subset used by csrc/cuda/*.cu, so CI can *run* the kernels
// without a GPU: g++ -std=c++20 -x c++ -include csrc/emu/cuda_emu.h csrc/cuda/<op>_cuda.cu
//
// A launch runs the grid's blocks one after another, each on blockDim emulated threads.
// __syncthreads is a barrier over the block's threads, __syncwarp one over the 32 threads of a
// warp, __shfl_xor_sync exchanges values through a per-thread slot between two warp barriers.
// __shared__ becomes `static`: with blocks run one at a time, a function-local static array is
// exactly one block's shared storage (uninitialised contents are not relied upon, as on a GPU;
// the dynamic shared array is filled with 0xff bytes, NaN, at every block start, so a read
// before the write shows). A thread that returns early from the kernel leaves every barrier of
// that block, as an exited GPU thread does. Launches are serialised. "Device" memory is host
// memory. A launch with an invalid configuration (an empty grid, too many threads, more
// dynamic shared memory than 48 KiB or the kernel's cudaFuncSetAttribute opt-in) runs nothing
// and sets the error cudaGetLastError returns, as on a GPU.
//
// Two schedules (set_schedule):
// * kSerial (the default): a block's threads are fibers (ucontext) on the launching thread, one
//   running at a time; at every barrier arrival the highest-priority ready thread runs next,
//   priorities a seeded random permutation per block, reversed on every other block. A missing
//   barrier lets a reader run before its writer (or a writer before its reader) in the same
//   way on every run: a race that changes values fails deterministically for a given seed.
//   Races that change no value (every thread storing the same) never show.
// * kThreads: one host thread (std::thread) per emulated thread, all running at once, barriers
//   the only synchronisation. For ThreadSanitizer (tools/sanitize_cuda.sh), which sees every
//   race whether or not the interleaving exposes it; under the serial schedule it would see a
//   single host thread and no race at all.
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
#include <queue>
#include <random>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <ucontext.h>

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
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = void*;

namespace cx_emu {
inline cudaError_t last_error = cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return std::exchange(cx_emu::last_error, cudaSuccess); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
namespace cx_emu {
// Dynamic shared memory a launch may take without opting in, and each kernel's opt-in
// (cudaFuncAttributeMaxDynamicSharedMemorySize): a launch over both fails as on a GPU, so a
// forgotten or too small attribute shows here, not only on a device.
constexpr size_t kDefaultDynamicShared = 48 * 1024;
struct SharedOptIns {
  std::mutex mutex;
  std::vector<std::pair<const void*, int>> bytes;
};
inline SharedOptIns& shared_opt_ins() {
  static SharedOptIns opt_ins;
  return opt_ins;
}
inline size_t dynamic_shared_limit(const void* kernel) {
  SharedOptIns& o = shared_opt_ins();
  std::lock_guard<std::mutex> lock(o.mutex);
  for (const auto& [k, b] : o.bytes)
    if (k == kernel) return std::max(kDefaultDynamicShared, static_cast<size_t>(b));
  return kDefaultDynamicShared;
}
}  // namespace cx_emu

template <typename F>
cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute attribute, int value) {
  if (value < 0) return cudaErrorInvalidValue;
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  cx_emu::SharedOptIns& o = cx_emu::shared_opt_ins();
  std::lock_guard<std::mutex> lock(o.mutex);
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& [k, b] : o.bytes)
    if (k == key) return b = value, cudaSuccess;
  o.bytes.emplace_back(key, value);
  return cudaSuccess;
}

namespace cx_emu {

enum class Schedule { kSerial = 0, kThreads = 1 };
struct ScheduleSetting {
  Schedule schedule = Schedule::kSerial;
  uint64_t seed = 0;
};
inline ScheduleSetting& schedule_setting() {
  static ScheduleSetting setting;
  return setting;
}
inline void set_schedule(Schedule schedule, uint64_t seed) { schedule_setting() = {schedule, seed}; }

constexpr int kWarp = 32;
inline thread_local int thread_rank = 0;  // linear thread index within the block
inline thread_local unsigned shuffle_count = 0;

inline dim3 thread_index(int rank, dim3 block) {
  return dim3(rank % block.x, (rank / block.x) % block.y, rank / (block.x * block.y));
}

// The serial schedule: one block's threads as fibers on the launching thread. A fiber runs
// until it arrives at a barrier (or finishes); then the highest-priority ready fiber runs.
class Fibers {
 public:
  bool active() const { return active_; }
  int self() const { return running_; }
  void make_ready(int rank) { ready_.emplace(priority_[rank], rank); }
  // Back to the scheduler; this fiber runs again once made ready.
  void block() { switch_out(); }
  // Back to the scheduler, staying ready: a higher-priority fiber the caller released runs first.
  void yield() {
    make_ready(running_);
    switch_out();
  }

  // Runs `entry` as every rank of one block, to completion; `order` picks the priorities.
  void run_block(int threads, dim3 block, uint64_t order, void (*entry)()) {
    if (static_cast<int>(stacks_.size()) < threads) {
      contexts_.resize(threads);
      shuffle_counts_.resize(threads);
      while (static_cast<int>(stacks_.size()) < threads) stacks_.emplace_back(new char[kStack]);
    }
    priority_.resize(threads);
    for (int r = 0; r < threads; ++r) priority_[r] = r;
    std::shuffle(priority_.begin(), priority_.end(), std::mt19937_64(order / 2));
    if (order % 2) std::reverse(priority_.begin(), priority_.end());  // pairs of opposite orders
    for (int r = 0; r < threads; ++r) {
      getcontext(&contexts_[r]);
      contexts_[r].uc_stack.ss_sp = stacks_[r].get();
      contexts_[r].uc_stack.ss_size = kStack;
      contexts_[r].uc_link = &scheduler_;
      makecontext(&contexts_[r], entry, 0);
      shuffle_counts_[r] = 0;
      make_ready(r);
    }
    active_ = true;
    int finished = 0;
    while (!ready_.empty()) {
      running_ = ready_.top().second;
      ready_.pop();
      thread_rank = running_;
      threadIdx = thread_index(running_, block);
      shuffle_count = shuffle_counts_[running_];
      finishing_ = false;
      swapcontext(&scheduler_, &contexts_[running_]);
      shuffle_counts_[running_] = shuffle_count;
      finished += finishing_;
    }
    active_ = false;
    // Threads left waiting at a barrier the others never reach: a GPU would hang.
    assert(finished == threads && "emulated block deadlocked at a barrier");
    (void)finished;
  }
  // Called by a fiber's entry as its last act: returning resumes the scheduler (uc_link).
  void finish() { finishing_ = true; }

 private:
  static constexpr size_t kStack = 256 * 1024;
  void switch_out() { swapcontext(&contexts_[running_], &scheduler_); }

  bool active_ = false, finishing_ = false;
  int running_ = -1;
  ucontext_t scheduler_;
  std::vector<ucontext_t> contexts_;
  std::vector<std::unique_ptr<char[]>> stacks_;
  std::vector<unsigned> shuffle_counts_;
  std::vector<int> priority_;
  std::priority_queue<std::pair<int, int>> ready_;  // (priority, rank)
};

inline Fibers& fibers() {
  static Fibers f;
  return f;
}

// A reusable barrier whose party count shrinks when a thread leaves (returns from the
// kernel), and is restored for the next block.
// Threads schedule: parties and arrivals share one atomic word so exactly one of the last
// arrival / the last leave releases a phase; waiters sleep on the generation counter (a
// futex: no mutex hand-off when many threads wake at once).
// Serial schedule: only one fiber runs at a time, so plain counters and a waiting list.
class Barrier {
 public:
  void reset(int parties) {
    state_.store(static_cast<uint64_t>(parties) << 32);
    parties_ = parties;
    waiting_.clear();
  }
  void wait() {
    if (fibers().active()) return wait_serial();
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
    if (fibers().active()) return leave_serial();
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
  void wait_serial() {
    if (static_cast<int>(waiting_.size()) + 1 < parties_) {
      waiting_.push_back(fibers().self());
      return fibers().block();
    }
    release_serial();
    fibers().yield();
  }
  void leave_serial() {
    if (--parties_ > 0 && static_cast<int>(waiting_.size()) == parties_) release_serial();
  }
  void release_serial() {
    for (int rank : waiting_) fibers().make_ready(rank);
    waiting_.clear();
  }
  std::atomic<uint64_t> state_{0};         // parties << 32 | arrived
  std::atomic<uint32_t> generation_{0};
  int parties_ = 0;
  std::vector<int> waiting_;
};

struct Launch {
  int threads = 0;
  Barrier block, block_end;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> exchange[2];          // shuffle slots per thread, used alternately
  std::vector<std::max_align_t> dynamic_shared;
  std::function<void()> kernel;               // the kernel on the launch's arguments
};

inline Launch*& current() {
  static Launch* launch = nullptr;
  return launch;
}

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

// One emulated thread's part of the current block: the kernel, then it leaves the barriers.
inline void run_thread() {
  Launch& l = *current();
  l.kernel();
  l.block.leave();
  l.warps[thread_rank / kWarp]->leave();
}

inline void fiber_entry() {
  run_thread();
  fibers().finish();
}

inline bool valid_configuration(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  return grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
         grid.z <= 65535 && block.x >= 1 && block.x <= 1024 && block.y >= 1 && block.y <= 1024 &&
         block.z >= 1 && block.z <= 64 && threads <= 1024;
}

// Run `kernel` over `grid` × `block` on the host.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  static std::mutex serial;
  std::lock_guard<std::mutex> lock(serial);
  if (!valid_configuration(grid, block)) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (shared_bytes > dynamic_shared_limit(reinterpret_cast<const void*>(kernel))) {
    last_error = cudaErrorInvalidValue;  // "invalid argument", as a GPU launch reports it
    return;
  }
  Launch l;
  l.threads = static_cast<int>(block.x * block.y * block.z);
  const int warp_count = (l.threads + kWarp - 1) / kWarp;
  for (int w = 0; w < warp_count; ++w) l.warps.push_back(std::make_unique<Barrier>());
  l.exchange[0].assign(l.threads, 0);
  l.exchange[1].assign(l.threads, 0);
  l.dynamic_shared.resize(shared_bytes / sizeof(std::max_align_t) + 1);
  std::tuple<std::decay_t<Params>...> converted(std::forward<Args>(args)...);
  l.kernel = [&] { std::apply(kernel, converted); };
  auto start_block = [&](dim3 index) {  // while no thread of the launch is running
    l.block.reset(l.threads);
    for (int w = 0; w < warp_count; ++w) l.warps[w]->reset(warp_parties(w, l.threads));
    std::memset(l.dynamic_shared.data(), 0xff, l.dynamic_shared.size() * sizeof(std::max_align_t));
    blockIdx = index;
  };
  current() = &l;
  gridDim = grid;
  blockDim = block;

  if (schedule_setting().schedule == Schedule::kSerial) {
    uint64_t order = (schedule_setting().seed * 0x9e3779b97f4a7c15ull) << 1;  // even: pairs of blocks
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x, ++order) {
          start_block(dim3(x, y, z));
          fibers().run_block(l.threads, block, order, fiber_entry);
        }
    current() = nullptr;
    return;
  }

  start_block(dim3(0, 0, 0));
  l.block_end.reset(l.threads);
  auto body = [&](int rank) {
    thread_rank = rank;
    shuffle_count = 0;
    threadIdx = thread_index(rank, block);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          run_thread();
          // Everyone is done with this block: rank 0 readies the next, then all go on.
          l.block_end.wait();
          if (rank == 0) start_block(blockIdx);
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
