// Per-element math of fastdiff::multistep_step_, shared by the CPU (csrc/cpu/multistep.cpp) and CUDA
// (csrc/cuda/multistep.cu) kernels. Plain C++ with CUDA qualifiers when nvcc compiles it; no torch headers.
//
// One sampler / solver update (DDIM, DDPM, DPM-Solver++, UniPC predictor + corrector, Euler, Heun, PLMS, ...), per
// element, in float32 with per-call coefficients (float64 in the op's `coef` tensor; fastdiff/ops/multistep.py
// documents the contract):
//   o  = o_u + w·(o_c − o_u)                                 classifier-free guidance, when o_c is given
//   d  = p·x + q·o;  clamp(d, ±clip) if CLIP;  clamp(d, ±s_b)/s_b with a per-sample s_b (dynamic thresholding)
//   y  = yx·x + yo·o + yd·d + Σ_k yh_k·h_k + σ·z              z a noise tensor or Philox N(0, 1); σ = yz, or with a
//                                                            VAR flag per element from the model's variance v
//   y2 = y2x·x + y2o·o + y2d·d + Σ_k y2h_k·h_k                 a second combination (e.g. UniPC's corrected sample)
// The sums run left to right, the order of fastdiff.ops.multistep.multistep_ref.
// Philox z: Philox4x32-10 + Box-Muller at counter (offset + i) with key seed, the numbers of Triton's
// tl.randn(seed, offset + i) (fastdiff.ops.sampler_step.philox_randn_ref is the reference).
#pragma once

#include <cmath>
#include <cstdint>

#include "fd_common.h"

namespace fastdiff {
namespace mstep {

// Layout of the coefficient vector (fastdiff.ops.multistep.COEF); 21..23 are reserved (zero).
enum Coef : int {
  kP = 0, kQ, kW, kClip,
  kYX, kYO, kYD, kYH0, kYH1, kYH2, kYH3, kYZ,
  kY2X, kY2O, kY2D, kY2H0, kY2H1, kY2H2, kY2H3,
  kLogMax, kLogMin,
  kNumCoef = 24
};
constexpr int kMaxHist = 4;
// Bits of the op's `flags`: clip d; the z term's σ per element from v (learned: √v; range: the log-interpolation
// between logmin and logmax, Nichol & Dhariwal eq. 15). At most one VAR bit.
enum Flag : int { kFlagClip = 1, kFlagVarLearned = 2, kFlagVarRange = 4, kFlagsAll = 7 };
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

FD_HD float guide(float ou, float oc, float w) { return ou + w * (oc - ou); }

FD_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

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

// One linear combination: y = x·x + o·o + d·d + Σ_k h[k]·h_k (+ z·z).
struct Lin {
  float x, o, d, h[kMaxHist], z;
};

struct Coefs {
  float p, q, w, clip, logmax, logmin;
  Lin y, y2;  // y2.z = 0: the second combination has no noise term
};

FD_HD Coefs load_coefs(const double* c) {
  Coefs k;
  k.p = (float)c[kP]; k.q = (float)c[kQ]; k.w = (float)c[kW]; k.clip = (float)c[kClip];
  k.logmax = (float)c[kLogMax]; k.logmin = (float)c[kLogMin];
  k.y.x = (float)c[kYX]; k.y.o = (float)c[kYO]; k.y.d = (float)c[kYD]; k.y.z = (float)c[kYZ];
  k.y2.x = (float)c[kY2X]; k.y2.o = (float)c[kY2O]; k.y2.d = (float)c[kY2D]; k.y2.z = 0.0f;
  for (int h = 0; h < kMaxHist; ++h) {
    k.y.h[h] = (float)c[kYH0 + h];
    k.y2.h[h] = (float)c[kY2H0 + h];
  }
  return k;
}

// d before clipping / thresholding (x̂0 or ε̂, whatever the solver keeps).
FD_HD float predict_d(const Coefs& k, float x, float o) { return k.p * x + k.q * o; }

// Dynamic thresholding of d with the sample's scale s.
FD_HD float threshold(float d, float s) { return clampf(d, -s, s) / s; }

// The z term's per-element σ from the model's variance output v (flags hold kFlagVarLearned or kFlagVarRange).
FD_HD float learned_sigma(const Coefs& k, int flags, float v) {
  if (flags & kFlagVarLearned) return sqrtf(v);
  float f = 0.5f * (v + 1.0f);
  return expf(0.5f * (f * k.logmax + (1.0f - f) * k.logmin));
}

// The first three terms of y or y2; the history terms, then the noise term, are added to it in that order.
FD_HD float combine(const Lin& l, float x, float o, float d) { return l.x * x + l.o * o + l.d * d; }

// Arguments of the CUDA launcher (csrc/cuda/multistep.cu), filled by csrc/cuda/multistep_glue.cpp. Device pointers;
// optional tensors are nullptr when absent; h[0 .. nh) are the given history tensors. One dense layout (memory order).
struct LaunchArgs {
  const void* x;
  const void* o;
  const void* oc;
  const void* h[kMaxHist];
  const void* z;
  const void* v;       // (n,) model variance output (a VAR flag), or nullptr
  const int64_t* rng;  // (2,) [seed, offset], or nullptr
  const float* thr;    // (B,), or nullptr
  const double* coef;  // (kNumCoef,)
  void* out;
  void* out2;          // or nullptr
  void* dout;          // or nullptr; x's dtype, or float32 when dout_f32
  int64_t n, per_sample;
  int nh, flags, dtype;  // dtype: DType of x and every other tensor but thr, coef (and dout when dout_f32)
  bool dout_f32;
};

}  // namespace mstep
}  // namespace fastdiff
