// Shared by every csrc/include/<op>_math.h: FD_HD marks per-element math that g++ (CPU kernels) and nvcc (CUDA
// kernels) both compile, so the CPU tests check the math the GPU runs.
#pragma once

#ifdef __CUDACC__
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif
