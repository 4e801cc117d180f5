// Test-side helpers of the CUDA-on-CPU harness: device buffers with guards, element conversions, the case runner
// and its counters. A kernel's cases live in cases_<op>.cpp and register themselves with CUEMU_SUITE (see README.md).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuemu_runtime.h"

namespace cuemu {

enum class DT { F32, F16, BF16 };
inline const char* dt_name(DT d) { return d == DT::F32 ? "f32" : (d == DT::F16 ? "f16" : "bf16"); }
inline size_t dt_size(DT d) { return d == DT::F32 ? 4 : 2; }
inline int dt_code(DT d) { return d == DT::F32 ? 0 : (d == DT::F16 ? 1 : 2); }  // fastdiff's kF32/kF16/kBF16
// Unit roundoff of the storage type (half an ulp at 1).
inline double dt_eps(DT d) { return d == DT::F32 ? 0x1p-24 : (d == DT::F16 ? 0x1p-11 : 0x1p-8); }

// Round a float through the storage type (the toolkit's host conversions, round to nearest even).
inline float round_to(DT d, float v) {
  if (d == DT::F16) return __half2float(__float2half_rn(v));
  if (d == DT::BF16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

// Device memory: 256-byte aligned (as cudaMalloc), optionally offset by `misalign` bytes, filled with 0xff (NaN in
// every float format, so an element no thread wrote shows), with canary bytes around it (a stray write shows) and
// registered with the emulator so that __ldg checks its bounds. Under AddressSanitizer the allocation ends exactly at
// the last byte, so an over-read is reported too.
class DevBuf {
 public:
  DevBuf(size_t bytes, size_t misalign = 0) : bytes_(bytes) {
#if defined(__SANITIZE_ADDRESS__)
    head_ = 256 + misalign;
    tail_ = 0;
#else
    head_ = 256 + misalign;
    tail_ = 256;
#endif
    void* p = nullptr;
    if (posix_memalign(&p, 256, head_ + bytes + tail_ + (bytes + tail_ == 0 ? 1 : 0)) != 0) std::abort();
    base_ = static_cast<unsigned char*>(p);
    std::memset(base_, 0xa5, head_);
    std::memset(base_ + head_, 0xff, bytes);
    std::memset(base_ + head_ + bytes, 0xa5, tail_);
    register_device_memory(data(), bytes);
  }
  ~DevBuf() {
    unregister_device_memory(data());
    std::free(base_);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void* data() const { return base_ + head_; }
  size_t bytes() const { return bytes_; }
  bool guards_ok() const {
    for (size_t i = 0; i < head_; ++i)
      if (base_[i] != 0xa5) return false;
    for (size_t i = 0; i < tail_; ++i)
      if (base_[head_ + bytes_ + i] != 0xa5) return false;
    return true;
  }

 private:
  unsigned char* base_;
  size_t bytes_, head_, tail_;
};

// A device tensor of `n` elements of dtype d (floats on the host side).
struct DevTensor {
  DT dt;
  size_t n;
  DevBuf buf;
  DevTensor(DT d, size_t n_, size_t misalign_elems = 0) : dt(d), n(n_), buf(n_ * dt_size(d), misalign_elems * dt_size(d)) {}
  void* data() const { return buf.data(); }
  void upload(const std::vector<float>& v) {
    for (size_t i = 0; i < n; ++i) set(i, v[i]);
  }
  void set(size_t i, float v) {
    if (dt == DT::F32) static_cast<float*>(data())[i] = v;
    if (dt == DT::F16) static_cast<__half*>(data())[i] = __float2half_rn(v);
    if (dt == DT::BF16) static_cast<__nv_bfloat16*>(data())[i] = __float2bfloat16_rn(v);
  }
  float get(size_t i) const {
    if (dt == DT::F16) return __half2float(static_cast<const __half*>(data())[i]);
    if (dt == DT::BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(data())[i]);
    return static_cast<const float*>(data())[i];
  }
  // Random values, stored (rounded to the dtype); returns them as the kernel will read them.
  template <class Dist>
  std::vector<float> fill_with(std::mt19937_64& r, Dist d) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) {
      set(i, d(r));
      v[i] = get(i);
    }
    return v;
  }
  std::vector<float> fill(std::mt19937_64& r, float lo, float hi) {
    return fill_with(r, std::uniform_real_distribution<float>(lo, hi));
  }
  std::vector<float> fill_normal(std::mt19937_64& r, float mean, float sd) {
    return fill_with(r, std::normal_distribution<float>(mean, sd));
  }
};

// One case: its name, counters, and the first few mismatches.
class Case {
 public:
  explicit Case(std::string name);
  ~Case();  // records the result
  // An element: exact equality (got == want, NaN never equal), or |got − want| <= tol.
  void exact(float got, float want, size_t i, const char* what);
  void close(double got, double want, double tol, size_t i, const char* what);
  void expect(bool ok, const std::string& msg);  // a property of the run (path taken, error code, ...)
  // The emulator's faults and launch records since the case began; guards of the given buffers.
  void check_faults();
  std::vector<LaunchRecord> launches();
  void check_guards(const DevBuf& b, const char* what);
  bool ok() const { return fails_ == 0; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  uint64_t values_ = 0, fails_ = 0;
  std::vector<LaunchRecord> launches_;
  bool took_launches_ = false;
};

struct Options {
  bool quick = false;  // a smaller set (the AddressSanitizer run)
  bool tiny = false;   // a few cases per kernel path (the ThreadSanitizer run; implies quick)
  std::string only;    // run only suites whose name contains this
};
const Options& options();
std::mt19937_64& case_rng();  // reseeded per case from the case name and the run's seed

struct Suite {
  const char* name;
  void (*fn)();
};
int register_suite(const char* name, void (*fn)());

}  // namespace cuemu

#define CUEMU_SUITE(name)                                                    \
  static void cuemu_suite_##name();                                          \
  static int cuemu_suite_reg_##name = ::cuemu::register_suite(#name, cuemu_suite_##name); \
  static void cuemu_suite_##name()
