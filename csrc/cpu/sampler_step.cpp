// fastdiff::sampler_step on the CPU: one pass over x, o (o_c, z, v), writing x_prev (and x̂0 when asked).
// Work is split over threads with at::parallel_for; each thread walks tiles of kTile elements, converts them to
// float32, and runs each stage of the step as a simple loop over the tile, which the compiler vectorizes
// (the flags only decide which stages run, outside the loops). Per-element math: csrc/include/sampler_step_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "sampler_step_checks.h"
#include "sampler_step_math.h"
#include "sampler_step_tiles.h"

namespace fastdiff {
namespace {

using namespace sstep;
using tiles::load_any;
using tiles::store_any;
constexpr int64_t kTile = 512;

struct Args {
  const void *x, *o, *oc, *z, *v;
  const float* thr;
  void* xp;
  float* x0;
  int64_t n, per_sample;
  uint64_t seed, offset;
  bool clip, philox;
  bool linear;     // no clip, threshold, guidance or x̂0 output: x' = cx·x + co·o (+ σ·z)
  float cx, co;
  int var_mode;
  Coefs k;
};

// Tiles [t0, t1) of the step. always_inline: it is compiled into both copies below (baseline and AVX2).
template <typename T, bool AVX2>
__attribute__((always_inline)) inline void step_tiles(const Args& a, int64_t t0, int64_t t1) {
  const T* X = static_cast<const T*>(a.x);
  const T* O = static_cast<const T*>(a.o);
  const T* OC = static_cast<const T*>(a.oc);
  const T* Z = static_cast<const T*>(a.z);
  const T* V = static_cast<const T*>(a.v);
  T* XP = static_cast<T*>(a.xp);
  const Coefs k = a.k;
  alignas(64) float xb[kTile], ob[kTile], x0b[kTile], eb[kTile], tb[kTile];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t base = t * kTile;
    const int64_t m = std::min(kTile, a.n - base);
    if (a.linear) {  // the common case (DDIM/DDPM without clipping): two FMAs per element
      const float* xs = xb;
      const float* os = ob;
      if constexpr (std::is_same_v<T, float>) {
        xs = X + base;
        os = O + base;
      } else {
        load_any<AVX2>(X + base, xb, m);
        load_any<AVX2>(O + base, ob, m);
      }
      const float cx = a.cx, co = a.co;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) eb[j] = cx * xs[j] + co * os[j];
    } else {
      load_any<AVX2>(X + base, xb, m);
      load_any<AVX2>(O + base, ob, m);
      if (OC) {
        load_any<AVX2>(OC + base, tb, m);
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) ob[j] = guide(ob[j], tb[j], k.w);
      }
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) x0b[j] = predict_x0(k, xb[j], ob[j]);
      if (a.clip) {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) x0b[j] = clampf(x0b[j], -k.clip, k.clip);
      }
      if (a.thr) {  // a tile may straddle two samples: look the threshold up per element
        for (int64_t j = 0; j < m; ++j) {
          const float s = a.thr[(base + j) / a.per_sample];
          x0b[j] = clampf(x0b[j], -s, s) / s;
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) eb[j] = combine(k, xb[j], x0b[j], predict_eps(k, xb[j], ob[j], x0b[j]));
      if (a.x0) std::copy(x0b, x0b + m, a.x0 + base);
    }
    if (Z || a.philox) {
      if (Z) {
        load_any<AVX2>(Z + base, tb, m);
      } else {
        for (int64_t j = 0; j < m; ++j) tb[j] = philox_normal(a.seed, a.offset + (uint64_t)(base + j));
      }
      if (V) {
        load_any<AVX2>(V + base, xb, m);  // xb is free now: reuse it for v
        for (int64_t j = 0; j < m; ++j) eb[j] += learned_sigma(k, a.var_mode, xb[j]) * tb[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) eb[j] += k.sigma * tb[j];
      }
    }
    store_any<AVX2>(eb, XP + base, m);
  }
}

template <typename T>
void step_tiles_base(const Args& a, int64_t t0, int64_t t1) { step_tiles<T, false>(a, t0, t1); }

#ifdef FD_X86_AVX2
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void step_tiles_avx2(const Args& a, int64_t t0, int64_t t1) {
  step_tiles<T, true>(a, t0, t1);
}
#endif

template <typename T>
void run_cpu(const Args& a) {
  void (*fn)(const Args&, int64_t, int64_t) = &step_tiles_base<T>;
#ifdef FD_X86_AVX2
  if (tiles::use_avx2()) fn = &step_tiles_avx2<T>;
#endif
  at::parallel_for(0, (a.n + kTile - 1) / kTile, 16, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
}

}  // namespace

namespace {

// The step into preallocated outputs (already checked): xp like x, x0 float32 like x or undefined.
void run_into(const at::Tensor& x, const at::Tensor& o, const c10::optional<at::Tensor>& o_cond,
              const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng,
              const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& thr, const at::Tensor& coef,
              int64_t flags, int64_t per_sample, const at::Tensor& xp, const at::Tensor& x0) {
  Args a{};
  a.x = x.data_ptr();
  a.o = o.data_ptr();
  a.oc = o_cond.has_value() ? o_cond->data_ptr() : nullptr;
  a.z = noise.has_value() ? noise->data_ptr() : nullptr;
  a.v = v.has_value() ? v->data_ptr() : nullptr;
  a.thr = thr.has_value() ? thr->data_ptr<float>() : nullptr;
  a.xp = xp.data_ptr();
  a.x0 = x0.defined() ? x0.data_ptr<float>() : nullptr;
  a.n = x.numel();
  a.per_sample = per_sample;
  a.clip = flags & kFlagClip;
  a.var_mode = (int)((flags & kVarMask) >> kVarShift);
  a.philox = rng.has_value();
  if (a.philox) {
    const int64_t* r = rng->data_ptr<int64_t>();
    a.seed = (uint64_t)r[0];
    a.offset = (uint64_t)r[1];
  }
  a.k = load_coefs(coef.data_ptr<double>());
  a.linear = !a.clip && !a.thr && !a.x0 && !a.oc;
  fold_linear(coef.data_ptr<double>(), &a.cx, &a.co);
  if (a.n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_cpu",
                                  [&] { run_cpu<scalar_t>(a); });
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x, const at::Tensor& o,
                                                    const c10::optional<at::Tensor>& o_cond,
                                                    const c10::optional<at::Tensor>& noise,
                                                    const c10::optional<at::Tensor>& rng,
                                                    const c10::optional<at::Tensor>& v,
                                                    const c10::optional<at::Tensor>& thr, const at::Tensor& coef,
                                                    int64_t flags, bool write_x0) {
  const int64_t per_sample = sampler_step_check(x, o, o_cond, noise, rng, v, thr, coef, flags);
  at::Tensor xp = at::empty_like(x);
  at::Tensor x0 = write_x0 ? at::empty_like(x, x.options().dtype(at::kFloat))
                           : at::empty({0}, x.options().dtype(at::kFloat));
  run_into(x, o, o_cond, noise, rng, v, thr, coef, flags, per_sample, xp, write_x0 ? x0 : at::Tensor());
  return {xp, x0};
}

// fastdiff::sampler_step_out: the same step written into the caller's out (x's dtype and strides) and x0_out
// (float32, x's strides; x̂0 is written exactly when it is given).
void sampler_step_out_cpu(const at::Tensor& x, const at::Tensor& o, const c10::optional<at::Tensor>& o_cond,
                          const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng,
                          const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& thr,
                          const at::Tensor& coef, int64_t flags, const at::Tensor& out,
                          const c10::optional<at::Tensor>& x0_out) {
  const int64_t per_sample = sampler_step_check(x, o, o_cond, noise, rng, v, thr, coef, flags);
  sampler_step_out_check(x, o, o_cond, noise, v, out, x0_out);
  run_into(x, o, o_cond, noise, rng, v, thr, coef, flags, per_sample, out, x0_out.value_or(at::Tensor()));
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("sampler_step", &fastdiff::sampler_step_cpu);
  m.impl("sampler_step_out", &fastdiff::sampler_step_out_cpu);
}
