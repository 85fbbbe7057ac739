// group_norm_silu entry points: dtype dispatch to the per-dtype instantiations
// (csrc/cuda/group_norm_<dtype>.cu); the kernels are in cuda_group_norm.cuh.
#include <stdexcept>
#include <string>

#include "imagen_fast/common.h"
#include "imagen_fast/cuda_api.h"
#include "imagen_fast/cuda_platform.cuh"

namespace imagen_fast {
namespace cuda {
namespace gn {

template <typename T> GroupNormPlan plan_typed(const GroupNormArgs&, bool, const DeviceProps*);
template <typename T> void forward_typed(const GroupNormArgs&);
template <typename T> void backward_typed(const GroupNormArgs&);

}  // namespace gn

namespace {

template <typename F>
auto by_dtype(int code, F&& f) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  throw std::invalid_argument("group_norm_silu (cuda): unsupported dtype code " + std::to_string(code));
}

}  // namespace

GroupNormPlan group_norm_plan(const GroupNormArgs& args, bool backward, const DeviceProps* props) {
  return by_dtype(args.dtype,
                  [&](auto t) { return gn::plan_typed<decltype(t)>(args, backward, props); });
}

void group_norm_forward(const GroupNormArgs& args) {
  by_dtype(args.dtype, [&](auto t) { gn::forward_typed<decltype(t)>(args); });
}

void group_norm_backward(const GroupNormArgs& args) {
  by_dtype(args.dtype, [&](auto t) { gn::backward_typed<decltype(t)>(args); });
}

}  // namespace cuda
}  // namespace imagen_fast
