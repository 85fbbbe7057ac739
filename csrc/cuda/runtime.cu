// CUDA runtime queries with every call checked.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "imagen_fast/cuda_api.h"
#include "imagen_fast/cuda_check.cuh"

namespace imagen_fast {
namespace cuda {

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  IF_CUDA_CHECK(err);
  return n;
}

DeviceInfo device_info(int device) {
  int n = device_count();
  if (device < 0 || device >= n) {
    throw std::invalid_argument("device must be in [0, " + std::to_string(n) + "), got " +
                                std::to_string(device));
  }
  cudaDeviceProp prop;
  IF_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceInfo info;
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  info.total_memory = prop.totalGlobalMem;
  info.shared_memory_per_block_optin = static_cast<int>(prop.sharedMemPerBlockOptin);
  info.l2_cache_bytes = prop.l2CacheSize;
  return info;
}

static std::string version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::string runtime_version() {
  int v = 0;
  IF_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return version_string(v);
}

std::string driver_version() {
  int v = 0;
  IF_CUDA_CHECK(cudaDriverGetVersion(&v));
  return v == 0 ? std::string("none") : version_string(v);
}

}  // namespace cuda
}  // namespace imagen_fast
