// Small helpers shared by the CUDA kernels (htwa_cuda_kernels.cuh, info_nce_cuda_kernels.cuh).
//
// The kernels use only __syncthreads / __syncthreads_count, threadIdx.x, blockIdx.x/y, dynamic shared memory and
// scalar float math: no warp shuffles, no atomics, no tensor-core intrinsics. That keeps them simple to read and
// bitwise deterministic (every output element and every partial sum is owned by exactly one thread and summed in
// a fixed order).
#pragma once

#include <cstddef>
#include <cstdint>

#include "htwa_geometry.h"  // LFVILA_HD

// The dynamic shared-memory buffer of a kernel file. tests/cuda_emu compiles the kernels as plain C++ (one block at
// a time, its threads as host threads); there the buffer is an ordinary array, shared by the threads of the block.
#ifndef LFVILA_CUDA_EMULATION
#define LFVILA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#else
#define LFVILA_DYNAMIC_SMEM(name) alignas(16) inline unsigned char name[LFVILA_CUDA_EMULATION_SMEM]
#endif

namespace lfvila {
namespace cuda_common {

constexpr int kThreads = 256;  // threads per block of every kernel here

// Carves typed arrays out of one dynamic shared-memory buffer, 16-byte aligned each. Run with base == nullptr on
// the host to get the byte count (`off`) of exactly the layout the kernel will use.
struct Carver {
  unsigned char* base;
  size_t off = 0;
  LFVILA_HD explicit Carver(unsigned char* b) : base(b) {}
  template <typename T>
  LFVILA_HD T* take(size_t n) {
    off = (off + 15) & ~static_cast<size_t>(15);
    T* p = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += n * sizeof(T);
    return p;
  }
};

template <typename T>
LFVILA_HD float to_float(T x) {
  return static_cast<float>(x);
}

}  // namespace cuda_common
}  // namespace lfvila
