// GroupNorm + FiLM + activation kernels (forward and backward), templated on the
// storage type T, the vector width VEC (16 bytes of T, or 1 where a shape or a pointer
// does not allow 16-byte access) and the layout (CL = channels-last).
//
// Notation: x is (N, C, S) contiguous or (N, S, C) channels-last, G groups of D = C/G
// channels, a group holds M = D*S elements. Per channel c of sample n:
//   alpha = rstd * w_c * (1 + scale_nc),  beta = b_c * (1 + scale_nc) + shift_nc
//   h = (x - mean) * alpha + beta,  y = act(h)
// Backward, with dh = dy * act'(h), xhat = (x - mean) * rstd and per-(n, c) sums
//   P = sum_s dh,  Q = sum_s dh * xhat:
//   grad_shift = P, grad_scale = w Q + b P, grad_bias = sum_n (1+scale) P,
//   grad_weight = sum_n (1+scale) Q,
//   grad_x = dh * alpha + xhat * c2 + c3 with, per group,
//   c2 = -rstd/M sum_c w_c (1+scale_nc) Q_nc,  c3 = -rstd/M sum_c w_c (1+scale_nc) P_nc.
//
// Two paths (chosen in cuda_group_norm_launch.cuh):
// * one-pass: one CTA per (n, g) keeps the whole group in registers: statistics
//   (exact two-pass mean / M2 on chip) and output in one read of x (forward), one read
//   of x and dy (backward);
// * split: per-(n, c) partial statistics over chunks of the spatial axis (many CTAs per
//   group), merged in a fixed order by a small finalize kernel, then an elementwise
//   apply kernel. Used when N*G CTAs would not fill the GPU or a group does not fit.
//
// Thread mapping of a group (one-pass) or of a tile (split): a thread owns one channel
// "owner" and walks the other axis with its items:
//   contiguous: owner = channel row of S/VEC vectors; lanes walk the row.
//   channels-last: owner = a VEC-wide column of channels; lanes walk the S rows.
// So per-channel parameters stay in registers and per-channel sums are per-thread
// sums followed by a fixed-order reduction over the owner's lanes.
#pragma once

#include "imagen_fast/cuda_device.cuh"

namespace imagen_fast {
namespace cuda {
namespace gn {

constexpr int kSplitThreads = 256;
constexpr int kApplyThreads = 256;
constexpr int kApplyUnroll = 4;
constexpr int kBwdOnePassThreads = 512;   // max block of the one-pass backward
constexpr int kBwdOnePassMaxD = 1024;      // channels per group it can hold
// Largest register tile of the one-pass backward: 8 items of x and dy, 4 for 8-byte types
// (float64 at 8 items spilled under the 128-register cap of a 512-thread block).
template <typename T> constexpr int bwd_onepass_max_items() { return sizeof(T) == 8 ? 4 : 8; }

// Second argument of __launch_bounds__ (minimum resident blocks per SM): 1 lets ptxas use
// the whole register budget of the block (128 a thread at 512 threads); 0 is no hint, and
// ptxas then trades registers for occupancy. Without the hint, nvcc 13.0 spilled 4-32 B in
// the one-pass backward holding 128 B or more of x and dy a thread (16-bit 8x8
// channels-last, fp32 4x4) and in float64 kernels; with it, none spill. Kernels holding less
// keep no hint, so they keep two resident 512-thread blocks.
template <bool FULL> constexpr int full_budget_if() { return FULL ? 1 : 0; }

template <typename A> struct Params {
  const void* x;
  void* y;
  const void* gy;
  void* gx;
  const A* weight;
  const A* bias;
  const A* scale;
  const A* shift;
  A* mean;   // forward: written; backward: read
  A* rstd;
  A* gweight;
  A* gbias;
  A* gscale;
  A* gshift;
  int64_t N, C, S;
  int G, D;
  A eps;
  int act;
  // geometry
  int lanes;            // threads per owner
  int owners_per_cta;   // split: owners in one CTA
  int K;                // split: chunks along the item axis
  int64_t chunk;        // split: items per chunk
  // workspace
  A* partial;
  A* alpha;
  A* beta;
  A* c2;
  A* c3;
  A* ptot;
  A* qtot;
};

template <typename A> struct ChanCoef {
  A alpha, beta, wf;
};

template <typename A>
__device__ __forceinline__ ChanCoef<A> chan_coef(const Params<A>& p, int64_t n, int64_t c, A rstd) {
  const A w = p.weight ? p.weight[c] : A(1);
  const A b = p.bias ? p.bias[c] : A(0);
  const A s = p.scale ? A(1) + p.scale[n * p.C + c] : A(1);
  const A sh = p.shift ? p.shift[n * p.C + c] : A(0);
  ChanCoef<A> r;
  r.wf = w * s;
  r.alpha = rstd * r.wf;
  r.beta = b * s + sh;
  return r;
}

// Where a thread's items lie inside one group (one-pass kernels).
struct GroupMap {
  int owners, lanes, extent;  // extent: items along the walked axis
  int o, l;
  bool active;
  int64_t base;         // element offset of item 0
  int64_t item_stride;  // elements between consecutive items
};

template <bool CL, int VEC, typename A>
__device__ __forceinline__ GroupMap group_map(const Params<A>& p, int64_t n, int g) {
  GroupMap m;
  const int tid = threadIdx.x;
  m.lanes = p.lanes;
  if (CL) {
    m.owners = p.D / VEC;
    m.extent = static_cast<int>(p.S);
    m.o = tid % m.owners;
    m.l = tid / m.owners;
    m.active = m.l < m.lanes;
    m.base = n * p.S * p.C + static_cast<int64_t>(m.l) * p.C + static_cast<int64_t>(g) * p.D +
             static_cast<int64_t>(m.o) * VEC;
    m.item_stride = static_cast<int64_t>(m.lanes) * p.C;
  } else {
    m.owners = p.D;
    m.extent = static_cast<int>(p.S / VEC);
    m.o = tid / m.lanes;
    m.l = tid % m.lanes;
    m.active = m.o < m.owners;
    m.base = (n * p.C + static_cast<int64_t>(g) * p.D + m.o) * p.S + static_cast<int64_t>(m.l) * VEC;
    m.item_stride = static_cast<int64_t>(m.lanes) * VEC;
  }
  return m;
}

// How many of a thread's ITEMS items lie inside the group: item it sits at position
// l + it * lanes of the walked axis, so the valid ones are a prefix. One count instead of
// a flag per item keeps the one-pass kernels inside their register budget.
template <int ITEMS>
__device__ __forceinline__ int valid_items(const GroupMap& m) {
  if (!m.active || m.l >= m.extent) return 0;
  return min(ITEMS, (m.extent - m.l + m.lanes - 1) / m.lanes);
}

// ----------------------------------------------------------------- forward
// Largest block of the one-pass forward: 1024 threads leave 64 registers a thread, too
// few for channels-last's VEC channels of alpha/beta next to the data.
template <int ITEMS, bool CL> constexpr int fwd_onepass_max_threads() {
  return ITEMS <= 4 && !CL ? 1024 : 512;
}

template <typename T, int VEC, int ITEMS, bool CL>
__global__ void __launch_bounds__(fwd_onepass_max_threads<ITEMS, CL>())
fwd_onepass_kernel(Params<acc_t<T>> p) {
  using A = acc_t<T>;
  constexpr int NCH = CL ? VEC : 1;
  __shared__ A scratch[33];
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / p.G;
  const int g = static_cast<int>(ng % p.G);
  const GroupMap m = group_map<CL, VEC>(p, n, g);
  const T* x = static_cast<const T*>(p.x);

  Packed<T, VEC> v[ITEMS];
  const int nok = valid_items<ITEMS>(m);
  A sum = A(0);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (it < nok) v[it] = load_packed<T, VEC>(x + m.base + it * m.item_stride);
  }
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (it < nok) {
      A f[VEC];
      unpack<T, VEC>(v[it], f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += f[j];
    }
  }
  const A count = static_cast<A>(p.D) * static_cast<A>(p.S);
  const A mean = block_sum(sum, scratch) / count;
  A m2 = A(0);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (it < nok) {
      A f[VEC];
      unpack<T, VEC>(v[it], f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A d = f[j] - mean;
        m2 += d * d;
      }
    }
  }
  m2 = block_sum(m2, scratch);
  const A rstd = rsqrt_acc(m2 / count + p.eps);
  if (threadIdx.x == 0) {
    p.mean[ng] = mean;
    p.rstd[ng] = rstd;
  }
  if (!m.active) return;

  A alpha[NCH], beta[NCH];
#pragma unroll
  for (int q = 0; q < NCH; ++q) {
    const int64_t c = static_cast<int64_t>(g) * p.D + (CL ? m.o * VEC + q : m.o);
    const ChanCoef<A> cc = chan_coef(p, n, c, rstd);
    alpha[q] = cc.alpha;
    beta[q] = cc.beta;
  }
  const Activation act = static_cast<Activation>(p.act);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (it < nok) {
      A out[VEC];
      unpack<T, VEC>(v[it], out);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int q = CL ? j : 0;
        out[j] = activate<A>((out[j] - mean) * alpha[q] + beta[q], act);
      }
      store_vec<T, VEC>(y + m.base + it * m.item_stride, out);
    }
  }
}

// Split path, step 1: per-(owner channel, chunk) partial sums.
//   forward (BWD = false): Welford (n, mean, M2) of x;
//   backward (BWD = true): (P, Q) = (sum dh, sum dh * xhat).
// Contiguous: blockIdx.x = block of owners_per_cta rows (n*C + c), blockIdx.y = chunk of
//   S/VEC vectors; partial index (n*C + c)*K + k.
// Channels-last: blockIdx.x = tile of owners_per_cta vector columns, blockIdx.y = chunk of
//   S rows, blockIdx.z = n; partial index (n*K + k)*C + c.
template <typename T, int VEC, bool CL, bool BWD>
__global__ void __launch_bounds__(kSplitThreads, full_budget_if<sizeof(T) == 8>()) split_reduce_kernel(Params<acc_t<T>> p) {
  using A = acc_t<T>;
  constexpr int NCH = CL ? VEC : 1;
  constexpr int NV = BWD ? 2 : 3;
  constexpr int B = kSplitThreads;
  constexpr int U = 4;  // items in flight per thread
  __shared__ A red[NV * NCH * B];
  const int tid = threadIdx.x;
  const int opc = p.owners_per_cta;
  const int lanes = p.lanes;
  const int k = blockIdx.y;
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.gy);

  int o_local, l;
  int64_t n, row_or_col;  // contiguous: row n*C + c; channels-last: vector column
  bool active;
  int64_t start, end, base, item_stride;
  if (CL) {
    o_local = tid % opc;
    l = tid / opc;
    n = blockIdx.z;
    row_or_col = static_cast<int64_t>(blockIdx.x) * opc + o_local;
    active = l < lanes && row_or_col < p.C / VEC;
    start = k * p.chunk;
    end = min(p.S, start + p.chunk);
    base = n * p.S * p.C + row_or_col * VEC;
    item_stride = p.C;
  } else {
    o_local = tid / lanes;
    l = tid % lanes;
    row_or_col = static_cast<int64_t>(blockIdx.x) * opc + o_local;
    n = row_or_col / p.C;
    active = o_local < opc && row_or_col < p.N * p.C;
    const int64_t V = p.S / VEC;
    start = k * p.chunk;
    end = min(V, start + p.chunk);
    base = row_or_col * p.S;
    item_stride = VEC;
  }

  // Per-thread accumulators.
  // A channels-last vector of VEC channels may straddle groups (only C % VEC == 0 is
  // required here), so each channel carries its own group's statistics.
  Welford<A> w[NCH];
  A P[NCH], Q[NCH];
  A mean[NCH], rstd[NCH], alpha[NCH], beta[NCH];
#pragma unroll
  for (int q = 0; q < NCH; ++q) {
    w[q] = Welford<A>{A(0), A(0), A(0)};
    P[q] = A(0);
    Q[q] = A(0);
    mean[q] = A(0);
    rstd[q] = A(0);
    alpha[q] = A(0);
    beta[q] = A(0);
  }
  if (BWD && active) {
    const int64_t c0 = CL ? row_or_col * VEC : row_or_col % p.C;
#pragma unroll
    for (int q = 0; q < NCH; ++q) {
      const int64_t ng = n * p.G + (c0 + q) / p.D;
      mean[q] = p.mean[ng];
      rstd[q] = p.rstd[ng];
      const ChanCoef<A> cc = chan_coef(p, n, c0 + q, rstd[q]);
      alpha[q] = cc.alpha;
      beta[q] = cc.beta;
    }
  }
  const Activation act = static_cast<Activation>(p.act);
  A cnt = A(0);  // channels-last Welford: one count for the thread's VEC channels

  if (active) {
    for (int64_t i0 = start + l; i0 < end; i0 += static_cast<int64_t>(lanes) * U) {
      A v[U][VEC], dv[U][VEC];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = i0 + static_cast<int64_t>(u) * lanes;
        ok[u] = i < end;
        if (ok[u]) {
          load_vec<T, VEC>(x + base + i * item_stride, v[u]);
          if (BWD) load_vec<T, VEC>(gy + base + i * item_stride, dv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        if (BWD) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int q = CL ? j : 0;
            const A xc = v[u][j] - mean[q];
            const A dh = dv[u][j] * activate_grad<A>(xc * alpha[q] + beta[q], act);
            P[q] += dh;
            Q[q] += dh * (xc * rstd[q]);
          }
        } else if (CL) {
          cnt += A(1);
          const A inv = A(1) / cnt;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A d = v[u][j] - w[j].mean;
            w[j].mean += d * inv;
            w[j].m2 += d * (v[u][j] - w[j].mean);
          }
        } else {
          A s = A(0);
#pragma unroll
          for (int j = 0; j < VEC; ++j) s += v[u][j];
          const A vm = s / A(VEC);
          A vm2 = A(0);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A d = v[u][j] - vm;
            vm2 += d * d;
          }
          w[0] = welford_merge(w[0], Welford<A>{A(VEC), vm, vm2});
        }
      }
    }
  }
  if (!BWD && CL) {
#pragma unroll
    for (int q = 0; q < NCH; ++q) w[q].n = cnt;
  }
#pragma unroll
  for (int q = 0; q < NCH; ++q) {
    if (BWD) {
      red[(q * NV + 0) * B + tid] = P[q];
      red[(q * NV + 1) * B + tid] = Q[q];
    } else {
      red[(q * NV + 0) * B + tid] = w[q].n;
      red[(q * NV + 1) * B + tid] = w[q].mean;
      red[(q * NV + 2) * B + tid] = w[q].m2;
    }
  }
  __syncthreads();

  // Reduce each owner channel over its lanes: one warp per channel, fixed order.
  const int lane = tid & 31, warp = tid >> 5;
  for (int oc = warp; oc < opc * NCH; oc += B / 32) {
    const int ol = oc / NCH, q = oc % NCH;
    const int64_t owner = static_cast<int64_t>(blockIdx.x) * opc + ol;
    if (CL ? owner >= p.C / VEC : owner >= p.N * p.C) continue;  // warp-uniform
    if (BWD) {
      A ps = A(0), qs = A(0);
      for (int ll = lane; ll < lanes; ll += 32) {
        const int t = CL ? ol + opc * ll : ol * lanes + ll;
        ps += red[(q * NV + 0) * B + t];
        qs += red[(q * NV + 1) * B + t];
      }
      ps = warp_sum(ps);
      qs = warp_sum(qs);
      if (lane == 0) {
        const int64_t idx = CL ? (n * p.K + k) * p.C + owner * VEC + q : owner * p.K + k;
        p.partial[idx * 2 + 0] = ps;
        p.partial[idx * 2 + 1] = qs;
      }
    } else {
      Welford<A> acc{A(0), A(0), A(0)};
      for (int ll = lane; ll < lanes; ll += 32) {
        const int t = CL ? ol + opc * ll : ol * lanes + ll;
        acc = welford_merge(acc, Welford<A>{red[(q * NV + 0) * B + t], red[(q * NV + 1) * B + t],
                                            red[(q * NV + 2) * B + t]});
      }
      acc = warp_welford(acc);
      if (lane == 0) {
        const int64_t idx = CL ? (n * p.K + k) * p.C + owner * VEC + q : owner * p.K + k;
        p.partial[idx * 3 + 0] = acc.n;
        p.partial[idx * 3 + 1] = acc.mean;
        p.partial[idx * 3 + 2] = acc.m2;
      }
    }
  }
}

// Split path, step 2 (forward): one warp per (n, g) merges the group's D*K partials in
// a fixed order, writes mean/rstd and the per-channel alpha/beta.
template <typename A, bool CL>
__global__ void __launch_bounds__(128) fwd_finalize_kernel(Params<A> p) {
  const int lane = threadIdx.x & 31;
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (ng >= p.N * p.G) return;  // whole warp
  const int64_t n = ng / p.G;
  const int64_t g = ng % p.G;
  const int64_t total = static_cast<int64_t>(p.D) * p.K;
  Welford<A> w{A(0), A(0), A(0)};
  for (int64_t i = lane; i < total; i += 32) {
    const int64_t idx = CL ? (n * p.K + i / p.D) * p.C + g * p.D + i % p.D
                           : (n * p.C + g * p.D) * p.K + i;
    w = welford_merge(w, Welford<A>{p.partial[idx * 3], p.partial[idx * 3 + 1],
                                    p.partial[idx * 3 + 2]});
  }
  w = warp_welford(w);
  const A count = static_cast<A>(p.D) * static_cast<A>(p.S);
  const A mean = w.mean;
  const A rstd = rsqrt_acc(w.m2 / count + p.eps);
  if (lane == 0) {
    p.mean[ng] = mean;
    p.rstd[ng] = rstd;
  }
  for (int cl = lane; cl < p.D; cl += 32) {
    const int64_t c = g * p.D + cl;
    const ChanCoef<A> cc = chan_coef(p, n, c, rstd);
    p.alpha[n * p.C + c] = cc.alpha;
    p.beta[n * p.C + c] = cc.beta;
  }
}

// Elementwise apply kernels: blockIdx.y (strided) is the sample, vectors of the sample
// are spread over blockIdx.x / threads. Contiguous: one channel per vector.
// Channels-last: VEC consecutive channels of one group per vector.
template <typename T, int VEC, bool CL, bool BWD>
__global__ void __launch_bounds__(kApplyThreads) apply_kernel(Params<acc_t<T>> p) {
  using A = acc_t<T>;
  const int64_t per_sample = p.C * p.S / VEC;
  const Activation act = static_cast<Activation>(p.act);
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.gy);
  T* out = static_cast<T*>(BWD ? p.gx : p.y);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kApplyThreads;
  for (int64_t n = blockIdx.y; n < p.N; n += gridDim.y) {
    const int64_t sample = n * p.C * p.S;
    for (int64_t i0 = static_cast<int64_t>(blockIdx.x) * kApplyThreads * kApplyUnroll + threadIdx.x;
         i0 < per_sample; i0 += step * kApplyUnroll) {
      A v[kApplyUnroll][VEC], dv[kApplyUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kApplyUnroll; ++u) {
        const int64_t i = i0 + static_cast<int64_t>(u) * kApplyThreads;
        if (i < per_sample) {
          load_vec<T, VEC>(x + sample + i * VEC, v[u]);
          if (BWD) load_vec<T, VEC>(gy + sample + i * VEC, dv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kApplyUnroll; ++u) {
        const int64_t i = i0 + static_cast<int64_t>(u) * kApplyThreads;
        if (i >= per_sample) continue;
        // 32-bit index maths (the planner keeps a sample below 2^31 elements): 64-bit
        // division costs several times more per vector. Channels-last vectors hold VEC
        // consecutive channels, possibly of two groups: the group advances in step.
        const int64_t e = i * VEC;
        const uint32_t e32 = static_cast<uint32_t>(e);
        const uint32_t D = static_cast<uint32_t>(p.D);
        const uint32_t c0 = CL ? e32 % static_cast<uint32_t>(p.C) : e32 / static_cast<uint32_t>(p.S);
        uint32_t g = c0 / D, r_in_g = c0 - g * D;
        const int64_t nc = n * p.C + c0;
        A mean = p.mean[n * p.G + g];
        A rstd = BWD ? p.rstd[n * p.G + g] : A(0);
        A c2 = BWD ? p.c2[n * p.G + g] : A(0);
        A c3 = BWD ? p.c3[n * p.G + g] : A(0);
        A r[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (CL && j > 0 && ++r_in_g == D) {
            r_in_g = 0;
            ++g;
            mean = p.mean[n * p.G + g];
            if (BWD) {
              rstd = p.rstd[n * p.G + g];
              c2 = p.c2[n * p.G + g];
              c3 = p.c3[n * p.G + g];
            }
          }
          const int64_t cj = CL ? nc + j : nc;
          const A alpha = p.alpha[cj], beta = p.beta[cj];
          const A xc = v[u][j] - mean;
          if (BWD) {
            const A dh = dv[u][j] * activate_grad<A>(xc * alpha + beta, act);
            r[j] = dh * alpha + (xc * rstd) * c2 + c3;
          } else {
            r[j] = activate<A>(xc * alpha + beta, act);
          }
        }
        store_vec<T, VEC>(out + sample + e, r);
      }
    }
  }
}

// ----------------------------------------------------------------- backward
// One-pass backward: one CTA per (n, g) holding x and dy of the group in registers.
// Writes grad_x, grad_scale, grad_shift and (for grad_weight / grad_bias) the
// per-(n, c) totals P, Q.
template <typename T, int VEC, int ITEMS, bool CL>
__global__ void __launch_bounds__(kBwdOnePassThreads, full_budget_if<sizeof(T) == 8 || 2 * ITEMS * VEC * sizeof(T) >= 128>())
bwd_onepass_kernel(Params<acc_t<T>> p) {
  using A = acc_t<T>;
  constexpr int NCH = CL ? VEC : 1;
  constexpr int B = kBwdOnePassThreads;
  __shared__ A red[2 * NCH * B];
  __shared__ A chP[kBwdOnePassMaxD];
  __shared__ A chQ[kBwdOnePassMaxD];
  __shared__ A group_sums[2];
  const int tid = threadIdx.x;
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / p.G;
  const int g = static_cast<int>(ng % p.G);
  const GroupMap m = group_map<CL, VEC>(p, n, g);
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.gy);
  const A mean = p.mean[ng];
  const A rstd = p.rstd[ng];
  const Activation act = static_cast<Activation>(p.act);

  A alpha[NCH], beta[NCH], P[NCH], Q[NCH];
#pragma unroll
  for (int q = 0; q < NCH; ++q) {
    alpha[q] = A(0);
    beta[q] = A(0);
    P[q] = A(0);
    Q[q] = A(0);
  }
  if (m.active) {
#pragma unroll
    for (int q = 0; q < NCH; ++q) {
      const int64_t c = static_cast<int64_t>(g) * p.D + (CL ? m.o * VEC + q : m.o);
      const ChanCoef<A> cc = chan_coef(p, n, c, rstd);
      alpha[q] = cc.alpha;
      beta[q] = cc.beta;
    }
  }
  Packed<T, VEC> v[ITEMS], dv[ITEMS];
  const int nok = valid_items<ITEMS>(m);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (it < nok) {
      v[it] = load_packed<T, VEC>(x + m.base + it * m.item_stride);
      dv[it] = load_packed<T, VEC>(gy + m.base + it * m.item_stride);
    }
  }
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (it < nok) {
      A xf[VEC], gf[VEC];
      unpack<T, VEC>(v[it], xf);
      unpack<T, VEC>(dv[it], gf);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int q = CL ? j : 0;
        const A xc = xf[j] - mean;
        const A d = gf[j] * activate_grad<A>(xc * alpha[q] + beta[q], act);
        P[q] += d;
        Q[q] += d * (xc * rstd);
      }
    }
  }
#pragma unroll
  for (int q = 0; q < NCH; ++q) {
    red[(q * 2 + 0) * B + tid] = P[q];
    red[(q * 2 + 1) * B + tid] = Q[q];
  }
  __syncthreads();
  const int lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  for (int ch = warp; ch < p.D; ch += nwarps) {
    const int o = CL ? ch / VEC : ch;
    const int q = CL ? ch % VEC : 0;
    A ps = A(0), qs = A(0);
    for (int ll = lane; ll < m.lanes; ll += 32) {
      const int t = CL ? o + m.owners * ll : o * m.lanes + ll;
      ps += red[(q * 2 + 0) * B + t];
      qs += red[(q * 2 + 1) * B + t];
    }
    ps = warp_sum(ps);
    qs = warp_sum(qs);
    if (lane == 0) {
      chP[ch] = ps;
      chQ[ch] = qs;
    }
  }
  __syncthreads();
  if (warp == 0) {
    A a = A(0), b = A(0);
    for (int ch = lane; ch < p.D; ch += 32) {
      const int64_t c = static_cast<int64_t>(g) * p.D + ch;
      const int64_t nc = n * p.C + c;
      const A w = p.weight ? p.weight[c] : A(1);
      const A bb = p.bias ? p.bias[c] : A(0);
      const A s = p.scale ? A(1) + p.scale[nc] : A(1);
      const A pc = chP[ch], qc = chQ[ch];
      a += w * s * pc;
      b += w * s * qc;
      if (p.ptot) {
        p.ptot[nc] = pc;
        p.qtot[nc] = qc;
      }
      if (p.gscale) p.gscale[nc] = w * qc + bb * pc;
      if (p.gshift) p.gshift[nc] = pc;
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      group_sums[0] = a;
      group_sums[1] = b;
    }
  }
  __syncthreads();
  if (!p.gx || !m.active) return;
  const A count = static_cast<A>(p.D) * static_cast<A>(p.S);
  const A c3 = -rstd * group_sums[0] / count;
  const A c2 = -rstd * group_sums[1] / count;
  T* gx = static_cast<T*>(p.gx);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (it < nok) {
      // dh is recomputed rather than kept: registers hold the raw 16-byte packs only.
      A xf[VEC], r[VEC];
      unpack<T, VEC>(v[it], xf);
      unpack<T, VEC>(dv[it], r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int q = CL ? j : 0;
        const A xc = xf[j] - mean;
        const A d = r[j] * activate_grad<A>(xc * alpha[q] + beta[q], act);
        r[j] = d * alpha[q] + (xc * rstd) * c2 + c3;
      }
      store_vec<T, VEC>(gx + m.base + it * m.item_stride, r);
    }
  }
}

// Split backward, step 2: one warp per (n, g): per-channel totals P, Q over the K
// chunks, grad_scale / grad_shift, the alpha/beta of the apply kernel and c2, c3.
template <typename A, bool CL>
__global__ void __launch_bounds__(128) bwd_finalize_kernel(Params<A> p) {
  const int lane = threadIdx.x & 31;
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (ng >= p.N * p.G) return;  // whole warp
  const int64_t n = ng / p.G;
  const int64_t g = ng % p.G;
  const A rstd = p.rstd[ng];
  A a = A(0), b = A(0);
  for (int cl = lane; cl < p.D; cl += 32) {
    const int64_t c = g * p.D + cl;
    const int64_t nc = n * p.C + c;
    A pc = A(0), qc = A(0);
    for (int k = 0; k < p.K; ++k) {
      const int64_t idx = CL ? (n * p.K + k) * p.C + c : nc * p.K + k;
      pc += p.partial[idx * 2];
      qc += p.partial[idx * 2 + 1];
    }
    const A w = p.weight ? p.weight[c] : A(1);
    const A bb = p.bias ? p.bias[c] : A(0);
    const ChanCoef<A> cc = chan_coef(p, n, c, rstd);
    p.alpha[nc] = cc.alpha;
    p.beta[nc] = cc.beta;
    if (p.ptot) {
      p.ptot[nc] = pc;
      p.qtot[nc] = qc;
    }
    if (p.gscale) p.gscale[nc] = w * qc + bb * pc;
    if (p.gshift) p.gshift[nc] = pc;
    a += cc.wf * pc;
    b += cc.wf * qc;
  }
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    const A count = static_cast<A>(p.D) * static_cast<A>(p.S);
    p.c3[ng] = -rstd * a / count;
    p.c2[ng] = -rstd * b / count;
  }
}

// grad_weight / grad_bias: a sum over samples of the per-(n, c) totals, one thread per
// channel, samples in order.
template <typename A>
__global__ void __launch_bounds__(256) param_grad_kernel(Params<A> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  A gw = A(0), gb = A(0);
  for (int64_t n = 0; n < p.N; ++n) {
    const A s = p.scale ? A(1) + p.scale[n * p.C + c] : A(1);
    gw += s * p.qtot[n * p.C + c];
    gb += s * p.ptot[n * p.C + c];
  }
  if (p.gweight) p.gweight[c] = gw;
  if (p.gbias) p.gbias[c] = gb;
}

}  // namespace gn
}  // namespace cuda
}  // namespace imagen_fast
