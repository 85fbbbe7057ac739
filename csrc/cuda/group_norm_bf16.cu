// GroupNorm kernels instantiated for __nv_bfloat16 (one file per dtype: parallel builds).
#include "imagen_fast/cuda_group_norm_launch.cuh"

namespace imagen_fast {
namespace cuda {
namespace gn {

template GroupNormPlan plan_typed<__nv_bfloat16>(const GroupNormArgs&, bool, const DeviceProps*);
template void forward_typed<__nv_bfloat16>(const GroupNormArgs&);
template void backward_typed<__nv_bfloat16>(const GroupNormArgs&);

}  // namespace gn
}  // namespace cuda
}  // namespace imagen_fast
