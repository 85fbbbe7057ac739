// Channel RMS norm + FiLM + activation on the CPU, forward and backward.
//
//   r_ns = 1 / max(sqrt(mean_c x_ncs^2), eps),  xh = x r,
//   h = xh * a_nc + b_nc  (a = w_c (1 + scale_nc), b = shift_nc),  y = act(h)
//
// One statistic per (sample, position): the reduction runs over channels.
// Layouts: contiguous (N, C, S) and channels-last (N, S, C), S = prod(spatial).
// Storage float / double / Half / BFloat16; arithmetic in float (double for double).
//
// Contiguous: a block of 64 positions (block_vecs vectors) is walked channel by channel
// twice (sum of squares, then y); the block's C rows stay in L2 between the passes;
// float outputs of kStreamBytes and more are written by streaming stores.
// Channels-last: each position's C channels are contiguous; sum of squares, then y.
//
// Backward, with dh = gy act'(h), g = dh a:
//   gx = r (g - xh mean_c(g xh))  (just r g where the RMS was clamped to eps)
//   P1_nc = sum_s dh, P2_nc = sum_s dh xh  ->  g_shift = P1, g_scale = w P2,
//   g_weight = sum_n (1 + scale) P2.
// dh is kept per block (or row) between the two passes, so act' is evaluated once.
#include "isa_begin.h"
#include "vec.h"

namespace imagen_fast {
namespace cpu {
namespace IMAGEN_FAST_ISA_NS {
namespace {

// Contiguous layout: a block of 64 positions (4 vectors of AVX-512, 8 of the portable
// path): each channel's run in a block is at least a 256-byte line pair for float32.
// (float64, one-lane vectors: 4 positions).
template <typename V> constexpr int block_vecs() { return V::W == 1 ? 4 : 64 / V::W; }

template <typename A> struct RmsParams {
  const A *w, *s, *sh;  // any may be null
  int64_t C;
  A weight(int64_t c) const { return w ? w[c] : A(1); }
  A film(int64_t n, int64_t c) const { return s ? A(1) + s[n * C + c] : A(1); }
  A shift(int64_t n, int64_t c) const { return sh ? sh[n * C + c] : A(0); }
};

// Per (n, c): a = w (1 + scale), b = shift.
template <typename A> void film_coefs(const RmsParams<A>& pr, int64_t N, std::vector<A>& a, std::vector<A>& b) {
  const int64_t C = pr.C;
  a.resize(N * C + 16);
  b.resize(N * C + 16);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      a[n * C + c] = pr.weight(c) * pr.film(n, c);
      b[n * C + c] = pr.shift(n, c);
    }
}

template <typename A> inline A rstd_of(double sumsq, int64_t C, double eps) {
  const double rms = std::sqrt(sumsq / static_cast<double>(C));
  return static_cast<A>(1.0 / std::max(rms, eps));
}

// The RMS was clamped: r is the constant 1 / eps (compared in the stored precision).
template <typename A> inline bool clamped(A r, double eps) { return r >= static_cast<A>(1.0 / eps); }

template <typename V, typename T> inline V load_k(const T* p, int n) {
  return n >= V::W ? load(p) : load_n(p, n);
}
template <typename V, typename T> inline void store_k(T* p, V v, int n) {
  if (n >= V::W) store(p, v);
  else store_n(p, v, n);
}

// ---------------------------------------------------------------------- forward
// Contiguous float outputs of this size and more go out by streaming stores: y is
// written as C short runs per block, too many streams for the hardware to fetch the
// lines ahead of the stores (forward alone, both variants: 8x128x32x32 1.05-1.10x,
// 8x64x64x64 1.13-1.22x; followed by a 3x3 convolution of the output: within the run-to-run
// noise of +-4% at 4-8 MB, 0.94-0.95x at 2 MB, where the output could stay in the caches).
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// Contiguous: positions [s0, s0 + len) of sample n (len <= block_vecs<V>() * W).
// next_block: whether the block after this one (s0 + len, same length) exists; its runs
// are pulled into L2 during the sum pass (each channel's run is a short strided piece
// that the hardware prefetchers do not follow).
template <Activation act, typename T, typename V>
void fwd_block(const T* x, T* y, typename V::A* rstd, int64_t C, int64_t S, int64_t s0, int64_t len,
               const typename V::A* a, const typename V::A* b, double eps, bool next_block, bool stream) {
  using A = typename V::A;
  constexpr int W = V::W, K = block_vecs<V>();
  int nk[K];
  for (int k = 0; k < K; ++k) nk[k] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(W, len - k * W)));
  V acc[K];
  for (int k = 0; k < K; ++k) acc[k] = V::zero();
  for (int64_t c = 0; c < C; ++c) {
    const T* p = x + c * S + s0;
    if (next_block) prefetch_span<int(K * W * sizeof(T))>(p + K * W);
    for (int k = 0; k < K; ++k)
      if (nk[k]) {
        V v = load_k<V>(p + k * W, nk[k]);
        acc[k] = fmadd(v, v, acc[k]);
      }
  }
  A sums[K * W], r[K * W];
  for (int k = 0; k < K; ++k) store(sums + k * W, acc[k]);
  for (int64_t i = 0; i < len; ++i) r[i] = rstd_of<A>(static_cast<double>(sums[i]), C, eps);
  for (int64_t i = len; i < K * W; ++i) r[i] = A(0);
  std::copy(r, r + len, rstd + s0);
  V rv[K];
  for (int k = 0; k < K; ++k) rv[k] = load(r + k * W);
  for (int64_t c = 0; c < C; ++c) {
    const T* p = x + c * S + s0;
    T* q = y + c * S + s0;
    const V av = V::set1(a[c]), bv = V::set1(b[c]);
    if constexpr (std::is_same_v<T, float>) {
      if (stream && len == K * W && reinterpret_cast<uintptr_t>(q) % (W * sizeof(float)) == 0) {
        for (int k = 0; k < K; ++k) store_stream(q + k * W, act_fwd<act, false>(fmadd(load(p + k * W) * rv[k], av, bv)));
        continue;
      }
    }
    for (int k = 0; k < K; ++k)
      if (nk[k]) store_k(q + k * W, act_fwd<act, sizeof(T) == 2>(fmadd(load_k<V>(p + k * W, nk[k]) * rv[k], av, bv)), nk[k]);
  }
}

// Channels-last: one position's C channels at x.
template <Activation act, typename T, typename V>
void fwd_row(const T* x, T* y, typename V::A* rstd, int64_t C, const typename V::A* a, const typename V::A* b,
             double eps) {
  constexpr int W = V::W;
  constexpr int64_t kLine = 64 / int64_t(sizeof(T)), kAhead = 2048 / int64_t(sizeof(T));
  for (int64_t c = 0; c < C; c += kLine) prefetch_l2(x + kAhead + c);   // rows stream by: stay ahead
  V s0 = V::zero(), s1 = V::zero();
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    V v0 = load(x + c), v1 = load(x + c + W);
    s0 = fmadd(v0, v0, s0);
    s1 = fmadd(v1, v1, s1);
  }
  for (; c < C; c += W) {
    V v = load_k<V>(x + c, static_cast<int>(C - c));
    s0 = fmadd(v, v, s0);
  }
  const auto r = rstd_of<typename V::A>(static_cast<double>(hsum(s0 + s1)), C, eps);
  *rstd = r;
  const V rv = V::set1(r);
  for (c = 0; c < C; c += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, C - c));
    V h = fmadd(load_k<V>(x + c, n) * rv, load_k<V>(a + c, n), load_k<V>(b + c, n));
    store_k(y + c, act_fwd<act, sizeof(T) == 2>(h), n);
  }
}

template <Activation act, typename T>
void rms_forward(const T* x, T* y, typename VecOf<T>::type::A* rstd, const RmsParams<typename VecOf<T>::type::A>& pr,
                 int64_t N, int64_t C, int64_t S, double eps, bool channels_last, int threads) {
  using V = typename VecOf<T>::type;
  using A = typename V::A;
  std::vector<A> a, b;
  film_coefs(pr, N, a, b);
  threads = pick_threads(threads, N * C * S);
  if (!channels_last) {
    const int64_t B = block_vecs<V>() * V::W, nb = (S + B - 1) / B;
    const bool stream = std::is_same_v<T, float> && N * C * S * int64_t(sizeof(T)) >= kStreamBytes;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < N * nb; ++t) {
        const int64_t n = t / nb, s0 = (t % nb) * B;
        fwd_block<act, T, V>(x + n * C * S, y + n * C * S, rstd + n * S, C, S, s0, std::min(B, S - s0),
                             &a[n * C], &b[n * C], eps, s0 + 2 * B <= S, stream);
      }
      if (stream) stream_fence();
    }
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < N * S; ++t) {
    const int64_t n = t / S;
    fwd_row<act, T, V>(x + t * C, y + t * C, rstd + t, C, &a[n * C], &b[n * C], eps);
  }
}

// --------------------------------------------------------------------- backward
// Per-thread sums P1 (dh) and P2 (dh xh) per (n, c), in double.
struct ChannelSums {
  std::vector<double> p1, p2;
  void init(int64_t NC) {
    p1.assign(NC, 0.0);
    p2.assign(NC, 0.0);
  }
};

// Contiguous block [s0, s0 + len) of sample n. dhb: C * block_vecs<V>() * W scratch.
template <Activation act, typename T, typename V>
void bwd_block(const T* gy, const T* x, T* gx, const typename V::A* rstd, int64_t C, int64_t S, int64_t s0,
               int64_t len, const typename V::A* a, const typename V::A* b, double eps, double* p1, double* p2,
               typename V::A* dhb) {
  using A = typename V::A;
  constexpr int W = V::W, K = block_vecs<V>();
  int nk[K];
  for (int k = 0; k < K; ++k) nk[k] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(W, len - k * W)));
  A rb[K * W];
  std::fill(rb, rb + K * W, A(0));
  std::copy(rstd + s0, rstd + s0 + len, rb);
  V rv[K], proj[K];
  for (int k = 0; k < K; ++k) {
    rv[k] = load(rb + k * W);
    proj[k] = V::zero();
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = c * S + s0;
    const V av = V::set1(a[c]), bv = V::set1(b[c]);
    V t1 = V::zero(), t2 = V::zero();
    for (int k = 0; k < K; ++k) {
      if (!nk[k]) continue;
      V xh = load_k<V>(x + o + k * W, nk[k]) * rv[k];
      V dh = load_k<V>(gy + o + k * W, nk[k]);
      if (act != Activation::None) dh = keep_first(dh * act_grad<act, sizeof(T) == 2>(fmadd(xh, av, bv)), nk[k]);
      if (gx) {
        store(dhb + c * K * W + k * W, dh);
        proj[k] = fmadd(dh * av, xh, proj[k]);
      }
      t1 = t1 + dh;
      t2 = fmadd(dh, xh, t2);
    }
    p1[c] += static_cast<double>(hsum(t1));
    p2[c] += static_cast<double>(hsum(t2));
  }
  if (!gx) return;
  A pb[K * W];
  for (int k = 0; k < K; ++k) store(pb + k * W, proj[k]);
  for (int i = 0; i < K * W; ++i) pb[i] = (i < len && !clamped(rb[i], eps)) ? pb[i] / static_cast<A>(C) : A(0);
  for (int k = 0; k < K; ++k) proj[k] = load(pb + k * W);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = c * S + s0;
    const V av = V::set1(a[c]);
    for (int k = 0; k < K; ++k) {
      if (!nk[k]) continue;
      V xh = load_k<V>(x + o + k * W, nk[k]) * rv[k];
      V g = load(dhb + c * K * W + k * W) * av;
      store_k(gx + o + k * W, (g - xh * proj[k]) * rv[k], nk[k]);
    }
  }
}

// Channels-last position: C channels at x. dhr: C scratch; c1, c2: the thread's running
// float sums for the current sample (flushed to double by the caller).
template <Activation act, typename T, typename V>
void bwd_row(const T* gy, const T* x, T* gx, typename V::A r, int64_t C, const typename V::A* a,
             const typename V::A* b, double eps, typename V::A* c1, typename V::A* c2, typename V::A* dhr) {
  using A = typename V::A;
  constexpr int W = V::W;
  const V rv = V::set1(r);
  V proj = V::zero();
  for (int64_t c = 0; c < C; c += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, C - c));
    V xh = load_k<V>(x + c, n) * rv;
    V av = load_k<V>(a + c, n);
    V dh = load_k<V>(gy + c, n);
    if (act != Activation::None) dh = keep_first(dh * act_grad<act, sizeof(T) == 2>(fmadd(xh, av, load_k<V>(b + c, n))), n);
    store_k(c1 + c, load_k<V>(c1 + c, n) + dh, n);
    store_k(c2 + c, fmadd(dh, xh, load_k<V>(c2 + c, n)), n);
    if (gx) {
      store_k(dhr + c, dh, n);
      proj = fmadd(dh * av, xh, proj);
    }
  }
  if (!gx) return;
  const A pj = clamped(r, eps) ? A(0) : hsum(proj) / static_cast<A>(C);
  const V pv = V::set1(pj);
  for (int64_t c = 0; c < C; c += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, C - c));
    V xh = load_k<V>(x + c, n) * rv;
    V g = load_k<V>(dhr + c, n) * load_k<V>(a + c, n);
    store_k(gx + c, (g - xh * pv) * rv, n);
  }
}

template <Activation act, typename T>
void rms_backward(const T* gy, const T* x, const typename VecOf<T>::type::A* rstd,
                  const RmsParams<typename VecOf<T>::type::A>& pr, T* gx, typename VecOf<T>::type::A* gw,
                  typename VecOf<T>::type::A* gs, typename VecOf<T>::type::A* gsh, int64_t N, int64_t C, int64_t S,
                  double eps, bool channels_last, int threads) {
  using V = typename VecOf<T>::type;
  using A = typename V::A;
  constexpr int W = V::W;
  std::vector<A> a, b;
  film_coefs(pr, N, a, b);
  threads = pick_threads(threads, N * C * S);
  std::vector<ChannelSums> sums(threads);
  for (ChannelSums& s : sums) s.init(N * C);
#pragma omp parallel num_threads(threads)
  {
    ChannelSums& mine = sums[thread_id()];
    if (!channels_last) {
      const int64_t B = block_vecs<V>() * W, nb = (S + B - 1) / B;
      std::vector<A> dhb(gx ? C * B : 0);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < N * nb; ++t) {
        const int64_t n = t / nb, s0 = (t % nb) * B, o = n * C * S;
        bwd_block<act, T, V>(gy + o, x + o, gx ? gx + o : nullptr, rstd + n * S, C, S, s0, std::min(B, S - s0),
                             &a[n * C], &b[n * C], eps, &mine.p1[n * C], &mine.p2[n * C], dhb.data());
      }
    } else {
      // Float running sums over at most kFlush positions, then into the double sums.
      constexpr int64_t kFlush = 256;
      std::vector<A> c1(C + W), c2(C + W), dhr(C + W);
      int64_t cur = -1, since = 0;
      auto flush = [&]() {
        if (cur < 0) return;
        for (int64_t c = 0; c < C; ++c) {
          mine.p1[cur * C + c] += static_cast<double>(c1[c]);
          mine.p2[cur * C + c] += static_cast<double>(c2[c]);
        }
        std::fill(c1.begin(), c1.end(), A(0));
        std::fill(c2.begin(), c2.end(), A(0));
        since = 0;
      };
#pragma omp for schedule(static)
      for (int64_t t = 0; t < N * S; ++t) {
        const int64_t n = t / S;
        if (n != cur || since == kFlush) {
          flush();
          cur = n;
        }
        bwd_row<act, T, V>(gy + t * C, x + t * C, gx ? gx + t * C : nullptr, rstd[t], C, &a[n * C], &b[n * C], eps,
                           c1.data(), c2.data(), dhr.data());
        ++since;
      }
      flush();
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      double t1 = 0.0, t2 = 0.0;
      for (const ChannelSums& s : sums) {
        t1 += s.p1[n * C + c];
        t2 += s.p2[n * C + c];
      }
      if (gsh) gsh[n * C + c] = static_cast<A>(t1);
      if (gs) gs[n * C + c] = static_cast<A>(static_cast<double>(pr.weight(c)) * t2);
      if (gw) {
        if (n == 0) gw[c] = A(0);
        gw[c] = static_cast<A>(static_cast<double>(gw[c]) + static_cast<double>(pr.film(n, c)) * t2);
      }
    }
}

}  // namespace

void rms_norm_fwd(uintptr_t x, uintptr_t y, uintptr_t rstd, uintptr_t w, uintptr_t s, uintptr_t sh, int64_t N,
                  int64_t C, int64_t S, double eps, bool channels_last, int dtype, int activation, int threads) {
  with_activation(activation, [&](auto tag) {
    with_storage(dtype, [&](auto type_tag, auto acc_tag) {
      using T = decltype(type_tag);
      using A = decltype(acc_tag);
      RmsParams<A> pr{ptr<const A>(w), ptr<const A>(s), ptr<const A>(sh), C};
      rms_forward<decltype(tag)::value, T>(ptr<const T>(x), ptr<T>(y), ptr<A>(rstd), pr, N, C, S, eps,
                                           channels_last, threads);
    });
  });
}

void rms_norm_bwd(uintptr_t gy, uintptr_t x, uintptr_t rstd, uintptr_t w, uintptr_t s, uintptr_t sh, uintptr_t gx,
                  uintptr_t gw, uintptr_t gs, uintptr_t gsh, int64_t N, int64_t C, int64_t S, double eps,
                  bool channels_last, int dtype, int activation, int threads) {
  with_activation(activation, [&](auto tag) {
    with_storage(dtype, [&](auto type_tag, auto acc_tag) {
      using T = decltype(type_tag);
      using A = decltype(acc_tag);
      RmsParams<A> pr{ptr<const A>(w), ptr<const A>(s), ptr<const A>(sh), C};
      rms_backward<decltype(tag)::value, T>(ptr<const T>(gy), ptr<const T>(x), ptr<const A>(rstd), pr, ptr<T>(gx),
                                            ptr<A>(gw), ptr<A>(gs), ptr<A>(gsh), N, C, S, eps, channels_last,
                                            threads);
    });
  });
}

}  // namespace IMAGEN_FAST_ISA_NS
}  // namespace cpu
}  // namespace imagen_fast

#include "isa_end.h"
