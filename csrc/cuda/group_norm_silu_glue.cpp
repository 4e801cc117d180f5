// Torch glue of the CUDA fastdiff::group_norm_silu: argument checks (csrc/include/group_norm_silu_checks.h), device
// guard, workspace from torch's caching allocator (so the op can be captured in a CUDA graph), current stream, then
// the plain launcher in group_norm_silu.cu. Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "group_norm_silu_checks.h"
#include "group_norm_silu_math.h"

namespace fastdiff {

namespace gns {
int64_t target_blocks();                                                                 // group_norm_silu.cu
cudaError_t launch_group_norm_silu(const LaunchArgs& a, const Plan& pl, cudaStream_t stream);  // group_norm_silu.cu
}  // namespace gns

namespace {

int dtype_code(at::ScalarType t) {
  return t == at::kHalf ? gns::kF16 : (t == at::kBFloat16 ? gns::kBF16 : gns::kF32);
}

// A parameter as the kernel reads it: contiguous, in fp32/fp16/bf16 (anything else is converted to fp32).
at::Tensor param(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  at::Tensor p = t->contiguous();
  const auto s = p.scalar_type();
  if (s != at::kFloat && s != at::kHalf && s != at::kBFloat16) p = p.to(at::kFloat);
  return p;
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                                int64_t num_groups, double eps, bool silu) {
  TORCH_CHECK(x.is_cuda(), "group_norm_silu (CUDA): x must be a CUDA tensor, got ", x.device());
  const bool nchw = group_norm_silu_check(x, weight, bias, add, num_groups, eps);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "group_norm_silu (CUDA): x must be float32, float16 or bfloat16, got ", st);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);  // preserves the memory format
  if (x.numel() == 0) return y;
  const int64_t N = x.size(0), C = x.size(1), HW = x.numel() / (N * C);
  TORCH_CHECK((C / num_groups) * HW < (int64_t(1) << 31),
              "group_norm_silu (CUDA): one group of x has too many elements (C / num_groups · H·W = ",
              (C / num_groups) * HW, ", limit 2^31)");
  at::Tensor w = param(weight), b = param(bias), a = param(add);
  const gns::Plan pl = gns::plan(N, C, HW, num_groups, !nchw, gns::target_blocks());
  at::Tensor work = at::empty({pl.work_floats > 0 ? pl.work_floats : 0}, x.options().dtype(at::kFloat));
  gns::LaunchArgs args{};
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.w = w.defined() ? w.data_ptr() : nullptr;
  args.b = b.defined() ? b.data_ptr() : nullptr;
  args.add = a.defined() ? a.data_ptr() : nullptr;
  args.work = pl.work_floats > 0 ? work.data_ptr<float>() : nullptr;
  args.N = N;
  args.C = C;
  args.HW = HW;
  args.G = num_groups;
  args.eps = static_cast<float>(eps);
  args.dtype = dtype_code(st);
  args.w_dtype = w.defined() ? dtype_code(w.scalar_type()) : gns::kF32;
  args.b_dtype = b.defined() ? dtype_code(b.scalar_type()) : gns::kF32;
  args.add_dtype = a.defined() ? dtype_code(a.scalar_type()) : gns::kF32;
  args.silu = silu;
  args.channels_last = !nchw;
  const cudaError_t err = gns::launch_group_norm_silu(args, pl, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err != cudaErrorInvalidConfiguration,
              "group_norm_silu (CUDA): unsupported size (channels_last needs C <= ~5000 channels; got C = ", C,
              ", N = ", N, ", H·W = ", HW, ")");
  TORCH_CHECK(err == cudaSuccess, "group_norm_silu (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("group_norm_silu", &fastdiff::group_norm_silu_cuda); }
