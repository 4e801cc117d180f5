// cuemu's runtime API for the test cases (the kernels only see cuemu.h): emulated SM count, schedule seed, the
// faults and launches of the last runs, device-memory registration for checked accesses.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cuemu.h"

namespace cuemu {

constexpr size_t kDynamicSmemLimit = 48 * 1024;  // without cudaFuncSetAttribute opt-in (not emulated)

struct LaunchRecord {
  std::string kernel, site;  // kernel expression as written at the launch, file:line of the launch
  dim3 grid, block;
  size_t smem;
  bool ran;  // false: refused by the launch checks (cudaGetLastError says why)
};

void set_sm_count(int sms);  // what cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount) returns (default 2)
int sm_count();
void set_seed(uint64_t seed);  // thread and block schedules (CUEMU_SEED sets the first one)
bool threads_mode();           // OS threads per CUDA thread (default under ThreadSanitizer; CUEMU_THREADS=1)
std::vector<std::string> take_faults();     // faults since the last call (each stops its kernel)
std::vector<LaunchRecord> take_launches();  // launches since the last call
uint64_t ldg_count();                       // __ldg calls so far
void register_device_memory(const void* p, size_t bytes);
void unregister_device_memory(const void* p);
cudaError_t& g_last_error_ref();

}  // namespace cuemu
