// fastdiff::group_norm_silu on CUDA: y = act((x + add[n,c] − mean[n,g]) · rstd[n,g] · w[c] + b[c]), statistics in
// float32, fp32/fp16/bf16 I/O, NCHW-contiguous or channels_last. CUDA toolkit headers only: the torch glue (checks,
// stream, workspace, registration) is csrc/cuda/group_norm_silu_glue.cpp.
//
// Work split (gns::plan in csrc/include/group_norm_silu_math.h): a unit is one (sample, group) for NCHW (a contiguous
// range of Cg·HW elements) and one sample for channels_last (HW pixels × C channels, all groups at once, so loads
// stay coalesced when a group is only a few channels wide). Each unit is cut into `split` slices, one 256-thread
// block each, so that batch 1 × 32 groups still gives ≥ 8 blocks per SM.
//   split == 1: one kernel; the block reduces its unit, then writes the output (the re-reads hit L1/L2).
//   split  > 1: (1) each block reduces its slice to (count, mean, M2) per group, (2) one warp per (sample, group)
//               merges the partials in a fixed order, (3) each block writes its slice's output.
// Per block the slice statistic is two-pass (sum → mean, then Σ(v − mean)², the slice re-read from L1), and slices
// merge with Chan's formula (gns::merge) — the same math as the CPU kernel; no E[x²] − E[x]² cancellation. All
// reductions use a fixed order, so the output is deterministic (and identical under CUDA-graph replay).
// Loads and stores are 16-byte vectors (8 fp16/bf16 or 4 fp32) when the pointers are aligned and the layout allows
// (NCHW: HW % VEC == 0; channels_last: C % VEC == 0); otherwise the scalar instantiation (VEC = 1) runs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fd_cuda_io.cuh"
#include "group_norm_silu_math.h"

namespace fastdiff {
namespace gns {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;


// VEC consecutive elements as floats: one 16/8/4-byte load for VEC > 1 (the caller guarantees alignment).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    load16<T, VEC>(p, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_f(p[j]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    store16<T, VEC>(p, in);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = from_f<T>(in[j]);
  }
}

// A parameter (weight, bias, add) in its own dtype; the dtype is uniform across the grid, so the switch does not
// diverge.
__device__ __forceinline__ float param(const void* p, int dtype, int64_t i, float dflt) {
  if (p == nullptr) return dflt;
  switch (dtype) {
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Block-wide sum, the result broadcast to every thread. Fixed order (deterministic). `red` holds kWarps floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[w];
  return s;
}

// ---- NCHW: a unit is the contiguous range of one (sample, group) -------------------------------------------------

struct NchwSlice {
  int64_t base;     // element offset of the unit (n·C + g·Cg)·HW
  int64_t lo, hi;   // the slice [lo, hi) within the unit
  int64_t n, g, Cg;
};

__device__ __forceinline__ NchwSlice nchw_slice(const LaunchArgs& a, const Plan& pl) {
  NchwSlice s;
  const int64_t u = blockIdx.x, k = blockIdx.y;
  s.Cg = a.C / a.G;
  s.n = u / a.G;
  s.g = u % a.G;
  s.base = (s.n * a.C + s.g * s.Cg) * a.HW;
  const int64_t len = s.Cg * a.HW;
  s.lo = k * pl.slice;
  s.hi = s.lo + pl.slice < len ? s.lo + pl.slice : len;
  return s;
}

// Channel (within the unit) of the unit's element i: 32-bit division (the launcher checks Cg·HW < 2^31).
__device__ __forceinline__ int64_t in_unit_channel(int64_t i, int64_t HW) { return (uint32_t)i / (uint32_t)HW; }

// The slice's (count, mean, M2) of v = x + add[n, c]. VEC > 1 requires HW % VEC == 0, so a vector never straddles
// channels; slice bounds are multiples of 8.
template <typename T, int VEC>
__device__ Stat nchw_slice_stat(const LaunchArgs& a, const NchwSlice& s, float* red) {
  const T* x = static_cast<const T*>(a.x) + s.base;
  const int64_t c0 = s.n * a.C + s.g * s.Cg;  // index of the unit's first channel in add
  float sum = 0.f;
  for (int64_t i = s.lo + (int64_t)threadIdx.x * VEC; i < s.hi; i += (int64_t)kThreads * VEC) {
    float v[VEC];
    load_vec<T, VEC>(x + i, v);
    const float ad = (a.add ? param(a.add, a.add_dtype, c0 + in_unit_channel(i, a.HW), 0.f) : 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += v[j] + ad;
  }
  const float cnt = (float)(s.hi - s.lo);
  const float mean = block_sum(sum, red) / cnt;
  float m2 = 0.f;
  for (int64_t i = s.lo + (int64_t)threadIdx.x * VEC; i < s.hi; i += (int64_t)kThreads * VEC) {
    float v[VEC];
    load_vec<T, VEC>(x + i, v);
    const float mu = mean - (a.add ? param(a.add, a.add_dtype, c0 + in_unit_channel(i, a.HW), 0.f) : 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = v[j] - mu;
      m2 += d * d;
    }
  }
  m2 = block_sum(m2, red);
  Stat st;
  st.count = cnt;
  st.mean = mean;
  st.m2 = m2;
  return st;
}

template <typename T, int VEC>
__device__ void nchw_slice_apply(const LaunchArgs& a, const NchwSlice& s, float mean, float rstd) {
  const T* x = static_cast<const T*>(a.x) + s.base;
  T* y = static_cast<T*>(a.y) + s.base;
  const int64_t cg0 = s.g * s.Cg;
  for (int64_t i = s.lo + (int64_t)threadIdx.x * VEC; i < s.hi; i += (int64_t)kThreads * VEC) {
    const int64_t c = cg0 + in_unit_channel(i, a.HW);
    float A, B;
    channel_affine(mean, rstd, param(a.w, a.w_dtype, c, 1.f), param(a.b, a.b_dtype, c, 0.f),
                   param(a.add, a.add_dtype, s.n * a.C + c, 0.f), &A, &B);
    float v[VEC];
    load_vec<T, VEC>(x + i, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = act(v[j] * A + B, a.silu);
    store_vec<T, VEC>(y + i, v);
  }
}

// grid (N·G, split). FUSED (split == 1): statistics then output. Otherwise: the slice's partial statistic.
template <typename T, int VEC, bool FUSED>
__global__ void __launch_bounds__(kThreads) nchw_stats_kernel(LaunchArgs a, Plan pl) {
  __shared__ float red[kWarps];
  const NchwSlice s = nchw_slice(a, pl);
  const Stat st = nchw_slice_stat<T, VEC>(a, s, red);
  if (FUSED) {
    nchw_slice_apply<T, VEC>(a, s, st.mean, rstd_of(st, a.eps));
  } else if (threadIdx.x == 0) {
    float* p = a.work + 3 * ((int64_t)blockIdx.x * pl.split + blockIdx.y);
    p[0] = st.count;
    p[1] = st.mean;
    p[2] = st.m2;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) nchw_apply_kernel(LaunchArgs a, Plan pl) {
  const NchwSlice s = nchw_slice(a, pl);
  const float* ms = a.work + 3 * a.N * a.G * pl.split + 2 * (int64_t)blockIdx.x;
  nchw_slice_apply<T, VEC>(a, s, ms[0], ms[1]);
}

// ---- merge: one warp per (sample, group) over its `split` partials, in a fixed order -----------------------------
// Partials are laid out [(n·G + g)·split + k] for both layouts.

__global__ void __launch_bounds__(kThreads) merge_kernel(LaunchArgs a, Plan pl) {
  const int64_t ng = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (ng >= a.N * a.G) return;
  const float* p = a.work + 3 * ng * pl.split;
  Stat st{0.f, 0.f, 0.f};
  for (int64_t k = lane; k < pl.split; k += 32) {
    Stat t;
    t.count = p[3 * k];
    t.mean = p[3 * k + 1];
    t.m2 = p[3 * k + 2];
    st = merge(st, t);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stat t;
    t.count = __shfl_down_sync(0xffffffffu, st.count, o);
    t.mean = __shfl_down_sync(0xffffffffu, st.mean, o);
    t.m2 = __shfl_down_sync(0xffffffffu, st.m2, o);
    st = merge(st, t);
  }
  if (lane == 0) {
    float* ms = a.work + 3 * a.N * a.G * pl.split + 2 * ng;
    ms[0] = st.mean;
    ms[1] = rstd_of(st, a.eps);
  }
}

// ---- channels_last: a unit is one sample, (HW, C); a block takes `slice` pixels × all C channels ------------------
// Thread t owns channel vector cv = cvb + t % CVt (VEC channels) for pixel rows t / CVt, stepping by R = kThreads/CVt
// rows, so its per-channel partial sums stay in registers; rows are summed through shared memory in a fixed order.
// Shared memory (floats): chs[C] (per-channel sums), mu[C] (group mean − add, per channel), gm[G] (group means),
// gr[G] (group rstd, fused kernel), rbuf[kThreads·VEC] (per-thread partial sums).

template <typename T, int VEC>
struct NhwcCtx {
  const T* x;
  int64_t n, p0, np;  // sample, first pixel, pixels in this block's slice
  int CV, CVt, R;     // channel vectors, channel vectors per pass, pixel rows per pass
};

template <typename T, int VEC>
__device__ __forceinline__ NhwcCtx<T, VEC> nhwc_ctx(const LaunchArgs& a, const Plan& pl) {
  NhwcCtx<T, VEC> c;
  c.n = blockIdx.x;
  c.p0 = (int64_t)blockIdx.y * pl.slice;
  c.np = c.p0 + pl.slice < a.HW ? pl.slice : a.HW - c.p0;
  c.x = static_cast<const T*>(a.x) + (c.n * a.HW + c.p0) * a.C;
  c.CV = (int)(a.C / VEC);
  c.CVt = c.CV < kThreads ? c.CV : kThreads;
  c.R = kThreads / c.CVt;
  return c;
}

// y = act(x·A[c] + B[c]) over the block's slice of pixels (A, B per channel, in shared memory).
template <typename T, int VEC>
__device__ __forceinline__ void nhwc_write(const LaunchArgs& a, const NhwcCtx<T, VEC>& cx, const float* A,
                                           const float* B) {
  T* y = static_cast<T*>(a.y) + (cx.n * a.HW + cx.p0) * a.C;
  const int64_t items = cx.np * cx.CV;
  for (int64_t it = threadIdx.x; it < items; it += kThreads) {
    const int64_t p = (uint32_t)it / (uint32_t)cx.CV;  // it < slice·C/VEC < 2^31 (gns::plan caps slice·C)
    const int cv = (int)(it - p * cx.CV);
    float v[VEC];
    load_vec<T, VEC>(cx.x + p * a.C + (int64_t)cv * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = act(v[j] * A[cv * VEC + j] + B[cv * VEC + j], a.silu);
    store_vec<T, VEC>(y + p * a.C + (int64_t)cv * VEC, v);
  }
}

// chs[c] = Σ over the slice's pixels of (x[p, c] − shift[c]) (SQUARE: of its square); shift == nullptr: 0.
template <typename T, int VEC, bool SQUARE>
__device__ void nhwc_channel_sums(const LaunchArgs& a, const NhwcCtx<T, VEC>& cx, const float* shift, float* chs,
                                  float* rbuf) {
  const int t = threadIdx.x;
  const int r = t / cx.CVt, cvl = t % cx.CVt;
  for (int cvb = 0; cvb < cx.CV; cvb += cx.CVt) {
    const int cv = cvb + cvl;
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    if (r < cx.R && cv < cx.CV) {
      float sh[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) sh[j] = shift ? shift[cv * VEC + j] : 0.f;
      for (int64_t p = r; p < cx.np; p += cx.R) {
        float v[VEC];
        load_vec<T, VEC>(cx.x + p * a.C + (int64_t)cv * VEC, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = v[j] - sh[j];
          acc[j] += SQUARE ? d * d : d;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) rbuf[t * VEC + j] = acc[j];
    __syncthreads();
    for (int e = t; e < cx.CVt * VEC; e += kThreads) {
      const int c = cvb * VEC + e;
      if (c < a.C) {
        const int l = e / VEC, j = e % VEC;
        float s = 0.f;
        for (int rr = 0; rr < cx.R; ++rr) s += rbuf[(rr * cx.CVt + l) * VEC + j];
        chs[c] = s;
      }
    }
    __syncthreads();
  }
}

template <typename T, int VEC, bool FUSED>
__global__ void __launch_bounds__(kThreads) nhwc_stats_kernel(LaunchArgs a, Plan pl) {
  FD_DYNAMIC_SMEM(float, smem);
  float* chs = smem;
  float* mu = chs + a.C;
  float* gm = mu + a.C;
  float* gr = gm + a.G;
  float* rbuf = gr + a.G;
  const NhwcCtx<T, VEC> cx = nhwc_ctx<T, VEC>(a, pl);
  const int t = threadIdx.x;
  const int Cg = (int)(a.C / a.G);
  const float cnt = (float)(cx.np * Cg);
  // pass 1: group means of x + add
  nhwc_channel_sums<T, VEC, false>(a, cx, nullptr, chs, rbuf);
  for (int g = t; g < a.G; g += kThreads) {
    float s = 0.f;
    for (int c = g * Cg; c < (g + 1) * Cg; ++c) s += chs[c] + (float)cx.np * param(a.add, a.add_dtype, cx.n * a.C + c, 0.f);
    gm[g] = s / cnt;
  }
  __syncthreads();
  for (int c = t; c < a.C; c += kThreads) mu[c] = gm[c / Cg] - param(a.add, a.add_dtype, cx.n * a.C + c, 0.f);
  __syncthreads();
  // pass 2: M2 about the group means (the slice is re-read from L1/L2)
  nhwc_channel_sums<T, VEC, true>(a, cx, mu, chs, rbuf);
  if (FUSED) {
    // the slice is the whole sample: finish the statistics, then write the output. chs → A, mu → B.
    for (int g = t; g < a.G; g += kThreads) {
      float m2 = 0.f;
      for (int c = g * Cg; c < (g + 1) * Cg; ++c) m2 += chs[c];
      Stat st;
      st.count = cnt;
      st.mean = gm[g];
      st.m2 = m2;
      gr[g] = rstd_of(st, a.eps);
    }
    __syncthreads();
    for (int c = t; c < a.C; c += kThreads) {
      const int g = c / Cg;
      channel_affine(gm[g], gr[g], param(a.w, a.w_dtype, c, 1.f), param(a.b, a.b_dtype, c, 0.f),
                     param(a.add, a.add_dtype, cx.n * a.C + c, 0.f), &chs[c], &mu[c]);
    }
    __syncthreads();
    nhwc_write(a, cx, chs, mu);
  } else {
    for (int g = t; g < a.G; g += kThreads) {
      float m2 = 0.f;
      for (int c = g * Cg; c < (g + 1) * Cg; ++c) m2 += chs[c];
      float* p = a.work + 3 * ((cx.n * a.G + g) * pl.split + blockIdx.y);
      p[0] = cnt;
      p[1] = gm[g];
      p[2] = m2;
    }
  }
}

// grid (N, split); shared memory: A[C], B[C].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) nhwc_apply_kernel(LaunchArgs a, Plan pl) {
  FD_DYNAMIC_SMEM(float, smem);
  float* A = smem;
  float* B = A + a.C;
  const NhwcCtx<T, VEC> cx = nhwc_ctx<T, VEC>(a, pl);
  const int t = threadIdx.x;
  const int Cg = (int)(a.C / a.G);
  const float* ms = a.work + 3 * a.N * a.G * pl.split + 2 * cx.n * a.G;
  for (int c = t; c < a.C; c += kThreads) {
    const int g = c / Cg;
    channel_affine(ms[2 * g], ms[2 * g + 1], param(a.w, a.w_dtype, c, 1.f), param(a.b, a.b_dtype, c, 0.f),
                   param(a.add, a.add_dtype, cx.n * a.C + c, 0.f), &A[c], &B[c]);
  }
  __syncthreads();
  nhwc_write(a, cx, A, B);
}

// ---- launch -------------------------------------------------------------------------------------------------------

template <typename T, int VEC>
cudaError_t launch_layout(const LaunchArgs& a, const Plan& pl, cudaStream_t stream) {
  const dim3 grid((unsigned)pl.units, (unsigned)pl.split);
  const dim3 block(kThreads);
  if (!a.channels_last) {
    if (pl.split == 1) {
      FD_LAUNCH(grid, block, 0, stream, nchw_stats_kernel<T, VEC, true>)(a, pl);
      return cudaGetLastError();
    }
    FD_LAUNCH(grid, block, 0, stream, nchw_stats_kernel<T, VEC, false>)(a, pl);
    FD_LAUNCH((unsigned)((a.N * a.G + kWarps - 1) / kWarps), block, 0, stream, merge_kernel)(a, pl);
    FD_LAUNCH(grid, block, 0, stream, nchw_apply_kernel<T, VEC>)(a, pl);
    return cudaGetLastError();
  }
  const size_t stats_smem = sizeof(float) * (size_t)(2 * a.C + 2 * a.G + kThreads * VEC);
  const size_t apply_smem = sizeof(float) * (size_t)(2 * a.C);
  if (stats_smem > 48 * 1024) return cudaErrorInvalidConfiguration;  // C > ~5000: the glue reports it
  if (pl.split == 1) {
    FD_LAUNCH(grid, block, stats_smem, stream, nhwc_stats_kernel<T, VEC, true>)(a, pl);
    return cudaGetLastError();
  }
  FD_LAUNCH(grid, block, stats_smem, stream, nhwc_stats_kernel<T, VEC, false>)(a, pl);
  FD_LAUNCH((unsigned)((a.N * a.G + kWarps - 1) / kWarps), block, 0, stream, merge_kernel)(a, pl);
  FD_LAUNCH(grid, block, apply_smem, stream, nhwc_apply_kernel<T, VEC>)(a, pl);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const LaunchArgs& a, const Plan& pl, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool aligned = aligned16(a.x) && aligned16(a.y);
  const bool vec_ok = aligned && (a.channels_last ? a.C % VEC == 0 : a.HW % VEC == 0);
  return vec_ok ? launch_layout<T, VEC>(a, pl, stream) : launch_layout<T, 1>(a, pl, stream);
}

}  // namespace

// Blocks to aim for: 8 per SM of the current device (256 threads each: full occupancy).
int64_t target_blocks() {
  const int sms = sm_count();
  return 8 * (int64_t)(sms > 0 ? sms : 132);
}

// The plain C++ launcher the torch glue calls, with the plan it sized the workspace from. Returns the CUDA error of
// the launches (cudaSuccess when there is nothing to do).
cudaError_t launch_group_norm_silu(const LaunchArgs& a, const Plan& pl, cudaStream_t stream) {
  if (a.N == 0 || a.C == 0 || a.HW == 0) return cudaSuccess;
  // grid (units, split): split is grid.y; in-unit element indices are 32-bit divisible (see the glue's checks)
  if (pl.split > 65535 || pl.units > 0x7fffffff || (a.C / a.G) * a.HW >= ((int64_t)1 << 31))
    return cudaErrorInvalidConfiguration;
  if (pl.split > 1 && a.work == nullptr) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case kF32: return launch_typed<float>(a, pl, stream);
    case kF16: return launch_typed<__half>(a, pl, stream);
    case kBF16: return launch_typed<__nv_bfloat16>(a, pl, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gns
}  // namespace fastdiff
