// The emulator's own checks, each with a small kernel that must pass or must be caught: shuffle/ballot semantics
// (widths, up/down/xor/idx), 3-D thread numbering, a shared-memory reduction, randomized schedules, launch-limit
// refusals through cudaGetLastError, and the faults: divergent or exited-thread barriers, deadlock, shuffles that
// read an exited or inactive lane, misaligned and out-of-bounds __ldg, dynamic shared memory overrun.
#include <atomic>

#include "fd_cuda_io.cuh"
#include "harness.h"

namespace {

using namespace cuemu;

__global__ void k_shuffles(int* out, int width) {
  const int t = threadIdx.x, lane = t & 31;
  int* o = out + 8 * t;
  o[0] = __shfl_sync(0xffffffffu, t * 10, 3, width);
  o[1] = __shfl_up_sync(0xffffffffu, t * 10, 2, width);
  o[2] = __shfl_down_sync(0xffffffffu, t * 10, 5, width);
  o[3] = __shfl_xor_sync(0xffffffffu, t * 10, 6, width);
  o[4] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
  o[5] = __any_sync(0xffffffffu, lane == 17);
  o[6] = __all_sync(0xffffffffu, lane < 31);
  o[7] = (int)__shfl_down_sync(0xffffffffu, (float)t + 0.5f, 1, width) * 2;
}

__global__ void k_numbering(int* out) {
  const int lin = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  const int blk = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  out[blk * nt + lin] = blk * 100000 + lin;
}

__global__ void k_block_sum(const float* x, float* out, int n) {
  __shared__ float part[256];
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h >>= 1) {
    if ((int)threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = part[0];
}

std::atomic<int> g_order{0};
__global__ void k_order(int* out) { out[threadIdx.x] = g_order++; }

__global__ void k_divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void k_exited_barrier(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void k_deadlock(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);  // lanes 16..31 never come: they wait below
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void k_read_exited_lane(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, (int)threadIdx.x, 8);  // lanes 8..15 read 16..23
}

__global__ void k_mask_exited(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

__global__ void k_ldg(const float* p, int off, float* out) {
  out[threadIdx.x] = __ldg(reinterpret_cast<const float4*>(p + off)).x;
}

__global__ void k_smem_overrun(int n) {
  FD_DYNAMIC_SMEM(float, sm);
  sm[threadIdx.x] = 1.f;
  if (threadIdx.x == 0) sm[n] = 2.f;  // one past the end
}

__global__ void k_nop(int*) {}

template <class F>
void expect_fault(const char* name, const char* needle, F launch) {
  Case c(std::string("cuemu_selftest/fault/") + name);
  launch();
  const cudaError_t e = cudaGetLastError();
  auto f = take_faults();
  c.expect(f.size() == 1, "expected exactly one fault, got " + std::to_string(f.size()));
  c.expect(!f.empty() && f[0].find(needle) != std::string::npos,
           std::string("fault should mention '") + needle + "': " + (f.empty() ? "(none)" : f[0]));
  c.expect(e == cudaErrorLaunchFailure, std::string("cudaGetLastError after a fault: ") + cudaGetErrorName(e));
  c.expect(cudaGetLastError() == cudaSuccess, "cudaGetLastError must reset");
}

}  // namespace

CUEMU_SUITE(cuemu_selftest) {
  for (int width : {32, 16, 8}) {
    Case c("cuemu_selftest/shuffles/width=" + std::to_string(width));
    DevBuf out(64 * 8 * sizeof(int));
    FD_LAUNCH(1, 64, 0, nullptr, k_shuffles)(static_cast<int*>(out.data()), width);
    const int* o = static_cast<const int*>(out.data());
    for (int t = 0; t < 64; ++t) {
      const int lane = t & 31, seg = lane & ~(width - 1), base = t - lane;
      const int idx = base + seg + 3;
      const int up = lane - 2 >= seg ? t - 2 : t;
      const int dn = lane + 5 < seg + width ? t + 5 : t;
      const int xr = ((lane ^ 6) < seg + width) ? base + (lane ^ 6) : t;
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if (l % 3 == 0) ballot |= 1u << l;
      c.exact((float)o[8 * t + 0], (float)(idx * 10), t, "shfl");
      c.exact((float)o[8 * t + 1], (float)(up * 10), t, "shfl_up");
      c.exact((float)o[8 * t + 2], (float)(dn * 10), t, "shfl_down");
      c.exact((float)o[8 * t + 3], (float)(xr * 10), t, "shfl_xor");
      c.expect((unsigned)o[8 * t + 4] == ballot, "ballot");
      c.exact((float)o[8 * t + 5], 1.f, t, "any");
      c.exact((float)o[8 * t + 6], 0.f, t, "all");
      c.exact((float)o[8 * t + 7], (float)((lane + 1 < seg + width ? t + 1 : t) * 2), t, "shfl_down(float)");
    }
  }
  {
    Case c("cuemu_selftest/numbering_3d");
    const dim3 grid(3, 2, 2), block(8, 4, 3);
    DevBuf out(12 * 96 * sizeof(int));
    FD_LAUNCH(grid, block, 0, nullptr, k_numbering)(static_cast<int*>(out.data()));
    const int* o = static_cast<const int*>(out.data());
    for (int b = 0; b < 12; ++b)
      for (int t = 0; t < 96; ++t) c.exact((float)o[b * 96 + t], (float)(b * 100000 + t), b * 96 + t, "index");
  }
  for (int rep = 0; rep < 4; ++rep) {
    Case c("cuemu_selftest/block_sum/" + std::to_string(rep));
    const int n = 1000 + 37 * rep;
    DevBuf x(n * sizeof(float)), out(3 * sizeof(float));
    float* xs = static_cast<float*>(x.data());
    double ref = 0;
    for (int i = 0; i < n; ++i) ref += (xs[i] = (float)((i * 7) % 13) - 6.f);
    FD_LAUNCH(3, 256, 0, nullptr, k_block_sum)(xs, static_cast<float*>(out.data()), n);
    for (int b = 0; b < 3; ++b) c.exact(static_cast<float*>(out.data())[b], (float)ref, b, "sum");
  }
  if (!threads_mode()) {
    Case c("cuemu_selftest/random_schedule");
    DevBuf o1(256 * sizeof(int)), o2(256 * sizeof(int));
    g_order = 0;
    FD_LAUNCH(1, 256, 0, nullptr, k_order)(static_cast<int*>(o1.data()));
    FD_LAUNCH(1, 256, 0, nullptr, k_order)(static_cast<int*>(o2.data()));
    int in_order = 0, same = 0;
    for (int t = 0; t < 256; ++t) {
      in_order += static_cast<int*>(o1.data())[t] == t;
      same += static_cast<int*>(o1.data())[t] + 256 == static_cast<int*>(o2.data())[t];
    }
    c.expect(in_order < 64 && same < 64, "thread schedules are not randomized (" + std::to_string(in_order) +
                                             " in order, " + std::to_string(same) + " the same twice)");
  }
  {
    Case c("cuemu_selftest/launch_limits");
    DevBuf out(sizeof(int));
    int* o = static_cast<int*>(out.data());
    struct Bad {
      dim3 g, b;
      size_t smem;
    } bad[] = {{dim3(1), dim3(1025), 0}, {dim3(1), dim3(32, 33), 0}, {dim3(1), dim3(1, 1, 65), 0},
               {dim3(1, 65536), dim3(32), 0}, {dim3(1, 1, 65536), dim3(32), 0}, {dim3(0), dim3(32), 0},
               {dim3(1), dim3(32), kDynamicSmemLimit + 1}};
    for (const Bad& x : bad) {
      FD_LAUNCH(x.g, x.b, x.smem, nullptr, k_nop)(o);
      c.expect(cudaGetLastError() == cudaErrorInvalidConfiguration, "a bad launch was not refused");
      c.expect(cudaGetLastError() == cudaSuccess, "cudaGetLastError must reset");
    }
    FD_LAUNCH(dim3(1), dim3(1024), kDynamicSmemLimit, nullptr, k_nop)(o);  // at the limits
    c.expect(cudaGetLastError() == cudaSuccess, "a launch at the limits was refused");
    const auto ls = c.launches();
    c.expect(ls.size() == 8 && !ls[0].ran && ls[7].ran, "launch records");
  }
  DevBuf out(1024 * sizeof(int));
  int* o = static_cast<int*>(out.data());
  expect_fault("divergent_barrier", "divergent __syncthreads",
               [&] { FD_LAUNCH(1, 64, 0, nullptr, k_divergent_barrier)(o); });
  expect_fault("exited_barrier", "exited", [&] { FD_LAUNCH(1, 64, 0, nullptr, k_exited_barrier)(o); });
  expect_fault("deadlock", "deadlock", [&] { FD_LAUNCH(2, 64, 0, nullptr, k_deadlock)(o); });
  expect_fault("read_exited_lane", "reads lane 16",
               [&] { FD_LAUNCH(1, 32, 0, nullptr, k_read_exited_lane)(o); });
  expect_fault("mask_names_exited_lane", "exited", [&] { FD_LAUNCH(1, 32, 0, nullptr, k_mask_exited)(o); });
  expect_fault("mask_names_missing_lane", "do not exist", [&] { FD_LAUNCH(1, 20, 0, nullptr, k_mask_exited)(o); });
  {
    DevBuf x(64 * sizeof(float));
    DevBuf fo(64 * sizeof(float));
    const float* xp = static_cast<const float*>(x.data());
    float* fp = static_cast<float*>(fo.data());
    expect_fault("ldg_misaligned", "misaligned", [&] { FD_LAUNCH(1, 32, 0, nullptr, k_ldg)(xp, 1, fp); });
    expect_fault("ldg_out_of_bounds", "outside every device allocation",
                 [&] { FD_LAUNCH(1, 32, 0, nullptr, k_ldg)(xp, 64, fp); });
    Case c("cuemu_selftest/ldg_in_bounds");
    FD_LAUNCH(1, 32, 0, nullptr, k_ldg)(xp, 60, fp);
    c.expect(cudaGetLastError() == cudaSuccess, "an aligned in-bounds __ldg faulted");
  }
#if !defined(__SANITIZE_ADDRESS__)  // under ASan the overrun is ASan's report (and the end of the process)
  expect_fault("dynamic_smem_overrun", "dynamic shared memory written past",
               [&] { FD_LAUNCH(1, 64, 64 * sizeof(float), nullptr, k_smem_overrun)(64); });
#endif
}
