// Dynamic thresholding and the fused sampler step: exact per-sample percentile of |x|
// by radix select over the bits of |x|, then clip/divide.
//
// For non-negative IEEE values the bit patterns order like the values, so the k-th
// smallest |x| is found digit by digit from the most significant bits (11 bits a pass
// at most: float 3 passes, half/bfloat16 2, double 6). Each pass counts, for the
// elements whose higher digits match the prefix found so far, how many fall in each
// digit bin: many CTAs per sample build shared-memory histograms (warp-aggregated
// atomics) and add them to a global histogram with integer atomics, so the counts,
// and hence the result, do not depend on scheduling. A one-CTA-per-sample select
// kernel then scans the bins and narrows the prefix. torch.quantile's linear
// interpolation needs the order statistics lo = floor(p (L-1)) and lo + 1; both are
// selected in the same passes (two prefixes; a second histogram only once they differ).
#pragma once

#include "imagen_fast/cuda_device.cuh"

namespace imagen_fast {
namespace cuda {
namespace thr {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kMaxBins = 2048;

template <typename KT> struct Radix;
template <> struct Radix<float> {
  using Key = unsigned int;
  static constexpr int kBits = 31;
  static __device__ __forceinline__ Key key(float v) { return __float_as_uint(v) & 0x7fffffffu; }
  static __device__ __forceinline__ double value(Key k) { return static_cast<double>(__uint_as_float(k)); }
};
template <> struct Radix<double> {
  using Key = unsigned long long;
  static constexpr int kBits = 63;
  static __device__ __forceinline__ Key key(double v) {
    return static_cast<Key>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
  }
  static __device__ __forceinline__ double value(Key k) { return __longlong_as_double(static_cast<long long>(k)); }
};
template <> struct Radix<__half> {
  using Key = unsigned int;
  static constexpr int kBits = 15;
  static __device__ __forceinline__ Key key(__half v) { return __half_as_ushort(v) & 0x7fffu; }
  static __device__ __forceinline__ double value(Key k) {
    return static_cast<double>(__half2float(__ushort_as_half(static_cast<unsigned short>(k))));
  }
};
template <> struct Radix<__nv_bfloat16> {
  using Key = unsigned int;
  static constexpr int kBits = 15;
  static __device__ __forceinline__ Key key(__nv_bfloat16 v) { return __bfloat16_as_ushort(v) & 0x7fffu; }
  static __device__ __forceinline__ double value(Key k) {
    return static_cast<double>(__bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(k))));
  }
};

// Digit layout: pass p covers bits [shift(p), shift(p) + width(p)).
template <typename KT> struct Digits {
  static constexpr int kBits = Radix<KT>::kBits;
  static constexpr int kPasses = (kBits + 10) / 11;
  static constexpr __host__ __device__ int width(int p) {
    return kBits / kPasses + (p < kBits % kPasses ? 1 : 0);
  }
  static constexpr __host__ __device__ int shift(int p) {
    int s = kBits;
    for (int q = 0; q <= p; ++q) s -= width(q);
    return s;
  }
};

// Selection state of one sample: for the low (t = 0) and high (t = 1) order statistic,
// the key bits found so far and the rank among the elements sharing them.
template <typename Key> struct SelState {
  Key prefix[2];
  long long k[2];
};

struct Params {
  int64_t N, L;      // samples, elements per sample
  int64_t slice;     // vectors per CTA along a sample
  double percentile, min_value, max_value;
  const void* x;     // dynamic_threshold input
  void* out;
  const void* z;     // sampler inputs
  const void* cond;
  const void* uncond;
  const void* noise;
  const double* coefs;
  double guidance;
  int mode;          // sampler: 0 none, 1 static, 2 dynamic
  unsigned* hist;    // [passes][N][2][kMaxBins]
  void* states;      // SelState<Key>[passes + 1][N]
  double* svals;     // [N] thresholds
  double* s_out;     // optional copy of svals for the caller
  void* scratch;     // sampler: x0 in the accumulation type, [N * L]
};

template <typename T, int N>
__device__ __forceinline__ void unpack_raw(const Packed<T, N>& pk, T (&out)[N]) {
  memcpy(out, &pk.raw, sizeof(pk.raw));
}

// Adds 1 to h[d] for each lane with take set; lanes with the same digit are merged
// into one atomic (a warp of equal values costs one atomic, not 32). All 32 lanes of
// the warp must call it.
__device__ __forceinline__ void add_aggregated(unsigned* h, unsigned d, bool take) {
  if (!__any_sync(kFullMask, take)) return;
  const unsigned tag = take ? d : 0xffffffffu;
  const unsigned peers = __match_any_sync(kFullMask, tag);
  if (take && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&h[d], __popc(peers));
}

template <typename Key> struct PassCtx {
  unsigned* h0;
  unsigned* h1;
  Key pre0, pre1;  // prefixes shifted down by hs
  int hs;          // bits above this pass's digit start at hs
  int shift;
  unsigned mask;
  bool split;

  __device__ __forceinline__ void add(Key key, bool valid) const {
    const unsigned d = static_cast<unsigned>(key >> shift) & mask;
    const Key high = key >> hs;
    add_aggregated(h0, d, valid && high == pre0);
    if (split) add_aggregated(h1, d, valid && high == pre1);
  }
};

template <typename KT>
__device__ __forceinline__ SelState<typename Radix<KT>::Key> initial_state(const Params& p) {
  const QuantileRank r = quantile_rank(p.percentile, p.L);
  SelState<typename Radix<KT>::Key> s;
  s.prefix[0] = s.prefix[1] = 0;
  s.k[0] = r.lo;
  s.k[1] = r.hi;
  return s;
}

template <typename KT>
__device__ __forceinline__ SelState<typename Radix<KT>::Key> load_state(const Params& p, int pass,
                                                                        int64_t n) {
  using Key = typename Radix<KT>::Key;
  if (pass == 0) return initial_state<KT>(p);
  return static_cast<const SelState<Key>*>(p.states)[pass * p.N + n];
}

// Prologue of a histogram pass: zero the shared bins, set up the matching context.
template <typename KT>
__device__ __forceinline__ PassCtx<typename Radix<KT>::Key> begin_pass(const Params& p, int pass,
                                                                       int64_t n, unsigned* sh) {
  using Key = typename Radix<KT>::Key;
  using Dg = Digits<KT>;
  const SelState<Key> st = load_state<KT>(p, pass, n);
  PassCtx<Key> c;
  c.shift = Dg::shift(pass);
  c.hs = c.shift + Dg::width(pass);
  c.mask = (1u << Dg::width(pass)) - 1u;
  c.pre0 = st.prefix[0] >> c.hs;
  c.pre1 = st.prefix[1] >> c.hs;
  c.split = st.prefix[0] != st.prefix[1];
  c.h0 = sh;
  c.h1 = sh + kMaxBins;
  const int nb = 1 << Dg::width(pass);
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    sh[b] = 0;
    sh[kMaxBins + b] = 0;
  }
  __syncthreads();
  return c;
}

template <typename KT>
__device__ __forceinline__ void end_pass(const Params& p, int pass, int64_t n, const unsigned* sh,
                                         bool split) {
  __syncthreads();
  const int nb = 1 << Digits<KT>::width(pass);
  unsigned* g = p.hist + ((static_cast<int64_t>(pass) * p.N + n) * 2) * kMaxBins;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    if (sh[b]) atomicAdd(&g[b], sh[b]);
    if (split && sh[kMaxBins + b]) atomicAdd(&g[kMaxBins + b], sh[kMaxBins + b]);
  }
}

// One histogram pass over a sample's elements of type KT (grid: CTAs along the sample
// x samples).
template <typename KT, int VEC>
__global__ void __launch_bounds__(kThreads) radix_pass_kernel(Params p, const KT* src, int pass) {
  using Key = typename Radix<KT>::Key;
  __shared__ unsigned sh[2 * kMaxBins];
  const int64_t n = blockIdx.y;
  const PassCtx<Key> ctx = begin_pass<KT>(p, pass, n, sh);
  const int64_t nvec = p.L / VEC;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.slice;
  const int64_t end = min(nvec, begin + p.slice);
  const KT* s = src + n * p.L;
  for (int64_t i0 = begin + threadIdx.x; i0 - threadIdx.x < end; i0 += kThreads * kUnroll) {
    Packed<KT, VEC> pk[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kThreads;
      ok[u] = i < end;
      if (ok[u]) pk[u] = load_packed<KT, VEC>(s + i * VEC);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      KT v[VEC];
      if (ok[u]) unpack_raw<KT, VEC>(pk[u], v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ctx.add(ok[u] ? Radix<KT>::key(v[j]) : Key(0), ok[u]);
    }
  }
  end_pass<KT>(p, pass, n, sh, ctx.split);
}

// Exclusive block scan of one value per thread (blockDim.x == kThreads).
__device__ __forceinline__ long long block_exclusive_scan(long long v, long long* warp_tot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  long long inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long up = __shfl_up_sync(kFullMask, inc, o);
    if (lane >= o) inc += up;
  }
  if (lane == 31) warp_tot[warp] = inc;
  __syncthreads();
  long long before = 0;
  for (int w = 0; w < warp; ++w) before += warp_tot[w];
  __syncthreads();
  return before + inc - v;
}

// After pass `pass`: find the digit bin of each order statistic, narrow the prefixes.
// After the last pass: s = lerp of the two order statistics, max(s, min_value), then
// min(s, max_value).
template <typename KT>
__global__ void __launch_bounds__(kThreads) select_kernel(Params p, int pass) {
  using Key = typename Radix<KT>::Key;
  using Dg = Digits<KT>;
  constexpr int kPer = kMaxBins / kThreads;
  __shared__ long long warp_tot[kThreads / 32];
  __shared__ unsigned found_digit[2];
  __shared__ long long found_rank[2];
  const int64_t n = blockIdx.x;
  const SelState<Key> st = load_state<KT>(p, pass, n);
  const bool split = st.prefix[0] != st.prefix[1];
  const int nb = 1 << Dg::width(pass);
  const unsigned* h = p.hist + ((static_cast<int64_t>(pass) * p.N + n) * 2) * kMaxBins;
  if (threadIdx.x < 2) {
    found_digit[threadIdx.x] = 0;
    found_rank[threadIdx.x] = 0;
  }
  __syncthreads();
  for (int t = 0; t < 2; ++t) {
    const unsigned* ht = (t == 1 && split) ? h + kMaxBins : h;
    unsigned cnt[kPer];
    long long local = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int b = threadIdx.x * kPer + i;
      cnt[i] = b < nb ? ht[b] : 0u;
      local += cnt[i];
    }
    const long long before = block_exclusive_scan(local, warp_tot);
    const long long k = st.k[t];
    if (k >= before && k < before + local) {
      long long c = before;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        if (k >= c && k < c + cnt[i]) {
          found_digit[t] = threadIdx.x * kPer + i;
          found_rank[t] = k - c;
        }
        c += cnt[i];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  SelState<Key> next;
  for (int t = 0; t < 2; ++t) {
    next.prefix[t] = st.prefix[t] | (static_cast<Key>(found_digit[t]) << Dg::shift(pass));
    next.k[t] = found_rank[t];
  }
  if (pass + 1 < Dg::kPasses) {
    static_cast<SelState<Key>*>(p.states)[(pass + 1) * p.N + n] = next;
    return;
  }
  const double lo = Radix<KT>::value(next.prefix[0]);
  const double hi = Radix<KT>::value(next.prefix[1]);
  const QuantileRank r = quantile_rank(p.percentile, p.L);
  // Rounded exactly like torch's below + (above - below) * frac (no fused multiply-add).
  double s = __dadd_rn(lo, __dmul_rn(__dsub_rn(hi, lo), r.frac));
  s = s > p.min_value ? s : p.min_value;
  s = s > p.max_value ? p.max_value : s;
  p.svals[n] = s;
  if (p.s_out) p.s_out[n] = s;
}

// y = clip(x, -s, s) / s.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) threshold_apply_kernel(Params p) {
  using A = acc_t<T>;
  const int64_t n = blockIdx.y;
  const A s = static_cast<A>(p.svals[n]);
  const int64_t nvec = p.L / VEC;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.slice;
  const int64_t end = min(nvec, begin + p.slice);
  const T* x = static_cast<const T*>(p.x) + n * p.L;
  T* y = static_cast<T*>(p.out) + n * p.L;
  for (int64_t i0 = begin + threadIdx.x; i0 < end; i0 += kThreads * kUnroll) {
    A v[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kThreads;
      if (i < end) load_vec<T, VEC>(x + i * VEC, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kThreads;
      if (i >= end) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[u][j] = fmin(fmax(v[u][j], -s), s) / s;
      store_vec<T, VEC>(y + i * VEC, v[u]);
    }
  }
}

// ----------------------------------------------------------------- sampler step
template <typename A> struct StepC {
  A a, b, c_x0, c_z, c_noise;
};

template <typename A> __device__ __forceinline__ StepC<A> step_coefs(const Params& p, int64_t n) {
  const double* c = p.coefs + n * 5;
  return StepC<A>{static_cast<A>(c[0]), static_cast<A>(c[1]), static_cast<A>(c[2]),
                  static_cast<A>(c[3]), static_cast<A>(c[4])};
}

// x0 = a z + b pred for VEC elements at vector index i of sample n.
template <typename T, int VEC>
__device__ __forceinline__ void predict_x0(const Params& p, const StepC<acc_t<T>>& k, int64_t off,
                                           acc_t<T> (&z)[VEC], acc_t<T> (&x0)[VEC]) {
  using A = acc_t<T>;
  load_vec<T, VEC>(static_cast<const T*>(p.z) + off, z);
  A c[VEC];
  load_vec<T, VEC>(static_cast<const T*>(p.cond) + off, c);
  if (p.uncond) {
    A u[VEC];
    load_vec<T, VEC>(static_cast<const T*>(p.uncond) + off, u);
    const A w = static_cast<A>(p.guidance);
#pragma unroll
    for (int j = 0; j < VEC; ++j) c[j] = u[j] + w * (c[j] - u[j]);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) x0[j] = k.a * z[j] + k.b * c[j];
}

// Accumulation-type arrays of N elements (N * sizeof(A) may exceed 16 bytes): 16-byte
// pieces where N allows, else elementwise.
template <typename A, int N>
__device__ __forceinline__ void load_acc(const A* src, A (&v)[N]) {
  constexpr int kPer = 16 / sizeof(A);
  if constexpr (N % kPer == 0) {
#pragma unroll
    for (int q = 0; q < N / kPer; ++q) {
      A part[kPer];
      load_vec<A, kPer>(src + q * kPer, part);
#pragma unroll
      for (int j = 0; j < kPer; ++j) v[q * kPer + j] = part[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = src[j];
  }
}

template <typename A, int N>
__device__ __forceinline__ void store_acc(A* dst, const A (&v)[N]) {
  constexpr int kPer = 16 / sizeof(A);
  if constexpr (N % kPer == 0) {
#pragma unroll
    for (int q = 0; q < N / kPer; ++q) {
      A part[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) part[j] = v[q * kPer + j];
      store_vec<A, kPer>(dst + q * kPer, part);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = v[j];
  }
}

// Dynamic thresholding, pass 0: compute x0 (kept in the scratch buffer for the later
// passes and the final step) and histogram the top digit of |x0|.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) sampler_x0_kernel(Params p) {
  using A = acc_t<T>;
  using Key = typename Radix<A>::Key;
  __shared__ unsigned sh[2 * kMaxBins];
  const int64_t n = blockIdx.y;
  const PassCtx<Key> ctx = begin_pass<A>(p, 0, n, sh);
  const StepC<A> k = step_coefs<A>(p, n);
  const int64_t nvec = p.L / VEC;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.slice;
  const int64_t end = min(nvec, begin + p.slice);
  A* scratch = static_cast<A*>(p.scratch) + n * p.L;
  for (int64_t i0 = begin + threadIdx.x; i0 - threadIdx.x < end; i0 += kThreads) {
    const bool ok = i0 < end;
    A z[VEC], x0[VEC];
    if (ok) {
      predict_x0<T, VEC>(p, k, n * p.L + i0 * VEC, z, x0);
      store_acc<A, VEC>(scratch + i0 * VEC, x0);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) ctx.add(ok ? Radix<A>::key(x0[j]) : Key(0), ok);
  }
  end_pass<A>(p, 0, n, sh, ctx.split);
}

// z_s = c_x0 * threshold(x0) + c_z * z + c_noise * noise. For mode 2, x0 comes from the
// scratch buffer and is clipped/divided by the selected s; otherwise it is computed
// here (mode 1 clips it to [-1, 1]).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) sampler_apply_kernel(Params p) {
  using A = acc_t<T>;
  const int64_t n = blockIdx.y;
  const StepC<A> k = step_coefs<A>(p, n);
  const A s = p.mode == 2 ? static_cast<A>(p.svals[n]) : A(1);
  const int64_t nvec = p.L / VEC;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.slice;
  const int64_t end = min(nvec, begin + p.slice);
  const A* scratch = static_cast<const A*>(p.scratch) + n * p.L;
  T* out = static_cast<T*>(p.out);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t off = n * p.L + i * VEC;
    A z[VEC], x0[VEC];
    if (p.mode == 2) {
      load_vec<T, VEC>(static_cast<const T*>(p.z) + off, z);
      load_acc<A, VEC>(scratch + i * VEC, x0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) x0[j] = fmin(fmax(x0[j], -s), s) / s;
    } else {
      predict_x0<T, VEC>(p, k, off, z, x0);
      if (p.mode == 1) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) x0[j] = fmin(fmax(x0[j], A(-1)), A(1));
      }
    }
    A r[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) r[j] = k.c_x0 * x0[j] + k.c_z * z[j];
    if (p.noise) {
      A e[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.noise) + off, e);
#pragma unroll
      for (int j = 0; j < VEC; ++j) r[j] += k.c_noise * e[j];
    }
    store_vec<T, VEC>(out + off, r);
  }
}

}  // namespace thr
}  // namespace cuda
}  // namespace imagen_fast
