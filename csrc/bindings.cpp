// The pybind11 module imagen_fast._C. Tensors cross as data pointers, shapes and
// strides (and a CUDA stream for GPU kernels); torch is never linked, so the module
// builds in seconds with no torch headers and serves any torch version.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#ifdef IMAGEN_FAST_WITH_CUDA
void register_cuda(py::module_& m);
#endif
// The CPU kernels' bindings (csrc/cpu/bindings.cpp).
void register_cpu(py::module_& m);

static py::dict build_info() {
  py::dict d;
  // The CPU kernels: the variant that runs now, its instruction sets, and every variant.
  d["cpu_kernels"] = std::string(imagen_fast::cpu::active_kernels().name);
  py::list isa;
  std::string flags = imagen_fast::cpu::active_kernels().isa;
  for (size_t p = 0; p <= flags.size();) {
    size_t e = flags.find('/', p);
    if (e == std::string::npos) e = flags.size();
    if (e > p) isa.append(flags.substr(p, e - p));
    p = e + 1;
  }
  d["cpu_isa"] = isa;
  py::dict variants;
  for (const auto& kv : imagen_fast::cpu::isa_status()) variants[py::str(kv.first)] = kv.second;
  d["cpu_kernel_variants"] = variants;
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
#ifdef IMAGEN_FAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(IMAGEN_FAST_CUDA_ARCHS);
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "imagen-fast compiled kernels (CPU always, CUDA when built with nvcc)";
  m.def("build_info", &build_info, "How this module was compiled.");
#ifdef IMAGEN_FAST_WITH_CUDA
  m.attr("HAS_CUDA") = true;
  register_cuda(m);
#else
  m.attr("HAS_CUDA") = false;
#endif
  register_cpu(m);
}
