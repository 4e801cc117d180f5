// Argument checks shared by the ops' torch glue (CPU .cpp files and csrc/cuda/*_glue.cpp): every error names the op
// and the argument. Host-only (torch headers).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace fastdiff {
namespace checks {

// `t` (optional) has x's device, shape and strides, and x's dtype or `dtype`; errors name op and argument.
inline void check_like(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& t, const char* name,
                       c10::optional<at::ScalarType> dtype = c10::nullopt) {
  if (!t.has_value()) return;
  const at::ScalarType want = dtype.value_or(x.scalar_type());
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), ", x on ", x.device());
  TORCH_CHECK(t->scalar_type() == want, op, ": ", name, " has dtype ", t->scalar_type(), ", expected ", want);
  TORCH_CHECK(t->sizes() == x.sizes(), op, ": ", name, " has shape ", t->sizes(), ", x has ", x.sizes());
  TORCH_CHECK(t->numel() <= 1 || t->strides() == x.strides(), op, ": ", name, " has strides ", t->strides(),
              ", x has ", x.strides(), " (all tensors must share x's memory layout)");
}

// The bytes of two tensors intersect (same device): an output aliasing an input or another output.
inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  auto span = [](const at::Tensor& t) {
    int64_t s = 1;
    for (int64_t d = 0; d < t.dim(); ++d) s += (t.size(d) - 1) * t.stride(d);
    return (uintptr_t)(s * (int64_t)t.element_size());
  };
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr()), pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  return pa < pb + span(b) && pb < pa + span(a);
}

// Output `name` overlaps none of the first n named tensors (null entries are absent optional tensors).
inline void check_no_overlap(const char* op, const char* name, const at::Tensor& out,
                             const std::pair<const char*, const at::Tensor*>* others, int n) {
  for (int i = 0; i < n; ++i)
    TORCH_CHECK(!others[i].second || !overlaps(out, *others[i].second), op, ": output ", name, " overlaps ",
                others[i].first, " (outputs may alias no input and no other output)");
}

}  // namespace checks
}  // namespace fastdiff
