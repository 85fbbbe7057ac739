// pybind11 wrappers of csrc/cuda's C++ API (compiled by the host compiler; nvcc never
// sees pybind11). Kernel arguments cross as a dict of plain values: device pointers
// as ints (tensor.data_ptr()), the torch stream as an int (stream.cuda_stream).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>

#include "imagen_fast/cuda_api.h"

namespace py = pybind11;

namespace {

namespace c = imagen_fast::cuda;

// Reads the dict's entries into fields; an unknown key is an error (a typo would
// otherwise silently keep a default).
class DictReader {
 public:
  DictReader(const py::dict& d, const char* what) : d_(d), what_(what) {}
  template <typename V> void get(const char* key, V& field) {
    seen_.insert(key);
    if (d_.contains(key)) {
      py::object v = d_[key];
      if (!v.is_none()) field = v.cast<V>();
    }
  }
  void ptr(const char* key, const void*& field) {
    std::uintptr_t v = 0;
    get(key, v);
    field = reinterpret_cast<const void*>(v);
  }
  void ptr(const char* key, void*& field) {
    std::uintptr_t v = 0;
    get(key, v);
    field = reinterpret_cast<void*>(v);
  }
  void finish() const {
    for (auto item : d_) {
      const std::string k = py::str(item.first);
      if (!seen_.count(k)) throw std::invalid_argument(std::string(what_) + ": unknown argument '" + k + "'");
    }
  }

 private:
  const py::dict& d_;
  const char* what_;
  std::set<std::string> seen_;
};

c::GroupNormArgs gn_args(const py::dict& d) {
  c::GroupNormArgs a;
  DictReader r(d, "group_norm_silu (cuda)");
  r.get("device", a.device);
  r.get("stream", a.stream);
  r.get("dtype", a.dtype);
  r.get("N", a.N);
  r.get("C", a.C);
  r.get("S", a.S);
  r.get("G", a.G);
  r.get("channels_last", a.channels_last);
  r.get("eps", a.eps);
  r.get("activation", a.activation);
  r.ptr("x", a.x);
  r.ptr("weight", a.weight);
  r.ptr("bias", a.bias);
  r.ptr("scale", a.scale);
  r.ptr("shift", a.shift);
  r.ptr("y", a.y);
  r.ptr("mean", a.mean);
  r.ptr("rstd", a.rstd);
  r.ptr("grad_y", a.grad_y);
  r.ptr("grad_x", a.grad_x);
  r.ptr("grad_weight", a.grad_weight);
  r.ptr("grad_bias", a.grad_bias);
  r.ptr("grad_scale", a.grad_scale);
  r.ptr("grad_shift", a.grad_shift);
  r.ptr("workspace", a.workspace);
  r.get("workspace_bytes", a.workspace_bytes);
  r.get("force_path", a.force_path);
  r.get("force_chunks", a.force_chunks);
  r.finish();
  return a;
}

c::ThresholdArgs thr_args(const py::dict& d) {
  c::ThresholdArgs a;
  DictReader r(d, "dynamic_threshold / sampler_step (cuda)");
  const void* coefs = nullptr;
  void* s_out = nullptr;
  r.get("device", a.device);
  r.get("stream", a.stream);
  r.get("dtype", a.dtype);
  r.get("N", a.N);
  r.get("L", a.L);
  r.get("percentile", a.percentile);
  r.get("min_value", a.min_value);
  r.get("max_value", a.max_value);
  r.ptr("x", a.x);
  r.ptr("z", a.z);
  r.ptr("cond", a.cond);
  r.ptr("uncond", a.uncond);
  r.ptr("noise", a.noise);
  r.ptr("coefs", coefs);
  r.get("guidance", a.guidance);
  r.get("threshold", a.threshold);
  r.ptr("out", a.out);
  r.ptr("s_out", s_out);
  r.ptr("workspace", a.workspace);
  r.get("workspace_bytes", a.workspace_bytes);
  r.get("force_ctas_per_sample", a.force_ctas_per_sample);
  r.finish();
  a.coefs = static_cast<const double*>(coefs);
  a.s_out = static_cast<double*>(s_out);
  return a;
}

// Planning for a hypothetical device: props = {"multiprocessors": ..., ...}.
bool props_from(const py::object& o, c::DeviceProps& p) {
  if (o.is_none()) return false;
  const py::dict d = o.cast<py::dict>();
  DictReader r(d, "device properties");
  r.get("major", p.major);
  r.get("minor", p.minor);
  r.get("multiprocessors", p.multiprocessors);
  r.get("max_threads_per_sm", p.max_threads_per_sm);
  r.get("regs_per_sm", p.regs_per_sm);
  r.get("smem_per_block_optin", p.smem_per_block_optin);
  r.get("smem_per_sm", p.smem_per_sm);
  r.get("l2_bytes", p.l2_bytes);
  r.finish();
  if (p.multiprocessors <= 0 || p.max_threads_per_sm <= 0) {
    throw std::invalid_argument("device properties need multiprocessors and max_threads_per_sm > 0");
  }
  return true;
}

py::dict gn_plan_dict(const c::GroupNormPlan& p) {
  py::dict d;
  d["path"] = p.path == 1 ? "onepass" : "split";
  d["vec"] = p.vec;
  d["items"] = p.items;
  d["threads"] = p.threads;
  d["lanes"] = p.lanes;
  d["chunks"] = p.chunks;
  d["owners_per_cta"] = p.owners_per_cta;
  d["chunk"] = p.chunk;
  d["workspace_bytes"] = p.workspace_bytes;
  return d;
}

}  // namespace

void register_cuda(py::module_& m) {
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

  m.def("cuda_group_norm_plan", [](const py::dict& d, bool backward, const py::object& props) {
    const c::GroupNormArgs a = gn_args(d);
    c::DeviceProps dp;
    const bool given = props_from(props, dp);
    return gn_plan_dict(c::group_norm_plan(a, backward, given ? &dp : nullptr));
  }, py::arg("args"), py::arg("backward"), py::arg("props") = py::none(),
     "Path ('onepass' or 'split'), geometry and workspace bytes of a group_norm_silu call.");
  m.def("cuda_group_norm_forward", [](const py::dict& d) {
    const c::GroupNormArgs a = gn_args(d);
    py::gil_scoped_release release;
    c::group_norm_forward(a);
  }, py::arg("args"));
  m.def("cuda_group_norm_backward", [](const py::dict& d) {
    const c::GroupNormArgs a = gn_args(d);
    py::gil_scoped_release release;
    c::group_norm_backward(a);
  }, py::arg("args"));

  m.def("cuda_threshold_plan", [](const py::dict& d, bool sampler, const py::object& props) {
    c::DeviceProps dp;
    const bool given = props_from(props, dp);
    const c::ThresholdPlan p = c::threshold_plan(thr_args(d), sampler, given ? &dp : nullptr);
    py::dict out;
    out["vec"] = p.vec;
    out["passes"] = p.passes;
    out["ctas_per_sample"] = p.ctas_per_sample;
    out["slice"] = p.slice;
    out["vec_scratch"] = p.vec_scratch;
    out["slice_scratch"] = p.slice_scratch;
    out["workspace_bytes"] = p.workspace_bytes;
    return out;
  }, py::arg("args"), py::arg("sampler"), py::arg("props") = py::none(),
     "Radix passes, CTAs per sample and workspace bytes of a threshold / sampler call.");
  m.def("cuda_dynamic_threshold", [](const py::dict& d) {
    const c::ThresholdArgs a = thr_args(d);
    py::gil_scoped_release release;
    c::dynamic_threshold(a);
  }, py::arg("args"));
  m.def("cuda_sampler_step", [](const py::dict& d) {
    const c::ThresholdArgs a = thr_args(d);
    py::gil_scoped_release release;
    c::sampler_step(a);
  }, py::arg("args"));
}
