// cuemu: run CUDA kernels on the CPU, for tests (csrc/tests/cuemu/README.md). This header is force-included
// (g++ -include cuemu.h) into every translation unit of the harness: the real csrc/cuda/*.cu (compiled as C++ with
// -DCUEMU_KERNEL_TU) and the case files. It uses the CUDA toolkit's own headers in their host-compiler mode (dim3,
// uint4, __half, __nv_bfloat16 and their conversions), then supplies what only nvcc would:
//   - threadIdx/blockIdx/blockDim/gridDim: the current emulated thread's values (per fiber, or per OS thread);
//   - __syncthreads, __syncwarp, __shfl*_sync, __ballot_sync/__any_sync/__all_sync on a per-block state machine that
//     reports divergence, deadlock and reads of inactive/exited lanes as a fault instead of hanging;
//   - FD_LAUNCH / FD_DYNAMIC_SMEM (csrc/include/fd_cuda_io.cuh) as a synchronous launch with CUDA's launch checks;
//   - __ldg with alignment and bounds checks; exact host versions of device intrinsics (rsqrtf, __expf, ...);
//   - in kernel TUs __CUDA_ARCH__ (so `#ifdef __CUDA_ARCH__` code takes the branch the GPU runs).
// The runtime (scheduler, launch, stubs of the few CUDA runtime calls the launchers make) is cuemu.cpp.
#pragma once
#ifdef __CUDACC__
#error "cuemu.h is for a host compiler (g++), not nvcc"
#endif
#define FD_CUEMU 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace cuemu {

// What a kernel sees of its thread; the emulator points tls_ctx at the running thread's record.
struct Ctx {
  uint3 tid, bid;    // threadIdx, blockIdx
  dim3 bdim, gdim;   // blockDim, gridDim
  void* smem;  // this block's dynamic shared memory
};
extern thread_local Ctx* tls_ctx;

struct LaunchSpec {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const char* kernel;  // the kernel expression as written at the launch site
  const char* file;
  int line;
};

// Checks the configuration (sets the error cudaGetLastError returns); true if the kernel may run.
bool launch_check(const LaunchSpec& s);
// Runs the grid: blocks one after another in a random order, each block's threads as fibers (or OS threads).
void run_grid(const LaunchSpec& s, void (*thunk)(void*), void* arg);

template <class... P>
struct Launcher {
  LaunchSpec spec;
  void (*fn)(P...);
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    struct Call {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> args;  // copied once at launch, as CUDA copies kernel parameters
    } call{fn, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
    if (!launch_check(spec)) return;
    run_grid(spec, [](void* p) {
      Call* c = static_cast<Call*>(p);
      std::apply(c->fn, c->args);  // each thread gets its own copy of the by-value parameters
    }, &call);
  }
};
template <class... P>
Launcher<P...> make_launcher(const LaunchSpec& s, void (*fn)(P...)) {
  return Launcher<P...>{s, fn};
}

// Synchronisation and warp exchange (cuemu.cpp). Values travel as up to 8 bytes.
void syncthreads(const char* file, int line);
enum WarpKind : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp };
uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);

template <class T>
T shfl(int kind, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_op(kind, mask, bits, arg, width, file, line);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// __ldg and other checked accesses: fault unless p is aligned to `align` and [p, p + bytes) is device memory.
void check_access(const void* p, size_t bytes, size_t align, const char* what);
unsigned active_mask();
void count_ldg();

template <class T>
T* dynamic_smem() {
  return static_cast<T*>(tls_ctx->smem);
}

}  // namespace cuemu

#define threadIdx (::cuemu::tls_ctx->tid)
#define blockIdx (::cuemu::tls_ctx->bid)
#define blockDim (::cuemu::tls_ctx->bdim)
#define gridDim (::cuemu::tls_ctx->gdim)
static constexpr int warpSize = 32;

#define FD_CUEMU_LAUNCH(grid, block, smem, stream, ...)                                                           \
  ::cuemu::make_launcher(::cuemu::LaunchSpec{dim3(grid), dim3(block), (size_t)(smem), (stream), #__VA_ARGS__,     \
                                             __FILE__, __LINE__},                                                 \
                         __VA_ARGS__)
#define FD_CUEMU_DYNAMIC_SMEM(T, name) T* name = ::cuemu::dynamic_smem<T>()

// Static __shared__ variables: one function-local static per kernel instantiation, shared by the block's threads
// (blocks run one after another). They keep their contents from block to block, as nothing clears shared memory on
// a GPU either.
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

#define __syncthreads() ::cuemu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ((void)::cuemu::warp_op(::cuemu::kSyncWarp, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 0xffffffffu, 0, 0, 32, __FILE__, __LINE__))
#define __shfl_sync(mask, v, lane, ...) ::cuemu::shfl(::cuemu::kShflIdx, (mask), (v), (lane), (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) ::cuemu::shfl(::cuemu::kShflUp, (mask), (v), (d), (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) ::cuemu::shfl(::cuemu::kShflDown, (mask), (v), (d), (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) ::cuemu::shfl(::cuemu::kShflXor, (mask), (v), (m), (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __ballot_sync(mask, p) ((unsigned)::cuemu::warp_op(::cuemu::kBallot, (mask), (p) ? 1u : 0u, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, p) ((int)::cuemu::warp_op(::cuemu::kAny, (mask), (p) ? 1u : 0u, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, p) ((int)::cuemu::warp_op(::cuemu::kAll, (mask), (p) ? 1u : 0u, 0, 32, __FILE__, __LINE__))
#define __activemask() ::cuemu::active_mask()

// __ldg: a read-only load that must be aligned to its size (16-byte vectors included) and inside device memory.
template <class T>
inline T __ldg(const T* p) {
  constexpr size_t a = sizeof(T) >= 16 ? 16 : (sizeof(T) & (sizeof(T) - 1)) == 0 ? sizeof(T) : alignof(T);
  ::cuemu::check_access(p, sizeof(T), a, "__ldg");
  ::cuemu::count_ldg();
  return *p;
}

// Device intrinsics: exact (correctly rounded or nearly so) host versions; the GPU's fast forms are within a few ulp.
inline float rsqrtf(float x) { return (float)(1.0 / std::sqrt((double)x)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }

#ifdef CUEMU_KERNEL_TU
// The kernel translation units take the device branches of `#ifdef __CUDA_ARCH__` code (after the toolkit headers
// above were read in host mode). The cases' own references are compiled without it.
#define __CUDA_ARCH__ 900
#endif
