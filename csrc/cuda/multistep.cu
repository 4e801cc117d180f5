// fastdiff::multistep_step_ on CUDA: one pass, 16-byte vector loads/stores (4 fp32 or 8 fp16/bf16 elements per
// thread per iteration) with an element-wise tail, float32 math from csrc/include/multistep_math.h, grid-stride loop.
// CUDA toolkit headers only: the torch glue (checks, stream, registration) is csrc/cuda/multistep_glue.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fd_cuda_io.cuh"
#include "multistep_math.h"
#include "sampler_step_vec.cuh"

namespace fastdiff {
namespace mstep {
namespace {

template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void multistep_chunk(const LaunchArgs& a, const Coefs& k, int64_t i, uint64_t seed,
                                                uint64_t offset) {
  float x[VEC], o[VEC], t[VEC], d[VEC], y[VEC], y2[VEC];
  vload<T, VEC, VECTOR>(static_cast<const T*>(a.x), i, a.n, x);
  vload<T, VEC, VECTOR>(static_cast<const T*>(a.o), i, a.n, o);
  if (a.oc) {
    vload<T, VEC, VECTOR>(static_cast<const T*>(a.oc), i, a.n, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = sstep::guide(o[j], t[j], k.w);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    d[j] = predict_d(k, x[j], o[j]);
    if (a.flags & kFlagClip) d[j] = sstep::clampf(d[j], -k.clip, k.clip);
    if (a.thr) d[j] = threshold(d[j], a.thr[(i + j < a.n ? i + j : i) / a.per_sample]);
    y[j] = combine(k.y, x[j], o[j], d[j]);
    y2[j] = a.out2 ? combine(k.y2, x[j], o[j], d[j]) : 0.0f;
  }
#pragma unroll
  for (int h = 0; h < kMaxHist; ++h) {  // unrolled: constant indices keep k and a.h in registers, not on the stack
    if (h >= a.nh) break;
    vload<T, VEC, VECTOR>(static_cast<const T*>(a.h[h]), i, a.n, t);  // t is free after guidance
    const float c = k.y.h[h], c2 = k.y2.h[h];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y[j] += c * t[j];
      if (a.out2) y2[j] += c2 * t[j];
    }
  }
  if (a.z || a.rng) {
    if (a.z) {
      vload<T, VEC, VECTOR>(static_cast<const T*>(a.z), i, a.n, t);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) t[j] = sstep::philox_normal(seed, offset + (uint64_t)(i + j));
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] += k.y.z * t[j];
  }
  vstore<T, VEC, VECTOR>(static_cast<T*>(a.out), i, a.n, y);
  if (a.out2) vstore<T, VEC, VECTOR>(static_cast<T*>(a.out2), i, a.n, y2);
  if (a.dout) vstore<T, VEC, VECTOR>(static_cast<T*>(a.dout), i, a.n, d);
}

// ALIGNED: every pointer is 16-byte aligned, so full chunks use vector accesses; the last partial chunk never does.
template <typename T, bool ALIGNED>
__global__ void multistep_kernel(LaunchArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  const Coefs k = load_coefs(a.coef);
  uint64_t seed = 0, offset = 0;
  if (a.rng) {
    seed = (uint64_t)a.rng[0];
    offset = (uint64_t)a.rng[1];
  }
  for_each_chunk<VEC, ALIGNED>(a.n, [&](int64_t i, auto vector) {
    multistep_chunk<T, VEC, decltype(vector)::value>(a, k, i, seed, offset);
  });
}

template <typename T>
cudaError_t launch_typed(const LaunchArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int kThreads = 256;
  const int64_t blocks = grid_blocks((a.n + VEC - 1) / VEC, kThreads);
  bool aligned = aligned16(a.x) && aligned16(a.o) && aligned16(a.oc) && aligned16(a.z) && aligned16(a.out) &&
                 aligned16(a.out2) && aligned16(a.dout);
  for (int h = 0; h < a.nh; ++h) aligned = aligned && aligned16(a.h[h]);
  if (aligned) {
    FD_LAUNCH((unsigned)blocks, kThreads, 0, stream, multistep_kernel<T, true>)(a);
  } else {
    FD_LAUNCH((unsigned)blocks, kThreads, 0, stream, multistep_kernel<T, false>)(a);
  }
  return cudaGetLastError();
}

}  // namespace

// The plain C++ launcher the torch glue calls. Returns the CUDA error of the launch (cudaSuccess when n == 0).
cudaError_t launch_multistep(const LaunchArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  switch (a.dtype) {
    case sstep::kF32: return launch_typed<float>(a, stream);
    case sstep::kF16: return launch_typed<__half>(a, stream);
    case sstep::kBF16: return launch_typed<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mstep
}  // namespace fastdiff
