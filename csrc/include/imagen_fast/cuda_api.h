// The host-callable API of csrc/cuda (compiled by nvcc into a static library).
// Every function checks each CUDA call and throws std::runtime_error naming the
// CUDA error, which pybind11 turns into a Python RuntimeError.
#pragma once

#include <string>

namespace imagen_fast {
namespace cuda {

struct DeviceInfo {
  std::string name;
  int major = 0;
  int minor = 0;
  int multiprocessors = 0;
  size_t total_memory = 0;
  int shared_memory_per_block_optin = 0;
  int l2_cache_bytes = 0;
};

// Number of visible devices; 0 (not an error) when there is no driver or device.
int device_count();
DeviceInfo device_info(int device);
std::string runtime_version();
std::string driver_version();

}  // namespace cuda
}  // namespace imagen_fast
