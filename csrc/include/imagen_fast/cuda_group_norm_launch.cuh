// Host side of the GroupNorm kernels: the plan (path, vector width, geometry,
// workspace) and the launches. Templated on the storage type; each dtype is
// instantiated in its own csrc/cuda/group_norm_<dtype>.cu so the build parallelises.
//
// Path heuristic (device properties queried once per device; not yet tuned on a GPU:
// benchmarks/bench_ops.py --device cuda times both paths forced next to the automatic choice):
// * one-pass when a group fits in one CTA's registers (at most 512 threads x 16
//   vectors of 16 bytes forward, 512 x 8 backward (x 4 for float64), whatever the channel count), N*G
//   CTAs cover at least every SM once, and, channels-last, a group's row of D channels
//   is at least one 32-byte sector of 16-byte vectors;
// * split otherwise: per-channel partial statistics over chunks of the spatial axis,
//   sized so the reduction launches about one full wave (SMs x resident 256-thread
//   CTAs) with at least 4 vectors per thread; channels-last vectorises whole rows of C.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "imagen_fast/cuda_api.h"
#include "imagen_fast/cuda_check.cuh"
#include "imagen_fast/cuda_context.cuh"
#include "imagen_fast/cuda_group_norm.cuh"

namespace imagen_fast {
namespace cuda {
namespace gn {

constexpr size_t kNone = std::numeric_limits<size_t>::max();

struct Geometry {
  GroupNormPlan plan;
  int opc = 1;          // split: owners per CTA
  int64_t chunk = 0;    // split: items per chunk
  dim3 reduce_grid;
  dim3 apply_grid;
  size_t off_partial = kNone, off_alpha = kNone, off_beta = kNone, off_c2 = kNone,
         off_c3 = kNone, off_ptot = kNone, off_qtot = kNone;
};

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline void check_args(const GroupNormArgs& a, bool bwd) {
  auto bad = [](const std::string& m) { throw std::invalid_argument("group_norm_silu (cuda): " + m); };
  if (a.N <= 0 || a.C <= 0 || a.S <= 0) bad("N, C and spatial size must be positive");
  if (a.G <= 0 || a.C % a.G != 0) bad("num_groups must be a positive divisor of C");
  if (a.N * a.G > std::numeric_limits<int>::max()) bad("N * num_groups is too large");
  if (a.C * a.S > std::numeric_limits<int>::max()) bad("a sample must have fewer than 2^31 elements");
  if (a.C / a.G > std::numeric_limits<int>::max() / 2) bad("channels per group is too large");
  if (a.channels_last && a.N > 65535) bad("channels-last inputs support N <= 65535");
  if (a.activation < 0 || a.activation > 2) bad("activation code must be 0, 1 or 2");
  if (!(a.eps > 0.0)) bad("eps must be > 0");
  if (!a.x || !a.mean || !a.rstd) bad("x, mean and rstd are required");
  if (!bwd && !a.y) bad("y is required");
  if (bwd && !a.grad_y) bad("grad_y is required");
  if (a.force_path < 0 || a.force_path > 2) bad("force_path must be 0, 1 or 2");
  if (a.force_chunks < 0) bad("force_chunks must be >= 0");
}

template <typename T>
Geometry make_geometry(const GroupNormArgs& a, bool bwd, const DeviceProps* props = nullptr) {
  using A = acc_t<T>;
  check_args(a, bwd);
  const DeviceProps& dp = props ? *props : device_props(a.device);
  constexpr int V16 = kVec16<T>;
  const int64_t D = a.C / a.G;
  const bool cl = a.channels_last;
  bool aligned = aligned16(a.x);
  if (bwd) {
    aligned = aligned && aligned16(a.grad_y) && (!a.grad_x || aligned16(a.grad_x));
  } else {
    aligned = aligned && aligned16(a.y);
  }
  // 16-byte vectors need whole vectors per thread: one-pass channels-last walks a
  // group's D channels, the split path whole rows of C channels.
  const int vec_onepass = aligned && (cl ? D % V16 == 0 : a.S % V16 == 0) ? V16 : 1;
  const int vec_split = aligned && (cl ? a.C % V16 == 0 : a.S % V16 == 0) ? V16 : 1;
  Geometry geo;
  GroupNormPlan& plan = geo.plan;
  int vec = vec_onepass;
  plan.vec = vec;

  // One-pass candidate: the smallest register tile that holds a group.
  const int64_t owners = cl ? D / vec : D;
  const int64_t extent = cl ? a.S : a.S / vec;
  const int items_fwd[2] = {4, 16};
  const int max_fwd[2] = {cl ? fwd_onepass_max_threads<4, true>() : fwd_onepass_max_threads<4, false>(),
                          fwd_onepass_max_threads<16, false>()};
  const int items_bwd[2] = {4, bwd_onepass_max_items<T>()}, max_bwd[2] = {kBwdOnePassThreads, kBwdOnePassThreads};
  int op_items = 0, op_threads = 0, op_lanes = 0;
  if (!bwd || D <= kBwdOnePassMaxD) {
    for (int i = 0; i < 2; ++i) {
      const int items = bwd ? items_bwd[i] : items_fwd[i];
      const int maxt = bwd ? max_bwd[i] : max_fwd[i];
      const int64_t lanes = ceil_div(extent, items);
      const int64_t threads = round_up(owners * lanes, 32);
      if (threads <= maxt) {
        op_items = items;
        op_threads = static_cast<int>(threads);
        op_lanes = static_cast<int>(lanes);
        break;
      }
    }
  }
  const bool fits = op_items > 0;
  if (a.force_path == 1 && !fits) {
    throw std::invalid_argument(
        "group_norm_silu (cuda): the one-pass path cannot hold a group of " +
        std::to_string(D * a.S) + " elements (" + std::to_string(D) +
        " channels) on chip; use the split path");
  }
  // Channels-last one-pass reads each row of a group as D contiguous channels: below a
  // 32-byte sector per row (or without 16-byte vectors) the split path, which reads
  // whole rows of C channels, moves fewer wasted bytes.
  const bool cl_rows_ok = !cl || (vec_onepass == V16 && D * static_cast<int64_t>(sizeof(T)) >= 32);
  const bool onepass = a.force_path == 1 ||
                       (a.force_path == 0 && fits && cl_rows_ok &&
                        a.N * a.G >= dp.multiprocessors);

  const int64_t resident = std::max(1, dp.max_threads_per_sm / kSplitThreads);
  const int64_t want = static_cast<int64_t>(dp.multiprocessors) * resident;
  size_t off = 0;
  auto take = [&off](int64_t count) {
    const size_t o = off;
    off = static_cast<size_t>(round_up(static_cast<int64_t>(off) + count * static_cast<int64_t>(sizeof(A)), 256));
    return o;
  };
  const int64_t NC = a.N * a.C;
  const bool param_grads = bwd && (a.grad_weight || a.grad_bias);

  if (onepass) {
    plan.path = 1;
    plan.items = op_items;
    plan.threads = op_threads;
    plan.lanes = op_lanes;
    plan.chunks = 1;
    geo.reduce_grid = dim3(static_cast<unsigned>(a.N * a.G));
    if (param_grads) {
      geo.off_ptot = take(NC);
      geo.off_qtot = take(NC);
    }
  } else {
    plan.path = 2;
    plan.threads = kSplitThreads;
    vec = vec_split;
    plan.vec = vec;
    int64_t lanes, opc, base, item_extent;
    if (!cl) {
      item_extent = a.S / vec;
      // Lanes per channel row: at least 4 vectors (one unrolled batch) per lane.
      lanes = std::min<int64_t>(kSplitThreads, pow2_ceil(ceil_div(item_extent, 4)));
      opc = kSplitThreads / lanes;
      base = ceil_div(NC, opc);
    } else {
      item_extent = a.S;
      const int64_t cv = a.C / vec;
      opc = std::min<int64_t>(cv, kSplitThreads);
      lanes = kSplitThreads / opc;
      base = a.N * ceil_div(cv, opc);
    }
    int64_t K;
    if (a.force_chunks > 0) {
      K = std::min<int64_t>(a.force_chunks, item_extent);
    } else {
      const int64_t max_k = std::max<int64_t>(1, item_extent / (lanes * 4));
      K = std::min(std::max<int64_t>(1, ceil_div(want, base)), max_k);
    }
    K = std::min<int64_t>(K, 65535);
    geo.chunk = ceil_div(item_extent, K);
    K = ceil_div(item_extent, geo.chunk);
    plan.chunks = static_cast<int>(K);
    plan.lanes = static_cast<int>(lanes);
    plan.owners_per_cta = static_cast<int>(opc);
    plan.chunk = geo.chunk;
    geo.opc = static_cast<int>(opc);
    if (!cl) {
      if (base > std::numeric_limits<int>::max()) {
        throw std::invalid_argument("group_norm_silu (cuda): N * C is too large");
      }
      geo.reduce_grid = dim3(static_cast<unsigned>(base), static_cast<unsigned>(K), 1);
    } else {
      geo.reduce_grid = dim3(static_cast<unsigned>(ceil_div(a.C / vec, opc)),
                             static_cast<unsigned>(K), static_cast<unsigned>(a.N));
    }
    const int64_t nv = bwd ? 2 : 3;
    geo.off_partial = take(NC * K * nv);
    geo.off_alpha = take(NC);
    geo.off_beta = take(NC);
    if (bwd) {
      geo.off_c2 = take(a.N * a.G);
      geo.off_c3 = take(a.N * a.G);
      if (param_grads) {
        geo.off_ptot = take(NC);
        geo.off_qtot = take(NC);
      }
    }
    const int64_t per_sample = a.C * a.S / vec;
    const int64_t ny = std::min<int64_t>(a.N, 65535);
    const int64_t nx = std::max<int64_t>(
        1, std::min(ceil_div(per_sample, int64_t(kApplyThreads) * kApplyUnroll),
                    ceil_div(4 * want, ny)));
    geo.apply_grid = dim3(static_cast<unsigned>(nx), static_cast<unsigned>(ny));
  }
  plan.workspace_bytes = off;
  return geo;
}

template <typename A>
Params<A> make_params(const GroupNormArgs& a, const Geometry& geo) {
  Params<A> p{};
  p.x = a.x;
  p.y = a.y;
  p.gy = a.grad_y;
  p.gx = a.grad_x;
  p.weight = static_cast<const A*>(a.weight);
  p.bias = static_cast<const A*>(a.bias);
  p.scale = static_cast<const A*>(a.scale);
  p.shift = static_cast<const A*>(a.shift);
  p.mean = static_cast<A*>(a.mean);
  p.rstd = static_cast<A*>(a.rstd);
  p.gweight = static_cast<A*>(a.grad_weight);
  p.gbias = static_cast<A*>(a.grad_bias);
  p.gscale = static_cast<A*>(a.grad_scale);
  p.gshift = static_cast<A*>(a.grad_shift);
  p.N = a.N;
  p.C = a.C;
  p.S = a.S;
  p.G = static_cast<int>(a.G);
  p.D = static_cast<int>(a.C / a.G);
  p.eps = static_cast<A>(a.eps);
  p.act = a.activation;
  p.lanes = geo.plan.lanes;
  p.owners_per_cta = geo.opc;
  p.K = geo.plan.chunks;
  p.chunk = geo.chunk;
  char* ws = static_cast<char*>(a.workspace);
  auto at = [ws](size_t off) { return off == kNone ? nullptr : reinterpret_cast<A*>(ws + off); };
  p.partial = at(geo.off_partial);
  p.alpha = at(geo.off_alpha);
  p.beta = at(geo.off_beta);
  p.c2 = at(geo.off_c2);
  p.c3 = at(geo.off_c3);
  p.ptot = at(geo.off_ptot);
  p.qtot = at(geo.off_qtot);
  return p;
}

inline void check_workspace(const GroupNormArgs& a, const Geometry& geo) {
  if (geo.plan.workspace_bytes > 0 &&
      (a.workspace == nullptr || a.workspace_bytes < geo.plan.workspace_bytes)) {
    throw std::invalid_argument("group_norm_silu (cuda): workspace of " +
                                std::to_string(geo.plan.workspace_bytes) + " bytes required, got " +
                                std::to_string(a.workspace_bytes));
  }
  if (a.workspace && !aligned16(a.workspace)) {
    throw std::invalid_argument("group_norm_silu (cuda): workspace must be 16-byte aligned");
  }
}

// Calls f(integral_constant<int, VEC>, bool_constant<CL>) for the runtime (vec, cl).
template <typename T, typename F>
void with_vec_layout(int vec, bool cl, F&& f) {
  constexpr int V16 = kVec16<T>;
  if (vec == V16) {
    if (cl) f(std::integral_constant<int, V16>{}, std::true_type{});
    else f(std::integral_constant<int, V16>{}, std::false_type{});
  } else {
    if (cl) f(std::integral_constant<int, 1>{}, std::true_type{});
    else f(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

template <typename T>
GroupNormPlan plan_typed(const GroupNormArgs& a, bool bwd, const DeviceProps* props) {
  return make_geometry<T>(a, bwd, props).plan;
}

template <typename T>
void forward_typed(const GroupNormArgs& a) {
  using A = acc_t<T>;
  const Geometry geo = make_geometry<T>(a, false);
  check_workspace(a, geo);
  DeviceGuard guard(a.device);
  cudaStream_t stream = as_stream(a.stream);
  const Params<A> p = make_params<A>(a, geo);
  const GroupNormPlan& plan = geo.plan;
  with_vec_layout<T>(plan.vec, a.channels_last, [&](auto vec_c, auto cl_c) {
    constexpr int VEC = decltype(vec_c)::value;
    constexpr bool CL = decltype(cl_c)::value;
    if (plan.path == 1) {
      if (plan.items == 4) {
        launch_kernel(fwd_onepass_kernel<T, VEC, 4, CL>, geo.reduce_grid, plan.threads, stream, p);
      } else {
        launch_kernel(fwd_onepass_kernel<T, VEC, 16, CL>, geo.reduce_grid, plan.threads, stream, p);
      }
      return;
    }
    launch_kernel(split_reduce_kernel<T, VEC, CL, false>, geo.reduce_grid, kSplitThreads, stream, p);
    const unsigned fin_blocks = static_cast<unsigned>(ceil_div(a.N * a.G, 4));
    launch_kernel(fwd_finalize_kernel<A, CL>, fin_blocks, 128, stream, p);
    launch_kernel(apply_kernel<T, VEC, CL, false>, geo.apply_grid, kApplyThreads, stream, p);
  });
}

template <typename T>
void backward_typed(const GroupNormArgs& a) {
  using A = acc_t<T>;
  const Geometry geo = make_geometry<T>(a, true);
  check_workspace(a, geo);
  DeviceGuard guard(a.device);
  cudaStream_t stream = as_stream(a.stream);
  const Params<A> p = make_params<A>(a, geo);
  const GroupNormPlan& plan = geo.plan;
  with_vec_layout<T>(plan.vec, a.channels_last, [&](auto vec_c, auto cl_c) {
    constexpr int VEC = decltype(vec_c)::value;
    constexpr bool CL = decltype(cl_c)::value;
    if (plan.path == 1) {
      if (plan.items == 4) {
        launch_kernel(bwd_onepass_kernel<T, VEC, 4, CL>, geo.reduce_grid, plan.threads, stream, p);
      } else {
        constexpr int kMaxItems = bwd_onepass_max_items<T>();
        launch_kernel(bwd_onepass_kernel<T, VEC, kMaxItems, CL>, geo.reduce_grid, plan.threads, stream, p);
      }
    } else {
      launch_kernel(split_reduce_kernel<T, VEC, CL, true>, geo.reduce_grid, kSplitThreads, stream, p);
      const unsigned fin_blocks = static_cast<unsigned>(ceil_div(a.N * a.G, 4));
      launch_kernel(bwd_finalize_kernel<A, CL>, fin_blocks, 128, stream, p);
      if (a.grad_x) {
        launch_kernel(apply_kernel<T, VEC, CL, true>, geo.apply_grid, kApplyThreads, stream, p);
      }
    }
    if (a.grad_weight || a.grad_bias) {
      launch_kernel(param_grad_kernel<A>, static_cast<unsigned>(ceil_div(a.C, 256)), 256, stream, p);
    }
  });
}

}  // namespace gn
}  // namespace cuda
}  // namespace imagen_fast
