// Argument checks of fastdiff::sampler_step / sampler_step_out, used by the CPU kernel (csrc/cpu/sampler_step.cpp)
// and the CUDA glue (csrc/cuda/sampler_step_glue.cpp). Host-only (torch headers).
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "fd_checks.h"
#include "sampler_step_math.h"

namespace fastdiff {
namespace sstep {
constexpr const char* kCheckOp = "sampler_step";  // the op named in the errors
}  // namespace sstep

// Checks shared by the CPU and CUDA entries; returns the per-sample element count.
inline int64_t sampler_step_check(const at::Tensor& x, const at::Tensor& o,
                                  const c10::optional<at::Tensor>& o_cond, const c10::optional<at::Tensor>& noise,
                                  const c10::optional<at::Tensor>& rng, const c10::optional<at::Tensor>& v,
                                  const c10::optional<at::Tensor>& thr, const at::Tensor& coef, int64_t flags) {
  using namespace sstep;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sampler_step: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "sampler_step: x must have shape (B, ...), got a 0-dim tensor");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "sampler_step: x must be dense (contiguous or channels_last), got "
              "strides ", x.strides(), " for shape ", x.sizes());
  checks::check_like(kCheckOp, x, o, "o");
  checks::check_like(kCheckOp, x, o_cond, "o_cond");
  checks::check_like(kCheckOp, x, noise, "noise");
  checks::check_like(kCheckOp, x, v, "v");
  TORCH_CHECK(coef.scalar_type() == at::kDouble && coef.dim() == 1 && coef.numel() == kNumCoef &&
              coef.is_contiguous() && coef.device() == x.device(),
              "sampler_step: coef must be a contiguous float64 tensor of ", (int)kNumCoef, " values on x's device");
  TORCH_CHECK(!(noise.has_value() && rng.has_value()), "sampler_step: pass noise or rng, not both");
  if (rng.has_value()) {
    TORCH_CHECK(rng->scalar_type() == at::kLong && rng->numel() == 2 && rng->is_contiguous() &&
                rng->device() == x.device(), "sampler_step: rng must be a contiguous int64 tensor [seed, offset] "
                "on x's device");
  }
  const int var_mode = (int)((flags & kVarMask) >> kVarShift);
  TORCH_CHECK(flags >= 0 && flags < 8 && var_mode <= kVarLearnedRange, "sampler_step: invalid flags ", flags);
  TORCH_CHECK((var_mode != kVarScalar) == v.has_value(), "sampler_step: v (the model's variance output) is needed "
              "exactly when flags select a learned variance");
  const int64_t B = x.size(0);
  const int64_t per_sample = B > 0 ? x.numel() / B : 0;
  if (thr.has_value()) {
    TORCH_CHECK(thr->scalar_type() == at::kFloat && thr->dim() == 1 && thr->numel() == B && thr->is_contiguous() &&
                thr->device() == x.device(), "sampler_step: thr must be a contiguous float32 tensor (B,) on x's "
                "device");
    TORCH_CHECK(x.numel() == 0 || x.stride(0) == per_sample, "sampler_step: thr needs the batch dimension outermost "
                "in memory, got strides ", x.strides());
  }
  return per_sample;
}

// Checks of the out= buffers (CPU and CUDA entries): out of x's dtype, shape and strides, x0_out the same in
// float32, neither overlapping an input or the other.
inline void sampler_step_out_check(const at::Tensor& x, const at::Tensor& o,
                                   const c10::optional<at::Tensor>& o_cond, const c10::optional<at::Tensor>& noise,
                                   const c10::optional<at::Tensor>& v, const at::Tensor& out,
                                   const c10::optional<at::Tensor>& x0_out) {
  using namespace sstep;
  checks::check_like(kCheckOp, x, out, "out");
  checks::check_like(kCheckOp, x, x0_out, "x0_out", at::kFloat);
  const std::pair<const char*, const at::Tensor*> ins[] = {
      {"x", &x}, {"o", &o}, {"o_cond", o_cond ? &*o_cond : nullptr}, {"noise", noise ? &*noise : nullptr},
      {"v", v ? &*v : nullptr}, {"out", &out}};
  checks::check_no_overlap(kCheckOp, "out", out, ins, 5);
  if (x0_out) checks::check_no_overlap(kCheckOp, "x0_out", *x0_out, ins, 6);
}

}  // namespace fastdiff
