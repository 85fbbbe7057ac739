// Turning CUDA errors into exceptions that name the error and the call site.
#pragma once

#include "imagen_fast/cuda_platform.cuh"

#include <stdexcept>
#include <string>

namespace imagen_fast {
namespace cuda {

inline void check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ") in " + what + " at " + file + ":" +
                             std::to_string(line));
  }
}

}  // namespace cuda
}  // namespace imagen_fast

#define IF_CUDA_CHECK(expr) ::imagen_fast::cuda::check((expr), #expr, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors surface here.
#define IF_CUDA_CHECK_LAUNCH() IF_CUDA_CHECK(cudaGetLastError())
