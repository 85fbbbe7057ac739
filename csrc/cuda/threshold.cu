// dynamic_threshold and sampler_step entry points: plan, workspace layout, launches.
// The kernels are in cuda_threshold.cuh.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "imagen_fast/cuda_api.h"
#include "imagen_fast/cuda_check.cuh"
#include "imagen_fast/cuda_context.cuh"
#include "imagen_fast/cuda_threshold.cuh"

namespace imagen_fast {
namespace cuda {
namespace thr {
namespace {

constexpr size_t kNone = std::numeric_limits<size_t>::max();

struct Geometry {
  ThresholdPlan plan;
  size_t off_hist = kNone, off_states = kNone, off_svals = kNone, off_scratch = kNone;
  size_t hist_bytes = 0;
};

void check_args(const ThresholdArgs& a, bool sampler) {
  const char* op = sampler ? "sampler_step (cuda): " : "dynamic_threshold (cuda): ";
  auto bad = [op](const std::string& m) { throw std::invalid_argument(op + m); };
  if (a.N <= 0 || a.L <= 0) bad("the input must not be empty");
  if (a.N > 65535) bad("at most 65535 samples per call");
  if (a.L >= (int64_t(1) << 32)) bad("at most 2^32 - 1 elements per sample");
  if (!(a.percentile >= 0.0 && a.percentile <= 1.0)) bad("percentile must be in [0, 1]");
  if (!(a.min_value > 0.0) || !std::isfinite(a.min_value)) bad("min_value must be finite and > 0");
  if (!(a.max_value > 0.0)) bad("max_value must be > 0 (infinity for none)");
  if (!a.out) bad("out is required");
  if (sampler) {
    if (!a.z || !a.cond || !a.coefs) bad("z_t, pred_cond and coefs are required");
    if (a.threshold < 0 || a.threshold > 2) bad("threshold code must be 0, 1 or 2");
    if (!std::isfinite(a.guidance)) bad("guidance_scale must be finite");
  } else if (!a.x) {
    bad("x0 is required");
  }
}

template <typename T>
Geometry make_geometry(const ThresholdArgs& a, bool sampler, const DeviceProps* props = nullptr) {
  using A = acc_t<T>;
  check_args(a, sampler);
  const DeviceProps& dp = props ? *props : device_props(a.device);
  constexpr int V16 = kVec16<T>;
  bool vec_ok = a.L % V16 == 0 && aligned16(a.out);
  if (sampler) {
    for (const void* ptr : {a.z, a.cond, a.uncond, a.noise}) vec_ok = vec_ok && (!ptr || aligned16(ptr));
  } else {
    vec_ok = vec_ok && aligned16(a.x);
  }
  Geometry geo;
  ThresholdPlan& plan = geo.plan;
  plan.vec = vec_ok ? V16 : 1;
  const bool select = !sampler || a.threshold == 2;
  plan.passes = select ? (sampler ? Digits<A>::kPasses : Digits<T>::kPasses) : 0;

  const int64_t want = static_cast<int64_t>(dp.multiprocessors) *
                       std::max(1, dp.max_threads_per_sm / kThreads);
  const int64_t nvec = a.L / plan.vec;
  int64_t cps = a.force_ctas_per_sample > 0
                    ? std::min<int64_t>(a.force_ctas_per_sample, nvec)
                    : std::min(std::max<int64_t>(1, ceil_div(want, a.N)), ceil_div(nvec, 2048));
  cps = std::max<int64_t>(1, std::min<int64_t>(cps, 1 << 20));
  plan.slice = ceil_div(nvec, cps);
  cps = ceil_div(nvec, plan.slice);
  plan.ctas_per_sample = static_cast<int>(cps);
  constexpr int VA = kVec16<A>;
  plan.vec_scratch = a.L % VA == 0 ? VA : 1;
  plan.slice_scratch = ceil_div(a.L / plan.vec_scratch, cps);

  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t o = off;
    off = static_cast<size_t>(round_up(static_cast<int64_t>(off + bytes), 256));
    return o;
  };
  if (select) {
    geo.hist_bytes = static_cast<size_t>(plan.passes) * a.N * 2 * kMaxBins * sizeof(unsigned);
    geo.off_hist = take(geo.hist_bytes);
    const size_t state_bytes = sampler ? sizeof(SelState<typename Radix<A>::Key>)
                                       : sizeof(SelState<typename Radix<T>::Key>);
    geo.off_states = take(static_cast<size_t>(plan.passes + 1) * a.N * state_bytes);
    geo.off_svals = take(static_cast<size_t>(a.N) * sizeof(double));
    if (sampler) geo.off_scratch = take(static_cast<size_t>(a.N * a.L) * sizeof(A));
  }
  plan.workspace_bytes = off;
  return geo;
}

Params make_params(const ThresholdArgs& a, const Geometry& geo) {
  Params p{};
  p.N = a.N;
  p.L = a.L;
  p.slice = geo.plan.slice;
  p.percentile = a.percentile;
  p.min_value = a.min_value;
  p.max_value = a.max_value;
  p.x = a.x;
  p.out = a.out;
  p.z = a.z;
  p.cond = a.cond;
  p.uncond = a.uncond;
  p.noise = a.noise;
  p.coefs = a.coefs;
  p.guidance = a.guidance;
  p.mode = a.threshold;
  p.s_out = a.s_out;
  char* ws = static_cast<char*>(a.workspace);
  auto at = [ws](size_t off) { return off == kNone ? nullptr : static_cast<void*>(ws + off); };
  p.hist = static_cast<unsigned*>(at(geo.off_hist));
  p.states = at(geo.off_states);
  p.svals = static_cast<double*>(at(geo.off_svals));
  p.scratch = at(geo.off_scratch);
  return p;
}

void check_workspace(const ThresholdArgs& a, const Geometry& geo, const char* op) {
  if (geo.plan.workspace_bytes > 0 &&
      (a.workspace == nullptr || a.workspace_bytes < geo.plan.workspace_bytes)) {
    throw std::invalid_argument(std::string(op) + " (cuda): workspace of " +
                                std::to_string(geo.plan.workspace_bytes) + " bytes required, got " +
                                std::to_string(a.workspace_bytes));
  }
  if (a.workspace && !aligned16(a.workspace)) {
    throw std::invalid_argument(std::string(op) + " (cuda): workspace must be 16-byte aligned");
  }
}

template <typename T, typename F>
void with_vec(int vec, F&& f) {
  if (vec == kVec16<T>) {
    f(std::integral_constant<int, kVec16<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

template <typename T>
void threshold_typed(const ThresholdArgs& a) {
  const Geometry geo = make_geometry<T>(a, false);
  check_workspace(a, geo, "dynamic_threshold");
  DeviceGuard guard(a.device);
  cudaStream_t stream = as_stream(a.stream);
  const Params p = make_params(a, geo);
  const dim3 grid(static_cast<unsigned>(geo.plan.ctas_per_sample), static_cast<unsigned>(a.N));
  IF_CUDA_CHECK(cudaMemsetAsync(p.hist, 0, geo.hist_bytes, stream));
  with_vec<T>(geo.plan.vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    for (int pass = 0; pass < geo.plan.passes; ++pass) {
      launch_kernel(radix_pass_kernel<T, VEC>, grid, kThreads, stream, p,
                    static_cast<const T*>(a.x), pass);
      launch_kernel(select_kernel<T>, static_cast<unsigned>(a.N), kThreads, stream, p, pass);
    }
    launch_kernel(threshold_apply_kernel<T, VEC>, grid, kThreads, stream, p);
  });
}

template <typename T>
void sampler_typed(const ThresholdArgs& a) {
  using A = acc_t<T>;
  const Geometry geo = make_geometry<T>(a, true);
  check_workspace(a, geo, "sampler_step");
  DeviceGuard guard(a.device);
  cudaStream_t stream = as_stream(a.stream);
  const Params p = make_params(a, geo);
  const dim3 grid(static_cast<unsigned>(geo.plan.ctas_per_sample), static_cast<unsigned>(a.N));
  if (geo.plan.passes > 0) IF_CUDA_CHECK(cudaMemsetAsync(p.hist, 0, geo.hist_bytes, stream));
  with_vec<T>(geo.plan.vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (geo.plan.passes > 0) {
      launch_kernel(sampler_x0_kernel<T, VEC>, grid, kThreads, stream, p);
      launch_kernel(select_kernel<A>, static_cast<unsigned>(a.N), kThreads, stream, p, 0);
      Params ps = p;
      ps.slice = geo.plan.slice_scratch;
      with_vec<A>(geo.plan.vec_scratch, [&](auto va_c) {
        constexpr int VA = decltype(va_c)::value;
        for (int pass = 1; pass < geo.plan.passes; ++pass) {
          launch_kernel(radix_pass_kernel<A, VA>, grid, kThreads, stream, ps,
                        static_cast<const A*>(p.scratch), pass);
          launch_kernel(select_kernel<A>, static_cast<unsigned>(a.N), kThreads, stream, p, pass);
        }
      });
    }
    launch_kernel(sampler_apply_kernel<T, VEC>, grid, kThreads, stream, p);
  });
}

template <typename F>
auto by_dtype(int code, const char* op, F&& f) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  throw std::invalid_argument(std::string(op) + " (cuda): unsupported dtype code " + std::to_string(code));
}

}  // namespace
}  // namespace thr

ThresholdPlan threshold_plan(const ThresholdArgs& args, bool sampler, const DeviceProps* props) {
  return thr::by_dtype(args.dtype, sampler ? "sampler_step" : "dynamic_threshold", [&](auto t) {
    return thr::make_geometry<decltype(t)>(args, sampler, props).plan;
  });
}

void dynamic_threshold(const ThresholdArgs& args) {
  thr::by_dtype(args.dtype, "dynamic_threshold", [&](auto t) { thr::threshold_typed<decltype(t)>(args); });
}

void sampler_step(const ThresholdArgs& args) {
  thr::by_dtype(args.dtype, "sampler_step", [&](auto t) { thr::sampler_typed<decltype(t)>(args); });
}

}  // namespace cuda
}  // namespace imagen_fast
