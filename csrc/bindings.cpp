// The pybind11 module imagen_fast._C. Tensors cross as data pointers, shapes and
// strides (and a CUDA stream for GPU kernels); torch is never linked, so the module
// builds in seconds with no torch headers and serves any torch version.
#include <pybind11/pybind11.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#ifdef IMAGEN_FAST_WITH_CUDA
void register_cuda(py::module_& m);
#endif
// CPU kernel families (csrc/cpu/*.cpp).
void register_cpu_group_norm(py::module_& m);
void register_cpu_threshold(py::module_& m);
void register_cpu_rms_norm(py::module_& m);

static py::dict build_info() {
  py::dict d;
  py::list isa;
#ifdef __AVX512F__
  isa.append("avx512f");
#endif
#ifdef __AVX512BF16__
  isa.append("avx512bf16");
#endif
#ifdef __AVX2__
  isa.append("avx2");
#endif
#ifdef __FMA__
  isa.append("fma");
#endif
#ifdef __F16C__
  isa.append("f16c");
#endif
#ifdef __ARM_NEON
  isa.append("neon");
#endif
  d["cpu_isa"] = isa;
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
  // CPU kernel families register themselves here (csrc/cpu/*.cpp).
  register_cpu_group_norm(m);
  register_cpu_threshold(m);
  register_cpu_rms_norm(m);
}
