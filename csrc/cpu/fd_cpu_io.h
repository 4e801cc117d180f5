// Element I/O shared by the CPU kernels (csrc/cpu/multistep.cpp through fd_tiles.h,
// csrc/cpu/group_norm_silu_kernels.inc): fp16/bf16 <-> float32 conversions, and which ISA build of a kernel runs.
//
// Conversions: bfloat16 -> float32 widens by a 16-bit shift; float32 -> bfloat16 rounds to nearest even with NaN ->
// 0x7FC0, bit for bit what c10::BFloat16 does, so a kernel's bf16 result is its float32 result rounded once; fp16
// uses F16C (round to nearest even) inside AVX2 builds and c10::Half's conversion otherwise.
//
// ISA: FASTDIFF_CPU_ISA = auto (default: the widest build this CPU supports) | avx512 | avx2 | base, read on every
// call so that tests can run each build on one machine. Naming a build the CPU (or this compiler) lacks is an error,
// not a silent fallback. Kernels with only a baseline and an AVX2 copy run the AVX2 copy for avx512 (use_avx2()).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FD_X86_AVX2 1  // AVX2+FMA+F16C (and AVX-512) copies picked at run time; the build targets baseline x86-64
#endif

// Forced inline for the per-element helpers: the kernels that call them are compiled with other target / optimization
// attributes, and g++ keeps a plain inline function out of line across such a mismatch (a call per element).
#define FD_IO_INLINE __attribute__((always_inline)) inline

namespace fastdiff {
namespace cpuio {

// ---- which build runs -------------------------------------------------------------------------------------------

enum class Isa { kBase, kAvx2, kAvx512 };

inline bool cpu_has_avx2() {
#ifdef FD_X86_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#ifdef FD_X86_AVX2
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

inline Isa pick_isa() {
  const char* req = std::getenv("FASTDIFF_CPU_ISA");
  if (req == nullptr || *req == '\0' || std::strcmp(req, "auto") == 0)
    return cpu_has_avx512() ? Isa::kAvx512 : cpu_has_avx2() ? Isa::kAvx2 : Isa::kBase;
  if (std::strcmp(req, "base") == 0) return Isa::kBase;
  if (std::strcmp(req, "avx2") == 0) {
    TORCH_CHECK(cpu_has_avx2(), "FASTDIFF_CPU_ISA=avx2, but this CPU (or build) lacks AVX2+FMA+F16C");
    return Isa::kAvx2;
  }
  if (std::strcmp(req, "avx512") == 0) {
    TORCH_CHECK(cpu_has_avx512(), "FASTDIFF_CPU_ISA=avx512, but this CPU (or build) lacks AVX-512 F/VL/BW/DQ/BF16");
    return Isa::kAvx512;
  }
  TORCH_CHECK(false, "FASTDIFF_CPU_ISA must be auto, avx512, avx2 or base, got '", req, "'");
}

// For kernels with a baseline and an AVX2 copy only.
inline bool use_avx2() { return pick_isa() != Isa::kBase; }

// ---- scalar conversions (vectorizable loops) --------------------------------------------------------------------

FD_IO_INLINE float bf16_bits_to_float(uint16_t u) {
  const uint32_t b = static_cast<uint32_t>(u) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

FD_IO_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}

// ---- AVX2 conversions: 8 lanes (for loops that convert in registers), and tiles (8 lanes, scalar tail) ------------
#ifdef FD_X86_AVX2
#define FD_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

FD_AVX2_INLINE __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
FD_AVX2_INLINE void store8(float* p, __m256 f) { _mm256_storeu_ps(p, f); }
FD_AVX2_INLINE __m256 load8_f32(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FD_AVX2_INLINE __m256 load8_f32(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
FD_AVX2_INLINE void store8(c10::Half* p, __m256 f) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
FD_AVX2_INLINE void store8(c10::BFloat16* p, __m256 f) {  // round to nearest even, NaN -> 0x7FC0
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), qnan = _mm256_set1_epi32(0x7FC0);
  const __m256i u = _mm256_castps_si256(f);
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), one), bias)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, qnan, nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(r),
                                                                     _mm256_extracti128_si256(r, 1)));
}

__attribute__((target("avx2,fma,f16c"))) inline void f16_to_f32_avx2(const c10::Half* __restrict__ src,
                                                                            float* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, load8_f32(src + j));
  for (; j < n; ++j) dst[j] = _cvtsh_ss(src[j].x);
}

__attribute__((target("avx2,fma,f16c"))) inline void f32_to_f16_avx2(const float* __restrict__ src,
                                                                            c10::Half* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(dst + j, _mm256_loadu_ps(src + j));
  for (; j < n; ++j) dst[j].x = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

__attribute__((target("avx2,fma,f16c"))) inline void bf16_to_f32_avx2(const c10::BFloat16* __restrict__ src,
                                                                             float* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, load8_f32(src + j));
  for (; j < n; ++j) dst[j] = bf16_bits_to_float(src[j].x);
}

__attribute__((target("avx2,fma,f16c"))) inline void f32_to_bf16_avx2(const float* __restrict__ src,
                                                                             c10::BFloat16* __restrict__ dst,
                                                                             int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(dst + j, _mm256_loadu_ps(src + j));
  for (; j < n; ++j) dst[j].x = float_to_bf16_bits(src[j]);
}
#endif

}  // namespace cpuio
}  // namespace fastdiff
