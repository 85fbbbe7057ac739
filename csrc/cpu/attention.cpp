// Attention of a few queries over a padded key sequence on the CPU, forward and backward:
//   out_i = softmax_j(scale q_i . k_j | mask_j) v,  lse_i = log sum_j exp(scale q_i . k_j)
// over the keys whose mask is true; a query with no such key gets out = 0, lse = -inf
// and zero gradients.
//
// For the short query sequences where torch's flash-attention kernel is all overhead
// (Imagen's attention pooling of the text: one query over the text tokens): one pass per
// (batch, head) with no tiling, scores of the valid keys in a small per-thread buffer,
// float arithmetic for float / half / bfloat16 storage. q, k, v, grad_out: (B, H, L, D)
// with unit stride on D and any strides on B, H, L; outputs contiguous.
#include "isa_begin.h"
#include "vec.h"

namespace imagen_fast {
namespace cpu {
namespace IMAGEN_FAST_ISA_NS {
namespace {

struct Strides {
  int64_t b, h, l;
};

template <typename T> inline const T* row(const T* base, const Strides& st, int64_t b, int64_t h, int64_t l) {
  return base + b * st.b + h * st.h + l * st.l;
}

// dot(a[0, D), b[0, D)) in float.
template <typename T> inline float dot(const T* a, const T* b, int64_t D) {
  constexpr int W = VF::W;
  VF s0 = VF::zero(), s1 = VF::zero();
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    s0 = fmadd(load(a + d), load(b + d), s0);
    s1 = fmadd(load(a + d + W), load(b + d + W), s1);
  }
  for (; d + W <= D; d += W) s0 = fmadd(load(a + d), load(b + d), s0);
  if (d < D) {
    const int n = static_cast<int>(D - d);
    s1 = fmadd(load_n(a + d, n), load_n(b + d, n), s1);
  }
  return hsum(s0 + s1);
}

// acc[0, D) += w * x[0, D)  (acc float, D padded to a multiple of W)
template <typename T> inline void axpy(float* acc, float w, const T* x, int64_t D) {
  constexpr int W = VF::W;
  const VF wv = VF::set1(w);
  int64_t d = 0;
  for (; d + W <= D; d += W) store(acc + d, fmadd(wv, load(x + d), load(acc + d)));
  if (d < D) {
    const int n = static_cast<int>(D - d);
    store_n(acc + d, fmadd(wv, load_n(x + d, n), load_n(acc + d, n)), n);
  }
}

// p[0, n) = exp(s[0, n) - m), returning their sum.
inline float exp_shifted(float* p, const float* s, int64_t n, float m) {
  constexpr int W = VF::W;
  const VF mv = VF::set1(m);
  VF sum = VF::zero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    VF e = vexp(load(s + j) - mv);
    store(p + j, e);
    sum = sum + e;
  }
  if (j < n) {
    const int r = static_cast<int>(n - j);
    VF e = keep_first(vexp(load_n(s + j, r) - mv), r);
    store_n(p + j, e, r);
    sum = sum + e;
  }
  return hsum(sum);
}

template <typename T> inline void store_row(T* dst, const float* src, float mul, int64_t D) {
  constexpr int W = VF::W;
  const VF mv = VF::set1(mul);
  int64_t d = 0;
  for (; d + W <= D; d += W) store(dst + d, load(src + d) * mv);
  if (d < D) {
    const int n = static_cast<int>(D - d);
    store_n(dst + d, load_n(src + d, n) * mv, n);
  }
}

// Valid key indices of each batch (all keys without a mask).
std::vector<std::vector<int32_t>> valid_keys(const uint8_t* mask, int64_t B, int64_t Lk) {
  std::vector<std::vector<int32_t>> keys(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    keys[b].reserve(static_cast<size_t>(Lk));
    for (int64_t j = 0; j < Lk; ++j)
      if (!mask || mask[b * Lk + j]) keys[b].push_back(static_cast<int32_t>(j));
  }
  return keys;
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const uint8_t* mask, T* out, float* lse, int64_t B, int64_t H,
             int64_t Lq, int64_t Lk, int64_t D, float scale, Strides sq, Strides sk, Strides sv, int threads) {
  const auto keys = valid_keys(mask, B, Lk);
  const int64_t Dp = (D + VF::W - 1) / VF::W * VF::W;
  // A thread team only where the work is worth waking it (the text pooling is not).
  threads = pick_threads(threads, B * H * Lq * Lk * D / 16);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> s(static_cast<size_t>(Lk) + VF::W), acc(static_cast<size_t>(Dp));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const auto& kv = keys[b];
      const int64_t nk = static_cast<int64_t>(kv.size());
      for (int64_t i = 0; i < Lq; ++i) {
        T* o = out + (bh * Lq + i) * D;
        float* l = lse + bh * Lq + i;
        if (nk == 0) {
          std::fill(o, o + D, from_acc<T>(0.0f));
          *l = -std::numeric_limits<float>::infinity();
          continue;
        }
        const T* qi = row(q, sq, b, h, i);
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < nk; ++t) {
          s[t] = scale * dot(qi, row(k, sk, b, h, kv[t]), D);
          m = std::max(m, s[t]);
        }
        const float sum = exp_shifted(s.data(), s.data(), nk, m);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t t = 0; t < nk; ++t) axpy(acc.data(), s[t], row(v, sv, b, h, kv[t]), D);
        store_row(o, acc.data(), 1.0f / sum, D);
        *l = m + std::log(sum);
      }
    }
  }
}

template <typename T>
void backward(const T* go, const T* q, const T* k, const T* v, const uint8_t* mask, const T* out, const float* lse,
              T* dq, T* dk, T* dv, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, float scale, Strides sg,
              Strides sq, Strides sk, Strides sv, int threads) {
  const auto keys = valid_keys(mask, B, Lk);
  const int64_t Dp = (D + VF::W - 1) / VF::W * VF::W;
  threads = pick_threads(threads, B * H * Lq * Lk * D / 8);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> p(static_cast<size_t>(Lk) + VF::W), gq(static_cast<size_t>(Dp));
    std::vector<float> gk(static_cast<size_t>(Lk * Dp)), gv(static_cast<size_t>(Lk * Dp));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const auto& kv = keys[b];
      const int64_t nk = static_cast<int64_t>(kv.size());
      std::fill(gk.begin(), gk.end(), 0.0f);
      std::fill(gv.begin(), gv.end(), 0.0f);
      for (int64_t i = 0; i < Lq; ++i) {
        T* dqi = dq + (bh * Lq + i) * D;
        const float li = lse[bh * Lq + i];
        if (nk == 0 || !(li > -std::numeric_limits<float>::infinity())) {
          std::fill(dqi, dqi + D, from_acc<T>(0.0f));
          continue;
        }
        const T* qi = row(q, sq, b, h, i);
        const T* gi = row(go, sg, b, h, i);
        const float delta = dot(gi, out + (bh * Lq + i) * D, D);
        for (int64_t t = 0; t < nk; ++t) p[t] = scale * dot(qi, row(k, sk, b, h, kv[t]), D);
        exp_shifted(p.data(), p.data(), nk, li);
        std::fill(gq.begin(), gq.end(), 0.0f);
        for (int64_t t = 0; t < nk; ++t) {
          const int64_t j = kv[t];
          const float ds = p[t] * (dot(gi, row(v, sv, b, h, j), D) - delta) * scale;
          axpy(gq.data(), ds, row(k, sk, b, h, j), D);
          axpy(gk.data() + j * Dp, ds, qi, D);
          axpy(gv.data() + j * Dp, p[t], gi, D);
        }
        store_row(dqi, gq.data(), 1.0f, D);
      }
      for (int64_t j = 0; j < Lk; ++j) {
        store_row(dk + (bh * Lk + j) * D, gk.data() + j * Dp, 1.0f, D);
        store_row(dv + (bh * Lk + j) * D, gv.data() + j * Dp, 1.0f, D);
      }
    }
  }
}

template <typename F> void with_attention_type(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(Half{}); break;
    case DType::BFloat16: f(BFloat16{}); break;
    default: break;  // float64: refused by the bindings
  }
}

}  // namespace

void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out, uintptr_t lse, int64_t B,
                   int64_t H, int64_t Lq, int64_t Lk, int64_t D, double scale, const int64_t* strides, int dtype,
                   int threads) {
  with_attention_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward<T>(ptr<const T>(q), ptr<const T>(k), ptr<const T>(v), ptr<const uint8_t>(mask), ptr<T>(out),
               ptr<float>(lse), B, H, Lq, Lk, D, static_cast<float>(scale), {strides[0], strides[1], strides[2]},
               {strides[3], strides[4], strides[5]}, {strides[6], strides[7], strides[8]}, threads);
  });
}

void attention_bwd(uintptr_t grad_out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out,
                   uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, int64_t B, int64_t H, int64_t Lq,
                   int64_t Lk, int64_t D, double scale, const int64_t* strides, int dtype, int threads) {
  with_attention_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    backward<T>(ptr<const T>(grad_out), ptr<const T>(q), ptr<const T>(k), ptr<const T>(v),
                ptr<const uint8_t>(mask), ptr<const T>(out), ptr<const float>(lse), ptr<T>(dq), ptr<T>(dk),
                ptr<T>(dv), B, H, Lq, Lk, D, static_cast<float>(scale), {strides[9], strides[10], strides[11]},
                {strides[0], strides[1], strides[2]}, {strides[3], strides[4], strides[5]},
                {strides[6], strides[7], strides[8]}, threads);
  });
}

}  // namespace IMAGEN_FAST_ISA_NS
}  // namespace cpu
}  // namespace imagen_fast

#include "isa_end.h"
