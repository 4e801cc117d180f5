// multistep (csrc/cuda/multistep.cu) on the emulator: every dtype, aligned / misaligned pointers, sizes that are not
// multiples of the vector width (and one that goes round the grid-stride loop several times), 0-4 history tensors,
// the second combination (out2), the d output (x's dtype or float32), CFG, clip, thresholding, noise tensor and
// Philox, learned variances (σ of the z term per element from v: learned, learned_range). Each output element
// is compared exactly with the same float32 math run element by element (csrc/include/multistep_math.h, as the CPU
// kernel), and within a tolerance with a float64 evaluation of the documented update.
#include "harness.h"
#include "multistep_math.h"

#include <memory>

namespace fastdiff {
namespace mstep {
cudaError_t launch_multistep(const LaunchArgs& a, cudaStream_t stream);  // csrc/cuda/multistep.cu
}
}  // namespace fastdiff

namespace {

using namespace cuemu;
using namespace fastdiff::mstep;

struct Opt {
  const char* name;
  int nh;
  bool out2, dout, cfg, clip, thr, z, philox;
  int var;        // 0, kFlagVarLearned or kFlagVarRange
  bool dout_f32;  // d_out in float32
};

const Opt kOpts[] = {
    {"h0", 0, false, false, false, false, false, false, false, 0, false},
    {"h1_dout", 1, false, true, false, false, false, false, false, 0, false},
    {"h2_out2", 2, true, false, false, false, false, false, false, 0, false},
    {"h3_cfg_clip", 3, false, false, true, true, false, false, false, 0, false},
    {"h4_thresh_noise", 4, false, false, false, false, true, true, false, 0, false},
    {"h2_philox_out2_dout", 2, true, true, false, false, false, false, true, 0, false},
    {"learned_dout32", 0, false, true, false, false, false, true, false, kFlagVarLearned, true},
    {"range_philox_dout32", 1, false, true, true, true, false, false, true, kFlagVarRange, true},
    {"all", 4, true, true, true, true, true, true, false, 0, false},
    {"all_philox", 3, true, true, true, true, true, false, true, 0, false},
    {"all_range_dout32", 2, true, true, true, true, true, true, false, kFlagVarRange, true},
};

void run_case(DT dt, int align, int64_t n, const Opt& op) {
  const int vec = (int)(16 / dt_size(dt));
  char name[160];
  std::snprintf(name, sizeof name, "multistep/%s/%s/n=%lld/%s", dt_name(dt),
                align == 0 ? "aligned" : (align == 1 ? "misaligned_inputs" : "misaligned_out"), (long long)n, op.name);
  Case c(name);
  auto& r = case_rng();
  const size_t in_off = align == 1 ? 1 : 0, out_off = align == 2 ? 1 : 0;
  const int64_t B = n % 3 == 0 ? 3 : 1, per_sample = n / B;
  DevTensor x(dt, n, in_off), o(dt, n, in_off), oc(dt, op.cfg ? n : 0, in_off), z(dt, op.z ? n : 0, in_off),
      v(dt, op.var ? n : 0, in_off), out(dt, n, out_off), out2(dt, op.out2 ? n : 0, out_off),
      dout(op.dout_f32 ? DT::F32 : dt, op.dout ? n : 0, out_off);
  std::vector<std::unique_ptr<DevTensor>> hist;
  std::vector<std::vector<float>> hh;
  const std::vector<float> hx = x.fill_normal(r, 0.f, 1.5f), ho = o.fill_normal(r, 0.f, 1.5f);
  const std::vector<float> hoc = op.cfg ? oc.fill_normal(r, 0.f, 1.5f) : std::vector<float>();
  const std::vector<float> hz = op.z ? z.fill_normal(r, 0.f, 1.f) : std::vector<float>();
  const std::vector<float> hv = op.var == kFlagVarLearned ? v.fill(r, 1e-3f, 5e-2f)
                                : op.var == kFlagVarRange ? v.fill(r, -1.f, 1.f)
                                                          : std::vector<float>();
  for (int h = 0; h < op.nh; ++h) {
    hist.emplace_back(new DevTensor(dt, n, in_off));
    hh.push_back(hist.back()->fill_normal(r, 0.f, 1.f));
  }
  DevBuf thr((op.thr ? B : 0) * sizeof(float)), rngb(2 * sizeof(int64_t)), coef(kNumCoef * sizeof(double));
  std::uniform_real_distribution<double> U(-1.2, 1.2);
  double* cf = static_cast<double*>(coef.data());
  for (int j = 0; j < kNumCoef; ++j) cf[j] = j >= 19 ? 0.0 : U(r);
  cf[kClip] = 1.0;
  cf[kW] = 3.0;
  cf[kLogMax] = -3.9;
  cf[kLogMin] = -5.2;
  float* th = static_cast<float*>(thr.data());
  for (int64_t b = 0; op.thr && b < B; ++b) th[b] = 1.25f + 0.5f * (float)b;
  int64_t* rg = static_cast<int64_t*>(rngb.data());
  rg[0] = (int64_t)(r() >> 1);
  rg[1] = (int64_t)(r() % 100000);

  LaunchArgs a{};
  a.x = x.data();
  a.o = o.data();
  a.oc = op.cfg ? oc.data() : nullptr;
  for (int h = 0; h < op.nh; ++h) a.h[h] = hist[h]->data();
  a.z = op.z ? z.data() : nullptr;
  a.v = op.var ? v.data() : nullptr;
  a.rng = op.philox ? rg : nullptr;
  a.thr = op.thr ? th : nullptr;
  a.coef = cf;
  a.out = out.data();
  a.out2 = op.out2 ? out2.data() : nullptr;
  a.dout = op.dout ? dout.data() : nullptr;
  a.n = n;
  a.per_sample = per_sample;
  a.nh = op.nh;
  a.flags = (op.clip ? kFlagClip : 0) | op.var;
  a.dout_f32 = op.dout_f32;
  a.dtype = dt_code(dt);
  const uint64_t ldg0 = ldg_count();
  const cudaError_t err = launch_multistep(a, nullptr);
  const uint64_t ldg = ldg_count() - ldg0;
  c.expect(err == cudaSuccess, std::string("launch_multistep returned ") + cudaGetErrorName(err));
  c.check_faults();
  const bool vec_path = align == 0 && n >= vec;
  c.expect(vec_path ? ldg > 0 : ldg == 0, "vector path " + std::string(vec_path ? "expected" : "not expected") +
                                               ", __ldg calls: " + std::to_string(ldg));
  const auto ls = c.launches();
  c.expect(ls.size() == 1 && ls[0].ran, "expected one launch");

  const Coefs k = load_coefs(cf);
  const uint64_t seed = (uint64_t)rg[0], offset = (uint64_t)rg[1];
  for (int64_t i = 0; i < n; ++i) {
    // float32, element by element (the order of multistep_math.h / the CPU kernel)
    float oo = ho[i];
    if (op.cfg) oo = guide(oo, hoc[i], k.w);
    float d = predict_d(k, hx[i], oo);
    if (op.clip) d = clampf(d, -k.clip, k.clip);
    if (op.thr) d = threshold(d, th[i / per_sample]);
    float y = combine(k.y, hx[i], oo, d), y2 = combine(k.y2, hx[i], oo, d);
    for (int h = 0; h < op.nh; ++h) {
      y += k.y.h[h] * hh[h][i];
      y2 += k.y2.h[h] * hh[h][i];
    }
    float zz = 0.f;
    if (op.z || op.philox) {
      zz = op.z ? hz[i] : philox_normal(seed, offset + (uint64_t)i);
      y += (op.var ? learned_sigma(k, op.var, hv[i]) : k.y.z) * zz;
    }
    c.exact(out.get(i), round_to(dt, y), (size_t)i, "out");
    if (op.out2) c.exact(out2.get(i), round_to(dt, y2), (size_t)i, "out2");
    if (op.dout) c.exact(dout.get(i), op.dout_f32 ? d : round_to(dt, d), (size_t)i, "d_out");
    // float64
    double od = op.cfg ? ho[i] + cf[kW] * ((double)hoc[i] - ho[i]) : ho[i];
    double dd = cf[kP] * hx[i] + cf[kQ] * od;
    if (op.clip) dd = std::min(std::max(dd, -cf[kClip]), cf[kClip]);
    if (op.thr) dd = std::min(std::max(dd, (double)-th[i / per_sample]), (double)th[i / per_sample]) / th[i / per_sample];
    double yd = cf[kYX] * hx[i] + cf[kYO] * od + cf[kYD] * dd, y2d = cf[kY2X] * hx[i] + cf[kY2O] * od + cf[kY2D] * dd;
    double sc = std::fabs(cf[kYX] * hx[i]) + std::fabs(cf[kYO] * od) + std::fabs(cf[kYD] * dd) + std::fabs(od) +
                std::fabs(hx[i]);
    for (int h = 0; h < op.nh; ++h) {
      yd += cf[kYH0 + h] * hh[h][i];
      y2d += cf[kY2H0 + h] * hh[h][i];
      sc += std::fabs(cf[kYH0 + h] * hh[h][i]) + std::fabs(cf[kY2H0 + h] * hh[h][i]);
    }
    if (op.z || op.philox) {
      double sg = cf[kYZ];
      if (op.var == kFlagVarLearned) sg = std::sqrt((double)hv[i]);
      if (op.var == kFlagVarRange) {
        const double f = 0.5 * ((double)hv[i] + 1.0);
        sg = std::exp(0.5 * (f * cf[kLogMax] + (1.0 - f) * cf[kLogMin]));
      }
      yd += sg * zz;
      sc += std::fabs(sg * zz);
    }
    const double t32 = 64 * 0x1p-24 * (sc + std::fabs(cf[kY2X] * hx[i]) + std::fabs(cf[kY2O] * od) + std::fabs(cf[kY2D] * dd));
    c.close(out.get(i), yd, t32 + dt_eps(dt) * std::fabs(yd) * 1.01, (size_t)i, "out(f64)");
    if (op.out2) c.close(out2.get(i), y2d, t32 + dt_eps(dt) * std::fabs(y2d) * 1.01, (size_t)i, "out2(f64)");
  }
  c.check_guards(x.buf, "x");
  c.check_guards(out.buf, "out");
  c.check_guards(out2.buf, "out2");
  c.check_guards(dout.buf, "d_out");
}

}  // namespace

CUEMU_SUITE(multistep) {
  const bool quick = options().quick;
  set_sm_count(1);  // 16 blocks at most: n = 70001 goes round the grid-stride loop 2 (16-bit) to 4 (fp32) times
  const int64_t sizes[] = {1, 7, 13, 1003, 3 * 1337, 70001};
  for (DT dt : {DT::F32, DT::F16, DT::BF16})
    for (int align : {0, 1, 2})
      for (int64_t n : sizes) {
        if (quick && (n > 5000 || align == 2)) continue;
        if (options().tiny && n != 13 && n != 1003) continue;
        for (const Opt& op : kOpts) {
          if (options().tiny && op.name[0] != 'a') continue;
          if (n == 70001 && align != 0 && op.name[0] != 'a') continue;
          run_case(dt, align, n, op);
        }
      }
  {
    Case c("multistep/n=0");
    LaunchArgs a{};
    a.n = 0;
    c.expect(launch_multistep(a, nullptr) == cudaSuccess && c.launches().empty(), "n = 0 must launch nothing");
  }
  set_sm_count(2);
}
