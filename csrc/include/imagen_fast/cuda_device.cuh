// Device-side building blocks shared by the csrc/cuda kernels: storage <-> accumulation
// conversions, 16-byte vector loads/stores, deterministic warp/block reductions and
// Welford (count, mean, M2) merging. The per-element maths (activations, quantile
// rank, sampler coefficients) comes from common.h, shared with csrc/cpu.
#pragma once

#include <cstdint>
#include <cstring>

#include "imagen_fast/common.h"
#include "imagen_fast/cuda_platform.cuh"

namespace imagen_fast {
namespace cuda {

// ------------------------------------------------------------------ types
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// Elements per 16-byte vector.
template <typename T> constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Cvt<double> {
  static __device__ __forceinline__ double to(double v) { return v; }
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <int BYTES> struct RawVec;
template <> struct RawVec<16> { using type = uint4; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<2> { using type = unsigned short; };

// N consecutive elements of T as one raw register vector (16 bytes at most). Kept raw
// in registers (4 registers per 16 bytes whatever T is) and unpacked where used.
template <typename T, int N> struct Packed {
  typename RawVec<sizeof(T) * N>::type raw;
};

// Read through the read-only path; p must be aligned to N * sizeof(T).
template <typename T, int N> __device__ __forceinline__ Packed<T, N> load_packed(const T* p) {
  using R = typename RawVec<sizeof(T) * N>::type;
  Packed<T, N> pk;
  pk.raw = __ldg(reinterpret_cast<const R*>(p));
  return pk;
}

template <typename T, int N>
__device__ __forceinline__ void unpack(const Packed<T, N>& pk, acc_t<T> (&out)[N]) {
  T v[N];
  memcpy(v, &pk.raw, sizeof(pk.raw));
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = Cvt<T>::to(v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, acc_t<T> (&out)[N]) {
  unpack<T, N>(load_packed<T, N>(p), out);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const acc_t<T> (&in)[N]) {
  using R = typename RawVec<sizeof(T) * N>::type;
  T v[N];
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = Cvt<T>::from(in[j]);
  R raw;
  memcpy(&raw, v, sizeof(R));
#ifdef IMAGEN_FAST_CUDA_EMULATION
  emu::check_aligned(p, sizeof(R));
#endif
  *reinterpret_cast<R*>(p) = raw;
}

// ------------------------------------------------------------ reductions
// All reductions combine in a fixed order (xor butterflies, then warps in index
// order), so results are bit-for-bit reproducible from run to run.
constexpr unsigned kFullMask = 0xffffffffu;

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of
// 32; `scratch` holds at least 33 values and is free again on return.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A r = lane < nwarps ? scratch[lane] : A(0);
    r = warp_sum(r);
    if (lane == 0) scratch[32] = r;
  }
  __syncthreads();
  A r = scratch[32];
  __syncthreads();
  return r;
}

// Welford state; n is a count kept in the accumulation type.
template <typename A> struct Welford {
  A n, mean, m2;
};

template <typename A> __device__ __forceinline__ Welford<A> welford_merge(Welford<A> a, Welford<A> b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;
  A n = a.n + b.n;
  A delta = b.mean - a.mean;
  A wb = b.n / n;
  Welford<A> r;
  r.n = n;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
  return r;
}

template <typename A> __device__ __forceinline__ Welford<A> warp_welford(Welford<A> w) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Welford<A> other;
    other.n = __shfl_xor_sync(kFullMask, w.n, o);
    other.mean = __shfl_xor_sync(kFullMask, w.mean, o);
    other.m2 = __shfl_xor_sync(kFullMask, w.m2, o);
    // The lower lane always takes the left operand: every lane ends with the same,
    // order-fixed result.
    w = (threadIdx.x & o) ? welford_merge(other, w) : welford_merge(w, other);
  }
  return w;
}

// 1 / sqrt(v) from the correctly rounded sqrt and division (rsqrtf is 2 ulp); it runs
// once per group, so the exact form costs nothing.
template <typename A> __device__ __forceinline__ A rsqrt_acc(A v) { return A(1) / sqrt(v); }

}  // namespace cuda
}  // namespace imagen_fast
