// imagen_fast_cuda_emu: csrc/cuda's pybind11 API (csrc/cuda/bindings.cpp) over the
// kernels compiled for the host emulation, so CPU tests run the kernels' own source.
#include <pybind11/pybind11.h>

#include "imagen_fast/cuda_api.h"

namespace py = pybind11;

void register_cuda(py::module_& m);

namespace imagen_fast {
namespace cuda {
extern DeviceProps g_emulated_props;
}  // namespace cuda
}  // namespace imagen_fast

PYBIND11_MODULE(imagen_fast_cuda_emu, m) {
  m.doc() = "csrc/cuda kernels run by the host CUDA emulation (tests only)";
  m.attr("HAS_CUDA") = true;
  m.attr("EMULATED") = true;
  register_cuda(m);
  m.def("set_device_props", [](int multiprocessors, int max_threads_per_sm) {
    imagen_fast::cuda::g_emulated_props.multiprocessors = multiprocessors;
    imagen_fast::cuda::g_emulated_props.max_threads_per_sm = max_threads_per_sm;
  }, py::arg("multiprocessors"), py::arg("max_threads_per_sm"));
}
