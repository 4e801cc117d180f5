// Argument checks of fastdiff::group_norm_silu, used by the CPU kernel (csrc/cpu/group_norm_silu.cpp) and the CUDA
// glue (csrc/cuda/group_norm_silu_glue.cpp). Host-only (torch headers).
#pragma once

#include <ATen/ATen.h>

namespace fastdiff {

// Returns true for NCHW-contiguous x, false for channels_last; anything else is an error.
inline bool group_norm_silu_check(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                                  int64_t num_groups, double eps) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: x must have shape (N, C, ...), got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups >= 1 && C % num_groups == 0, "group_norm_silu: num_groups (", num_groups,
              ") must be a positive divisor of the channel count ", C);
  TORCH_CHECK(eps > 0, "group_norm_silu: eps must be > 0, got ", eps);
  const bool nchw = x.is_contiguous();
  const bool nhwc = !nchw && ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                              (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
  TORCH_CHECK(nchw || nhwc, "group_norm_silu: x must be contiguous (NCHW) or channels_last, got strides ",
              x.strides());
  if (weight.has_value())
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C, "group_norm_silu: weight must have shape (", C,
                "), got ", weight->sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "group_norm_silu: bias must have shape (", C, "), got ",
                bias->sizes());
  if (add.has_value())
    TORCH_CHECK(add->dim() == 2 && add->size(0) == N && add->size(1) == C, "group_norm_silu: add must have shape (",
                N, ", ", C, "), got ", add->sizes());
  for (const auto* t : {&weight, &bias, &add})
    if (t->has_value())
      TORCH_CHECK((*t)->device() == x.device(), "group_norm_silu: weight, bias and add must be on x's device ",
                  x.device(), ", got ", (*t)->device());
  return nchw;
}

}  // namespace fastdiff
