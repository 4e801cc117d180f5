// Element I/O shared by the CUDA kernels: fp32/fp16/bf16 ↔ float32 registers, 16-byte vector loads/stores,
// pointer alignment and the SM count of the device; and the two macros that keep CUDA-only
// syntax out of a host compiler's way, so that the CPU test harness (csrc/tests/cuemu) compiles these same sources
// with g++. Under nvcc they expand to exactly the CUDA syntax:
//   FD_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   FD_DYNAMIC_SMEM(T, name);                               extern __shared__ T name[];
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

// 16 bytes of T (VEC = 16 / sizeof(T) elements) as float32 registers and back: one uint4 load / store. p must be
// 16-byte aligned (aligned16 on the host decides which kernel instantiation may use these).
template <typename T, int VEC>
__device__ __forceinline__ void load16(const T* __restrict__ p, float (&out)[VEC]) {
  static_assert(VEC * sizeof(T) == 16, "load16 moves 16 bytes");
  union { uint4 u; T t[VEC]; } buf;
  buf.u = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_f(buf.t[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store16(T* __restrict__ p, const float (&in)[VEC]) {
  static_assert(VEC * sizeof(T) == 16, "store16 moves 16 bytes");
  union { uint4 u; T t[VEC]; } buf;
#pragma unroll
  for (int j = 0; j < VEC; ++j) buf.t[j] = from_f<T>(in[j]);
  *reinterpret_cast<uint4*>(p) = buf.u;
}

// Null or 16-byte aligned: a tensor whose full chunks can use load16 / store16.
inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Streaming multiprocessors of the current device; 0 when the query fails (callers pick their fallback).
inline int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 0)
    return 0;
  return sms;
}

}  // namespace fastdiff
