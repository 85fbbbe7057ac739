// The CPU kernels' entry points as plain C++ (data pointers, sizes, dtype / activation
// codes), one set per variant. csrc/cpu/bindings.cpp checks the arguments, releases the
// GIL and calls the set of the active variant (csrc/cpu/isa.cpp).
#pragma once

#include <cstdint>

namespace imagen_fast {
namespace cpu {

using GroupNormFwd = void(uintptr_t x, uintptr_t y, uintptr_t mean, uintptr_t rstd, uintptr_t w, uintptr_t b,
                          uintptr_t s, uintptr_t sh, int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                          bool channels_last, int dtype, int activation, int threads);
using GroupNormBwd = void(uintptr_t gy, uintptr_t x, uintptr_t mean, uintptr_t rstd, uintptr_t w, uintptr_t b,
                          uintptr_t s, uintptr_t sh, uintptr_t gx, uintptr_t gw, uintptr_t gb, uintptr_t gs,
                          uintptr_t gsh, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, int dtype,
                          int activation, int threads);
using RmsNormFwd = void(uintptr_t x, uintptr_t y, uintptr_t rstd, uintptr_t w, uintptr_t s, uintptr_t sh, int64_t N,
                        int64_t C, int64_t S, double eps, bool channels_last, int dtype, int activation, int threads);
using RmsNormBwd = void(uintptr_t gy, uintptr_t x, uintptr_t rstd, uintptr_t w, uintptr_t s, uintptr_t sh,
                        uintptr_t gx, uintptr_t gw, uintptr_t gs, uintptr_t gsh, int64_t N, int64_t C, int64_t S,
                        double eps, bool channels_last, int dtype, int activation, int threads);
using DynamicThreshold = void(uintptr_t x, uintptr_t y, int64_t N, int64_t L, int dtype, double percentile,
                              double min_value, double max_value, int threads);
using SamplerStep = void(uintptr_t z, uintptr_t cond, uintptr_t uncond, uintptr_t noise, uintptr_t out,
                         uintptr_t coefs, int64_t coef_stride, int64_t N, int64_t L, int dtype,
                         double guidance_scale, int threshold, double percentile, double min_value, int threads);
// Writes N doubles to out: the quantile of |x| per sample as dynamic_threshold finds it.
using QuantileAbs = void(uintptr_t x, int64_t N, int64_t L, int dtype, double percentile, int threads,
                         bool radix_only, double* out);

// strides: 12 element strides, (B, H, L) of q, k, v and (for the backward) grad_out.
using AttentionFwd = void(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out, uintptr_t lse,
                          int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, double scale,
                          const int64_t* strides, int dtype, int threads);
using AttentionBwd = void(uintptr_t grad_out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out,
                          uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, int64_t B, int64_t H,
                          int64_t Lq, int64_t Lk, int64_t D, double scale, const int64_t* strides, int dtype,
                          int threads);

struct KernelTable {
  const char* name;  // "portable" | "avx512"
  const char* isa;   // the instruction sets it was compiled for, "/"-separated
  GroupNormFwd* group_norm_fwd;
  GroupNormBwd* group_norm_bwd;
  RmsNormFwd* rms_norm_fwd;
  RmsNormBwd* rms_norm_bwd;
  DynamicThreshold* dynamic_threshold;
  SamplerStep* sampler_step;
  QuantileAbs* quantile_abs;
  AttentionFwd* attention_fwd;
  AttentionBwd* attention_bwd;
};

namespace portable {
const KernelTable& kernel_table();
}
namespace avx512 {
const KernelTable& kernel_table();
}

#ifdef IMAGEN_FAST_ISA_NS
// Inside a variant's sources: its entry points (defined in group_norm.cpp, rms_norm.cpp,
// threshold.cpp, attention.cpp; collected by variant.cpp).
namespace IMAGEN_FAST_ISA_NS {
GroupNormFwd group_norm_fwd;
GroupNormBwd group_norm_bwd;
RmsNormFwd rms_norm_fwd;
RmsNormBwd rms_norm_bwd;
DynamicThreshold dynamic_threshold;
SamplerStep sampler_step;
QuantileAbs quantile_abs;
AttentionFwd attention_fwd;
AttentionBwd attention_bwd;
}  // namespace IMAGEN_FAST_ISA_NS
#endif

}  // namespace cpu
}  // namespace imagen_fast
