// CUDA runtime queries with every call checked.
#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "imagen_fast/cuda_api.h"
#include "imagen_fast/cuda_check.cuh"
#include "imagen_fast/cuda_context.cuh"

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

const DeviceProps& device_props(int device) {
  static std::mutex mutex;
  static std::vector<DeviceProps> cache;
  static std::vector<bool> known;
  int n = device_count();
  if (n == 0) {
    throw std::runtime_error(
        "imagen_fast CUDA kernels need a CUDA device, but the CUDA runtime finds none "
        "(no GPU or no driver on this machine); use backend 'cpu' or 'torch'");
  }
  if (device < 0 || device >= n) {
    throw std::invalid_argument("device must be in [0, " + std::to_string(n) + "), got " +
                                std::to_string(device));
  }
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() < static_cast<size_t>(n)) {
    cache.resize(n);
    known.resize(n, false);
  }
  if (!known[device]) {
    DeviceProps p;
    auto attr = [device](cudaDeviceAttr a) {
      int v = 0;
      IF_CUDA_CHECK(cudaDeviceGetAttribute(&v, a, device));
      return v;
    };
    p.major = attr(cudaDevAttrComputeCapabilityMajor);
    p.minor = attr(cudaDevAttrComputeCapabilityMinor);
    p.multiprocessors = attr(cudaDevAttrMultiProcessorCount);
    p.max_threads_per_sm = attr(cudaDevAttrMaxThreadsPerMultiProcessor);
    p.regs_per_sm = attr(cudaDevAttrMaxRegistersPerMultiprocessor);
    p.smem_per_block_optin = attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    p.smem_per_sm = attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
    p.l2_bytes = attr(cudaDevAttrL2CacheSize);
    if (p.major < 8) {
      throw std::runtime_error("imagen_fast CUDA kernels are built for compute capability "
                               ">= 8.0 (sm_80, sm_90a); device " + std::to_string(device) +
                               " has " + std::to_string(p.major) + "." +
                               std::to_string(p.minor));
    }
    cache[device] = p;
    known[device] = true;
  }
  return cache[device];
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
