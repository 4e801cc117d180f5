// Per-element and per-group math of fastdiff::group_norm_silu, shared by the CPU (g++) and CUDA (nvcc) kernels.
//   y = act((x + add[n,c] − mean[n,g]) · rstd[n,g] · w[c] + b[c]) = act(x · A[n,c] + B[n,c])
//   A = rstd · w,  B = b + (add − mean) · A,  act = SiLU or identity.
// Statistics: each worker reduces a chunk to (count, mean, M2) with M2 = Σ(x − mean_chunk)² (two passes over data it
// already holds), and chunks merge with Chan et al.'s parallel formula, so there is no E[x²] − E[x]² cancellation.
#pragma once

#ifdef __CUDACC__
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

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

}  // namespace gns
}  // namespace fastdiff
