// cuemu runtime: launch checks, the block scheduler (fibers on ucontext, or one OS thread per CUDA thread), the
// barrier and warp-exchange state machine, device-memory bookkeeping for checked accesses, and stubs of the CUDA
// runtime calls the launchers make (nothing links libcudart). See cuemu.h and README.md next to it.
#include "cuemu_runtime.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define CUEMU_TSAN 1
#endif
// ThreadSanitizer run (scripts/cuda_emu_test.sh): this file is compiled WITHOUT -fsanitize=thread but with
// CUEMU_TSAN_FIBERS, the kernels with it. Each emulated thread is a TSan fiber; switches carry no synchronisation
// (__tsan_switch_to_fiber_no_sync), and the only happens-before edges are the ones CUDA guarantees: launch → every
// thread, every thread → the end of the block, __syncthreads arrivals → departures, a warp operation's arrivals →
// its departures. So a missing __syncthreads is a reported race even though the fibers never run at the same time.
#if defined(CUEMU_TSAN_FIBERS)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#define TSAN_ACQUIRE(p) __tsan_acquire(p)
#define TSAN_RELEASE(p) __tsan_release(p)
#else
#define TSAN_ACQUIRE(p) ((void)0)
#define TSAN_RELEASE(p) ((void)0)
#endif

namespace cuemu {

thread_local Ctx* tls_ctx = nullptr;

namespace {

struct Unwind {};  // thrown inside an emulated thread to abandon the block after a fault

struct Config {
  int sms = 2;
  bool threads = false;  // OS threads instead of fibers
  uint64_t seed = 1;
  bool verbose = false;
} cfg;

std::mt19937_64& rng() {
  static std::mt19937_64 r(1);
  return r;
}

cudaError_t g_last_error = cudaSuccess;
std::vector<std::string> g_faults;
std::vector<LaunchRecord> g_launches;
std::atomic<uint64_t> g_ldg{0};
bool g_in_launch = false;

struct Range {
  uintptr_t lo, hi;
};
std::vector<Range> g_ranges;

enum State { kNotStarted, kRunnable, kRunning, kBlocked, kExited };

// The run list: a ring of thread numbers, sized once per block on the main fiber (no allocation from inside a fiber:
// under ThreadSanitizer that would look like a race on the heap between unsynchronised fibers).
struct RunList {
  std::vector<int> v;
  size_t head = 0, count = 0;
  void reset(size_t cap) {
    if (v.size() < cap) v.resize(cap);
    head = count = 0;
  }
  bool empty() const { return count == 0; }
  size_t size() const { return count; }
  int& operator[](size_t k) { return v[(head + k) % v.size()]; }
  void push_back(int i) { (*this)[count++] = i; }
  int back() { return (*this)[count - 1]; }
  void pop_back() { --count; }
  int front() { return (*this)[0]; }
  void pop_front() {
    head = (head + 1) % v.size();
    --count;
  }
};

struct Thread {
  Ctx ctx;
  int linear = 0, lane = 0, warp = 0;
  State st = kNotStarted;
  ucontext_t uc;  // the fiber's start (makecontext); later switches are _setjmp/_longjmp (no signal-mask syscall)
  jmp_buf jb;
  bool first_entry = false;
  char* stack = nullptr;
  const char* wfile = nullptr;  // where it waits (deadlock report)
  int wline = 0;
#ifdef CUEMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Warp {
  unsigned exists = 0, exited = 0, arrived = 0;
  int kind = 0, width = 32;
  unsigned mask = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t gen = 0;
  char sync[2];  // TSan sync objects (by generation parity)
  uint64_t val[32];
  int src[32];
  uint64_t res[32];
};

struct Block {
  int n = 0;
  std::vector<Thread> th;
  std::vector<Warp> w;
  int live = 0, waiting = 0;
  int bar_arrived = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  uint64_t bar_gen = 0;
  char bar_sync[2];
  std::string fault;
  bool threads = false;
  std::mutex m;
  std::condition_variable cv;
  ucontext_t sched;
  jmp_buf sched_jb;
  RunList runnable;
  int policy = 0;  // this block's schedule: 0 random pick, 1 LIFO (run ahead what was just woken), 2 FIFO
  Thread* cur = nullptr;
  void (*thunk)(void*) = nullptr;
  void* arg = nullptr;
  const LaunchSpec* spec = nullptr;
#ifdef CUEMU_ASAN
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
};

thread_local Thread* tls_thread = nullptr;
thread_local Block* tls_block = nullptr;

constexpr size_t kStack = 256 * 1024;
std::vector<char*> g_stacks;
[[maybe_unused]] char g_launch_sync, g_block_sync;
bool g_stacks_dirty = false;  // a fault abandoned fiber frames (their ASan redzones are still poisoned)
#if defined(CUEMU_TSAN_FIBERS)
std::vector<void*> g_tsan_fibers;  // one per stack slot, reused block after block
void* g_tsan_main = nullptr;
void* tsan_fiber(int i) {
  while ((int)g_tsan_fibers.size() <= i) g_tsan_fibers.push_back(__tsan_create_fiber(0));
  return g_tsan_fibers[i];
}
#endif

char* stack_for(int i) {
  while ((int)g_stacks.size() <= i) {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "cuemu: cannot map a fiber stack\n");
      std::abort();
    }
    g_stacks.push_back(static_cast<char*>(p));
  }
  return g_stacks[i];
}

std::string where(const Thread& t) {
  char b[160];
  std::snprintf(b, sizeof b, "thread (%u,%u,%u) of block (%u,%u,%u)", t.ctx.tid.x, t.ctx.tid.y,
                t.ctx.tid.z, t.ctx.bid.x, t.ctx.bid.y, t.ctx.bid.z);
  return b;
}

std::string site(const char* file, int line) {
  const char* s = file ? std::strrchr(file, '/') : nullptr;
  return std::string(s ? s + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}

// Wakes every blocked thread (fibers: back on the run list; threads: the caller notifies).
void wake_all(Block& b) {
  if (b.threads) {
    b.cv.notify_all();
    return;
  }
  for (int i = 0; i < b.n; ++i)
    if (Thread& t = b.th[i]; t.st == kBlocked) {
      t.st = kRunnable;
      b.runnable.push_back(t.linear);
    }
}

void record_fault(Block& b, const std::string& msg) {
  if (b.fault.empty()) b.fault = msg;
  wake_all(b);
}

[[noreturn]] void fault(Block& b, const std::string& msg) {
  record_fault(b, msg);
  throw Unwind{};
}

std::string deadlock_report(Block& b) {
  std::map<std::string, int> sites;
  for (int i = 0; i < b.n; ++i)
    if (Thread& t = b.th[i]; t.st == kBlocked || (b.threads && t.st == kRunning && t.wfile)) sites[site(t.wfile, t.wline)]++;
  std::string s = "deadlock: every live thread of block (" + std::to_string(b.th[0].ctx.bid.x) + "," +
                  std::to_string(b.th[0].ctx.bid.y) + "," + std::to_string(b.th[0].ctx.bid.z) +
                  ") waits and none can proceed (";
  bool first = true;
  for (auto& kv : sites) {
    s += (first ? "" : ", ") + std::to_string(kv.second) + " at " + kv.first;
    first = false;
  }
  return s + "; " + std::to_string(b.n - b.live) + " exited)";
}

struct MaybeLock {
  std::unique_lock<std::mutex> lk;
  explicit MaybeLock(Block& b) {
    if (b.threads) lk = std::unique_lock<std::mutex>(b.m);
  }
};

// Switch from a fiber back to the scheduler (and, when resumed, back).
void fiber_yield(Block& b, Thread& t) {
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(&t.fake_stack, b.sched_bottom, b.sched_size);
#endif
#if defined(CUEMU_TSAN_FIBERS)
  __tsan_switch_to_fiber(g_tsan_main, 1);
  swapcontext(&t.uc, &b.sched);
#else
  if (_setjmp(t.jb) == 0) _longjmp(b.sched_jb, 1);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
#endif
}

// Blocks the calling thread until pred() holds; faults (deadlock) if every live thread would wait.
template <class Pred>
void wait_until(Block& b, Thread& t, MaybeLock& L, Pred pred, const char* file, int line) {
  t.wfile = file;
  t.wline = line;
  if (b.threads) {
    ++b.waiting;
    if (b.waiting == b.live && !pred()) {
      fault(b, deadlock_report(b));
    }
    b.cv.wait(L.lk, [&] { return pred() || !b.fault.empty(); });  // the releaser took it off b.waiting
  } else {
    while (!pred() && b.fault.empty()) {
      t.st = kBlocked;
      fiber_yield(b, t);
    }
  }
  t.wfile = nullptr;
  if (!b.fault.empty()) throw Unwind{};
}

Thread& current(Block*& bp) {
  bp = tls_block;
  if (!bp || !tls_thread) {
    std::fprintf(stderr, "cuemu: a device function was called outside a kernel\n");
    std::abort();
  }
  return *tls_thread;
}

void thread_exit(Block& b, Thread& t) {
  MaybeLock L(b);
  t.st = kExited;
  --b.live;
  Warp& w = b.w[t.warp];
  w.exited |= 1u << t.lane;
  if (b.fault.empty()) {
    if (b.bar_arrived > 0)
      record_fault(b, where(t) + " exited while " + std::to_string(b.bar_arrived) +
                          " thread(s) wait at __syncthreads at " + site(b.bar_file, b.bar_line) +
                          " (divergent barrier)");
    else if (w.arrived && (w.mask >> t.lane & 1u))
      record_fault(b, where(t) + " (lane " + std::to_string(t.lane) + ") exited while its warp waits for it at " +
                          site(w.file, w.line));
    else if (b.threads && b.live > 0 && b.waiting == b.live)
      record_fault(b, deadlock_report(b));
  }
  if (b.threads) b.cv.notify_all();
}

void run_body(Block& b, Thread& t) {
  try {
    if (b.fault.empty()) b.thunk(b.arg);
  } catch (Unwind&) {
  } catch (std::exception& e) {
    MaybeLock L(b);
    record_fault(b, where(t) + ": exception " + e.what());
  }
  thread_exit(b, t);
}

void fiber_main() {
  Block& b = *tls_block;
  Thread& t = *tls_thread;
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_bottom, &b.sched_size);
#endif
  TSAN_ACQUIRE(&g_launch_sync);
  run_body(b, t);
  TSAN_RELEASE(&g_block_sync);
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, b.sched_bottom, b.sched_size);  // this fiber's stack is done
#endif
#if defined(CUEMU_TSAN_FIBERS)
  __tsan_switch_to_fiber(g_tsan_main, 1);
  setcontext(&b.sched);
#else
  _longjmp(b.sched_jb, 1);
#endif
}

void run_fibers(Block& b) {
#if defined(CUEMU_TSAN_FIBERS)
  if (!g_tsan_main) g_tsan_main = __tsan_get_current_fiber();
#endif
  TSAN_RELEASE(&g_launch_sync);
  auto& r = rng();
  b.runnable.reset(b.n);
  for (int i = 0; i < b.n; ++i) b.runnable.push_back(i);
  for (int i = b.n - 1; i > 0; --i) std::swap(b.runnable[i], b.runnable[r() % (i + 1)]);
  // Schedules vary per block: uniformly random picks, or LIFO (a warp just released runs far ahead of the others:
  // exposes a missing barrier before shared memory is reused), or FIFO (round robin).
  b.policy = (int)(r() % 3);
  while (true) {
    if (b.runnable.empty()) {
      if (b.live == 0) break;
      record_fault(b, b.fault.empty() ? deadlock_report(b) : b.fault);  // wakes the blocked ones to unwind
      if (b.runnable.empty()) break;
      continue;
    }
    int i;
    if (b.policy == 1) {
      i = b.runnable.back();
      b.runnable.pop_back();
    } else if (b.policy == 2) {
      i = b.runnable.front();
      b.runnable.pop_front();
    } else {
      const size_t k = r() % b.runnable.size();
      i = b.runnable[k];
      b.runnable[k] = b.runnable.back();
      b.runnable.pop_back();
    }
    Thread& t = b.th[i];
    if (t.st == kNotStarted) {
      if (!b.fault.empty()) {  // abandoned before it started
        t.st = kExited;
        --b.live;
        continue;
      }
      t.stack = stack_for(i);
#ifdef CUEMU_ASAN
      if (g_stacks_dirty) __asan_unpoison_memory_region(t.stack, kStack);  // frames abandoned by a fault
#endif
      static ucontext_t tmpl;  // getcontext once: it costs a signal-mask syscall
      static bool have_tmpl = (getcontext(&tmpl), true);
      (void)have_tmpl;
      t.uc = tmpl;
      t.uc.uc_stack.ss_sp = t.stack;
      t.uc.uc_stack.ss_size = kStack;
      t.uc.uc_link = nullptr;
      makecontext(&t.uc, fiber_main, 0);
      t.first_entry = true;
    } else if (t.st != kRunnable) {
      continue;
    }
    t.st = kRunning;
    tls_thread = &t;
    tls_ctx = &t.ctx;
#ifdef CUEMU_ASAN
    void* fs = nullptr;
    __sanitizer_start_switch_fiber(&fs, t.stack, kStack);
#endif
    b.cur = &t;
#if defined(CUEMU_TSAN_FIBERS)
    __tsan_switch_to_fiber(tsan_fiber(i), 1);
    swapcontext(&b.sched, &t.uc);
    t.first_entry = false;
#else
    if (_setjmp(b.sched_jb) == 0) {
      if (b.cur->first_entry) {
        b.cur->first_entry = false;
        swapcontext(&b.sched, &b.cur->uc);
      } else {
        _longjmp(b.cur->jb, 1);
      }
    }
#endif
#ifdef CUEMU_ASAN
    __sanitizer_finish_switch_fiber(fs, nullptr, nullptr);
#endif
  }
  tls_thread = nullptr;
  tls_ctx = nullptr;
  g_stacks_dirty = !b.fault.empty();
  TSAN_ACQUIRE(&g_block_sync);
}

void run_threads(Block& b) {
  std::vector<std::thread> pool;
  pool.reserve(b.n);
  for (int i = 0; i < b.n; ++i)
    pool.emplace_back([&b, i] {
      Thread& t = b.th[i];
      tls_block = &b;
      tls_thread = &t;
      tls_ctx = &t.ctx;
      {
        MaybeLock L(b);
        t.st = kRunning;
      }
      run_body(b, t);
    });
  for (auto& th : pool) th.join();
}

void read_env() {
  static bool done = false;
  if (done) return;
  done = true;
  if (const char* s = std::getenv("CUEMU_SMS")) cfg.sms = std::max(1, std::atoi(s));
  if (const char* s = std::getenv("CUEMU_SEED")) cfg.seed = std::strtoull(s, nullptr, 10);
#if defined(CUEMU_TSAN) && !defined(CUEMU_TSAN_FIBERS)
  cfg.threads = true;  // unannotated fibers in one OS thread would show ThreadSanitizer no concurrency at all
#endif
  if (const char* s = std::getenv("CUEMU_THREADS")) cfg.threads = std::atoi(s) != 0;
  rng().seed(cfg.seed);
}

}  // namespace

// ---- public runtime API (cuemu_runtime.h) -------------------------------------------------------------------------

void set_sm_count(int sms) { cfg.sms = sms; }
int sm_count() {
  read_env();
  return cfg.sms;
}
void set_seed(uint64_t seed) {
  read_env();
  rng().seed(seed);
}
bool threads_mode() {
  read_env();
  return cfg.threads;
}
std::vector<std::string> take_faults() {
  std::vector<std::string> f;
  f.swap(g_faults);
  return f;
}
std::vector<LaunchRecord> take_launches() {
  std::vector<LaunchRecord> l;
  l.swap(g_launches);
  return l;
}
uint64_t ldg_count() { return g_ldg.load(); }

void register_device_memory(const void* p, size_t bytes) {
  g_ranges.push_back({(uintptr_t)p, (uintptr_t)p + bytes});
}
void unregister_device_memory(const void* p) {
  for (size_t i = 0; i < g_ranges.size(); ++i)
    if (g_ranges[i].lo == (uintptr_t)p) {
      g_ranges.erase(g_ranges.begin() + i);
      return;
    }
}

void check_access(const void* p, size_t bytes, size_t align, const char* what) {
  const uintptr_t a = (uintptr_t)p;
  std::string err;
  if (align > 1 && a % align != 0) {
    char b[128];
    std::snprintf(b, sizeof b, "%s of %zu bytes at %p: misaligned (needs %zu-byte alignment)", what, bytes, p, align);
    err = b;
  } else {
    bool ok = false;
    for (const Range& r : g_ranges)
      if (a >= r.lo && a + bytes <= r.hi) {
        ok = true;
        break;
      }
    if (!ok) {
      char b[128];
      std::snprintf(b, sizeof b, "%s of %zu bytes at %p: outside every device allocation", what, bytes, p);
      err = b;
    }
  }
  if (err.empty()) return;
  Block* bp;
  Thread& t = current(bp);
  MaybeLock L(*bp);
  fault(*bp, where(t) + ": " + err);
}

void count_ldg() { g_ldg.fetch_add(1, std::memory_order_relaxed); }

unsigned active_mask() {
  Block* bp;
  Thread& t = current(bp);
  MaybeLock L(*bp);
  const Warp& w = bp->w[t.warp];
  return w.exists & ~w.exited;
}

void syncthreads(const char* file, int line) {
  Block* bp;
  Thread& t = current(bp);
  Block& b = *bp;
  MaybeLock L(b);
  if (!b.fault.empty()) throw Unwind{};
  if (b.live < b.n)
    fault(b, "__syncthreads at " + site(file, line) + " reached by " + where(t) + " after " +
                 std::to_string(b.n - b.live) + " thread(s) of the block exited (divergent barrier)");
  if (b.bar_arrived == 0) {
    b.bar_file = file;
    b.bar_line = line;
  } else if (b.bar_line != line || (b.bar_file != file && std::strcmp(b.bar_file, file) != 0)) {
    fault(b, "divergent __syncthreads: " + where(t) + " at " + site(file, line) + ", " +
                 std::to_string(b.bar_arrived) + " other thread(s) at " + site(b.bar_file, b.bar_line));
  }
  const uint64_t g = b.bar_gen;
  TSAN_RELEASE(&b.bar_sync[g & 1]);
  if (++b.bar_arrived == b.live) {
    TSAN_ACQUIRE(&b.bar_sync[g & 1]);
    b.bar_arrived = 0;
    ++b.bar_gen;
    if (b.threads) b.waiting -= b.live - 1;  // every other arrival waits in wait_until
    wake_all(b);
    return;
  }
  wait_until(b, t, L, [&] { return b.bar_gen != g; }, file, line);
  TSAN_ACQUIRE(&b.bar_sync[g & 1]);
}

uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};
  Block* bp;
  Thread& t = current(bp);
  Block& b = *bp;
  MaybeLock L(b);
  if (!b.fault.empty()) throw Unwind{};
  Warp& w = b.w[t.warp];
  const int lane = t.lane;
  auto me = [&] {  // built only for a fault message
    char hex[64];
    std::snprintf(hex, sizeof hex, " (lane %d, mask 0x%08x)", lane, mask);
    return std::string(names[kind]) + " at " + site(file, line) + " by " + where(t) + hex;
  };
  if (!(mask >> lane & 1u)) fault(b, me() + ": the mask does not include the calling lane");
  if (mask & ~w.exists)
    fault(b, me() + ": the mask names lanes that do not exist (the block has " + std::to_string(b.n) + " threads)");
  if (mask & w.exited) fault(b, me() + ": the mask names lanes that have exited");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fault(b, me() + ": width " + std::to_string(width) + " is not a power of two <= 32");
  if (w.arrived == 0) {
    w.kind = kind;
    w.mask = mask;
    w.width = width;
    w.file = file;
    w.line = line;
  } else if (w.kind != kind || w.mask != mask || w.width != width || w.line != line ||
             (w.file != file && std::strcmp(w.file, file) != 0)) {
    fault(b, "divergent warp operations: " + me() + " while lanes of its warp wait at " + names[w.kind] + " at " +
                 site(w.file, w.line));
  }
  const int seg = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case kShflIdx: src = seg + (arg & (width - 1)); break;
    case kShflUp: src = lane - arg >= seg ? lane - arg : lane; break;
    case kShflDown: src = lane + arg < seg + width ? lane + arg : lane; break;
    case kShflXor: src = (lane ^ arg) < seg + width ? (lane ^ arg) : lane; break;
    default: break;
  }
  w.val[lane] = value;
  w.src[lane] = src;
  w.arrived |= 1u << lane;
  const uint64_t g = w.gen;
  TSAN_RELEASE(&w.sync[g & 1]);
  if (w.arrived == w.mask) {
    TSAN_ACQUIRE(&w.sync[g & 1]);
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
      if ((w.mask >> l & 1u) && w.val[l]) ballot |= 1u << l;
    for (int l = 0; l < 32; ++l) {
      if (!(w.mask >> l & 1u)) continue;
      switch (w.kind) {
        case kBallot: w.res[l] = ballot; break;
        case kAny: w.res[l] = ballot != 0; break;
        case kAll: w.res[l] = ballot == w.mask; break;
        case kSyncWarp: w.res[l] = 0; break;
        default: {
          const int s = w.src[l];
          if (!(w.mask >> s & 1u))
            fault(b, std::string(names[w.kind]) + " at " + site(w.file, w.line) + ": lane " + std::to_string(l) +
                         " reads lane " + std::to_string(s) + ", which is " +
                         ((w.exists >> s & 1u) ? ((w.exited >> s & 1u) ? "exited" : "not in the mask (inactive)")
                                               : "not a thread of the block"));
          w.res[l] = w.val[s];
        }
      }
    }
    w.arrived = 0;
    ++w.gen;
    if (b.threads) {
      b.waiting -= __builtin_popcount(w.mask) - 1;
      b.cv.notify_all();
    } else {
      for (int l = 0; l < 32; ++l) {
        Thread& u = b.th[t.warp * 32 + l];
        if ((w.mask >> l & 1u) && u.st == kBlocked) {
          u.st = kRunnable;
          b.runnable.push_back(u.linear);
        }
      }
    }
    return w.res[lane];
  }
  wait_until(b, t, L, [&] { return w.gen != g; }, file, line);
  TSAN_ACQUIRE(&w.sync[g & 1]);
  return w.res[lane];
}

bool launch_check(const LaunchSpec& s) {
  read_env();
  const unsigned long long threads = (unsigned long long)s.block.x * s.block.y * s.block.z;
  std::string why;
  if (s.block.x == 0 || s.block.y == 0 || s.block.z == 0 || s.grid.x == 0 || s.grid.y == 0 || s.grid.z == 0)
    why = "a zero grid or block dimension";
  else if (threads > 1024 || s.block.x > 1024 || s.block.y > 1024 || s.block.z > 64)
    why = "more than 1024 threads per block (or block.y > 1024, block.z > 64)";
  else if (s.grid.x > 0x7fffffffu || s.grid.y > 65535 || s.grid.z > 65535)
    why = "grid.x > 2^31 - 1 or grid.y / grid.z > 65535";
  else if (s.smem > kDynamicSmemLimit)
    why = "dynamic shared memory " + std::to_string(s.smem) + " bytes > " + std::to_string(kDynamicSmemLimit);
  LaunchRecord rec{s.kernel, site(s.file, s.line), s.grid, s.block, s.smem, why.empty()};
  g_launches.push_back(rec);
  if (!why.empty()) {
    if (cfg.verbose) std::fprintf(stderr, "cuemu: launch of %s refused: %s\n", s.kernel, why.c_str());
    g_last_error = cudaErrorInvalidConfiguration;
    return false;
  }
  return true;
}

void run_grid(const LaunchSpec& s, void (*thunk)(void*), void* arg) {
  if (g_in_launch) {
    std::fprintf(stderr, "cuemu: nested launch (dynamic parallelism is not emulated)\n");
    std::abort();
  }
  g_in_launch = true;
  const unsigned nb = s.grid.x * s.grid.y * s.grid.z;
  std::vector<unsigned> order(nb);
  for (unsigned i = 0; i < nb; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng());  // blocks in a random order
  const int n = (int)(s.block.x * s.block.y * s.block.z);
  const int nw = (n + 31) / 32;
  std::vector<unsigned char> smem;
  for (unsigned bi : order) {
    static Block* blk = new Block;  // reused block after block (its thread records are large: ucontext_t)
    Block& b = *blk;
    b.n = n;
    b.threads = cfg.threads;
    b.thunk = thunk;
    b.arg = arg;
    b.spec = &s;
    b.live = n;
    b.waiting = 0;
    b.bar_arrived = 0;
    b.fault.clear();
    b.runnable.reset(n);
    b.cur = nullptr;
    if ((int)b.th.size() < n) b.th.resize(n);
    if ((int)b.w.size() < nw) b.w.resize(nw);
    for (int i = 0; i < nw; ++i) {
      Warp& w = b.w[i];
      w.exists = (i + 1) * 32 <= n ? 0xffffffffu : ((1u << (n - i * 32)) - 1u);
      w.exited = w.arrived = 0;
    }
    const uint3 bidx = make_uint3(bi % s.grid.x, (bi / s.grid.x) % s.grid.y, bi / (s.grid.x * s.grid.y));
    // dynamic shared memory: exactly the requested bytes (AddressSanitizer sees an overrun), poisoned with 0xff
    // (a float NaN) so that reading what no thread wrote shows; a canary tail catches overruns without ASan
#ifdef CUEMU_ASAN
    const size_t canary = 0;
#else
    const size_t canary = 64;
#endif
    smem.assign(s.smem + canary, 0xff);
    unsigned char* smem_p = s.smem + canary ? smem.data() : nullptr;
    if (canary) std::memset(smem_p + s.smem, 0xa5, canary);
    for (int i = 0; i < n; ++i) {
      Thread& t = b.th[i];
      t.st = kNotStarted;
      t.first_entry = false;
      t.wfile = nullptr;
      t.wline = 0;
      t.linear = i;
      t.lane = i % 32;
      t.warp = i / 32;
      t.ctx.tid = make_uint3(i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y));
      t.ctx.bid = bidx;
      t.ctx.bdim = s.block;
      t.ctx.gdim = s.grid;
      t.ctx.smem = smem_p;
    }
    tls_block = &b;
    if (b.threads)
      run_threads(b);
    else
      run_fibers(b);
    tls_block = nullptr;
    for (size_t i = 0; i < canary && b.fault.empty(); ++i)
      if (smem_p[s.smem + i] != 0xa5) b.fault = "dynamic shared memory written past its " + std::to_string(s.smem) +
                                                " bytes (block " + std::to_string(bi) + ")";
    if (!b.fault.empty()) {
      g_faults.push_back(std::string(s.kernel) + " (launched at " + site(s.file, s.line) + "): " + b.fault);
      g_last_error = cudaErrorLaunchFailure;
      break;  // the kernel is dead, as on a GPU
    }
  }
  g_in_launch = false;
}

}  // namespace cuemu

// ---- the CUDA runtime calls the launchers make --------------------------------------------------------------------
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = cuemu::sm_count(); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)cuemu::kDynamicSmemLimit; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;  // not emulated: a launcher that needs it must get a stub here
  }
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuemu::g_last_error_ref();
  cuemu::g_last_error_ref() = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return cuemu::g_last_error_ref(); }

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "cuda error (emulated)";
  }
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError (emulated)";
  }
}

}  // extern "C"

cudaError_t& cuemu::g_last_error_ref() { return g_last_error; }
