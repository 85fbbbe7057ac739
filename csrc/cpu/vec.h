// A small SIMD layer for the CPU kernels: VF (16 float lanes) and VD (1 double lane).
//
// Two variants (see isa_begin.h): in the AVX-512 one VF is one __m512 register and
// exp/erfc are polynomial approximations accurate to a few float ulps; in the portable
// one VF is a plain array that the compiler vectorises for the base ISA (AVX2 on the
// usual x86 machine), with the activations and the bfloat16 conversions written with
// GCC/Clang vector extensions (never a libm call per lane). VD is the float64 path:
// scalar double with libm, used where inputs are float64 (tests, gradcheck).
//
// Loads convert the storage type (float, double, Half, BFloat16) to the lane type;
// stores round back (round to nearest even, as torch does). `n`-suffixed forms touch
// only the first n lanes and zero the others on load.
#pragma once

#ifndef IMAGEN_FAST_ISA_REGION
#error "vec.h belongs inside a variant's region: include isa_begin.h first"
#endif

#define IMAGEN_FAST_AVX512 IMAGEN_FAST_ISA_AVX512
// The vector helpers are a few instructions each and sit in the kernels' inner loops:
// inline them always (GCC otherwise keeps exp_neg8 as a call per vector).
#define IF_VINLINE inline __attribute__((always_inline))

namespace imagen_fast {
namespace cpu {
namespace IMAGEN_FAST_ISA_NS {

// ------------------------------------------------------------------ scalar helpers
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(Half v) { return f16_to_f32(v.bits); }
inline float to_acc(BFloat16 v) { return bf16_to_f32(v.bits); }

template <typename T> inline T from_acc(float v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline Half from_acc<Half>(float v) { return Half{f32_to_f16(v)}; }
template <> inline BFloat16 from_acc<BFloat16>(float v) {
  // torch's rounding: NaN -> canonical quiet NaN, otherwise round to nearest even.
  uint32_t u = f32_bits(v);
  if (v != v) return BFloat16{0x7fc0};
  return BFloat16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <typename T> inline T from_acc(double v);
template <> inline double from_acc<double>(double v) { return v; }

// ===================================================================== VD: double
struct VD {
  static constexpr int W = 1;
  using A = double;
  double v;
  VD() = default;
  VD(double x) : v(x) {}
  static VD set1(double a) { return VD(a); }
  static VD zero() { return VD(0.0); }
};
inline VD operator+(VD a, VD b) { return a.v + b.v; }
inline VD operator-(VD a, VD b) { return a.v - b.v; }
inline VD operator*(VD a, VD b) { return a.v * b.v; }
inline VD operator/(VD a, VD b) { return a.v / b.v; }
inline VD fmadd(VD a, VD b, VD c) { return a.v * b.v + c.v; }
inline VD keep_first(VD a, int n) { return n > 0 ? a : VD(0.0); }
inline double hsum(VD a) { return a.v; }
inline VD load(const double* p) { return *p; }
inline VD load_n(const double* p, int n) { return n > 0 ? *p : 0.0; }
inline void store(double* p, VD a) { *p = a.v; }
inline void store_n(double* p, VD a, int n) {
  if (n > 0) *p = a.v;
}
template <Activation act, bool LO = false> inline VD act_fwd(VD h) { return activate<double>(h.v, act); }
template <Activation act, bool LO = false> inline VD act_grad(VD h) { return activate_grad<double>(h.v, act); }

// ====================================================================== VF: float
#if IMAGEN_FAST_AVX512

struct VF {
  static constexpr int W = 16;
  using A = float;
  __m512 v;
  VF() = default;
  VF(__m512 x) : v(x) {}
  static VF set1(float a) { return VF(_mm512_set1_ps(a)); }
  static VF zero() { return VF(_mm512_setzero_ps()); }
};
inline __mmask16 first_n(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}
inline VF operator+(VF a, VF b) { return _mm512_add_ps(a.v, b.v); }
inline VF operator-(VF a, VF b) { return _mm512_sub_ps(a.v, b.v); }
inline VF operator*(VF a, VF b) { return _mm512_mul_ps(a.v, b.v); }
inline VF operator/(VF a, VF b) { return _mm512_div_ps(a.v, b.v); }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline VF keep_first(VF a, int n) { return _mm512_maskz_mov_ps(first_n(n), a.v); }
inline float hsum(VF a) { return _mm512_reduce_add_ps(a.v); }

inline VF load(const float* p) { return _mm512_loadu_ps(p); }
inline VF load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first_n(n), p); }
inline void store(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
inline void store_n(float* p, VF a, int n) { _mm512_mask_storeu_ps(p, first_n(n), a.v); }

inline VF widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m256i narrow_bf16(VF a) {
#if IMAGEN_FAST_ISA_BF16
  // Round to nearest even in hardware (float32 denormals flush to zero, ~1e-38 away).
  return (__m256i)_mm512_cvtneps_pbh(a.v);
#else
  __m512i u = _mm512_castps_si512(a.v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}
inline VF load(const BFloat16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VF load_n(const BFloat16* p, int n) { return widen_bf16(_mm256_maskz_loadu_epi16(first_n(n), p)); }
inline void store(BFloat16* p, VF a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(a)); }
inline void store_n(BFloat16* p, VF a, int n) { _mm256_mask_storeu_epi16(p, first_n(n), narrow_bf16(a)); }

inline VF load(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VF load_n(const Half* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_n(n), p)); }
inline void store(Half* p, VF a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store_n(Half* p, VF a, int n) {
  _mm256_mask_storeu_epi16(p, first_n(n), _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 1/d to ~1 ulp: 14-bit estimate and one Newton step.
IF_VINLINE VF recip(VF d) {
  __m512 r = _mm512_rcp14_ps(d.v);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d.v, r, _mm512_set1_ps(1.0f)), r);
}

// e^x: x = n ln2 + r, |r| <= ln2/2, minimax degree-6 polynomial (rel. error ~1e-7),
// scaled by 2^n with vscalefps (overflow to inf, gradual underflow to 0).
IF_VINLINE VF vexp(VF x) {
  __m512 xc = _mm512_min_ps(_mm512_max_ps(x.v, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(0.0013836836442351341f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.008374815806746483f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04166822507977486f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16666419804096222f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49999991059303284f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline VF vabs(VF a) { return _mm512_abs_ps(a.v); }
inline VF vmax(VF a, VF b) { return _mm512_max_ps(a.v, b.v); }
inline float hmax(VF a) { return _mm512_reduce_max_ps(a.v); }

// erfc(a) for a >= 0 given e = exp(-a^2): t = 1 / (1 + 0.47 a),
// erfc(a) = e * t * P(t), P a degree-9 fit of erfc(a) exp(a^2) / t on a in [0, 10]
// (relative error ~2e-7 in float arithmetic).
IF_VINLINE VF erfc_pos(VF a, VF e) {
  VF t = recip(fmadd(a, VF::set1(0.47f), VF::set1(1.0f)));
  __m512 p = _mm512_set1_ps(-0.01830999f);
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(0.04902491f));
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(0.05052609f));
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(-0.28739695f));
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(0.2483227f));
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(-0.01435505f));
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(0.21160253f));
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(0.22964843f));
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(0.26579481f));
  p = _mm512_fmadd_ps(p, t.v, _mm512_set1_ps(0.26514251f));
  return _mm512_mul_ps(_mm512_mul_ps(p, t.v), e.v);
}

// exp(-h) for the sigmoid, h clamped to [-87, 100]: finite (<= 6e37, so 1 + exp(-h)
// has a finite reciprocal), and silu(1e30) stays 1e30. A NaN h gives a finite value
// (vminps returns its second operand): the caller's h keeps the NaN.
IF_VINLINE VF vexp_neg(VF h) {
  __m512 hc = _mm512_max_ps(_mm512_min_ps(h.v, _mm512_set1_ps(100.0f)), _mm512_set1_ps(-87.0f));
  // exp(-h) = 2^n exp(-(h + n ln2)), n = round(-h / ln2)
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(hc, _mm512_set1_ps(-1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(0.693145751953125f), hc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);  // exp(-r) wanted
  __m512 p = _mm512_set1_ps(0.0013836836442351341f);
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(0.008374815806746483f));  // Horner in -r
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(0.04166822507977486f));
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(0.16666419804096222f));
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(0.49999991059303284f));
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Phi(h) = 0.5 (1 + erf(h / sqrt 2)) and, optionally, its density, sharing exp(-h^2/2).
IF_VINLINE VF gauss_cdf(VF h, VF* pdf) {
  VF a = vabs(h) * VF::set1(0.70710678118654752f);
  a = _mm512_min_ps(a.v, _mm512_set1_ps(10.0f));
  VF e = vexp(VF::zero() - a * a);
  VF tail = erfc_pos(a, e) * VF::set1(0.5f);  // Phi(-|h|)
  __mmask16 neg = _mm512_cmp_ps_mask(h.v, _mm512_setzero_ps(), _CMP_LT_OQ);
  if (pdf) *pdf = e * VF::set1(0.39894228040143267794f);
  return _mm512_mask_blend_ps(neg, (VF::set1(1.0f) - tail).v, tail.v);
}

// exp(-h) to ~1e-4 relative (degree-3 polynomial): enough for 16-bit outputs.
IF_VINLINE VF vexp_neg_lo(VF h) {
  __m512 hc = _mm512_max_ps(_mm512_min_ps(h.v, _mm512_set1_ps(100.0f)), _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(hc, _mm512_set1_ps(-1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(0.69314718055994531f), hc);
  __m512 p = _mm512_set1_ps(0.16566828f);  // minimax, relative error 7.5e-5
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(0.50496328f));
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(1.00016415f));
  p = _mm512_fnmadd_ps(p, r, _mm512_set1_ps(0.99992806f));
  return _mm512_scalef_ps(p, n);
}

// LO: the result is rounded to a 16-bit type, so ~1e-4 relative error is invisible.
template <Activation act, bool LO = false> IF_VINLINE VF act_fwd(VF h) {
  if constexpr (act == Activation::SiLU && LO)
    return h * VF(_mm512_rcp14_ps((VF::set1(1.0f) + vexp_neg_lo(h)).v));
  else if constexpr (act == Activation::SiLU) return h * recip(VF::set1(1.0f) + vexp_neg(h));
  else if constexpr (act == Activation::GELU) return h * gauss_cdf(h, nullptr);
  else return h;
}
template <Activation act, bool LO = false> IF_VINLINE VF act_grad(VF h) {
  // silu'(h) = s (1 + h (1 - s)), s = 1 / (1 + e), e = exp(-h); 1 - s as e s keeps its
  // relative accuracy where s rounds to 1 (large h).
  if constexpr (act == Activation::SiLU && LO) {
    VF e = vexp_neg_lo(h);
    VF s = _mm512_rcp14_ps((VF::set1(1.0f) + e).v);
    return s * fmadd(h, e * s, VF::set1(1.0f));
  } else if constexpr (act == Activation::SiLU) {
    VF e = vexp_neg(h);
    VF s = recip(VF::set1(1.0f) + e);
    return s * fmadd(h, e * s, VF::set1(1.0f));
  } else if constexpr (act == Activation::GELU) {
    VF pdf;
    VF cdf = gauss_cdf(h, &pdf);
    return fmadd(h, pdf, cdf);
  } else {
    return VF::set1(1.0f);
  }
}

#else  // portable

// 8 float lanes as a GCC/Clang vector extension: one ymm register on AVX2, two on
// SSE2/NEON. Every operation is written on 8-lane vectors: GCC scalarises compares and
// `?:` on vectors wider than the hardware's, and a libm call per lane (expf) made SiLU
// 3x slower than torch's on AVX2. Selects use bit masks (GCC scalarises `?:` on floats).
typedef float V8f __attribute__((vector_size(32)));
typedef int32_t V8i __attribute__((vector_size(32)));
typedef uint32_t V8u __attribute__((vector_size(32)));
typedef uint16_t V8h __attribute__((vector_size(16)));

inline V8f bits_f(V8i a) { return reinterpret_cast<V8f>(a); }
inline V8i bits_i(V8f a) { return reinterpret_cast<V8i>(a); }
inline V8f pick(V8i m, V8f a, V8f b) { return bits_f((m & bits_i(a)) | (~m & bits_i(b))); }
inline V8i lane_index() { return V8i{0, 1, 2, 3, 4, 5, 6, 7}; }

struct VF {
  static constexpr int W = 8;
  using A = float;
  V8f v;
  VF() = default;
  VF(V8f x) : v(x) {}
  static VF set1(float a) { return VF(V8f{a, a, a, a, a, a, a, a}); }  // not {} + a: that adds 0.0 (kept, for -0.0) then shuffles
  static VF zero() { return VF(V8f{}); }
};
inline VF operator+(VF a, VF b) { return a.v + b.v; }
inline VF operator-(VF a, VF b) { return a.v - b.v; }
inline VF operator*(VF a, VF b) { return a.v * b.v; }
inline VF operator/(VF a, VF b) { return a.v / b.v; }
inline VF fmadd(VF a, VF b, VF c) { return a.v * b.v + c.v; }  // contracted to FMA where there is one
inline VF keep_first(VF a, int n) { return bits_f(bits_i(a.v) & (lane_index() < n)); }
inline VF vmax(VF a, VF b) { return pick(a.v > b.v, a.v, b.v); }
inline float hmax(VF a) {
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}
inline float hsum(VF a) {
#ifdef __AVX__
  const __m256 v = reinterpret_cast<__m256>(a.v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  const V8f& v = a.v;
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
#endif
}

// Loads and stores: full vectors through memcpy (unaligned vector moves); the first n
// lanes through a zeroed buffer (tails only).
template <typename T> inline VF load(const T* p);
template <typename T> inline void store(T* p, VF a);
template <typename T> inline VF load_n(const T* p, int n) {
  T buf[8];
  std::memset(static_cast<void*>(buf), 0, sizeof(buf));
  std::memcpy(static_cast<void*>(buf), p, sizeof(T) * static_cast<size_t>(std::max(0, std::min(n, 8))));
  return keep_first(load(buf), n);
}
template <typename T> inline void store_n(T* p, VF a, int n) {
  T buf[8];
  store(buf, a);
  std::memcpy(static_cast<void*>(p), buf, sizeof(T) * static_cast<size_t>(std::max(0, std::min(n, 8))));
}
template <> inline VF load<float>(const float* p) {
  V8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <> inline void store<float>(float* p, VF a) { std::memcpy(p, &a.v, sizeof(a.v)); }
// bfloat16: the upper half of a float32 (widen by a shift); narrow rounding to nearest
// even, NaN to the canonical quiet NaN, as torch does. AVX2 intrinsics where the base ISA
// has them (GCC splits the generic zero-extension and narrowing into several shuffles).
template <> inline VF load<BFloat16>(const BFloat16* p) {
#ifdef __AVX2__
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return VF(reinterpret_cast<V8f>(_mm256_slli_epi32(w, 16)));
#else
  V8h h;
  std::memcpy(&h, p, sizeof(h));
  return bits_f(reinterpret_cast<V8i>(__builtin_convertvector(h, V8u) << 16));
#endif
}
template <> inline void store<BFloat16>(BFloat16* p, VF a) {
  const V8u u = reinterpret_cast<V8u>(a.v);
  const V8i nan = a.v != a.v;
  const V8i r = (reinterpret_cast<V8i>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) & ~nan) | (nan & 0x7fc0);
#ifdef __AVX2__
  const __m256i ri = reinterpret_cast<__m256i>(r);  // every lane <= 0xffff: packus keeps it
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(ri), _mm256_extracti128_si256(ri, 1)));
#else
  const V8h h = __builtin_convertvector(reinterpret_cast<V8u>(r), V8h);
  std::memcpy(p, &h, sizeof(h));
#endif
}
// float16: F16C where the base ISA has it (every AVX2 machine), else per lane.
template <> inline VF load<Half>(const Half* p) {
#ifdef __F16C__
  return VF(reinterpret_cast<V8f>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#else
  VF r;
  for (int i = 0; i < 8; ++i) r.v[i] = f16_to_f32(p[i].bits);
  return r;
#endif
}
template <> inline void store<Half>(Half* p, VF a) {
#ifdef __F16C__
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(a.v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int i = 0; i < 8; ++i) p[i] = Half{f32_to_f16(a.v[i])};
#endif
}

// h clamped to [lo, hi]; a NaN h gives a finite value (its caller keeps the NaN).
IF_VINLINE V8f clamp8(V8f h, float lo, float hi) {
#ifdef __AVX__
  // vminps / vmaxps return the second operand when either is NaN
  const __m256 m = _mm256_min_ps(reinterpret_cast<__m256>(h), _mm256_set1_ps(hi));
  return reinterpret_cast<V8f>(_mm256_max_ps(m, _mm256_set1_ps(lo)));
#else
  const V8f zero = {};
  V8f c = pick(h < zero + lo, zero + lo, h);
  c = pick(c > zero + hi, zero + hi, c);
  return pick(c == c, c, zero);
#endif
}

// exp(-h), the reduction and polynomial of the AVX-512 vexp_neg. Wide: h clamped to
// [-87, 100], 2^n built from exponent bits in two halves so that n down to -145
// underflows gradually as vscalefps does (the Gaussian tails). Else h in [-87, 87] and
// one 2^n: enough for the sigmoid, whose 1 / (1 + exp(-h)) is 1 beyond h = 17.
template <bool kWide = true> IF_VINLINE V8f exp_neg8(V8f h) {
  const V8f zero = {};
  const V8f hc = clamp8(h, -87.0f, kWide ? 100.0f : 87.0f);
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V8f n = (hc * -1.44269504088896341f + kRound) - kRound;
  V8f r = n * 0.693145751953125f + hc;
  r = n * 1.428606765330187e-06f + r;  // exp(-r) wanted
  V8f p = zero + 0.0013836836442351341f;
  p = 0.008374815806746483f - p * r;
  p = 0.04166822507977486f - p * r;
  p = 0.16666419804096222f - p * r;
  p = 0.49999991059303284f - p * r;
  p = 1.0f - p * r;
  p = 1.0f - p * r;
  V8i ni = __builtin_convertvector(n, V8i);
  if constexpr (!kWide) return p * bits_f((ni + 127) << 23);
  V8i n1 = ni >> 1;
  return p * bits_f((n1 + 127) << 23) * bits_f((ni - n1 + 127) << 23);
}
// exp(-h) to ~1e-4 relative for 16-bit outputs (the AVX-512 vexp_neg_lo), h in [-87, 87].
IF_VINLINE V8f exp_neg8_lo(V8f h) {
  const V8f zero = {};
  const V8f hc = clamp8(h, -87.0f, 87.0f);
  const float kRound = 12582912.0f;
  V8f n = (hc * -1.44269504088896341f + kRound) - kRound;
  V8f r = n * 0.69314718055994531f + hc;
  V8f p = zero + 0.16566828f;
  p = 0.50496328f - p * r;
  p = 1.00016415f - p * r;
  p = 0.99992806f - p * r;
  return p * bits_f((__builtin_convertvector(n, V8i) + 127) << 23);
}

// 1/d: on x86 the 12-bit vrcpps estimate, refined by a Newton step unless LO (16-bit
// outputs); a division elsewhere. d must be finite and non-zero.
template <bool LO> IF_VINLINE V8f recip8(V8f d) {
#ifdef __AVX__
  const V8f r = reinterpret_cast<V8f>(_mm256_rcp_ps(reinterpret_cast<__m256>(d)));
  if constexpr (LO) return r;
  return r * (1.0f - d * r) + r;
#else
  return 1.0f / d;
#endif
}

// Phi(h) = 0.5 (1 + erf(h / sqrt 2)) and, optionally, its density: the AVX-512
// gauss_cdf's erfc fit, sharing exp(-h^2/2).
IF_VINLINE V8f gauss_cdf8(V8f h, V8f* pdf) {
  const V8f zero = {}, ten = zero + 10.0f;
  V8f a = bits_f(bits_i(h) & 0x7fffffff) * 0.70710678118654752f;
  a = pick(a > ten, ten, a);
  V8f e = exp_neg8(a * a);
  V8f t = 1.0f / (a * 0.47f + 1.0f);
  V8f p = zero - 0.01830999f;
  for (float c : {0.04902491f, 0.05052609f, -0.28739695f, 0.2483227f, -0.01435505f, 0.21160253f,
                  0.22964843f, 0.26579481f, 0.26514251f})
    p = p * t + c;
  V8f tail = p * t * e * 0.5f;  // Phi(-|h|)
  if (pdf) *pdf = e * 0.39894228040143267794f;
  return pick(h < zero, tail, 1.0f - tail);
}

// e^x for x <= 87 (below -100 it returns e^-100, not 0: callers exclude such terms).
IF_VINLINE VF vexp(VF x) { return exp_neg8<true>(-x.v); }

template <Activation act, bool LO = false> IF_VINLINE VF act_fwd(VF h) {
  if constexpr (act == Activation::SiLU && LO) return h.v * recip8<true>(1.0f + exp_neg8_lo(h.v));
  else if constexpr (act == Activation::SiLU) return h.v * recip8<false>(1.0f + exp_neg8<false>(h.v));
  else if constexpr (act == Activation::GELU) return h.v * gauss_cdf8(h.v, nullptr);
  else return h;
}
template <Activation act, bool LO = false> IF_VINLINE VF act_grad(VF h) {
  if constexpr (act == Activation::SiLU) {  // as the AVX-512 act_grad: 1 - s as e s
    const V8f e = LO ? exp_neg8_lo(h.v) : exp_neg8<false>(h.v);
    const V8f s = recip8<LO>(1.0f + e);
    return s * (h.v * (e * s) + 1.0f);
  } else if constexpr (act == Activation::GELU) {
    V8f pdf;
    V8f cdf = gauss_cdf8(h.v, &pdf);
    return h.v * pdf + cdf;
  } else {
    return VF::set1(1.0f);
  }
}

#endif

// clamp(x, -s, s) with torch.minimum/maximum semantics: a NaN x stays NaN.
inline VD clamp_sym(VD x, VD s) {
  double m = s.v < x.v ? s.v : x.v;
  return -s.v > m ? -s.v : m;
}
#if IMAGEN_FAST_AVX512
inline VF clamp_sym(VF x, VF s) {
  // vminps/vmaxps return the second operand when either is NaN.
  __m512 m = _mm512_min_ps(s.v, x.v);
  return _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), s.v), m);
}
#else
inline VF clamp_sym(VF x, VF s) {
  // NaN x stays NaN: both compares are false for it.
  const V8f m = pick(s.v < x.v, s.v, x.v);
  return pick(-s.v > m, -s.v, m);
}
#endif

// A store that bypasses the caches (no read for ownership of the line first), for
// outputs much larger than the caches; p aligned to the vector size. stream_fence()
// after the last one, before other threads read the data.
inline void store_stream(float* p, VF a) {
#if IMAGEN_FAST_AVX512
  _mm512_stream_ps(p, a.v);
#elif defined(__AVX__)
  _mm256_stream_ps(p, reinterpret_cast<__m256>(a.v));
#else
  store(p, a);
#endif
}
inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Asks for the cache line holding p in L2 (read, moderate locality).
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// Prefetches bytes [0, nbytes) from p, one request per 64-byte line.
template <int nbytes> inline void prefetch_span(const void* p) {
  for (int k = 0; k < nbytes; k += 64) prefetch_l2(static_cast<const char*>(p) + k);
}

// The lane type that accumulates storage type T.
template <typename T> struct VecOf { using type = VF; };
template <> struct VecOf<double> { using type = VD; };

}  // namespace IMAGEN_FAST_ISA_NS
}  // namespace cpu
}  // namespace imagen_fast
