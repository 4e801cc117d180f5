// fastdiff::group_norm_silu on the CPU: y = act(GroupNorm(x + add)), statistics in float32.
//
// NCHW: one (sample, group) per task; the group is walked per channel in tiles of kTile elements. Each tile is reduced
// to (count, mean, M2) with two passes over the tile (in L1) and tiles merge with Chan's formula
// (csrc/include/group_norm_silu_math.h). The apply pass re-reads the group, which is still in L2 for the DDPM sizes
// (4 channels × 32×32 fp32 = 16 KiB), so x comes from DRAM about once: 1 read + 1 write against eager
// GroupNorm + SiLU's 2 reads + 1 write then 1 read + 1 write.
// NHWC (channels_last): when the batch covers the threads, one sample per task (statistics, then output while the
// sample is in L2); otherwise (batch 1) pixel segments with partial statistics merged per group, then the output pass
// over the same segments. Tiles of ~4096 elements are reduced per channel with the accumulators in registers.
// SiLU: polynomial exp (relative error 2.5e-7) and a Newton-refined reciprocal instead of a division, 4 vectors
// interleaved (16-lane vectors, exact at the extremes, in the AVX-512 build); fp16/bf16 converted in registers. The
// hot loops are compiled for AVX-512 (F/VL/BW/DQ/BF16), for AVX2+FMA+F16C and for the baseline ISA
// (group_norm_silu_kernels.inc compiled three times); the widest the CPU supports runs, or the one FASTDIFF_CPU_ISA
// names (pick_isa below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fd_cpu_io.h"
#include "group_norm_silu_checks.h"
#include "group_norm_silu_math.h"

// Lets gcc if-convert the clamps of fast_exp (float selects) so the SiLU loops vectorize; no other math changes.
#pragma GCC optimize("no-trapping-math")

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastdiff {
namespace {

using gns::Stat;
constexpr int64_t kTile = 2048;
// NCHW without add: statistics tiles over the group's contiguous run (16 KiB fp32).
constexpr int64_t kFlatTile = 4096;
constexpr int64_t kNhwcTile = 16384;  // channels_last statistics tile, elements (64 KiB fp32: the M2 pass reads L2)

struct Params {
  int64_t N, C, HW, G;
  const float *w, *b, *add;  // (C,), (C,), (N, C) float32 or nullptr
  float eps;
  bool silu;
  float wc(int64_t c) const { return w ? w[c] : 1.f; }
  float bc(int64_t c) const { return b ? b[c] : 0.f; }
  float addc(int64_t n, int64_t c) const { return add ? add[n * C + c] : 0.f; }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GNS_HAVE_AVX2_PASS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define GNS_AVX2 1
namespace avx2 {
#include "group_norm_silu_kernels.inc"
}  // namespace avx2
#undef GNS_AVX2
#pragma GCC pop_options
// The same kernels once more for AVX-512 (F, VL, BW, DQ, BF16): the SiLU blocks run on 16-lane vectors with
// vscalefps / vrcp14ps (silu16x), and bfloat16 stores are one vcvtneps2bf16 instead of ~9 integer ops. The SiLU pass
// is bound by vector-op throughput, and on this project's AMD EPYC (Zen 4) the 16-lane form takes 0.28 ns per
// element against 0.41 for the 8-lane AVX2 form (L1-resident micro-benchmark, one core).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")
#define GNS_AVX2 1
#define GNS_AVX512 1
namespace avx512 {
#include "group_norm_silu_kernels.inc"
}  // namespace avx512
#undef GNS_AVX512
#undef GNS_AVX2
#pragma GCC pop_options
#endif
namespace base {
#include "group_norm_silu_kernels.inc"
}  // namespace base

// Which build of the kernels runs: the widest this CPU supports, or the one FASTDIFF_CPU_ISA names (csrc/cpu/fd_cpu_io.h).
using cpuio::Isa;
using cpuio::pick_isa;

at::Tensor opt_float(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

}  // namespace

namespace {

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                               int64_t num_groups, double eps, bool silu) {
  const bool nchw = group_norm_silu_check(x, weight, bias, add, num_groups, eps);
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor w = opt_float(weight), b = opt_float(bias), a = opt_float(add);
  const Isa isa = pick_isa();
  at::Tensor y = at::empty_like(x);  // preserves the memory format
  if (x.numel() == 0) return y;
  Params p{N, C, x.numel() / (N * C), num_groups, w.defined() ? w.data_ptr<float>() : nullptr,
           b.defined() ? b.data_ptr<float>() : nullptr, a.defined() ? a.data_ptr<float>() : nullptr,
           static_cast<float>(eps), silu};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    const scalar_t* X = x.const_data_ptr<scalar_t>();
    scalar_t* Y = y.mutable_data_ptr<scalar_t>();
#ifdef GNS_HAVE_AVX2_PASS
    if (isa == Isa::kAvx512) {
      nchw ? avx512::run_nchw<scalar_t>(X, Y, p) : avx512::run_nhwc<scalar_t>(X, Y, p);
      return;
    }
    if (isa == Isa::kAvx2) {
      nchw ? avx2::run_nchw<scalar_t>(X, Y, p) : avx2::run_nhwc<scalar_t>(X, Y, p);
      return;
    }
#endif
    nchw ? base::run_nchw<scalar_t>(X, Y, p) : base::run_nhwc<scalar_t>(X, Y, p);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("group_norm_silu", &group_norm_silu_cpu); }

}  // namespace fastdiff
