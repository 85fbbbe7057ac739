// Python bindings of the CPU kernels: argument checks (everything that could make a
// kernel touch memory it should not), the GIL released, and a call into the active
// variant (csrc/cpu/isa.cpp). The kernels themselves are plain C++ (kernels.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "isa.h"

namespace py = pybind11;

namespace imagen_fast {
namespace cpu {
namespace {

void check_dtype_activation(const std::string& fn, int dtype, int activation) {
  if (dtype < 0 || dtype > 3) throw std::invalid_argument(fn + ": unknown dtype code " + std::to_string(dtype));
  if (activation < 0 || activation > 2)
    throw std::invalid_argument(fn + ": unknown activation code " + std::to_string(activation));
}

// ------------------------------------------------------------------- group norm
void check_gn(const char* fn, int64_t N, int64_t C, int64_t S, int64_t G, int dtype, int activation) {
  if (N <= 0 || C <= 0 || S <= 0 || G <= 0)
    throw std::invalid_argument(std::string(fn) + ": N, C, S and G must be positive (got N=" + std::to_string(N) +
                                ", C=" + std::to_string(C) + ", S=" + std::to_string(S) +
                                ", G=" + std::to_string(G) + ")");
  if (C % G != 0) throw std::invalid_argument(std::string(fn) + ": G must divide C");
  check_dtype_activation(fn, dtype, activation);
}

void group_norm_fwd(uintptr_t x, uintptr_t y, uintptr_t mean, uintptr_t rstd, uintptr_t w, uintptr_t b,
                    uintptr_t s, uintptr_t sh, int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                    bool channels_last, int dtype, int activation, int threads) {
  check_gn("group_norm_fwd", N, C, S, G, dtype, activation);
  if (!x || !y || !mean || !rstd) throw std::invalid_argument("group_norm_fwd: x, y, mean and rstd are required");
  if (!(eps > 0.0)) throw std::invalid_argument("group_norm_fwd: eps must be > 0");
  const KernelTable& k = active_kernels();
  py::gil_scoped_release nogil;
  k.group_norm_fwd(x, y, mean, rstd, w, b, s, sh, N, C, S, G, eps, channels_last, dtype, activation, threads);
}

void group_norm_bwd(uintptr_t gy, uintptr_t x, uintptr_t mean, uintptr_t rstd, uintptr_t w, uintptr_t b,
                    uintptr_t s, uintptr_t sh, uintptr_t gx, uintptr_t gw, uintptr_t gb, uintptr_t gs,
                    uintptr_t gsh, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, int dtype,
                    int activation, int threads) {
  check_gn("group_norm_bwd", N, C, S, G, dtype, activation);
  if (!gy || !x || !mean || !rstd)
    throw std::invalid_argument("group_norm_bwd: grad_y, x, mean and rstd are required");
  const KernelTable& k = active_kernels();
  py::gil_scoped_release nogil;
  k.group_norm_bwd(gy, x, mean, rstd, w, b, s, sh, gx, gw, gb, gs, gsh, N, C, S, G, channels_last, dtype,
                   activation, threads);
}

// --------------------------------------------------------------------- rms norm
void check_rms(const char* fn, int64_t N, int64_t C, int64_t S, double eps, int dtype, int activation) {
  if (N <= 0 || C <= 0 || S <= 0)
    throw std::invalid_argument(std::string(fn) + ": N, C and S must be positive (got N=" + std::to_string(N) +
                                ", C=" + std::to_string(C) + ", S=" + std::to_string(S) + ")");
  if (!(eps > 0.0) || !std::isfinite(eps)) throw std::invalid_argument(std::string(fn) + ": eps must be finite and > 0");
  check_dtype_activation(fn, dtype, activation);
}

void rms_norm_fwd(uintptr_t x, uintptr_t y, uintptr_t rstd, uintptr_t w, uintptr_t s, uintptr_t sh, int64_t N,
                  int64_t C, int64_t S, double eps, bool channels_last, int dtype, int activation, int threads) {
  check_rms("channel_rms_norm_fwd", N, C, S, eps, dtype, activation);
  if (!x || !y || !rstd) throw std::invalid_argument("channel_rms_norm_fwd: x, y and rstd are required");
  const KernelTable& k = active_kernels();
  py::gil_scoped_release nogil;
  k.rms_norm_fwd(x, y, rstd, w, s, sh, N, C, S, eps, channels_last, dtype, activation, threads);
}

void rms_norm_bwd(uintptr_t gy, uintptr_t x, uintptr_t rstd, uintptr_t w, uintptr_t s, uintptr_t sh, uintptr_t gx,
                  uintptr_t gw, uintptr_t gs, uintptr_t gsh, int64_t N, int64_t C, int64_t S, double eps,
                  bool channels_last, int dtype, int activation, int threads) {
  check_rms("channel_rms_norm_bwd", N, C, S, eps, dtype, activation);
  if (!gy || !x || !rstd) throw std::invalid_argument("channel_rms_norm_bwd: grad_y, x and rstd are required");
  const KernelTable& k = active_kernels();
  py::gil_scoped_release nogil;
  k.rms_norm_bwd(gy, x, rstd, w, s, sh, gx, gw, gs, gsh, N, C, S, eps, channels_last, dtype, activation, threads);
}

// ----------------------------------------------------------------- thresholding
void check_sizes(const char* fn, int64_t N, int64_t L, int dtype, double p, double min_value) {
  if (N <= 0 || L <= 0)
    throw std::invalid_argument(std::string(fn) + ": N and L must be positive (got N=" + std::to_string(N) +
                                ", L=" + std::to_string(L) + ")");
  if (dtype < 0 || dtype > 3) throw std::invalid_argument(std::string(fn) + ": unknown dtype code " + std::to_string(dtype));
  if (!(p >= 0.0 && p <= 1.0)) throw std::invalid_argument(std::string(fn) + ": percentile must be in [0, 1]");
  if (!(min_value > 0.0) || !std::isfinite(min_value))
    throw std::invalid_argument(std::string(fn) + ": min_value must be finite and > 0");
}

void dynamic_threshold(uintptr_t x, uintptr_t y, int64_t N, int64_t L, int dtype, double percentile,
                       double min_value, double max_value, int threads) {
  check_sizes("dynamic_threshold", N, L, dtype, percentile, min_value);
  if (!(max_value > 0.0)) throw std::invalid_argument("dynamic_threshold: max_value must be > 0 (inf for none)");
  if (!x || !y) throw std::invalid_argument("dynamic_threshold: x and y are required");
  const KernelTable& k = active_kernels();
  py::gil_scoped_release nogil;
  k.dynamic_threshold(x, y, N, L, dtype, percentile, min_value, max_value, threads);
}

void sampler_step(uintptr_t z, uintptr_t cond, uintptr_t uncond, uintptr_t noise, uintptr_t out, uintptr_t coefs,
                  int64_t coef_stride, int64_t N, int64_t L, int dtype, double guidance_scale, int threshold,
                  double percentile, double min_value, int threads) {
  check_sizes("sampler_step", N, L, dtype, percentile, min_value);
  if (!z || !cond || !out || !coefs)
    throw std::invalid_argument("sampler_step: z_t, pred_cond, out and coefs are required");
  if (coef_stride != 0 && coef_stride != 5)
    throw std::invalid_argument("sampler_step: coef_stride must be 5 (a row per sample) or 0 (one row), got " +
                                std::to_string(coef_stride));
  if (threshold < 0 || threshold > 2) throw std::invalid_argument("sampler_step: threshold must be 0, 1 or 2");
  if (!std::isfinite(guidance_scale)) throw std::invalid_argument("sampler_step: guidance_scale must be finite");
  const KernelTable& k = active_kernels();
  py::gil_scoped_release nogil;
  k.sampler_step(z, cond, uncond, noise, out, coefs, coef_stride, N, L, dtype, guidance_scale, threshold, percentile,
                 min_value, threads);
}

py::tuple quantile_abs(uintptr_t x, int64_t N, int64_t L, int dtype, double percentile, int threads,
                       bool radix_only) {
  check_sizes("quantile_abs", N, L, dtype, percentile, 1.0);
  if (!x) throw std::invalid_argument("quantile_abs: x is required");
  std::vector<double> out(static_cast<size_t>(N));
  const KernelTable& k = active_kernels();
  {
    py::gil_scoped_release nogil;
    k.quantile_abs(x, N, L, dtype, percentile, threads, radix_only, out.data());
  }
  py::list l;
  for (double v : out) l.append(v);
  return py::tuple(l);
}

// -------------------------------------------------------------------- attention
void check_attention(const char* fn, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, double scale,
                     const std::vector<int64_t>& strides, size_t nstrides, int dtype) {
  if (B <= 0 || H <= 0 || Lq <= 0 || Lk <= 0 || D <= 0)
    throw std::invalid_argument(std::string(fn) + ": B, H, Lq, Lk and D must be positive");
  if (!(scale > 0.0) || !std::isfinite(scale)) throw std::invalid_argument(std::string(fn) + ": scale must be finite and > 0");
  if (strides.size() != nstrides)
    throw std::invalid_argument(std::string(fn) + ": strides must hold " + std::to_string(nstrides) + " values");
  for (int64_t st : strides)
    if (st < 0) throw std::invalid_argument(std::string(fn) + ": strides must be non-negative");
  if (dtype != 0 && dtype != 2 && dtype != 3)
    throw std::invalid_argument(std::string(fn) + ": dtype must be float32, float16 or bfloat16 (code " +
                                std::to_string(dtype) + ")");
}

void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out, uintptr_t lse, int64_t B,
                   int64_t H, int64_t Lq, int64_t Lk, int64_t D, double scale, const std::vector<int64_t>& strides,
                   int dtype, int threads) {
  check_attention("attention_fwd", B, H, Lq, Lk, D, scale, strides, 9, dtype);
  if (!q || !k || !v || !out) throw std::invalid_argument("attention_fwd: q, k, v and out are required");
  const KernelTable& t = active_kernels();
  py::gil_scoped_release nogil;
  t.attention_fwd(q, k, v, mask, out, lse, B, H, Lq, Lk, D, scale, strides.data(), dtype, threads);
}

void attention_bwd(uintptr_t grad_out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out,
                   uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, int64_t B, int64_t H, int64_t Lq,
                   int64_t Lk, int64_t D, double scale, const std::vector<int64_t>& strides, int dtype, int threads) {
  check_attention("attention_bwd", B, H, Lq, Lk, D, scale, strides, 12, dtype);
  if (!grad_out || !q || !k || !v || !out || !lse || !dq || !dk || !dv)
    throw std::invalid_argument("attention_bwd: grad_out, q, k, v, out, lse, dq, dk and dv are required");
  const KernelTable& t = active_kernels();
  py::gil_scoped_release nogil;
  t.attention_bwd(grad_out, q, k, v, mask, out, lse, dq, dk, dv, B, H, Lq, Lk, D, scale, strides.data(), dtype,
                  threads);
}

}  // namespace
}  // namespace cpu
}  // namespace imagen_fast

void register_cpu(py::module_& m) {
  using namespace imagen_fast::cpu;
  m.def("cpu_isa", []() { return std::string(active_kernels().name); },
        "The variant of the CPU kernels that runs: 'portable' or 'avx512'.");
  m.def("cpu_isa_flags", []() { return std::string(active_kernels().isa); },
        "The instruction sets the active variant was compiled for ('/'-separated).");
  m.def("set_cpu_isa", &set_isa,
        "Choose the CPU kernels' variant: 'auto' (the best this CPU runs), 'portable' or 'avx512'. "
        "Raises ValueError for an unknown name or a variant this module or CPU lacks.",
        py::arg("name"));
  m.def("cpu_isas", []() {
        py::dict d;
        for (const auto& kv : isa_status()) d[py::str(kv.first)] = kv.second;
        return d;
      },
        "Every variant of the CPU kernels: 'available' or why it is not.");
  m.def("group_norm_fwd", &group_norm_fwd,
        "GroupNorm + FiLM + activation forward on CPU buffers (data pointers). "
        "Writes y (x's dtype and layout) and mean/rstd (N, G) in float32 (float64 for float64).",
        py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("bias"),
        py::arg("scale"), py::arg("shift"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"),
        py::arg("eps"), py::arg("channels_last"), py::arg("dtype"), py::arg("activation"),
        py::arg("threads") = 0);
  m.def("group_norm_bwd", &group_norm_bwd,
        "GroupNorm + FiLM + activation backward on CPU buffers (data pointers; 0 = absent). "
        "Writes any of grad_x, grad_weight, grad_bias, grad_scale, grad_shift whose pointer is non-zero.",
        py::arg("grad_y"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("bias"),
        py::arg("scale"), py::arg("shift"), py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"),
        py::arg("grad_scale"), py::arg("grad_shift"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"),
        py::arg("channels_last"), py::arg("dtype"), py::arg("activation"), py::arg("threads") = 0);
  m.def("channel_rms_norm_fwd", &rms_norm_fwd,
        "Channel RMS norm + FiLM + activation forward on CPU buffers (data pointers). Writes y (x's dtype "
        "and layout) and rstd (N, S) in float32 (float64 for float64).",
        py::arg("x"), py::arg("y"), py::arg("rstd"), py::arg("weight"), py::arg("scale"), py::arg("shift"),
        py::arg("N"), py::arg("C"), py::arg("S"), py::arg("eps"), py::arg("channels_last"), py::arg("dtype"),
        py::arg("activation"), py::arg("threads") = 0);
  m.def("channel_rms_norm_bwd", &rms_norm_bwd,
        "Channel RMS norm + FiLM + activation backward on CPU buffers (data pointers; 0 = absent). Writes any "
        "of grad_x, grad_weight, grad_scale, grad_shift whose pointer is non-zero.",
        py::arg("grad_y"), py::arg("x"), py::arg("rstd"), py::arg("weight"), py::arg("scale"), py::arg("shift"),
        py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_scale"), py::arg("grad_shift"), py::arg("N"),
        py::arg("C"), py::arg("S"), py::arg("eps"), py::arg("channels_last"), py::arg("dtype"),
        py::arg("activation"), py::arg("threads") = 0);
  m.def("dynamic_threshold", &dynamic_threshold,
        "Per sample (N samples of L elements, any layout): s = min(max(quantile(|x|, percentile), min_value), "
        "max_value) with torch.quantile's linear interpolation, exact; y = clamp(x, -s, s) / s.",
        py::arg("x"), py::arg("y"), py::arg("N"), py::arg("L"), py::arg("dtype"), py::arg("percentile"),
        py::arg("min_value"), py::arg("max_value") = std::numeric_limits<double>::infinity(),
        py::arg("threads") = 0);
  m.def("sampler_step", &sampler_step,
        "Fused guided reverse-diffusion step: pred = uncond + w (cond - uncond) (cond if no uncond), "
        "x0 = a z + b pred, threshold (0 none, 1 static, 2 dynamic), out = c_x0 x0 + c_z z + c_noise noise. "
        "coefs: float64 [a, b, c_x0, c_z, c_noise], sample n's at coefs + n * coef_stride (5: (N, 5) "
        "contiguous; 0: one row for all). uncond and noise may be 0.",
        py::arg("z"), py::arg("cond"), py::arg("uncond"), py::arg("noise"), py::arg("out"), py::arg("coefs"),
        py::arg("coef_stride"), py::arg("N"), py::arg("L"), py::arg("dtype"), py::arg("guidance_scale"), py::arg("threshold"),
        py::arg("percentile"), py::arg("min_value"), py::arg("threads") = 0);
  m.def("attention_fwd", &attention_fwd,
        "Masked attention of short query sequences on CPU buffers (data pointers): out (B, H, Lq, D) contiguous "
        "in q's dtype and lse (B, H, Lq) float32 (or 0: not written); mask (B, Lk) bool or 0; strides: the (B, H, L) element "
        "strides of q, k, v (unit stride on D). A query with no valid key gets zeros and lse = -inf.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("out"), py::arg("lse"), py::arg("B"),
        py::arg("H"), py::arg("Lq"), py::arg("Lk"), py::arg("D"), py::arg("scale"), py::arg("strides"),
        py::arg("dtype"), py::arg("threads") = 0);
  m.def("attention_bwd", &attention_bwd,
        "Backward of attention_fwd: dq, dk, dv contiguous in q's dtype; strides: those of q, k, v, grad_out.",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("out"),
        py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("B"), py::arg("H"), py::arg("Lq"),
        py::arg("Lk"), py::arg("D"), py::arg("scale"), py::arg("strides"), py::arg("dtype"),
        py::arg("threads") = 0);
  m.def("quantile_abs", &quantile_abs,
        "Per-sample exact quantile of |x| (linear interpolation) as dynamic_threshold finds it: a tuple of N "
        "floats. radix_only skips the sampled estimate (tests the fallback path).",
        py::arg("x"), py::arg("N"), py::arg("L"), py::arg("dtype"), py::arg("percentile"), py::arg("threads") = 0,
        py::arg("radix_only") = false);
}
