// Torch glue of the CUDA fastdiff::sampler_step: argument checks (csrc/include/sampler_step_checks.h), device guard,
// current stream, then the plain launcher in sampler_step.cu. Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "sampler_step_checks.h"  // the argument checks, shared with the CPU kernel
#include "sampler_step_math.h"

namespace fastdiff {

namespace sstep {
cudaError_t launch_sampler_step(const LaunchArgs& a, cudaStream_t stream);  // csrc/cuda/sampler_step.cu
}

namespace {

const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// The step into checked outputs: xp like x, x0 float32 like x or undefined.
void run_into(const at::Tensor& x, const at::Tensor& o, const c10::optional<at::Tensor>& o_cond,
              const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng,
              const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& thr, const at::Tensor& coef,
              int64_t flags, int64_t per_sample, const at::Tensor& xp, const at::Tensor& x0) {
  sstep::LaunchArgs a{};
  a.x = x.data_ptr();
  a.o = o.data_ptr();
  a.oc = ptr_or_null(o_cond);
  a.z = ptr_or_null(noise);
  a.v = ptr_or_null(v);
  a.rng = rng.has_value() ? rng->data_ptr<int64_t>() : nullptr;
  a.thr = thr.has_value() ? thr->data_ptr<float>() : nullptr;
  a.coef = coef.data_ptr<double>();
  a.xp = xp.data_ptr();
  a.x0 = x0.defined() ? x0.data_ptr<float>() : nullptr;
  a.n = x.numel();
  a.per_sample = per_sample;
  a.flags = (int)flags;
  a.dtype = x.scalar_type() == at::kFloat ? sstep::kF32 : (x.scalar_type() == at::kHalf ? sstep::kF16 : sstep::kBF16);
  const cudaError_t err = sstep::launch_sampler_step(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sampler_step (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x, const at::Tensor& o,
                                                     const c10::optional<at::Tensor>& o_cond,
                                                     const c10::optional<at::Tensor>& noise,
                                                     const c10::optional<at::Tensor>& rng,
                                                     const c10::optional<at::Tensor>& v,
                                                     const c10::optional<at::Tensor>& thr, const at::Tensor& coef,
                                                     int64_t flags, bool write_x0) {
  TORCH_CHECK(x.is_cuda(), "sampler_step (CUDA): x must be a CUDA tensor");
  const int64_t per_sample = sampler_step_check(x, o, o_cond, noise, rng, v, thr, coef, flags);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xp = at::empty_like(x);
  at::Tensor x0 = write_x0 ? at::empty_like(x, x.options().dtype(at::kFloat))
                           : at::empty({0}, x.options().dtype(at::kFloat));
  run_into(x, o, o_cond, noise, rng, v, thr, coef, flags, per_sample, xp, write_x0 ? x0 : at::Tensor());
  return {xp, x0};
}

void sampler_step_out_cuda(const at::Tensor& x, const at::Tensor& o, const c10::optional<at::Tensor>& o_cond,
                           const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng,
                           const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& thr,
                           const at::Tensor& coef, int64_t flags, const at::Tensor& out,
                           const c10::optional<at::Tensor>& x0_out) {
  TORCH_CHECK(x.is_cuda(), "sampler_step (CUDA): x must be a CUDA tensor");
  const int64_t per_sample = sampler_step_check(x, o, o_cond, noise, rng, v, thr, coef, flags);
  sampler_step_out_check(x, o, o_cond, noise, v, out, x0_out);
  const c10::cuda::CUDAGuard guard(x.device());
  run_into(x, o, o_cond, noise, rng, v, thr, coef, flags, per_sample, out, x0_out.value_or(at::Tensor()));
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("sampler_step", &fastdiff::sampler_step_cuda);
  m.impl("sampler_step_out", &fastdiff::sampler_step_out_cuda);
}
