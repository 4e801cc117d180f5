// group_norm_silu (csrc/cuda/group_norm_silu.cu) on the emulator against a float64 GroupNorm(+add)(+SiLU): every dtype,
// NCHW and channels_last, the fused one-kernel path and the split three-kernel path (partial statistics, merge,
// apply; the emulated SM count decides as the GPU's would), vector and scalar instantiations (aligned or
// misaligned x, H·W or C not a multiple of the vector width), with and without the add, weight and bias in their
// own dtypes, SiLU or identity, batch 1. Each case also checks that the kernels it expected were launched.
#include <map>

#include "group_norm_silu_math.h"
#include "harness.h"

namespace fastdiff {
namespace gns {
int64_t target_blocks();                                                                  // group_norm_silu.cu
cudaError_t launch_group_norm_silu(const LaunchArgs& a, const Plan& pl, cudaStream_t stream);  // group_norm_silu.cu
}  // namespace gns
}  // namespace fastdiff

namespace {

using namespace cuemu;
using namespace fastdiff::gns;

struct Shape {
  int64_t N, C, H, W, G;
  int sms;
};

struct Params {
  const char* name;
  bool wb, add, silu, own_dtype;  // own_dtype: weight, bias and add in x's dtype (else float32)
};
const Params kParams[] = {
    {"w_b_add_silu_f32params", true, true, true, false},
    {"plain", false, false, false, false},
    {"w_b_add_silu_ownparams", true, true, true, true},
    {"add_only_identity", false, true, false, true},
};

std::map<std::string, int> g_paths;  // coverage: which (layout, fused/split, vector/scalar) ran

void run_case(const Shape& s, DT dt, bool cl, int mis, const Params& pr) {
  const int64_t HW = s.H * s.W, n = s.N * s.C * HW, Cg = s.C / s.G;
  const int vec = (int)(16 / dt_size(dt));
  set_sm_count(s.sms);
  char name[200];
  std::snprintf(name, sizeof name, "group_norm_silu/%s/%s/%lldx%lldx%lldx%lld/G=%lld/sms=%d/%s/%s", dt_name(dt),
                cl ? "channels_last" : "nchw", (long long)s.N, (long long)s.C, (long long)s.H, (long long)s.W,
                (long long)s.G, s.sms, mis ? "x_misaligned" : "aligned", pr.name);
  Case c(name);
  auto& r = case_rng();
  const DT pdt = pr.own_dtype ? dt : DT::F32;
  DevTensor x(dt, n, mis), y(dt, n), w(pdt, pr.wb ? s.C : 0), b(pdt, pr.wb ? s.C : 0),
      add(pdt, pr.add ? s.N * s.C : 0);
  const std::vector<float> hx = x.fill_normal(r, 3.0f, 2.0f);  // an offset mean: E[x²] − E[x]² would lose digits
  const std::vector<float> hw = pr.wb ? w.fill(r, 0.5f, 1.5f) : std::vector<float>();
  const std::vector<float> hb = pr.wb ? b.fill(r, -0.5f, 0.5f) : std::vector<float>();
  const std::vector<float> ha = pr.add ? add.fill_normal(r, 0.f, 1.f) : std::vector<float>();
  const Plan pl = plan(s.N, s.C, HW, s.G, cl, target_blocks());
  DevBuf work((size_t)pl.work_floats * sizeof(float));
  LaunchArgs a{};
  a.x = x.data();
  a.y = y.data();
  a.w = pr.wb ? w.data() : nullptr;
  a.b = pr.wb ? b.data() : nullptr;
  a.add = pr.add ? add.data() : nullptr;
  a.work = pl.work_floats > 0 ? static_cast<float*>(work.data()) : nullptr;
  a.N = s.N;
  a.C = s.C;
  a.HW = HW;
  a.G = s.G;
  a.eps = 1e-5f;
  a.dtype = dt_code(dt);
  a.w_dtype = a.b_dtype = a.add_dtype = dt_code(pdt);
  a.silu = pr.silu;
  a.channels_last = cl;
  const uint64_t ldg0 = ldg_count();
  const cudaError_t err = launch_group_norm_silu(a, pl, nullptr);
  const uint64_t ldg = ldg_count() - ldg0;
  c.expect(err == cudaSuccess, std::string("launch_group_norm_silu returned ") + cudaGetErrorName(err));
  c.check_faults();

  // the path: kernels launched, and vector loads exactly when the launcher's conditions hold
  const bool vec_path = mis == 0 && (cl ? s.C % vec == 0 : HW % vec == 0);
  const std::string L = cl ? "nhwc" : "nchw";
  std::vector<std::string> want;
  if (pl.split == 1) {
    want = {L + "_stats_kernel<T, VEC, true>"};
  } else {
    want = {L + "_stats_kernel<T, VEC, false>", "merge_kernel", L + "_apply_kernel<T, VEC>"};
  }
  std::vector<std::string> got;
  for (const LaunchRecord& l : c.launches()) got.push_back(l.kernel + (l.ran ? "" : " (refused)"));
  std::string gs;
  for (auto& k : got) gs += k + "; ";
  c.expect(got == want, "launches: " + gs + "expected the " + (pl.split == 1 ? "fused" : "split") + " path");
  c.expect(vec_path ? ldg > 0 : ldg == 0, std::string("vector path ") + (vec_path ? "expected" : "not expected") +
                                              ", __ldg calls: " + std::to_string(ldg));
  g_paths[L + (pl.split == 1 ? "/fused" : "/split") + (vec_path ? "/vector" : "/scalar") + "/" + dt_name(dt)]++;

  // float64 reference
  auto xi = [&](int64_t nn, int64_t ch, int64_t p) { return cl ? (nn * HW + p) * s.C + ch : (nn * s.C + ch) * HW + p; };
  for (int64_t nn = 0; nn < s.N; ++nn)
    for (int64_t g = 0; g < s.G; ++g) {
      double sum = 0, m2 = 0;
      for (int64_t ch = g * Cg; ch < (g + 1) * Cg; ++ch)
        for (int64_t p = 0; p < HW; ++p) sum += (double)hx[xi(nn, ch, p)] + (pr.add ? ha[nn * s.C + ch] : 0.0);
      const double cnt = (double)(Cg * HW), mean = sum / cnt;
      for (int64_t ch = g * Cg; ch < (g + 1) * Cg; ++ch)
        for (int64_t p = 0; p < HW; ++p) {
          const double d = (double)hx[xi(nn, ch, p)] + (pr.add ? ha[nn * s.C + ch] : 0.0) - mean;
          m2 += d * d;
        }
      const double rstd = 1.0 / std::sqrt(m2 / cnt + 1e-5);
      for (int64_t ch = g * Cg; ch < (g + 1) * Cg; ++ch) {
        const double wc = pr.wb ? hw[ch] : 1.0, bc = pr.wb ? hb[ch] : 0.0;
        for (int64_t p = 0; p < HW; ++p) {
          const int64_t i = xi(nn, ch, p);
          const double zn = ((double)hx[i] + (pr.add ? ha[nn * s.C + ch] : 0.0) - mean) * rstd;
          const double z = zn * wc + bc;
          const double yr = pr.silu ? z / (1.0 + std::exp(-z)) : z;
          const double abs_err = 2e-5 * (std::fabs(zn * wc) + std::fabs(bc) + 1.0);
          c.close(y.get(i), yr, dt_eps(dt) * 1.01 * (std::fabs(yr) + abs_err) + abs_err, (size_t)i, "y");
        }
      }
    }
  c.check_guards(x.buf, "x");
  c.check_guards(y.buf, "y");
  c.check_guards(work, "workspace");
}

}  // namespace

CUEMU_SUITE(group_norm_silu) {
  const bool quick = options().quick;
  const Shape shapes[] = {
      {2, 32, 4, 4, 8, 2},      // fused everywhere
      {1, 64, 16, 16, 4, 4},    // batch 1: split (8 slices NCHW, 32 channels_last)
      {3, 36, 7, 9, 6, 2},      // H·W = 63, C = 36: scalar NCHW, fp16/bf16 scalar channels_last; split channels_last
      {1, 48, 5, 5, 6, 2},      // batch 1, H·W = 25
      {2, 1280, 3, 3, 32, 2},   // wide channels_last: 320 fp32 channel vectors, two passes per block
      {1, 64, 48, 48, 8, 1},    // a group over kMaxSlice elements: split even at one SM
      {1, 32, 64, 64, 4, 8},    // 64 partials per group: the merge warp loops over them
  };
  for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; ++si) {
    const Shape& s = shapes[si];
    if (quick && si >= 4) continue;
    for (DT dt : {DT::F32, DT::F16, DT::BF16})
      for (bool cl : {false, true})
        for (int mis : {0, 1})
          for (const Params& pr : kParams) {
            if ((si >= 5 || quick) && &pr != &kParams[0] && &pr != &kParams[2]) continue;
            if (quick && &pr != &kParams[mis ? 2 : 0]) continue;  // quick: one parameter set per alignment
            if (options().tiny && (si >= 2 || mis || dt == DT::F16)) continue;
            run_case(s, dt, cl, mis, pr);
          }
  }
  {  // channels_last with too many channels for the statistics kernel's shared memory: refused, nothing launched
    Case c("group_norm_silu/channels_last/C=6000/refused");
    set_sm_count(2);
    LaunchArgs a{};
    DevTensor x(DT::F32, 6000 * 4), y(DT::F32, 6000 * 4);
    a.x = x.data();
    a.y = y.data();
    a.N = 1;
    a.C = 6000;
    a.HW = 4;
    a.G = 30;
    a.eps = 1e-5f;
    a.channels_last = true;
    const Plan pl = plan(1, 6000, 4, 30, true, target_blocks());
    DevBuf work((size_t)pl.work_floats * sizeof(float));
    a.work = pl.work_floats ? static_cast<float*>(work.data()) : nullptr;
    c.expect(launch_group_norm_silu(a, pl, nullptr) == cudaErrorInvalidConfiguration && c.launches().empty(),
             "C = 6000 channels_last must be refused before any launch");
  }
  if (!quick) {  // every path ran for every dtype
    Case c("group_norm_silu/coverage");
    for (const char* L : {"nchw", "nhwc"})
      for (const char* p : {"/fused", "/split"})
        for (const char* v : {"/vector", "/scalar"})
          for (const char* d : {"f32", "f16", "bf16"}) {
            const std::string k = std::string(L) + p + v + "/" + d;
            c.expect(g_paths[k] > 0, "no case took the path " + k);
          }
  }
  set_sm_count(2);
}
