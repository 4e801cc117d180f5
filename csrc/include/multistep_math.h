// Per-element math of fastdiff::multistep_step_, shared by the CPU (csrc/cpu/multistep.cpp) and CUDA
// (csrc/cuda/multistep.cu) kernels. Plain C++ with CUDA qualifiers when nvcc compiles it; no torch headers.
//
// One solver update (DPM-Solver++, UniPC predictor + corrector, Euler, Heun, PLMS, ...), per element, in float32 with
// per-call coefficients (float64 in the op's `coef` tensor; fastdiff/ops/multistep.py documents the contract):
//   o  = o_u + w·(o_c − o_u)                                 classifier-free guidance, when o_c is given
//   d  = p·x + q·o;  clamp(d, ±clip) if CLIP;  clamp(d, ±s_b)/s_b with a per-sample s_b (dynamic thresholding)
//   y  = yx·x + yo·o + yd·d + Σ_k yh_k·h_k + yz·z             z a noise tensor or Philox N(0, 1), as sampler_step's
//   y2 = y2x·x + y2o·o + y2d·d + Σ_k y2h_k·h_k                 a second combination (e.g. UniPC's corrected sample)
// The sums run left to right, the order of fastdiff.ops.multistep.multistep_ref.
#pragma once

#include <cstdint>

#include "fd_common.h"
#include "sampler_step_math.h"  // guide, clampf, philox_normal: the same helpers as the sampler step

namespace fastdiff {
namespace mstep {

// Layout of the coefficient vector (fastdiff.ops.multistep.COEF); 19..23 are reserved (zero).
enum Coef : int {
  kP = 0, kQ, kW, kClip,
  kYX, kYO, kYD, kYH0, kYH1, kYH2, kYH3, kYZ,
  kY2X, kY2O, kY2D, kY2H0, kY2H1, kY2H2, kY2H3,
  kNumCoef = 24
};
constexpr int kMaxHist = 4;
enum Flag : int { kFlagClip = 1 };

// One linear combination: y = x·x + o·o + d·d + Σ_k h[k]·h_k (+ z·z).
struct Lin {
  float x, o, d, h[kMaxHist], z;
};

struct Coefs {
  float p, q, w, clip;
  Lin y, y2;  // y2.z = 0: the second combination has no noise term
};

FD_HD Coefs load_coefs(const double* c) {
  Coefs k;
  k.p = (float)c[kP]; k.q = (float)c[kQ]; k.w = (float)c[kW]; k.clip = (float)c[kClip];
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
FD_HD float threshold(float d, float s) { return sstep::clampf(d, -s, s) / s; }

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
  const int64_t* rng;  // (2,) [seed, offset], or nullptr
  const float* thr;    // (B,), or nullptr
  const double* coef;  // (kNumCoef,)
  void* out;
  void* out2;          // or nullptr
  void* dout;          // or nullptr
  int64_t n, per_sample;
  int nh, flags, dtype;  // dtype: sstep::DType
};

}  // namespace mstep
}  // namespace fastdiff
