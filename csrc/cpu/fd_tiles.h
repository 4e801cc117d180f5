// Tile I/O of the CPU elementwise kernels (csrc/cpu/multistep.cpp): a tile of
// fp32/fp16/bf16 elements to float32 and back, with F16C / AVX2 conversions inside the AVX2 copy of a kernel, and the
// run-time choice of that copy. The bf16 rounding matches c10::BFloat16 bit for bit, so a kernel's fp16/bf16 result is
// its float32 result rounded once.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <utility>
#include <type_traits>

#include "fd_checks.h"   // check_like, overlaps, check_no_overlap
#include "fd_cpu_io.h"  // fp16/bf16 conversions, FD_X86_AVX2, the ISA choice

namespace fastdiff {
namespace tiles {

template <typename T>
inline void load_tile(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
inline void store_tile(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// Tile loads/stores: F16C conversions for Half inside the AVX2 copy, plain (vectorizable) loops otherwise.
template <bool AVX2, typename T>
inline void load_any(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
#ifdef FD_X86_AVX2
  if constexpr (AVX2 && std::is_same_v<T, c10::Half>) {
    cpuio::f16_to_f32_avx2(src, dst, n);
    return;
  }
  if constexpr (AVX2 && std::is_same_v<T, c10::BFloat16>) {
    cpuio::bf16_to_f32_avx2(src, dst, n);
    return;
  }
#endif
  load_tile(src, dst, n);
}

template <bool AVX2, typename T>
inline void store_any(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
#ifdef FD_X86_AVX2
  if constexpr (AVX2 && std::is_same_v<T, c10::Half>) {
    cpuio::f32_to_f16_avx2(src, dst, n);
    return;
  }
  if constexpr (AVX2 && std::is_same_v<T, c10::BFloat16>) {
    cpuio::f32_to_bf16_avx2(src, dst, n);
    return;
  }
#endif
  store_tile(src, dst, n);
}

// A tile of T as float32: float tensors are read in place (no copy), others converted into `buf`.
template <bool AVX2, typename T>
inline const float* as_f32(const T* __restrict__ p, float* __restrict__ buf, int64_t m) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    load_any<AVX2>(p, buf, m);
    return buf;
  }
}

// Where a tile's float32 result is formed: in the output itself for float tensors, else in `buf` (then `flush` it).
template <typename T>
inline float* out_f32(T* __restrict__ p, float* __restrict__ buf) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    return buf;
  }
}

template <bool AVX2, typename T>
inline void flush(const float* __restrict__ buf, T* __restrict__ p, int64_t m) {
  if constexpr (!std::is_same_v<T, float>) store_any<AVX2>(buf, p, m);
}

// Whether to run the AVX2 copy: FASTDIFF_CPU_ISA (fd_cpu_io.h) is not "base" and the CPU has AVX2, FMA and F16C.
using cpuio::use_avx2;

// The argument checks every op shares (csrc/include/fd_checks.h), under their old names here.
using checks::check_like;
using checks::check_no_overlap;
using checks::overlaps;

}  // namespace tiles
}  // namespace fastdiff
