// Helpers of the CPU kernels' pybind11 entry points: data pointers, and the runtime
// dtype / activation codes turned into template arguments.
#pragma once

#include <cstdint>
#include <type_traits>

#include "imagen_fast/common.h"

namespace imagen_fast {
namespace cpu {

template <typename P> inline P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

// Calls f(storage{}, accumulation{}) for a DType code (float16/bfloat16 accumulate in float).
template <typename F> void with_storage(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: f(float{}, float{}); break;
    case DType::Float64: f(double{}, double{}); break;
    case DType::Float16: f(Half{}, float{}); break;
    case DType::BFloat16: f(BFloat16{}, float{}); break;
  }
}

// Calls f(tag) with tag = Activation constant for the runtime code.
template <typename F> void with_activation(int activation, F&& f) {
  switch (static_cast<Activation>(activation)) {
    case Activation::SiLU: f(std::integral_constant<Activation, Activation::SiLU>{}); break;
    case Activation::GELU: f(std::integral_constant<Activation, Activation::GELU>{}); break;
    default: f(std::integral_constant<Activation, Activation::None>{}); break;
  }
}

}  // namespace cpu
}  // namespace imagen_fast
