// Driver of the CUDA-on-CPU harness: runs every registered suite (cases_*.cpp), prints the cases and values checked,
// exits non-zero on any mismatch or emulator fault.
//   cuemu_test [--quick | --tiny] [--only SUBSTRING] [--seed N]        (scripts/cuda_emu_test.sh builds and runs it)
#include <chrono>
#include <map>

#include "harness.h"

namespace cuemu {
namespace {

Options g_opts;
uint64_t g_seed = 1;
std::mt19937_64 g_case_rng;
uint64_t g_cases = 0, g_failed_cases = 0, g_values = 0, g_launch_count = 0;
std::map<std::string, uint64_t> g_kernel_launches;
std::vector<std::string> g_failed_names;
Case* g_current = nullptr;

std::vector<Suite>& suites() {
  static std::vector<Suite> s;
  return s;
}

uint64_t hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (char c : s) h = (h ^ (unsigned char)c) * 1099511628211ull;
  return h;
}

}  // namespace

const Options& options() { return g_opts; }
std::mt19937_64& case_rng() { return g_case_rng; }

int register_suite(const char* name, void (*fn)()) {
  suites().push_back({name, fn});
  return 0;
}

Case::Case(std::string name) : name_(std::move(name)) {
  g_current = this;
  g_case_rng.seed(hash(name_) ^ g_seed);
  set_seed(hash(name_) * 31 + g_seed);
  take_faults();
  take_launches();
}

Case::~Case() {
  check_faults();
  launches();
  for (const LaunchRecord& l : launches_) {
    ++g_launch_count;
    ++g_kernel_launches[l.kernel];
  }
  ++g_cases;
  g_values += values_;
  if (fails_) {
    ++g_failed_cases;
    g_failed_names.push_back(name_);
    std::fprintf(stderr, "FAIL %s: %llu mismatch(es) of %llu values\n", name_.c_str(), (unsigned long long)fails_,
                 (unsigned long long)values_);
  }
  g_current = nullptr;
}

void Case::exact(float got, float want, size_t i, const char* what) {
  ++values_;
  if (got == want) return;  // NaN fails
  if (fails_++ < 4)
    std::fprintf(stderr, "  %s: %s[%zu] = %.9g, expected exactly %.9g\n", name_.c_str(), what, i, got, want);
}

void Case::close(double got, double want, double tol, size_t i, const char* what) {
  ++values_;
  if (std::fabs(got - want) <= tol) return;  // NaN fails
  if (fails_++ < 4)
    std::fprintf(stderr, "  %s: %s[%zu] = %.9g, expected %.9g +- %.3g\n", name_.c_str(), what, i, got, want, tol);
}

void Case::expect(bool ok, const std::string& msg) {
  if (ok) return;
  ++fails_;
  std::fprintf(stderr, "  %s: %s\n", name_.c_str(), msg.c_str());
}

void Case::check_faults() {
  for (const std::string& f : take_faults()) expect(false, "emulator fault: " + f);
}

std::vector<LaunchRecord> Case::launches() {
  for (LaunchRecord& l : take_launches()) launches_.push_back(l);
  return launches_;
}

void Case::check_guards(const DevBuf& b, const char* what) {
  expect(b.guards_ok(), std::string("bytes around ") + what + " were overwritten (a write out of bounds)");
}

}  // namespace cuemu

int main(int argc, char** argv) {
  using namespace cuemu;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick") {
      g_opts.quick = true;
    } else if (a == "--tiny") {
      g_opts.quick = g_opts.tiny = true;
    } else if (a == "--only" && i + 1 < argc) {
      g_opts.only = argv[++i];
    } else if (a == "--seed" && i + 1 < argc) {
      g_seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--quick | --tiny] [--only SUBSTRING] [--seed N]\n", argv[0]);
      return 2;
    }
  }
  if (const char* s = std::getenv("CUEMU_SEED")) g_seed = std::strtoull(s, nullptr, 10);
  const auto t0 = std::chrono::steady_clock::now();
  int ran = 0;
  for (const Suite& s : suites()) {
    if (!g_opts.only.empty() && std::string(s.name).find(g_opts.only) == std::string::npos) continue;
    const uint64_t c0 = g_cases, v0 = g_values, f0 = g_failed_cases;
    const auto ts = std::chrono::steady_clock::now();
    s.fn();
    ++ran;
    std::printf("cuemu: %-16s %5llu cases, %9llu values, %llu failed (%.2f s)\n", s.name,
                (unsigned long long)(g_cases - c0), (unsigned long long)(g_values - v0),
                (unsigned long long)(g_failed_cases - f0),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count());
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("cuemu: kernels launched:");
  for (auto& kv : g_kernel_launches) std::printf(" %s x%llu;", kv.first.c_str(), (unsigned long long)kv.second);
  std::printf("\ncuemu: %llu cases, %llu values checked, %llu launches, %llu failed case(s); %s, emulated SMs %d, "
              "seed %llu, %.1f s%s\n",
              (unsigned long long)g_cases, (unsigned long long)g_values, (unsigned long long)g_launch_count,
              (unsigned long long)g_failed_cases, threads_mode() ? "OS threads" : "fibers", sm_count(),
              (unsigned long long)g_seed, dt, g_opts.tiny ? " (tiny set)" : (g_opts.quick ? " (quick set)" : ""));
  if (ran == 0) {
    std::fprintf(stderr, "cuemu: no suite matched\n");
    return 1;
  }
  if (g_failed_cases) {
    std::fprintf(stderr, "cuemu: FAILED:");
    for (size_t i = 0; i < g_failed_names.size() && i < 20; ++i) std::fprintf(stderr, " %s", g_failed_names[i].c_str());
    std::fprintf(stderr, "%s\n", g_failed_names.size() > 20 ? " ..." : "");
    return 1;
  }
  return 0;
}
