// Per-element and per-group math of fastdiff::group_norm_silu, shared by the CPU (g++) and CUDA (nvcc) kernels.
//   y = act((x + add[n,c] − mean[n,g]) · rstd[n,g] · w[c] + b[c]) = act(x · A[n,c] + B[n,c])
//   A = rstd · w,  B = b + (add − mean) · A,  act = SiLU or identity.
// Statistics: each worker reduces a chunk to (count, mean, M2) with M2 = Σ(x − mean_chunk)² (two passes over data it
// already holds), and chunks merge with Chan et al.'s parallel formula, so there is no E[x²] − E[x]² cancellation.
#pragma once

#include <cmath>
#include <cstdint>

#include "fd_common.h"

namespace fastdiff {
namespace gns {

struct Stat {
  float count, mean, m2;
};

// Chan, Golub & LeVeque: merge two partial (count, mean, M2).
FD_HD Stat merge(Stat a, Stat b) {
  const float n = a.count + b.count;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean;
  const float fb = b.count / n;
  Stat r;
  r.count = n;
  r.mean = a.mean + d * fb;
  r.m2 = a.m2 + b.m2 + d * d * a.count * fb;
  return r;
}

// rstd from a merged group statistic (biased variance, as torch's GroupNorm).
FD_HD float rstd_of(Stat s, float eps) {
  const float var = s.count > 0.f ? s.m2 / s.count : 0.f;
  const float v = (var > 0.f ? var : 0.f) + eps;
#ifdef __CUDA_ARCH__
  return rsqrtf(v);
#else
  return 1.0f / __builtin_sqrtf(v);
#endif
}

// The per-channel affine of the normalised output: y = x·A + B (before the activation).
FD_HD void channel_affine(float mean, float rstd, float w, float b, float add, float* A, float* B) {
  *A = rstd * w;
  *B = b + (add - mean) * (*A);
}

// Tile statistic from a tile's sum and its M2 about the tile mean (the second of the two passes).
FD_HD Stat tile_stat(float count, float sum, float m2) {
  Stat r;
  r.count = count;
  r.mean = count > 0.f ? sum / count : 0.f;
  r.m2 = m2;
  return r;
}

// The activation: SiLU(v) = v / (1 + e^−v) (→ −0 for v → −∞), or identity. The CPU kernel evaluates the same formula
// with its own vectorized exp (csrc/cpu/group_norm_silu_kernels.inc).
FD_HD float act(float v, bool silu) {
#ifdef __CUDA_ARCH__
  return silu ? v / (1.0f + __expf(-v)) : v;
#else
  return silu ? v / (1.0f + std::exp(-v)) : v;
#endif
}

// ---- the CUDA launch contract (csrc/cuda/group_norm_silu.cu; the torch glue fills it) ----------------------------
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct LaunchArgs {
  const void* x;    // (N, C, HW) NCHW-contiguous, or (N, HW, C) when channels_last
  void* y;          // same layout and dtype as x
  const void* w;    // (C,) or nullptr; dtype w_dtype
  const void* b;    // (C,) or nullptr; dtype b_dtype
  const void* add;  // (N, C) contiguous or nullptr; dtype add_dtype
  float* work;      // workspace of plan(...).work_floats floats (device memory)
  int64_t N, C, HW, G;
  float eps;
  int dtype, w_dtype, b_dtype, add_dtype;  // DType codes
  bool silu, channels_last;
};

// How the reduction is split. A "unit" is one (sample, group) for NCHW and one sample for channels_last; each unit's
// elements are cut into `split` slices of at most kMaxSlice elements, one CUDA block each, so that the block's second
// statistics pass re-reads its slice from L1/L2, and so that units × split ≥ target_blocks (batch 1 × 32 groups still
// fills 132 SMs). split == 1 runs one fused kernel (statistics then output); otherwise three launches: partial
// statistics, merge per (sample, group), output.
struct Plan {
  int64_t units, split, slice;  // slice: elements (NCHW) or pixels (channels_last) per block
  int64_t work_floats;          // partials (3 per unit·split·group) + merged (mean, rstd) per (sample, group)
};
constexpr int64_t kMaxSlice = 16384;  // elements per block
constexpr int64_t kMinSlice = 512;    // do not split below this many elements per block

inline Plan plan(int64_t N, int64_t C, int64_t HW, int64_t G, bool channels_last, int64_t target_blocks) {
  Plan p;
  const int64_t unit_elems = channels_last ? HW * C : (C / G) * HW;
  const int64_t row = channels_last ? C : 1;  // elements per slicing step
  p.units = channels_last ? N : N * G;
  int64_t split = (target_blocks + p.units - 1) / p.units;
  const int64_t max_split = unit_elems / kMinSlice > 1 ? unit_elems / kMinSlice : 1;
  split = split < max_split ? split : max_split;
  const int64_t need = (unit_elems + kMaxSlice - 1) / kMaxSlice;
  split = split > need ? split : need;
  split = split > 1 ? split : 1;
  const int64_t steps = unit_elems / row;  // pixels (channels_last) or elements (NCHW)
  int64_t slice = (steps + split - 1) / split;
  if (!channels_last) slice = (slice + 7) / 8 * 8;  // keep slices 16-byte aligned for every dtype
  p.slice = slice > 0 ? slice : 1;
  p.split = (steps + p.slice - 1) / p.slice;
  if (p.split < 1) p.split = 1;
  p.work_floats = p.split > 1 ? 3 * N * G * p.split + 2 * N * G : 0;
  return p;
}

}  // namespace gns
}  // namespace fastdiff
