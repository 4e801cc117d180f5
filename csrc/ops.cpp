// fastdiff::_C — op schemas. Kernels register per backend:
//   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(fastdiff, CPU, m)
//   csrc/cuda/<op>.cu   the CUDA kernel, CUDA toolkit headers only (a plain C++ launcher)
//   csrc/cuda/<op>_glue.cpp  TORCH_LIBRARY_IMPL(fastdiff, CUDA, m): checks, stream, calls the launcher
// Per-element math shared by CPU and CUDA lives in csrc/include/<op>_math.h.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// The module is imported only for its side effect: registering the ops below with the dispatcher.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastdiff compiled ops (see torch.ops.fastdiff)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
}

TORCH_LIBRARY(fastdiff, m) {
  // Schemas are added here, one block per op (fastdiff/ops/<op>.py documents each).
  // group_norm_silu (fastdiff/ops/group_norm_silu.py): act(GroupNorm(x + add[:, :, None, None]) * weight + bias),
  // act = SiLU if silu else identity; x NCHW-contiguous or channels_last; statistics in float32.
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? add, int num_groups, float eps, bool silu) "
        "-> Tensor");
  // multistep_step_ (fastdiff/ops/multistep.py): the one fused sampler / solver update (DDIM, DDPM, DPM-Solver++,
  // UniPC, Euler, Heun, PLMS): d = p*x + q*o (clip, threshold), out = yx*x + yo*o + yd*d + sum_k yh_k*h_k + sigma*z
  // (sigma = yz, or per element from v with flags bit 1 learned / bit 2 learned_range), out2 the same without z,
  // d_out = d. coef: float64 (24,); flags: bit 0 clip; hist: 0 to 4 tensors; rng: int64 [seed, offset] for
  // in-kernel Philox noise. Outputs are preallocated (x's strides; out, out2 x's dtype, d_out x's dtype or float32)
  // and may overlap no input or output.
  m.def("multistep_step_(Tensor x, Tensor o, Tensor? o_cond, Tensor[] hist, Tensor? noise, Tensor? rng, Tensor? v, "
        "Tensor? thr, Tensor coef, int flags, Tensor(a!) out, Tensor(b!)? out2, Tensor(c!)? d_out) -> ()");
}
