// Element I/O shared by the CUDA kernels: fp32/fp16/bf16 ↔ float32 registers; and the two macros that keep CUDA-only
// syntax out of a host compiler's way, so that the CPU test harness (csrc/tests/cuemu) compiles these same sources
// with g++. Under nvcc they expand to exactly the CUDA syntax:
//   FD_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   FD_DYNAMIC_SMEM(T, name);                               extern __shared__ T name[];
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef FD_CUEMU  // csrc/tests/cuemu/cuemu.h (force-included by the harness) defines these
#define FD_LAUNCH(grid, block, smem, stream, ...) FD_CUEMU_LAUNCH(grid, block, smem, stream, __VA_ARGS__)
#define FD_DYNAMIC_SMEM(T, name) FD_CUEMU_DYNAMIC_SMEM(T, name)
#else
#define FD_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FD_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

namespace fastdiff {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace fastdiff
