// GroupNorm kernels instantiated for double (one file per dtype: parallel builds).
#include "imagen_fast/cuda_group_norm_launch.cuh"

namespace imagen_fast {
namespace cuda {
namespace gn {

template GroupNormPlan plan_typed<double>(const GroupNormArgs&, bool, const DeviceProps*);
template void forward_typed<double>(const GroupNormArgs&);
template void backward_typed<double>(const GroupNormArgs&);

}  // namespace gn
}  // namespace cuda
}  // namespace imagen_fast
