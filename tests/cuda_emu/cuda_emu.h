// A tiny CUDA execution model on host threads, enough to run csrc/*_cuda_kernels.cuh as plain C++ on a machine
// without a GPU: each block runs with blockDim.x host threads (std::thread) that meet at a real barrier for
// __syncthreads; blocks run one after another, so `static` stands in for __shared__ (one block alive at a time).
// Used only by tests/test_cuda_emu.py (opt-in). It checks the kernels' logic (indexing, tiling, online softmax,
// reductions, synchronisation points), not their speed or anything specific to the hardware.
#pragma once

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#define LFVILA_CUDA_EMULATION 1
#define LFVILA_CUDA_EMULATION_SMEM (256 * 1024)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 gridDim, blockDim;

namespace emu {

struct Barrier {
  std::mutex m;
  std::condition_variable cv;
  int n = 0, waiting = 0;
  uint64_t generation = 0;
  void wait() {
    std::unique_lock<std::mutex> lock(m);
    const uint64_t g = generation;
    if (++waiting == n) {
      waiting = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != g; });
    }
  }
};

inline Barrier* barrier = nullptr;
inline std::atomic<int> counts[3];
inline thread_local unsigned count_calls = 0;

// Runs body() for every block of a (gx, gy) grid with `threads` threads per block.
template <typename F>
void launch(unsigned gx, unsigned gy, unsigned threads, F body) {
  if (gx == 0 || gy == 0) return;
  gridDim = {gx, gy, 1};
  blockDim = {threads, 1, 1};
  Barrier bar;
  bar.n = static_cast<int>(threads);
  barrier = &bar;
  for (auto& c : counts) c = 0;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      count_calls = 0;
      for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
          blockIdx = {bx, by, 0};
          body();
          bar.wait();  // no thread starts the next block while the block's shared memory is in use
        }
    });
  }
  for (auto& th : pool) th.join();
  barrier = nullptr;
}

}  // namespace emu

inline void __syncthreads() { emu::barrier->wait(); }

// Barrier + count of threads with pred != 0. Call c uses slot c % 3; thread 0 clears slot (c + 2) % 3, which was
// last read before this call's barrier and is next written after the following call's barrier.
inline int __syncthreads_count(int pred) {
  const unsigned slot = emu::count_calls++ % 3;
  if (pred) emu::counts[slot].fetch_add(1);
  emu::barrier->wait();
  const int result = emu::counts[slot].load();
  if (threadIdx.x == 0) emu::counts[(slot + 2) % 3] = 0;
  return result;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
