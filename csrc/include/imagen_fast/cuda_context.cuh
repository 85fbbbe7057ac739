// Host-side context for launching kernels: cached device properties, a device guard,
// and the "is there a device at all" check that every entry point runs first.
#pragma once

#include <cstdint>
#include <utility>

#include "imagen_fast/cuda_api.h"
#include "imagen_fast/cuda_check.cuh"
#include "imagen_fast/cuda_platform.cuh"

namespace imagen_fast {
namespace cuda {

// Throws (naming the problem) unless `device` is a usable CUDA device; then returns
// its cached properties.
const DeviceProps& device_props(int device);

// Makes `device` current for the lifetime of the guard (kernels launch on the
// current device, which must own the stream they go to).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    IF_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      IF_CUDA_CHECK(cudaSetDevice(device));
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);  // best effort in a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// kernel<<<grid, block, 0, stream>>>(args...) and the launch check; under emulation
// the block's threads run as host fibers.
template <typename... KArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream,
                          Args&&... args) {
#ifdef IMAGEN_FAST_CUDA_EMULATION
  (void)stream;
  ::emu::launch(kernel, grid, block, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
  IF_CUDA_CHECK_LAUNCH();
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace imagen_fast
