// The entry-point table of one variant of the CPU kernels (see isa_begin.h).
#include "isa_begin.h"

namespace imagen_fast {
namespace cpu {
namespace IMAGEN_FAST_ISA_NS {

const KernelTable& kernel_table() {
  static const KernelTable table{
#define IF_STR2(x) #x
#define IF_STR(x) IF_STR2(x)
      IF_STR(IMAGEN_FAST_ISA_NS),
#if IMAGEN_FAST_ISA_AVX512
      IMAGEN_FAST_ISA_BF16 ? "avx512f/avx512bw/avx512dq/avx512vl/avx512bf16" : "avx512f/avx512bw/avx512dq/avx512vl",
#else
      // what the base flags give the portable variant
#if defined(__AVX2__) && defined(__FMA__)
      "avx2/fma",
#elif defined(__AVX__)
      "avx",
#elif defined(__ARM_NEON)
      "neon",
#elif defined(__SSE2__)
      "sse2",
#else
      "scalar",
#endif
#endif
      &group_norm_fwd, &group_norm_bwd, &rms_norm_fwd, &rms_norm_bwd, &dynamic_threshold, &sampler_step,
      &quantile_abs, &attention_fwd, &attention_bwd};
  return table;
}

}  // namespace IMAGEN_FAST_ISA_NS
}  // namespace cpu
}  // namespace imagen_fast

#include "isa_end.h"
