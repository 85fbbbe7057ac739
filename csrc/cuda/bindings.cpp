// pybind11 wrappers of csrc/cuda's C++ API (compiled by the host compiler).
#include <pybind11/pybind11.h>

#include "imagen_fast/cuda_api.h"

namespace py = pybind11;

void register_cuda(py::module_& m) {
  namespace c = imagen_fast::cuda;
  m.def("cuda_device_count", &c::device_count, "Visible CUDA devices (0 without driver).");
  m.def("cuda_runtime_version", &c::runtime_version);
  m.def("cuda_driver_version", &c::driver_version);
  m.def("cuda_device_info", [](int device) {
    c::DeviceInfo i = c::device_info(device);
    py::dict d;
    d["name"] = i.name;
    d["capability"] = py::make_tuple(i.major, i.minor);
    d["multiprocessors"] = i.multiprocessors;
    d["total_memory"] = i.total_memory;
    d["shared_memory_per_block_optin"] = i.shared_memory_per_block_optin;
    d["l2_cache_bytes"] = i.l2_cache_bytes;
    return d;
  }, py::arg("device"));
}
