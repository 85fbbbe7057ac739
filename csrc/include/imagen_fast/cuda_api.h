// The host-callable API of csrc/cuda (compiled by nvcc into a static library).
// Every function checks each CUDA call and throws std::runtime_error naming the
// CUDA error, which pybind11 turns into a Python RuntimeError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
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

// The device properties the launch heuristics use (queried once per device).
struct DeviceProps {
  int major = 0;
  int minor = 0;
  int multiprocessors = 0;
  int max_threads_per_sm = 0;
  int regs_per_sm = 0;
  int smem_per_block_optin = 0;
  int smem_per_sm = 0;
  int l2_bytes = 0;
};

// Number of visible devices; 0 (not an error) when there is no driver or device.
int device_count();
DeviceInfo device_info(int device);
std::string runtime_version();
std::string driver_version();

// ------------------------------------------------------------ group_norm_silu
// Pointers are device pointers (torch tensors' data_ptr()). x, y, grad_y, grad_x are
// of `dtype` (imagen_fast::DType code) and all share one layout: (N, C, S) contiguous or,
// with channels_last, (N, S, C). Parameters, statistics and parameter gradients are
// float32 (float64 when dtype is float64): weight, bias (C,); scale, shift (N, C);
// mean, rstd (N, G). Null pointers mean "absent" / "not needed".
struct GroupNormArgs {
  int device = 0;
  std::uintptr_t stream = 0;  // cudaStream_t of the current torch stream
  int dtype = 0;
  int64_t N = 0, C = 0, S = 0;
  int64_t G = 1;
  bool channels_last = false;
  double eps = 1e-5;
  int activation = 1;  // imagen_fast::Activation code
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* scale = nullptr;
  const void* shift = nullptr;
  void* y = nullptr;        // forward output
  void* mean = nullptr;     // forward: written; backward: read
  void* rstd = nullptr;
  const void* grad_y = nullptr;  // backward
  void* grad_x = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
  void* grad_scale = nullptr;
  void* grad_shift = nullptr;
  void* workspace = nullptr;  // device scratch allocated by the caller (torch)
  size_t workspace_bytes = 0;
  int force_path = 0;    // 0 automatic, 1 one-pass, 2 split
  int force_chunks = 0;  // split: chunks along the spatial axis (0 = automatic)
};

// How a call will run; the caller allocates workspace_bytes before running it.
struct GroupNormPlan {
  int path = 0;   // 1 one-pass, 2 split
  int vec = 1;    // elements per vector access
  int items = 0;  // one-pass: vectors per thread
  int threads = 0;
  int lanes = 0;
  int chunks = 1;  // split: CTAs along the spatial axis of each channel
  int owners_per_cta = 0;  // split: channel rows (contiguous) / vector columns per CTA
  int64_t chunk = 0;       // split: items (vectors or rows) per chunk
  size_t workspace_bytes = 0;
};

// `props` plans for a hypothetical device (no device needed); null queries args.device.
GroupNormPlan group_norm_plan(const GroupNormArgs& args, bool backward,
                              const DeviceProps* props = nullptr);
void group_norm_forward(const GroupNormArgs& args);
void group_norm_backward(const GroupNormArgs& args);

// ------------------------------------------------- dynamic threshold / sampler step
// Per sample n of N, the L elements at offset n*L (any dense layout: the per-sample
// block is contiguous). Thresholds s (per sample, float64) go to s_out when non-null.
struct ThresholdArgs {
  int device = 0;
  std::uintptr_t stream = 0;
  int dtype = 0;
  int64_t N = 0, L = 0;
  double percentile = 0.995;
  double min_value = 1.0;
  double max_value = std::numeric_limits<double>::infinity();  // s = min(max(quantile, min_value), max_value)
  // dynamic_threshold: out = clip(x, -s, s) / s
  const void* x = nullptr;
  // sampler_step: x0 = a z + b pred, pred = uncond + w (cond - uncond) (or cond),
  // threshold x0, out = c_x0 x0 + c_z z + c_noise noise. coefs: device (N, 5) float64.
  const void* z = nullptr;
  const void* cond = nullptr;
  const void* uncond = nullptr;
  const void* noise = nullptr;
  const double* coefs = nullptr;
  double guidance = 1.0;
  int threshold = 2;  // 0 none, 1 static (clip to [-1, 1]), 2 dynamic
  void* out = nullptr;
  double* s_out = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int force_ctas_per_sample = 0;  // 0 automatic
};

struct ThresholdPlan {
  int vec = 1;
  int passes = 0;            // radix passes (0 when no selection is needed)
  int ctas_per_sample = 1;
  int64_t slice = 0;         // vectors per CTA along a sample
  int vec_scratch = 1;       // sampler: vector width over its x0 buffer
  int64_t slice_scratch = 0;
  size_t workspace_bytes = 0;
};

ThresholdPlan threshold_plan(const ThresholdArgs& args, bool sampler,
                             const DeviceProps* props = nullptr);
void dynamic_threshold(const ThresholdArgs& args);
void sampler_step(const ThresholdArgs& args);

}  // namespace cuda
}  // namespace imagen_fast
