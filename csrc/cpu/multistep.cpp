// fastdiff::multistep_step_ on the CPU: one pass over x, o (o_c, h_0..h_3, z, v), writing out (out2, d_out) into
// the caller's buffers (d_out in x's dtype or float32). Threads split the tensor with at::parallel_for; each walks tiles of kTile elements: float32
// tensors are read and written in place, fp16/bf16 tiles are converted to float32 once, and each term of the update
// is a simple loop over the tile that the compiler vectorizes (which terms run is decided outside the loops).
// Rows that need no d in memory take linear_tiles (d in registers; 8 lanes in registers in the AVX2 copy).
// Per-element math: csrc/include/multistep_math.h; tile I/O and the AVX2 copy: fd_tiles.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "multistep_math.h"
#include "fd_tiles.h"

namespace fastdiff {
namespace {

using namespace mstep;
using tiles::check_like;
constexpr int64_t kTile = 512;
constexpr const char* kOp = "multistep_step";

struct Args {
  const void *x, *o, *oc, *z, *v;
  const void* h[kMaxHist];
  int nh;
  const float* thr;
  void *out, *out2, *dout;
  int64_t n, per_sample;
  uint64_t seed, offset;
  bool clip, philox, dout_f32;
  bool linear;  // the row needs no d in memory: linear_tiles
  int var;  // flags & (kFlagVarLearned | kFlagVarRange)
  Coefs k;
};

// out[j] = l.x·x + l.o·o + l.d·d + Σ_{k<NH} l.h[k]·h_k (+ l.z·z when Z), and when OUT2 the same for out2 with l2
// (no z): one pass over the tile, each input element read once for both sums, kept in registers, in the order of
// the formula.
template <int NH, bool Z, bool OUT2>
__attribute__((always_inline)) inline void combine_tile(const Lin& l, const Lin& l2, const float* __restrict__ x,
                                                        const float* __restrict__ o, const float* __restrict__ d,
                                                        const float* const* h, const float* __restrict__ z,
                                                        float* __restrict__ out, float* __restrict__ out2,
                                                        int64_t m) {
  const float* __restrict__ h0 = h[0];
  const float* __restrict__ h1 = h[1];
  const float* __restrict__ h2 = h[2];
  const float* __restrict__ h3 = h[3];
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    float acc = combine(l, x[j], o[j], d[j]);
    float acc2 = OUT2 ? combine(l2, x[j], o[j], d[j]) : 0.0f;
    if constexpr (NH > 0) { acc += l.h[0] * h0[j]; if constexpr (OUT2) acc2 += l2.h[0] * h0[j]; }
    if constexpr (NH > 1) { acc += l.h[1] * h1[j]; if constexpr (OUT2) acc2 += l2.h[1] * h1[j]; }
    if constexpr (NH > 2) { acc += l.h[2] * h2[j]; if constexpr (OUT2) acc2 += l2.h[2] * h2[j]; }
    if constexpr (NH > 3) { acc += l.h[3] * h3[j]; if constexpr (OUT2) acc2 += l2.h[3] * h3[j]; }
    if constexpr (Z) acc += l.z * z[j];
    out[j] = acc;
    if constexpr (OUT2) out2[j] = acc2;
  }
}

// Tiles [t0, t1), NH history tensors. always_inline: compiled into both copies below (baseline and AVX2).
// float32 results are written straight into the outputs (each once); fp16/bf16 ones are formed in float32 tile
// buffers and rounded once on the way out.
template <typename T, bool AVX2, int NH>
__attribute__((always_inline)) inline void multistep_tiles(const Args& a, int64_t t0, int64_t t1) {
  using tiles::as_f32;
  using tiles::flush;
  using tiles::out_f32;
  const Coefs k = a.k;
  Lin ly = k.y;
  if (a.var) ly.z = 1.0f;  // the tile's z already holds σ(v)·z: 1·(σ·z) adds exactly σ·z
  T* OUT = static_cast<T*>(a.out);
  T* OUT2 = static_cast<T*>(a.out2);
  T* DOUT = static_cast<T*>(a.dout);
  float* DOUT32 = static_cast<float*>(a.dout);
  alignas(64) float xb[kTile], ob[kTile], cb[kTile], zb[kTile], db[kTile], yb[kTile], y2b[kTile], vb[kTile];
  alignas(64) float hb[NH > 0 ? NH : 1][kTile];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t base = t * kTile;
    const int64_t m = std::min(kTile, a.n - base);
    const float* xs = as_f32<AVX2>(static_cast<const T*>(a.x) + base, xb, m);
    const float* os = as_f32<AVX2>(static_cast<const T*>(a.o) + base, ob, m);
    if (a.oc) {
      const float* cs = as_f32<AVX2>(static_cast<const T*>(a.oc) + base, cb, m);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) ob[j] = guide(os[j], cs[j], k.w);
      os = ob;
    }
    // d is formed in the output itself when that is float32 (a float32 x, or a float32 d_out), else in db
    float* ds = !DOUT ? db : (a.dout_f32 ? DOUT32 + base : out_f32(DOUT + base, db));
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) ds[j] = predict_d(k, xs[j], os[j]);
    if (a.clip) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) ds[j] = clampf(ds[j], -k.clip, k.clip);
    }
    if (a.thr) {  // a tile may straddle two samples: runs of one sample each
      for (int64_t j = 0; j < m;) {
        const int64_t b = (base + j) / a.per_sample;
        const int64_t e = std::min(m, (b + 1) * a.per_sample - base);
        const float s = a.thr[b];
#pragma omp simd
        for (int64_t i = j; i < e; ++i) ds[i] = threshold(ds[i], s);
        j = e;
      }
    }
    const float* hs[kMaxHist] = {nullptr, nullptr, nullptr, nullptr};
    for (int h = 0; h < NH; ++h) hs[h] = as_f32<AVX2>(static_cast<const T*>(a.h[h]) + base, hb[h], m);
    const float* zs = nullptr;
    if (a.z) {
      zs = as_f32<AVX2>(static_cast<const T*>(a.z) + base, zb, m);
    } else if (a.philox) {
      for (int64_t j = 0; j < m; ++j) zb[j] = philox_normal(a.seed, a.offset + (uint64_t)(base + j));
      zs = zb;
    }
    if (zs && a.var) {  // σ per element from v: z ← σ(v)·z in the tile buffer
      const float* vs = as_f32<AVX2>(static_cast<const T*>(a.v) + base, vb, m);
      for (int64_t j = 0; j < m; ++j) zb[j] = learned_sigma(k, a.var, vs[j]) * zs[j];
      zs = zb;
    }
    float* ys = out_f32(OUT + base, yb);
    float* y2s = OUT2 ? out_f32(OUT2 + base, y2b) : nullptr;
    if (zs && OUT2) {
      combine_tile<NH, true, true>(ly, k.y2, xs, os, ds, hs, zs, ys, y2s, m);
    } else if (zs) {
      combine_tile<NH, true, false>(ly, k.y2, xs, os, ds, hs, zs, ys, y2s, m);
    } else if (OUT2) {
      combine_tile<NH, false, true>(k.y, k.y2, xs, os, ds, hs, zs, ys, y2s, m);
    } else {
      combine_tile<NH, false, false>(k.y, k.y2, xs, os, ds, hs, zs, ys, y2s, m);
    }
    flush<AVX2>(yb, OUT + base, m);
    if (OUT2) flush<AVX2>(y2b, OUT2 + base, m);
    if (DOUT && !a.dout_f32) flush<AVX2>(db, DOUT + base, m);
  }
}

template <typename T>
constexpr bool kVec8 = std::is_same_v<T, float> || std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

#ifdef FD_X86_AVX2
// linear_tiles' update on the tile's first m − m % 8 elements (offset e of the tensor), converted in
// registers, 8 lanes at a time; z from the tensor ZT, or zb (the tile's Philox z) when ZT is null. Returns the count
// done. The contractions g++ makes of the scalar expressions there (-ffp-contract=fast, the AVX2 copy), written out
// so that both give the same bits (tests/ops/test_multistep.py compares them with the general path's):
// guide o + w·(c − o) = fma(w, c − o, o); predict_d p·x + q·o = fma(p, x, q·o); combine
// yx·x + yo·o + yd·d = fma(yd, d, fma(yx, x, yo·o)); + yz·z = fma(yz, z, acc). float32 tiles run here too, so a
// row's fp16/bf16 result is its float32 result rounded once whatever a compiler contracts.
template <typename T, bool CFG, bool Z>
__attribute__((target("avx2,fma,f16c"))) int64_t linear_regs_avx2(const Coefs& k, const T* __restrict__ X,
                                                                   const T* __restrict__ O, const T* __restrict__ OC,
                                                                   const T* __restrict__ ZT,
                                                                   const float* __restrict__ zb, T* __restrict__ OUT,
                                                                   int64_t e, int64_t m) {
  const __m256 w = _mm256_set1_ps(k.w), p = _mm256_set1_ps(k.p), q = _mm256_set1_ps(k.q);
  const __m256 yx = _mm256_set1_ps(k.y.x), yo = _mm256_set1_ps(k.y.o), yd = _mm256_set1_ps(k.y.d);
  const __m256 yz = _mm256_set1_ps(k.y.z);
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    const __m256 x = cpuio::load8_f32(X + e + j);
    __m256 o = cpuio::load8_f32(O + e + j);
    if constexpr (CFG) o = _mm256_fmadd_ps(w, _mm256_sub_ps(cpuio::load8_f32(OC + e + j), o), o);
    const __m256 d = _mm256_fmadd_ps(p, x, _mm256_mul_ps(q, o));
    __m256 acc = _mm256_fmadd_ps(yd, d, _mm256_fmadd_ps(yx, x, _mm256_mul_ps(yo, o)));
    if constexpr (Z) acc = _mm256_fmadd_ps(yz, ZT ? cpuio::load8_f32(ZT + e + j) : _mm256_loadu_ps(zb + j), acc);
    cpuio::store8(OUT + e + j, acc);
  }
  return j;
}
#endif

// Rows that need no d in memory (no d_out, history, out2, clip, threshold or learned σ: DDIM, DDPM, Euler, ...):
// y = yx·x + yo·o + yd·d (+ yz·z) with d = p·x + q·o (and o guided) kept in registers, one loop per tile. The same
// expressions in the same order as multistep_tiles (guide, predict_d, combine, then + l.z·z), so the same bits;
// only the d buffer and its loop (and, with o_cond, the guided-o loop) are gone. In the AVX2 copy the tile runs in
// registers, 8 lanes at a time (linear_regs_avx2; fp16/bf16 converted there), with no tile buffers but Philox z's;
// the rest (m % 8) as below.
template <typename T, bool AVX2, bool CFG, bool Z>
__attribute__((always_inline)) inline void linear_tiles(const Args& a, int64_t t0, int64_t t1) {
  using tiles::as_f32;
  using tiles::flush;
  using tiles::out_f32;
  const Coefs k = a.k;
  const Lin l = k.y;
  const T* X = static_cast<const T*>(a.x);
  const T* O = static_cast<const T*>(a.o);
  const T* OC = static_cast<const T*>(a.oc);
  const T* ZT = static_cast<const T*>(a.z);
  T* OUT = static_cast<T*>(a.out);
  alignas(64) float xb[kTile], ob[kTile], cb[kTile], zb[kTile], yb[kTile];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t base = t * kTile;
    const int64_t m = std::min(kTile, a.n - base);
    if constexpr (Z) {
      if (!ZT) {
        for (int64_t j = 0; j < m; ++j) zb[j] = philox_normal(a.seed, a.offset + (uint64_t)(base + j));
      }
    }
    int64_t j0 = 0;  // elements [0, j0) of the tile done in registers
#ifdef FD_X86_AVX2
    if constexpr (AVX2 && kVec8<T>) {
      j0 = linear_regs_avx2<T, CFG, Z>(k, X, O, OC, ZT, zb, OUT, base, m);
      if (j0 == m) continue;
    }
#endif
    const int64_t r = m - j0;  // the rest (all of it but in the AVX2 fp16/bf16 copy): through float32 tile buffers
    const float* __restrict__ xs = as_f32<AVX2>(X + base + j0, xb, r);
    const float* __restrict__ os = as_f32<AVX2>(O + base + j0, ob, r);
    const float* __restrict__ cs = CFG ? as_f32<AVX2>(OC + base + j0, cb, r) : nullptr;
    const float* __restrict__ zs = nullptr;
    if constexpr (Z) zs = ZT ? as_f32<AVX2>(ZT + base + j0, zb, r) : zb + j0;
    float* __restrict__ ys = out_f32(OUT + base + j0, yb);
#pragma omp simd
    for (int64_t j = 0; j < r; ++j) {
      const float x = xs[j];
      const float o = CFG ? guide(os[j], cs[j], k.w) : os[j];
      float acc = combine(l, x, o, predict_d(k, x, o));
      if constexpr (Z) acc += l.z * zs[j];
      ys[j] = acc;
    }
    flush<AVX2>(yb, OUT + base + j0, r);
  }
}

// Whether the linear path may run: FASTDIFF_CPU_LINEAR = 0 turns it off (read per call, like FASTDIFF_CPU_ISA, so
// tests and benchmarks can run the general path on the same rows in one process).
inline bool linear_path_enabled() {
  const char* e = std::getenv("FASTDIFF_CPU_LINEAR");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

template <typename T, bool AVX2>
__attribute__((always_inline)) inline void multistep_any(const Args& a, int64_t t0, int64_t t1) {
  if (a.linear) {
    const bool z = a.z || a.philox;
    if (a.oc) return z ? linear_tiles<T, AVX2, true, true>(a, t0, t1) : linear_tiles<T, AVX2, true, false>(a, t0, t1);
    return z ? linear_tiles<T, AVX2, false, true>(a, t0, t1) : linear_tiles<T, AVX2, false, false>(a, t0, t1);
  }
  switch (a.nh) {
    case 0: return multistep_tiles<T, AVX2, 0>(a, t0, t1);
    case 1: return multistep_tiles<T, AVX2, 1>(a, t0, t1);
    case 2: return multistep_tiles<T, AVX2, 2>(a, t0, t1);
    case 3: return multistep_tiles<T, AVX2, 3>(a, t0, t1);
    default: return multistep_tiles<T, AVX2, 4>(a, t0, t1);
  }
}

template <typename T>
void multistep_tiles_base(const Args& a, int64_t t0, int64_t t1) { multistep_any<T, false>(a, t0, t1); }

#ifdef FD_X86_AVX2
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void multistep_tiles_avx2(const Args& a, int64_t t0, int64_t t1) {
  multistep_any<T, true>(a, t0, t1);
}
#endif

template <typename T>
void run_cpu(const Args& a) {
  void (*fn)(const Args&, int64_t, int64_t) = &multistep_tiles_base<T>;
#ifdef FD_X86_AVX2
  if (tiles::use_avx2()) fn = &multistep_tiles_avx2<T>;
#endif
  at::parallel_for(0, (a.n + kTile - 1) / kTile, 16, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
}

}  // namespace

// Checks shared by the CPU and CUDA entries; returns the per-sample element count.
int64_t multistep_check(const at::Tensor& x, const at::Tensor& o, const c10::optional<at::Tensor>& o_cond,
                        at::TensorList hist, const c10::optional<at::Tensor>& noise,
                        const c10::optional<at::Tensor>& rng, const c10::optional<at::Tensor>& v,
                        const c10::optional<at::Tensor>& thr, const at::Tensor& coef, int64_t flags,
                        const at::Tensor& out, const c10::optional<at::Tensor>& out2,
                        const c10::optional<at::Tensor>& d_out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "multistep_step: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "multistep_step: x must have shape (B, ...), got a 0-dim tensor");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "multistep_step: x must be dense (contiguous or channels_last), got "
              "strides ", x.strides(), " for shape ", x.sizes());
  TORCH_CHECK(hist.size() <= (size_t)kMaxHist, "multistep_step: hist has ", hist.size(), " tensors, at most ",
              (int)kMaxHist);
  static const char* const hname[kMaxHist] = {"hist[0]", "hist[1]", "hist[2]", "hist[3]"};
  check_like(kOp, x, o, "o");
  check_like(kOp, x, o_cond, "o_cond");
  for (size_t h = 0; h < hist.size(); ++h) check_like(kOp, x, hist[h], hname[h]);
  check_like(kOp, x, noise, "noise");
  check_like(kOp, x, v, "v");
  check_like(kOp, x, out, "out");
  check_like(kOp, x, out2, "out2");
  if (d_out.has_value() && d_out->scalar_type() == at::kFloat) {
    check_like(kOp, x, d_out, "d_out", at::kFloat);
  } else {
    check_like(kOp, x, d_out, "d_out");
  }
  TORCH_CHECK(coef.scalar_type() == at::kDouble && coef.dim() == 1 && coef.numel() == kNumCoef &&
              coef.is_contiguous() && coef.device() == x.device(),
              "multistep_step: coef must be a contiguous float64 tensor of ", (int)kNumCoef, " values on x's device, got ",
              coef.scalar_type(), " ", coef.sizes(), " on ", coef.device());
  TORCH_CHECK(!(noise.has_value() && rng.has_value()), "multistep_step: pass noise or rng, not both");
  if (rng.has_value()) {
    TORCH_CHECK(rng->scalar_type() == at::kLong && rng->numel() == 2 && rng->is_contiguous() &&
                rng->device() == x.device(), "multistep_step: rng must be a contiguous int64 tensor [seed, offset] "
                "on x's device");
  }
  TORCH_CHECK(flags >= 0 && (flags & ~kFlagsAll) == 0 && (flags & (kFlagVarLearned | kFlagVarRange)) !=
              (kFlagVarLearned | kFlagVarRange), "multistep_step: invalid flags ", flags,
              " (bit 0: clip; bit 1: learned variance; bit 2: learned_range variance; at most one of bits 1, 2)");
  TORCH_CHECK(((flags & (kFlagVarLearned | kFlagVarRange)) != 0) == v.has_value(),
              "multistep_step: v (the model's variance output) is needed exactly when flags select a learned "
              "variance (bit 1 or 2), got flags ", flags, v.has_value() ? " with v" : " without v");
  const int64_t B = x.size(0);
  const int64_t per_sample = B > 0 ? x.numel() / B : 0;
  if (thr.has_value()) {
    TORCH_CHECK(thr->scalar_type() == at::kFloat && thr->dim() == 1 && thr->numel() == B && thr->is_contiguous() &&
                thr->device() == x.device(), "multistep_step: thr must be a contiguous float32 tensor (B,) on x's "
                "device");
    TORCH_CHECK(x.numel() == 0 || x.stride(0) == per_sample, "multistep_step: thr needs the batch dimension "
                "outermost in memory, got strides ", x.strides());
  }
  using Named = std::pair<const char*, const at::Tensor*>;
  Named all[5 + kMaxHist + 4];
  int n = 0;
  auto add = [&](const char* name, const at::Tensor* t) { all[n++] = Named{name, t}; };
  add("x", &x);
  add("o", &o);
  add("o_cond", o_cond ? &*o_cond : nullptr);
  for (size_t h = 0; h < hist.size(); ++h) add(hname[h], &hist[h]);
  add("noise", noise ? &*noise : nullptr);
  add("v", v ? &*v : nullptr);
  const int n_in = n;
  add("out", &out);
  add("out2", out2 ? &*out2 : nullptr);
  add("d_out", d_out ? &*d_out : nullptr);
  for (int i = n_in; i < n; ++i)  // each output against every input and the outputs before it
    if (all[i].second) tiles::check_no_overlap(kOp, all[i].first, *all[i].second, all, i);
  return per_sample;
}

namespace {

void multistep_cpu(const at::Tensor& x, const at::Tensor& o, const c10::optional<at::Tensor>& o_cond,
                   at::TensorList hist, const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng,
                   const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& thr, const at::Tensor& coef,
                   int64_t flags, const at::Tensor& out, const c10::optional<at::Tensor>& out2,
                   const c10::optional<at::Tensor>& d_out) {
  const int64_t per_sample =
      multistep_check(x, o, o_cond, hist, noise, rng, v, thr, coef, flags, out, out2, d_out);
  Args a{};
  a.x = x.data_ptr();
  a.o = o.data_ptr();
  a.oc = o_cond ? o_cond->data_ptr() : nullptr;
  a.nh = (int)hist.size();
  for (int h = 0; h < a.nh; ++h) a.h[h] = hist[h].data_ptr();
  a.z = noise ? noise->data_ptr() : nullptr;
  a.v = v ? v->data_ptr() : nullptr;
  a.thr = thr ? thr->data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.out2 = out2 ? out2->data_ptr() : nullptr;
  a.dout = d_out ? d_out->data_ptr() : nullptr;
  a.n = x.numel();
  a.per_sample = per_sample;
  a.clip = flags & kFlagClip;
  a.var = (int)(flags & (kFlagVarLearned | kFlagVarRange));
  a.dout_f32 = d_out.has_value() && d_out->scalar_type() == at::kFloat;
  a.philox = rng.has_value();
  if (a.philox) {
    const int64_t* r = rng->data_ptr<int64_t>();
    a.seed = (uint64_t)r[0];
    a.offset = (uint64_t)r[1];
  }
  a.k = load_coefs(coef.data_ptr<double>());
  a.linear = !a.dout && a.nh == 0 && !a.out2 && !a.clip && !a.thr && !a.var && linear_path_enabled();
  if (a.n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multistep_cpu",
                                  [&] { run_cpu<scalar_t>(a); });
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("multistep_step_", &fastdiff::multistep_cpu); }
