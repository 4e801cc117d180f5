// fastdiff::sampler_step on CUDA: one pass, 16-byte vector loads/stores (4 fp32 or 8 fp16/bf16 elements per thread
// per iteration), float32 math from csrc/include/sampler_step_math.h, grid-stride loop. CUDA toolkit headers only:
// the torch glue (checks, stream, registration) is csrc/cuda/sampler_step_glue.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fd_cuda_io.cuh"
#include "sampler_step_math.h"
#include "sampler_step_vec.cuh"

namespace fastdiff {
namespace sstep {
namespace {

template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void step_chunk(const LaunchArgs& a, const Coefs& k, int64_t i, uint64_t seed,
                                           uint64_t offset) {
  const int var_mode = (a.flags & kVarMask) >> kVarShift;
  float x[VEC], o[VEC], t[VEC], x0[VEC], out[VEC];
  vload<T, VEC, VECTOR>(static_cast<const T*>(a.x), i, a.n, x);
  vload<T, VEC, VECTOR>(static_cast<const T*>(a.o), i, a.n, o);
  if (a.oc) {
    vload<T, VEC, VECTOR>(static_cast<const T*>(a.oc), i, a.n, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = guide(o[j], t[j], k.w);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    x0[j] = predict_x0(k, x[j], o[j]);
    if (a.flags & kFlagClip) x0[j] = clampf(x0[j], -k.clip, k.clip);
    if (a.thr) {
      const float s = a.thr[(i + j < a.n ? i + j : i) / a.per_sample];
      x0[j] = clampf(x0[j], -s, s) / s;
    }
    out[j] = combine(k, x[j], x0[j], predict_eps(k, x[j], o[j], x0[j]));
  }
  if (a.z || a.rng) {
    if (a.z) {
      vload<T, VEC, VECTOR>(static_cast<const T*>(a.z), i, a.n, t);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) t[j] = philox_normal(seed, offset + (uint64_t)(i + j));
    }
    if (a.v) {
      vload<T, VEC, VECTOR>(static_cast<const T*>(a.v), i, a.n, x);  // x is free now: reuse it for v
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] += learned_sigma(k, var_mode, x[j]) * t[j];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] += k.sigma * t[j];
    }
  }
  vstore<T, VEC, VECTOR>(static_cast<T*>(a.xp), i, a.n, out);
  if (a.x0) {
    if (VECTOR && VEC % 4 == 0) {
#pragma unroll
      for (int j = 0; j < VEC; j += 4)
        *reinterpret_cast<float4*>(a.x0 + i + j) = make_float4(x0[j], x0[j + 1], x0[j + 2], x0[j + 3]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (i + j < a.n) a.x0[i + j] = x0[j];
    }
  }
}

// ALIGNED: every pointer is 16-byte aligned, so full chunks use vector accesses; the last partial chunk never does.
template <typename T, bool ALIGNED>
__global__ void sampler_step_kernel(LaunchArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  const Coefs k = load_coefs(a.coef);
  uint64_t seed = 0, offset = 0;
  if (a.rng) {
    seed = (uint64_t)a.rng[0];
    offset = (uint64_t)a.rng[1];
  }
  for_each_chunk<VEC, ALIGNED>(a.n, [&](int64_t i, auto vector) {
    step_chunk<T, VEC, decltype(vector)::value>(a, k, i, seed, offset);
  });
}

template <typename T>
cudaError_t launch_typed(const LaunchArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int kThreads = 256;
  const int64_t chunks = (a.n + VEC - 1) / VEC;
  const int64_t blocks = grid_blocks(chunks, kThreads);
  const bool aligned = aligned16(a.x) && aligned16(a.o) && aligned16(a.oc) && aligned16(a.z) && aligned16(a.v) &&
                       aligned16(a.xp) && aligned16(a.x0);
  if (aligned) {
    FD_LAUNCH((unsigned)blocks, kThreads, 0, stream, sampler_step_kernel<T, true>)(a);
  } else {
    FD_LAUNCH((unsigned)blocks, kThreads, 0, stream, sampler_step_kernel<T, false>)(a);
  }
  return cudaGetLastError();
}

}  // namespace

// The plain C++ launcher the torch glue calls. Returns the CUDA error of the launch (cudaSuccess when n == 0).
cudaError_t launch_sampler_step(const LaunchArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  switch (a.dtype) {
    case kF32: return launch_typed<float>(a, stream);
    case kF16: return launch_typed<__half>(a, stream);
    case kBF16: return launch_typed<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace sstep
}  // namespace fastdiff
