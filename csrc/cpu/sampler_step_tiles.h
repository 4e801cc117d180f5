// Tile I/O of the CPU elementwise kernels (csrc/cpu/sampler_step.cpp, csrc/cpu/multistep.cpp): a tile of
// fp32/fp16/bf16 elements to float32 and back, with F16C / AVX2 conversions inside the AVX2 copy of a kernel, and the
// run-time choice of that copy. The bf16 rounding matches c10::BFloat16 bit for bit, so a kernel's fp16/bf16 result is
// its float32 result rounded once.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <utility>
#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define FD_X86_AVX2 1  // an AVX2+FMA+F16C copy of the tile loop, picked at run time (the build targets baseline x86-64)
#endif

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

#ifdef FD_X86_AVX2
__attribute__((target("avx2,fma,f16c"))) inline void load_tile_f16c(const c10::Half* __restrict__ src,
                                                                     float* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < n; ++j) dst[j] = _cvtsh_ss(src[j].x);
}

__attribute__((target("avx2,fma,f16c"))) inline void store_tile_f16c(const float* __restrict__ src,
                                                                      c10::Half* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
  for (; j < n; ++j) dst[j].x = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT);
}

// bfloat16 <-> float32 as c10::BFloat16 does it: widen by a 16-bit shift; narrow rounding to nearest even, NaN → 0x7FC0.
__attribute__((target("avx2,fma,f16c"))) inline void load_tile_bf16(const c10::BFloat16* __restrict__ src,
                                                                     float* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
    _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

__attribute__((target("avx2,fma,f16c"))) inline void store_tile_bf16(const float* __restrict__ src,
                                                                      c10::BFloat16* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), qnan = _mm256_set1_epi32(0x7FC0);
  for (; j + 8 <= n; j += 8) {
    __m256 f = _mm256_loadu_ps(src + j);
    __m256i u = _mm256_castps_si256(f);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), one),
                                                                        bias)), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, qnan, nan);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), packed);
  }
  for (; j < n; ++j) dst[j] = static_cast<c10::BFloat16>(src[j]);
}
#endif

// Tile loads/stores: F16C conversions for Half inside the AVX2 copy, plain (vectorizable) loops otherwise.
template <bool AVX2, typename T>
inline void load_any(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
#ifdef FD_X86_AVX2
  if constexpr (AVX2 && std::is_same_v<T, c10::Half>) {
    load_tile_f16c(src, dst, n);
    return;
  }
  if constexpr (AVX2 && std::is_same_v<T, c10::BFloat16>) {
    load_tile_bf16(src, dst, n);
    return;
  }
#endif
  load_tile(src, dst, n);
}

template <bool AVX2, typename T>
inline void store_any(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
#ifdef FD_X86_AVX2
  if constexpr (AVX2 && std::is_same_v<T, c10::Half>) {
    store_tile_f16c(src, dst, n);
    return;
  }
  if constexpr (AVX2 && std::is_same_v<T, c10::BFloat16>) {
    store_tile_bf16(src, dst, n);
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

// Whether to run the AVX2 copy: the CPU has AVX2, FMA and F16C, and FASTDIFF_CPU_NO_AVX2 is not 1 (tests set it to
// run the baseline copy).
inline bool use_avx2() {
#ifdef FD_X86_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  const char* off = std::getenv("FASTDIFF_CPU_NO_AVX2");
  return avx2 && !(off && off[0] == '1');
#else
  return false;
#endif
}

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

}  // namespace tiles
}  // namespace fastdiff
