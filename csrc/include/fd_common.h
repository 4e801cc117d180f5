// Shared by every csrc/include/<op>_math.h: FD_HD marks per-element math that g++ (CPU kernels) and nvcc (CUDA
// kernels) both compile, so the CPU tests check the math the GPU runs.
#pragma once

#ifdef __CUDACC__
#define FD_HD __host__ __device__ __forceinline__
#else
// Forced inline on the host too: the CPU kernels that call this math are compiled with other target / optimization
// attributes (csrc/cpu/group_norm_silu.cpp), and g++ keeps a plain inline function out of line across such a
// mismatch (a call per tile or per element).
#define FD_HD inline __attribute__((always_inline))
#endif
