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

// Weighted sums of rows, accumulated in registers (a running sum in memory would wait on
// store-to-load forwarding at every key):  dst[0, D) = mul * sum_{t < n} w[t] x(t)[0, D).
// Columns go in chunks of four, two, then one vector (two interleaved accumulators there,
// so the chain of fused multiply-adds is not one long dependency), the tail masked.
template <int NV, typename T, typename Out, typename RowFn>
IF_VINLINE void weighted_chunk(Out* dst, const float* w, int64_t n, RowFn x, int64_t d, float mul) {
  constexpr int W = VF::W;
  VF a[NV], b[NV];
  for (int c = 0; c < NV; ++c) a[c] = b[c] = VF::zero();
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) {
    const VF w0 = VF::set1(w[t]), w1 = VF::set1(w[t + 1]);
    const T* x0 = x(t) + d;
    const T* x1 = x(t + 1) + d;
    for (int c = 0; c < NV; ++c) {
      a[c] = fmadd(w0, load(x0 + c * W), a[c]);
      b[c] = fmadd(w1, load(x1 + c * W), b[c]);
    }
  }
  if (t < n) {
    const VF w0 = VF::set1(w[t]);
    const T* x0 = x(t) + d;
    for (int c = 0; c < NV; ++c) a[c] = fmadd(w0, load(x0 + c * W), a[c]);
  }
  const VF mv = VF::set1(mul);
  for (int c = 0; c < NV; ++c) store(dst + d + c * W, (a[c] + b[c]) * mv);
}

template <typename T, typename Out, typename RowFn>
inline void weighted_sum(Out* dst, const float* w, int64_t n, RowFn x, int64_t D, float mul) {
  constexpr int W = VF::W;
  int64_t d = 0;
  for (; d + 4 * W <= D; d += 4 * W) weighted_chunk<4, T>(dst, w, n, x, d, mul);
  if (d + 2 * W <= D) {
    weighted_chunk<2, T>(dst, w, n, x, d, mul);
    d += 2 * W;
  }
  if (d + W <= D) {
    weighted_chunk<1, T>(dst, w, n, x, d, mul);
    d += W;
  }
  if (d < D) {
    const int r = static_cast<int>(D - d);
    VF a = VF::zero(), b = VF::zero();
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
      a = fmadd(VF::set1(w[t]), load_n(x(t) + d, r), a);
      b = fmadd(VF::set1(w[t + 1]), load_n(x(t + 1) + d, r), b);
    }
    if (t < n) a = fmadd(VF::set1(w[t]), load_n(x(t) + d, r), a);
    store_n(dst + d, (a + b) * VF::set1(mul), r);
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

template <typename T> inline void zero_row(T* dst, int64_t D) { std::fill(dst, dst + D, from_acc<T>(0.0f)); }

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
  // A thread team only where the work is worth waking it (the text pooling is not).
  threads = pick_threads(threads, B * H * Lq * Lk * D / 2);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> s(static_cast<size_t>(Lk) + VF::W);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const auto& kv = keys[b];
      const int64_t nk = static_cast<int64_t>(kv.size());
      const auto v_row = [&](int64_t t) { return row(v, sv, b, h, kv[t]); };
      for (int64_t i = 0; i < Lq; ++i) {
        T* o = out + (bh * Lq + i) * D;
        float* l = lse + bh * Lq + i;
        if (nk == 0) {
          zero_row(o, D);
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
        weighted_sum<T>(o, s.data(), nk, v_row, D, 1.0f / sum);
        *l = m + std::log(sum);
      }
    }
  }
}

// dS = P (dP - delta) scale with P = exp(scale q k^T - lse), dP = g v^T, delta_i = g_i . out_i;
// dq_i = sum_t dS_it k_t, dk_t = sum_i dS_it q_i, dv_t = sum_i P_it g_i (t over the valid
// keys; a masked key gets zero dk, dv). P and dS are kept key-major, so every sum runs
// in registers and each output row is written once.
template <typename T>
void backward(const T* go, const T* q, const T* k, const T* v, const uint8_t* mask, const T* out, const float* lse,
              T* dq, T* dk, T* dv, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, float scale, Strides sg,
              Strides sq, Strides sk, Strides sv, int threads) {
  const auto keys = valid_keys(mask, B, Lk);
  threads = pick_threads(threads, B * H * Lq * Lk * D);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> ds_row(static_cast<size_t>(Lk) + VF::W);
    std::vector<float> p_t(static_cast<size_t>(Lk * Lq)), ds_t(static_cast<size_t>(Lk * Lq));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const auto& kv = keys[b];
      const int64_t nk = static_cast<int64_t>(kv.size());
      const auto k_row = [&](int64_t t) { return row(k, sk, b, h, kv[t]); };
      for (int64_t i = 0; i < Lq; ++i) {
        T* dqi = dq + (bh * Lq + i) * D;
        const float li = lse[bh * Lq + i];
        if (nk == 0 || !(li > -std::numeric_limits<float>::infinity())) {
          for (int64_t t = 0; t < nk; ++t) p_t[t * Lq + i] = ds_t[t * Lq + i] = 0.0f;
          zero_row(dqi, D);
          continue;
        }
        const T* qi = row(q, sq, b, h, i);
        const T* gi = row(go, sg, b, h, i);
        const float delta = dot(gi, out + (bh * Lq + i) * D, D);
        for (int64_t t = 0; t < nk; ++t) ds_row[t] = scale * dot(qi, k_row(t), D);
        exp_shifted(ds_row.data(), ds_row.data(), nk, li);
        for (int64_t t = 0; t < nk; ++t) {
          const float p = ds_row[t];
          const float ds = p * (dot(gi, row(v, sv, b, h, kv[t]), D) - delta) * scale;
          ds_row[t] = ds;
          p_t[t * Lq + i] = p;
          ds_t[t * Lq + i] = ds;
        }
        weighted_sum<T>(dqi, ds_row.data(), nk, k_row, D, 1.0f);
      }
      const auto q_row = [&](int64_t i) { return row(q, sq, b, h, i); };
      const auto g_row = [&](int64_t i) { return row(go, sg, b, h, i); };
      int64_t t = 0;
      for (int64_t j = 0; j < Lk; ++j) {
        T* dkj = dk + (bh * Lk + j) * D;
        T* dvj = dv + (bh * Lk + j) * D;
        if (t < nk && kv[t] == j) {
          weighted_sum<T>(dkj, ds_t.data() + t * Lq, Lq, q_row, D, 1.0f);
          weighted_sum<T>(dvj, p_t.data() + t * Lq, Lq, g_row, D, 1.0f);
          ++t;
        } else {
          zero_row(dkj, D);
          zero_row(dvj, D);
        }
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
