// Per-element math of fastdiff::sampler_step, shared by the CPU (csrc/cpu/sampler_step.cpp) and CUDA
// (csrc/cuda/sampler_step.cu) kernels. Plain C++ with CUDA qualifiers when nvcc compiles it; no torch headers.
//
// One step, per element, in float32 (fastdiff/ops/sampler_step.py documents how the coefficients are built):
//   o   = o_u + w·(o_c − o_u)                      classifier-free guidance (when o_c is given)
//   x̂0  = p·x + q·o;  clamp(x̂0, ±clip) if CLIP;  clamp(x̂0, ±s_b)/s_b with a per-sample s_b (dynamic thresholding)
//   ε̂   = r·x + s·o + u·x̂0
//   x'  = A·x̂0 + B·ε̂ + C·x + σ·z                   σ a scalar, or per element from the model's variance output v
// Noise z is a tensor, or N(0, 1) from Philox4x32-10 + Box-Muller at counter (offset + i) with key seed: the same
// numbers as Triton's tl.randn(seed, offset + i) (fastdiff.ops.sampler_step.philox_randn_ref is the reference).
#pragma once

#include <cmath>
#include <cstdint>

#include "fd_common.h"

namespace fastdiff {
namespace sstep {

// Layout of the per-step coefficient vector (float64 on the host and in the op's `coef` tensor).
enum Coef : int {
  kP = 0, kQ, kR, kS, kU, kA, kB, kC, kSigma, kClip, kW, kLogMax, kLogMin, kNumCoef = 16
};
// Bits of the op's `flags` argument.
enum Flag : int { kFlagClip = 1, kVarShift = 1, kVarMask = 3 << 1 };
// Variance modes (flags >> kVarShift & 3): 0 scalar σ = coef[kSigma]; 1 learned: σ = √v;
// 2 learned_range: σ = exp(½(f·logmax + (1−f)·logmin)), f = (v + 1)/2.
enum VarMode : int { kVarScalar = 0, kVarLearned = 1, kVarLearnedRange = 2 };

struct Coefs {
  float p, q, r, s, u, A, B, C, sigma, clip, w, logmax, logmin;
};

FD_HD Coefs load_coefs(const double* c) {
  Coefs k;
  k.p = (float)c[kP]; k.q = (float)c[kQ]; k.r = (float)c[kR]; k.s = (float)c[kS]; k.u = (float)c[kU];
  k.A = (float)c[kA]; k.B = (float)c[kB]; k.C = (float)c[kC]; k.sigma = (float)c[kSigma];
  k.clip = (float)c[kClip]; k.w = (float)c[kW]; k.logmax = (float)c[kLogMax]; k.logmin = (float)c[kLogMin];
  return k;
}

// Without clipping or thresholding the step is linear: x' = c_x·x + c_o·o (+ σ·z), the linear form of
// docs/math.md, "The fused DDPM/DDIM step".
// The two scalars are folded in float64 from the coefficient vector.
FD_HD void fold_linear(const double* c, float* cx, float* co) {
  *cx = (float)(c[kA] * c[kP] + c[kB] * (c[kR] + c[kU] * c[kP]) + c[kC]);
  *co = (float)(c[kA] * c[kQ] + c[kB] * (c[kS] + c[kU] * c[kQ]));
}

FD_HD float guide(float ou, float oc, float w) { return ou + w * (oc - ou); }

FD_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// x̂0 before clipping / thresholding.
FD_HD float predict_x0(const Coefs& k, float x, float o) { return k.p * x + k.q * o; }

// ε̂ from x, o and the (possibly clipped) x̂0.
FD_HD float predict_eps(const Coefs& k, float x, float o, float x0) { return k.r * x + k.s * o + k.u * x0; }

// x_prev without noise.
FD_HD float combine(const Coefs& k, float x, float x0, float eps) { return k.A * x0 + k.B * eps + k.C * x; }

// Per-element σ of DDPM's learned variances from the model's variance output v.
FD_HD float learned_sigma(const Coefs& k, int var_mode, float v) {
  if (var_mode == kVarLearned) return sqrtf(v);
  float f = 0.5f * (v + 1.0f);
  return expf(0.5f * (f * k.logmax + (1.0f - f) * k.logmin));
}

// ---- Philox4x32-10 (Salmon et al. 2011), as Triton's tl.randint4x: counter (lo, hi, 0, 0), key (seed lo, hi) ----
FD_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  return (uint32_t)p;
}

FD_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo(0xD2511F53u, c[0], &hi0);
    uint32_t lo1 = mulhilo(0xCD9E8D57u, c[2], &hi1);
    uint32_t n0 = hi1 ^ c[1] ^ k0;
    uint32_t n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Triton's uint_to_uniform_float for 32-bit: bitcast to int32, fold negatives with ~x, scale into [0, 1).
FD_HD float uint_to_uniform(uint32_t u) {
  int32_t x = (int32_t)u;
  if (x < 0) x = ~x;
  return (float)x * 4.6566127342e-10f;
}

// N(0, 1) sample number `counter` of stream `seed` (first output of Box-Muller on the first two Philox words).
FD_HD float philox_normal(uint64_t seed, uint64_t counter) {
  uint32_t c[4] = {(uint32_t)counter, (uint32_t)(counter >> 32), 0u, 0u};
  philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
  float u1 = uint_to_uniform(c[0]);
  float u2 = uint_to_uniform(c[1]);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(6.283185307179586f * u2);
}

}  // namespace sstep
}  // namespace fastdiff

namespace fastdiff {
namespace sstep {

// Arguments of the CUDA launcher (csrc/cuda/sampler_step.cu), filled by csrc/cuda/sampler_step_glue.cpp. All pointers
// are device pointers; optional inputs are nullptr when absent. Tensors share one dense layout (memory order).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
struct LaunchArgs {
  const void* x;       // (n,) x_t
  const void* o;       // (n,) model output (unconditional with CFG)
  const void* oc;      // (n,) conditional model output, or nullptr
  const void* z;       // (n,) noise, or nullptr
  const void* v;       // (n,) model variance output (learned variances), or nullptr
  const int64_t* rng;  // (2,) [seed, offset] for Philox noise, or nullptr
  const float* thr;    // (B,) dynamic-thresholding scale, or nullptr
  const double* coef;  // (kNumCoef,) step scalars
  void* xp;            // (n,) out: x_prev
  float* x0;           // (n,) out: x̂0, or nullptr
  int64_t n, per_sample;
  int flags, dtype;
};

}  // namespace sstep
}  // namespace fastdiff
