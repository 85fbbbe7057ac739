// GroupNorm kernels instantiated for float (one file per dtype: parallel builds).
#include "imagen_fast/cuda_group_norm_launch.cuh"

namespace imagen_fast {
namespace cuda {
namespace gn {

template GroupNormPlan plan_typed<float>(const GroupNormArgs&, bool, const DeviceProps*);
template void forward_typed<float>(const GroupNormArgs&);
template void backward_typed<float>(const GroupNormArgs&);

}  // namespace gn
}  // namespace cuda
}  // namespace imagen_fast
