// Shared by csrc/cpu and csrc/cuda: dtype codes, scalar conversions, small maths.
// Everything here is usable from host and device code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define IF_HD __host__ __device__ __forceinline__
#else
#define IF_HD inline
#endif

namespace imagen_fast {

// Must match imagen_fast/_compiled.py DTYPE_CODES.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Must match imagen_fast/_compiled.py ACTIVATION_CODES.
enum class Activation : int { None = 0, SiLU = 1, GELU = 2 };

IF_HD uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

IF_HD float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bfloat16 <-> float32, round to nearest even (NaN stays NaN).
IF_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

IF_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half <-> float32, round to nearest even, subnormals and inf/NaN handled.
IF_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_f32(sign);
    float f = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24
    return sign ? -f : f;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

IF_HD uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;             // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;            // overflow (>= 65520) -> inf
  if (a < 0x38800000u) {                                  // subnormal half or zero
    if (a < 0x33000000u) return sign;                     // < 2^-25 rounds to zero
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    int shift = 126 - static_cast<int>(a >> 23);          // 14..24
    uint32_t half_man = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return sign | static_cast<uint16_t>(half_man);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;  // rebias 127 -> 15, round
  return sign | static_cast<uint16_t>(r >> 13);
}

// Storage type <-> accumulation type.
template <typename T> struct Scalar;
template <> struct Scalar<float> {
  using acc = float;
  static IF_HD float load(float v) { return v; }
  static IF_HD float store(float v) { return v; }
};
template <> struct Scalar<double> {
  using acc = double;
  static IF_HD double load(double v) { return v; }
  static IF_HD double store(double v) { return v; }
};
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };
template <> struct Scalar<Half> {
  using acc = float;
  static IF_HD float load(Half v) { return f16_to_f32(v.bits); }
  static IF_HD Half store(float v) { return Half{f32_to_f16(v)}; }
};
template <> struct Scalar<BFloat16> {
  using acc = float;
  static IF_HD float load(BFloat16 v) { return bf16_to_f32(v.bits); }
  static IF_HD BFloat16 store(float v) { return BFloat16{f32_to_bf16(v)}; }
};

// Activations and their derivatives, in the accumulation type.
template <typename A> IF_HD A sigmoid(A h) { return A(1) / (A(1) + std::exp(-h)); }

template <typename A> IF_HD A activate(A h, Activation act) {
  switch (act) {
    case Activation::SiLU: return h * sigmoid(h);
    case Activation::GELU: return A(0.5) * h * (A(1) + std::erf(h * A(0.70710678118654752440)));
    default: return h;
  }
}

template <typename A> IF_HD A activate_grad(A h, Activation act) {
  switch (act) {
    case Activation::SiLU: {
      A s = sigmoid(h);
      return s * (A(1) + h * (A(1) - s));
    }
    case Activation::GELU: {
      A cdf = A(0.5) * (A(1) + std::erf(h * A(0.70710678118654752440)));
      A pdf = std::exp(A(-0.5) * h * h) * A(0.39894228040143267794);
      return cdf + h * pdf;
    }
    default: return A(1);
  }
}

// Rank arithmetic of torch.quantile's linear interpolation, in double.
struct QuantileRank {
  int64_t lo;     // order statistic below (0-based)
  int64_t hi;     // order statistic above
  double frac;    // weight of hi
};

IF_HD QuantileRank quantile_rank(double q, int64_t n) {
  double rank = q * static_cast<double>(n - 1);
  int64_t lo = static_cast<int64_t>(floor(rank));
  if (lo > n - 1) lo = n - 1;
  if (lo < 0) lo = 0;
  int64_t hi = lo + 1 < n ? lo + 1 : n - 1;
  return QuantileRank{lo, hi, rank - static_cast<double>(lo)};
}

// Per-sample sampler coefficients (see imagen_fast.ops.step_coefficients).
struct StepCoefs {
  double a, b, c_x0, c_z, c_noise;
};

}  // namespace imagen_fast
