// Torch glue of the CUDA fastdiff::multistep_step_: argument checks (shared with the CPU kernel), device guard,
// current stream, then the plain launcher in multistep.cu. Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "multistep_math.h"

namespace fastdiff {

int64_t multistep_check(const at::Tensor& x, const at::Tensor& o, const c10::optional<at::Tensor>& o_cond,
                        at::TensorList hist, const c10::optional<at::Tensor>& noise,
                        const c10::optional<at::Tensor>& rng, const c10::optional<at::Tensor>& v,
                        const c10::optional<at::Tensor>& thr, const at::Tensor& coef, int64_t flags,
                        const at::Tensor& out, const c10::optional<at::Tensor>& out2,
                        const c10::optional<at::Tensor>& d_out);  // csrc/cpu/multistep.cpp

namespace mstep {
cudaError_t launch_multistep(const LaunchArgs& a, cudaStream_t stream);  // csrc/cuda/multistep.cu
}

namespace {

void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void multistep_cuda(const at::Tensor& x, const at::Tensor& o, const c10::optional<at::Tensor>& o_cond,
                    at::TensorList hist, const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& rng,
                    const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& thr, const at::Tensor& coef,
                    int64_t flags, const at::Tensor& out, const c10::optional<at::Tensor>& out2,
                    const c10::optional<at::Tensor>& d_out) {
  TORCH_CHECK(x.is_cuda(), "multistep_step (CUDA): x must be a CUDA tensor");
  const int64_t per_sample =
      multistep_check(x, o, o_cond, hist, noise, rng, v, thr, coef, flags, out, out2, d_out);
  const c10::cuda::CUDAGuard guard(x.device());
  mstep::LaunchArgs a{};
  a.x = x.data_ptr();
  a.o = o.data_ptr();
  a.oc = ptr_or_null(o_cond);
  a.nh = (int)hist.size();
  for (int h = 0; h < a.nh; ++h) a.h[h] = hist[h].data_ptr();
  a.z = ptr_or_null(noise);
  a.v = ptr_or_null(v);
  a.rng = rng.has_value() ? rng->data_ptr<int64_t>() : nullptr;
  a.thr = thr.has_value() ? thr->data_ptr<float>() : nullptr;
  a.coef = coef.data_ptr<double>();
  a.out = out.data_ptr();
  a.out2 = ptr_or_null(out2);
  a.dout = ptr_or_null(d_out);
  a.dout_f32 = d_out.has_value() && d_out->scalar_type() == at::kFloat;
  a.n = x.numel();
  a.per_sample = per_sample;
  a.flags = (int)flags;
  a.dtype = x.scalar_type() == at::kFloat ? mstep::kF32 : (x.scalar_type() == at::kHalf ? mstep::kF16 : mstep::kBF16);
  const cudaError_t err = mstep::launch_multistep(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "multistep_step (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("multistep_step_", &fastdiff::multistep_cuda); }
