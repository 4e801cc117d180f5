// sampler_step (csrc/cuda/sampler_step.cu) on the emulator: every dtype, aligned / misaligned pointers, sizes that are
// not multiples of the vector width (and one large enough for the grid-stride loop to go round several times at the
// emulated SM count), every option (CFG, clip, thresholding, noise tensor, Philox, learned variances, x̂0 output).
// Each output element is compared exactly with the same float32 math run element by element
// (csrc/include/sampler_step_math.h, as the CPU kernel), and within a tolerance with a float64 evaluation.
#include "harness.h"
#include "sampler_step_math.h"

namespace fastdiff {
namespace sstep {
cudaError_t launch_sampler_step(const LaunchArgs& a, cudaStream_t stream);  // csrc/cuda/sampler_step.cu
}
}  // namespace fastdiff

namespace {

using namespace cuemu;
using namespace fastdiff::sstep;

struct Opt {
  const char* name;
  bool cfg, clip, thr, z, philox, x0;
  int var;  // 0 scalar σ, kVarLearned, kVarLearnedRange
};

const Opt kOpts[] = {
    {"linear", false, false, false, false, false, false, 0},
    {"cfg", true, false, false, false, false, false, 0},
    {"clip", false, true, false, false, false, false, 0},
    {"thresh", false, false, true, false, false, false, 0},
    {"noise", false, false, false, true, false, false, 0},
    {"philox", false, false, false, false, true, false, 0},
    {"learned", false, false, false, true, false, false, kVarLearned},
    {"learned_range_philox", false, false, false, false, true, false, kVarLearnedRange},
    {"x0", false, false, false, false, false, true, 0},
    {"all", true, true, true, true, false, true, kVarLearnedRange},
    {"all_philox", true, true, true, false, true, true, kVarLearned},
};

void run_case(DT dt, int align, int64_t n, const Opt& op) {
  const int vec = (int)(16 / dt_size(dt));
  char name[160];
  std::snprintf(name, sizeof name, "sampler_step/%s/%s/n=%lld/%s", dt_name(dt),
                align == 0 ? "aligned" : (align == 1 ? "misaligned_inputs" : "misaligned_out"), (long long)n, op.name);
  Case c(name);
  auto& r = case_rng();
  const size_t in_off = align == 1 ? 1 : 0, out_off = align == 2 ? 1 : 0;
  // per-sample thresholds: n = B · per_sample with B = 3 when n allows
  const int64_t B = n % 3 == 0 ? 3 : 1, per_sample = n / B;
  DevTensor x(dt, n, in_off), o(dt, n, in_off), oc(dt, op.cfg ? n : 0, in_off), z(dt, op.z ? n : 0, in_off),
      v(dt, op.var ? n : 0, in_off), xp(dt, n, out_off);
  DevBuf x0((op.x0 ? n : 0) * sizeof(float), out_off * sizeof(float));
  DevBuf thr((op.thr ? B : 0) * sizeof(float)), rngb(2 * sizeof(int64_t)), coef(kNumCoef * sizeof(double));
  const std::vector<float> hx = x.fill_normal(r, 0.f, 1.5f), ho = o.fill_normal(r, 0.f, 1.5f);
  const std::vector<float> hoc = op.cfg ? oc.fill_normal(r, 0.f, 1.5f) : std::vector<float>();
  const std::vector<float> hz = op.z ? z.fill_normal(r, 0.f, 1.f) : std::vector<float>();
  const std::vector<float> hv = op.var == kVarLearned ? v.fill(r, 1e-3f, 5e-2f)
                                : op.var == kVarLearnedRange ? v.fill(r, -1.f, 1.f)
                                                             : std::vector<float>();
  std::uniform_real_distribution<double> U(-1.2, 1.2);
  double* cf = static_cast<double*>(coef.data());
  for (int j = 0; j < kNumCoef; ++j) cf[j] = U(r);
  cf[kSigma] = 0.3;
  cf[kClip] = 1.0;
  cf[kW] = 3.0;
  cf[kLogMax] = std::log(0.02);
  cf[kLogMin] = std::log(1e-4);
  float* th = static_cast<float*>(thr.data());
  for (int64_t b = 0; op.thr && b < B; ++b) th[b] = 1.0f + 0.5f * (float)b + 0.25f;
  int64_t* rg = static_cast<int64_t*>(rngb.data());
  rg[0] = (int64_t)(r() >> 1);
  rg[1] = (int64_t)(r() % 100000);

  LaunchArgs a{};
  a.x = x.data();
  a.o = o.data();
  a.oc = op.cfg ? oc.data() : nullptr;
  a.z = op.z ? z.data() : nullptr;
  a.v = op.var ? v.data() : nullptr;
  a.rng = op.philox ? rg : nullptr;
  a.thr = op.thr ? th : nullptr;
  a.coef = cf;
  a.xp = xp.data();
  a.x0 = op.x0 ? static_cast<float*>(x0.data()) : nullptr;
  a.n = n;
  a.per_sample = per_sample;
  a.flags = (op.clip ? kFlagClip : 0) | (op.var << kVarShift);
  a.dtype = dt_code(dt);
  const uint64_t ldg0 = ldg_count();
  const cudaError_t err = launch_sampler_step(a, nullptr);
  const uint64_t ldg = ldg_count() - ldg0;
  c.expect(err == cudaSuccess, std::string("launch_sampler_step returned ") + cudaGetErrorName(err));
  c.check_faults();
  // the path: full 16-byte chunks use __ldg vector loads exactly when every pointer is aligned
  const bool vec_path = align == 0 && n >= vec;
  c.expect(vec_path ? ldg > 0 : ldg == 0, "vector path " + std::string(vec_path ? "expected" : "not expected") +
                                               ", __ldg calls: " + std::to_string(ldg));
  const auto ls = c.launches();
  c.expect(ls.size() == 1 && ls[0].ran, "expected one launch");

  const Coefs k = load_coefs(cf);
  const uint64_t seed = (uint64_t)rg[0], offset = (uint64_t)rg[1];
  const float* x0o = static_cast<const float*>(x0.data());
  for (int64_t i = 0; i < n; ++i) {
    // float32, element by element: what every correct schedule of the kernel must produce, bit for bit
    float oo = ho[i];
    if (op.cfg) oo = guide(oo, hoc[i], k.w);
    float x0v = predict_x0(k, hx[i], oo);
    if (op.clip) x0v = clampf(x0v, -k.clip, k.clip);
    if (op.thr) {
      const float s = th[i / per_sample];
      x0v = clampf(x0v, -s, s) / s;
    }
    float out = combine(k, hx[i], x0v, predict_eps(k, hx[i], oo, x0v));
    float zz = 0.f;
    if (op.z || op.philox) {
      zz = op.z ? hz[i] : philox_normal(seed, offset + (uint64_t)i);
      out += (op.var ? learned_sigma(k, op.var, hv[i]) : k.sigma) * zz;
    }
    c.exact(xp.get(i), round_to(dt, out), (size_t)i, "x_prev");
    if (op.x0) c.exact(x0o[i], x0v, (size_t)i, "x0");
    // float64 evaluation of the documented step (sampler_step_math.h's header) on the same inputs
    double od = ho[i];
    if (op.cfg) od = ho[i] + cf[kW] * ((double)hoc[i] - ho[i]);
    double x0d = cf[kP] * hx[i] + cf[kQ] * od;
    if (op.clip) x0d = std::min(std::max(x0d, -cf[kClip]), cf[kClip]);
    if (op.thr) {
      const double s = th[i / per_sample];
      x0d = std::min(std::max(x0d, -s), s) / s;
    }
    const double eps = cf[kR] * hx[i] + cf[kS] * od + cf[kU] * x0d;
    double outd = cf[kA] * x0d + cf[kB] * eps + cf[kC] * hx[i];
    double scale = std::fabs(cf[kA] * x0d) + std::fabs(cf[kB]) * (std::fabs(cf[kR] * hx[i]) + std::fabs(cf[kS] * od) +
                   std::fabs(cf[kU] * x0d)) + std::fabs(cf[kC] * hx[i]) + std::fabs(od) + std::fabs(hx[i]);
    if (op.z || op.philox) {
      double sig = cf[kSigma];
      if (op.var == kVarLearned) sig = std::sqrt((double)hv[i]);
      if (op.var == kVarLearnedRange) {
        const double f = 0.5 * ((double)hv[i] + 1.0);
        sig = std::exp(0.5 * (f * cf[kLogMax] + (1.0 - f) * cf[kLogMin]));
      }
      outd += sig * zz;
      scale += std::fabs(sig * zz);
    }
    c.close(xp.get(i), outd, 64 * 0x1p-24 * scale + dt_eps(dt) * std::fabs(outd) * 1.01, (size_t)i, "x_prev(f64)");
  }
  c.check_guards(x.buf, "x");
  c.check_guards(xp.buf, "x_prev");
  c.check_guards(x0, "x0");
}

}  // namespace

CUEMU_SUITE(sampler_step) {
  const bool quick = options().quick;
  set_sm_count(1);  // 16 blocks at most: n = 70001 goes round the grid-stride loop 2 (16-bit) to 4 (fp32) times
  const int64_t sizes[] = {1, 7, 13, 1003, 3 * 1337, 70001};
  for (DT dt : {DT::F32, DT::F16, DT::BF16})
    for (int align : {0, 1, 2})
      for (int64_t n : sizes) {
        if (quick && (n > 5000 || align == 2)) continue;
        if (options().tiny && n != 13 && n != 1003) continue;
        for (const Opt& op : kOpts) {
          if (options().tiny && op.name[0] != 'a' && op.name[0] != 'l') continue;  // all, all_philox, linear, learned*
          if (n == 70001 && align != 0 && op.name[0] != 'a') continue;  // big + misaligned: the 'all' options only
          run_case(dt, align, n, op);
        }
      }
  {  // n == 0: nothing launched, success
    Case c("sampler_step/n=0");
    LaunchArgs a{};
    a.n = 0;
    c.expect(launch_sampler_step(a, nullptr) == cudaSuccess && c.launches().empty(), "n = 0 must launch nothing");
  }
  set_sm_count(2);
}
