// 16-byte vector I/O of the elementwise CUDA kernels (csrc/cuda/multistep.cu): a chunk
// of VEC = 16 / sizeof(T) elements as float32 registers, one uint4 load/store when the chunk is full and aligned,
// element by element (bounds-checked) otherwise. nvcc only; CUDA toolkit headers only.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "fd_cuda_io.cuh"

namespace fastdiff {

// VEC elements of T at p[i .. i+VEC) as floats; one 16-byte load when VECTOR (aligned, full chunk).
template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void vload(const T* __restrict__ p, int64_t i, int64_t n, float (&out)[VEC]) {
  if (VECTOR) {
    load16<T, VEC>(p + i, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = i + j < n ? to_f(p[i + j]) : 0.0f;
  }
}

template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void vstore(T* __restrict__ p, int64_t i, int64_t n, const float (&in)[VEC]) {
  if (VECTOR) {
    store16<T, VEC>(p + i, in);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (i + j < n) p[i + j] = from_f<T>(in[j]);
  }
}

// chunk(i, vector) for each chunk start i = c·VEC in [0, n) of this thread (grid-stride loop); `vector` is
// std::true_type for full chunks when ALIGNED (every pointer 16-byte aligned), std::false_type otherwise (the tail).
template <int VEC, bool ALIGNED, typename F>
__device__ __forceinline__ void for_each_chunk(int64_t n, F&& chunk) {
  const int64_t chunks = (n + VEC - 1) / VEC;
  for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < chunks; c += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = c * VEC;
    if (ALIGNED && i + VEC <= n) {
      chunk(i, std::true_type{});
    } else {
      chunk(i, std::false_type{});
    }
  }
}

// Blocks of `threads` for `chunks` work items, at most 16 per SM (a grid-stride loop covers the rest).
inline int64_t grid_blocks(int64_t chunks, int threads) {
  const int64_t blocks = (chunks + threads - 1) / threads;
  const int sms = sm_count();
  return sms > 0 && blocks > (int64_t)sms * 16 ? (int64_t)sms * 16 : blocks;
}

}  // namespace fastdiff
