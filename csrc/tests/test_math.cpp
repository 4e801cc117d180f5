// C++ tests of the per-element math shared by the CPU and CUDA kernels (csrc/include/*_math.h), compiled with g++:
//   bash scripts/test.sh (runs it first), or: cmake --build build && ctest --test-dir build
// Exits non-zero and prints the failing check on any mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "group_norm_silu_math.h"
#include "multistep_math.h"

static int failures = 0;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);  \
      std::fprintf(stderr, __VA_ARGS__);                         \
      std::fprintf(stderr, "\n");                                \
      ++failures;                                                \
    }                                                            \
  } while (0)

using namespace fastdiff;

// Philox4x32-10 known-answer vectors of Random123 (kat_vectors: philox4x32 10 rounds).
static void test_philox_kat() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    uint32_t c[4] = {k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]};
    mstep::philox4x32_10(c, k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) CHECK(c[i] == k.out[i], "philox word %d: %08x != %08x", i, c[i], k.out[i]);
  }
}

// Box-Muller output: finite, deterministic, and N(0, 1) in its first two moments over 200k counters.
static void test_philox_normal_moments() {
  double s = 0, s2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    float z = mstep::philox_normal(12345u, (uint64_t)i);
    CHECK(std::isfinite(z), "philox_normal(%d) not finite", i);
    s += z;
    s2 += (double)z * z;
  }
  const double mean = s / n, var = s2 / n - mean * mean;
  CHECK(std::fabs(mean) < 4.0 / std::sqrt((double)n), "mean %g", mean);
  CHECK(std::fabs(var - 1.0) < 4.0 * std::sqrt(2.0 / n), "variance %g", var);
  CHECK(mstep::philox_normal(7u, 99u) == mstep::philox_normal(7u, 99u), "not deterministic");
  CHECK(mstep::philox_normal(7u, 99u) != mstep::philox_normal(8u, 99u), "seed ignored");
}

// The z term's σ from a learned variance output v: √v (learned), and the log-interpolation between logmin and
// logmax (learned_range) at its ends and middle, against float64.
static void test_learned_sigma() {
  double c[mstep::kNumCoef] = {0};
  c[mstep::kLogMax] = -3.9;
  c[mstep::kLogMin] = -5.2;
  const mstep::Coefs k = mstep::load_coefs(c);
  for (float v : {1e-3f, 0.02f, 0.5f}) {
    const float got = mstep::learned_sigma(k, mstep::kFlagVarLearned, v);
    CHECK(std::fabs(got - std::sqrt((double)v)) <= 1e-6 * std::sqrt((double)v), "learned sigma(%g) = %g", v, got);
  }
  for (float v : {-1.f, 0.f, 1.f, 0.37f}) {
    const double f = 0.5 * ((double)v + 1.0), want = std::exp(0.5 * (f * -3.9 + (1.0 - f) * -5.2));
    const float got = mstep::learned_sigma(k, mstep::kFlagVarRange, v);
    CHECK(std::fabs(got - want) <= 4e-7 * want, "learned_range sigma(%g) = %g, want %g", v, got, want);
  }
}

// Chan's merge of tile statistics equals the two-pass statistic of the whole, including a mean of 1e4
// (where E[x²] − E[x]² in float32 would lose every digit of a variance of 1).
static void test_group_stat_merge() {
  std::mt19937 rng(1);
  for (double offset : {0.0, 1e4}) {
    std::normal_distribution<double> N(offset, 1.0);
    std::vector<float> x(5000);
    for (float& v : x) v = (float)N(rng);
    gns::Stat acc{0.f, 0.f, 0.f};
    for (size_t lo = 0; lo < x.size(); lo += 333) {
      const size_t hi = std::min(x.size(), lo + 333);
      float sum = 0.f;
      for (size_t i = lo; i < hi; ++i) sum += x[i];
      const float mean = sum / (float)(hi - lo);
      float m2 = 0.f;
      for (size_t i = lo; i < hi; ++i) m2 += (x[i] - mean) * (x[i] - mean);
      acc = gns::merge(acc, gns::tile_stat((float)(hi - lo), sum, m2));
    }
    double mean = 0, m2 = 0;
    for (float v : x) mean += v;
    mean /= x.size();
    for (float v : x) m2 += (v - mean) * (v - mean);
    const double var = m2 / x.size();
    CHECK(acc.count == (float)x.size(), "count %g", acc.count);
    CHECK(std::fabs(acc.mean - mean) < 1e-6 * (1 + std::fabs(mean)) * 10, "mean %g vs %g", acc.mean, mean);
    CHECK(std::fabs(acc.m2 / acc.count - var) < 1e-3 * var, "var %g vs %g (offset %g)", acc.m2 / acc.count, var,
          offset);
    const float rstd = gns::rstd_of(acc, 1e-6f);
    CHECK(std::fabs(rstd - 1.0 / std::sqrt(var + 1e-6)) < 1e-3, "rstd %g", rstd);
  }
  CHECK(gns::act(0.f, true) == 0.f && std::fabs(gns::act(2.f, true) - 2.f / (1.f + std::exp(-2.f))) < 1e-6f,
        "silu");
}

int main() {
  test_philox_kat();
  test_philox_normal_moments();
  test_learned_sigma();
  test_group_stat_merge();
  if (failures) {
    std::fprintf(stderr, "test_math: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_math: all checks passed (Philox KAT and moments, learned variance sigma, GroupNorm merge)\n");
  return 0;
}
