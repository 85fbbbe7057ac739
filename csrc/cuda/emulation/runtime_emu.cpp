// The runtime entry points of csrc/cuda/runtime.cu for the CPU emulation build: one
// emulated device whose properties the tests set (the launch heuristics read them).
#include <stdexcept>
#include <string>

#include "imagen_fast/cuda_api.h"
#include "imagen_fast/cuda_context.cuh"

namespace imagen_fast {
namespace cuda {

DeviceProps g_emulated_props = [] {
  DeviceProps p;  // an H100 SXM by default
  p.major = 9;
  p.minor = 0;
  p.multiprocessors = 132;
  p.max_threads_per_sm = 2048;
  p.regs_per_sm = 65536;
  p.smem_per_block_optin = 232448;
  p.smem_per_sm = 233472;
  p.l2_bytes = 50 << 20;
  return p;
}();

int device_count() { return 1; }

const DeviceProps& device_props(int device) {
  if (device != 0) throw std::invalid_argument("the emulation has one device, 0");
  return g_emulated_props;
}

DeviceInfo device_info(int device) {
  const DeviceProps& p = device_props(device);
  DeviceInfo i;
  i.name = "CUDA emulation on the host";
  i.major = p.major;
  i.minor = p.minor;
  i.multiprocessors = p.multiprocessors;
  i.shared_memory_per_block_optin = p.smem_per_block_optin;
  i.l2_cache_bytes = p.l2_bytes;
  return i;
}

std::string runtime_version() { return "emulated"; }
std::string driver_version() { return "emulated"; }

}  // namespace cuda
}  // namespace imagen_fast
