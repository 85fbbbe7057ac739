// GroupNorm + FiLM + activation on the CPU, forward and backward.
//
//   h = ((x - mean_g) * rstd_g * w_c + b_c) * (1 + scale_nc) + shift_nc,  y = act(h)
//
// Layouts: contiguous (N, C, S) and channels-last (N, S, C), S = prod(spatial).
// Storage float / double / Half / BFloat16; arithmetic in float (double for double).
//
// Statistics are two-level: each chunk of ~4K elements gets an exact two-pass mean
// and M2 while it sits in L1, and chunks are merged with Chan's formula in double.
// The forward reads x once from memory for the statistics and once more (from L2
// when the tile fits) to write y; channels-last samples taken whole pull the next
// sample into L2 meanwhile, and float outputs of kStreamBytes and more are written by
// streaming stores (the caches could not keep them). The backward recomputes h from x,
// mean and rstd.
//
// Parallelism: independent tiles ((n, g) slices for contiguous, samples for
// channels-last) go to threads whole when there are enough of them; otherwise all
// threads split each tile and merge their partial statistics after a barrier (the
// "team" path, which also covers N * G < threads).
#include "isa_begin.h"
#include "vec.h"

namespace imagen_fast {
namespace cpu {
namespace IMAGEN_FAST_ISA_NS {
namespace {

constexpr int64_t kChunk = 4096;  // elements per two-pass chunk

// Count, mean and sum of squared deviations; merged with Chan et al.'s formula.
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  void merge(double nb, double mb, double m2b) {
    if (nb <= 0.0) return;
    double tot = n + nb;
    double d = mb - mean;
    mean += d * (nb / tot);
    m2 += m2b + d * d * (n * nb / tot);
    n = tot;
  }
  void merge(const Moments& o) { merge(o.n, o.mean, o.m2); }
};

// Sums of d = x - shift and d^2 over q[0, k) (vector lanes; the tail masked).
template <typename T, typename V>
inline void shifted_sums(const T* q, int64_t k, typename V::A shift, double* t, double* ss) {
  constexpr int W = V::W;
  const V mv = V::set1(shift);
  V s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
  V t0 = V::zero(), t1 = V::zero();
  int64_t i = 0;
  for (; i + 4 * W <= k; i += 4 * W) {
    V d0 = load(q + i) - mv, d1 = load(q + i + W) - mv;
    V d2 = load(q + i + 2 * W) - mv, d3 = load(q + i + 3 * W) - mv;
    t0 = t0 + (d0 + d1);
    t1 = t1 + (d2 + d3);
    s0 = fmadd(d0, d0, s0);
    s1 = fmadd(d1, d1, s1);
    s2 = fmadd(d2, d2, s2);
    s3 = fmadd(d3, d3, s3);
  }
  for (; i + W <= k; i += W) {
    V d = load(q + i) - mv;
    t0 = t0 + d;
    s0 = fmadd(d, d, s0);
  }
  if (i < k) {
    const int r = static_cast<int>(k - i);
    V d = keep_first(load_n(q + i, r) - mv, r);
    t1 = t1 + d;
    s1 = fmadd(d, d, s1);
  }
  *t = static_cast<double>(hsum(t0 + t1));
  *ss = static_cast<double>(hsum((s0 + s1) + (s2 + s3)));
}

// The shifted sums give mean = shift + t/k and M2 = ss - t^2/k; that difference is
// well conditioned (relative error ~ float eps) when the shift is within half a
// standard deviation of the mean, i.e. t^2/k <= ss/4. Otherwise: recentre and redo.
inline bool shift_ok(double k, double t, double ss) { return t * t <= 0.25 * ss * k; }

// Moments of each 4K-element chunk of a contiguous range (the chunk stays in L1),
// merged into m with Chan's formula. A chunk takes one pass shifted by the running
// mean (first chunk: the mean of its first 64 elements) when that verifies as well
// centred; otherwise a pass for its mean and a second pass about it.
template <typename T, typename V>
void range_moments(const T* p, int64_t len, Moments& m) {
  using A = typename V::A;
  constexpr int W = V::W;
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    const int64_t k = std::min(kChunk, len - c0);
    const T* q = p + c0;
    const double kd = static_cast<double>(k);
    double t, ss;
    if (m.n > 0 || k >= 8 * W) {
      // Shift: the running mean, or for the first chunk the mean of its first 4 vectors.
      A shift = static_cast<A>(m.mean);
      if (m.n == 0) shift = hsum((load(q) + load(q + W)) + (load(q + 2 * W) + load(q + 3 * W))) / A(4 * W);
      shifted_sums<T, V>(q, k, shift, &t, &ss);
      if (shift_ok(kd, t, ss)) {
        m.merge(kd, static_cast<double>(shift) + t / kd, std::max(0.0, ss - t * t / kd));
        continue;
      }
    }
    V s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
    int64_t i = 0;
    for (; i + 4 * W <= k; i += 4 * W) {
      s0 = s0 + load(q + i);
      s1 = s1 + load(q + i + W);
      s2 = s2 + load(q + i + 2 * W);
      s3 = s3 + load(q + i + 3 * W);
    }
    for (; i + W <= k; i += W) s0 = s0 + load(q + i);
    if (i < k) s1 = s1 + load_n(q + i, static_cast<int>(k - i));
    const A mean = hsum((s0 + s1) + (s2 + s3)) / static_cast<A>(k);
    // About the rounded chunk mean the same correction applies (and the shift is good).
    shifted_sums<T, V>(q, k, mean, &t, &ss);
    m.merge(kd, static_cast<double>(mean) + t / kd, std::max(0.0, ss - t * t / kd));
  }
}

// Channels-last geometry: positions repeat with period P = lcm(C, W) (R rows) when
// that is small, else P = C (R = 1) with a masked tail in every row.
struct Period {
  int64_t P, R;
};
template <int W> Period make_period(int64_t C) {
  int64_t g = C, b = W;
  while (b) {
    int64_t t = g % b;
    g = b;
    b = t;
  }
  int64_t R = W / g;
  if (R * C <= 1024) return {R * C, R};
  return {C, 1};
}

// Calls f(offset_in_block, j, n) for every vector of a flat block of E elements walked
// with period P: j is the position in the period, n the lanes in use (<= W).
template <int W, typename F> inline void for_period(int64_t E, int64_t P, F&& f) {
  for (int64_t off = 0; off < E; off += P) {
    const int64_t len = std::min(P, E - off);
    int64_t j = 0;
    for (; j + W <= len; j += W) f(off + j, j, W);
    if (j < len) f(off + j, j, static_cast<int>(len - j));
  }
}

template <typename V, typename A> inline V load_pos(const A* a, int64_t j, int n) {
  return n == V::W ? load(a + j) : load_n(a + j, n);
}
template <typename V, typename A> inline void store_pos(A* a, int64_t j, V v, int n) {
  if (n == V::W) store(a + j, v);
  else store_n(a + j, v, n);
}

// Scratch of one thread for the channels-last paths.
template <typename A> struct ClScratch {
  std::vector<A> acc, acc2, mpos, apos, bpos, rpos, k1, k2, k3;
  std::vector<double> chan1, chan2;
  void init(int64_t P, int64_t C) {
    for (auto* v : {&acc, &acc2, &mpos, &apos, &bpos, &rpos, &k1, &k2, &k3}) v->assign(P + 16, A(0));
    chan1.assign(C, 0.0);
    chan2.assign(C, 0.0);
  }
};

// Calls f(j, c) for every position j of a period and its channel c = j % C.
template <typename F> inline void for_positions(int64_t P, int64_t C, F&& f) {
  for (int64_t j0 = 0; j0 < P; j0 += C)
    for (int64_t c = 0; c < C; ++c) f(j0 + c, c);
}
// Same with the group g = c / Cg.
template <typename F> inline void for_positions_g(int64_t P, int64_t C, int64_t Cg, F&& f) {
  for (int64_t j0 = 0; j0 < P; j0 += C)
    for (int64_t c0 = 0, g = 0; c0 < C; c0 += Cg, ++g)
      for (int64_t c = c0; c < c0 + Cg; ++c) f(j0 + c, c, g);
}

inline int64_t chunk_rows_for(const Period& per) {
  return per.R * std::max<int64_t>(16, (2 * kChunk + per.P - 1) / per.P);
}

// Column-blocked sums over `np` whole periods (rows of P elements) of q: K vectors of
// accumulators stay in registers while the rows stream by. acc[j..j+K*W) is overwritten.
// next (or null): the following chunk, whose same columns are pulled into L2 meanwhile.
template <int K, typename T, typename V>
inline void col_sums(const T* q, int64_t np, int64_t P, int64_t j, typename V::A* acc, const T* next) {
  constexpr int W = V::W;
  V s[K];
  for (int k = 0; k < K; ++k) s[k] = V::zero();
  for (int64_t r = 0; r < np; ++r) {
    const T* p = q + r * P + j;
    if (next) prefetch_span<int(K * W * sizeof(T))>(next + r * P + j);
    for (int k = 0; k < K; ++k) s[k] = s[k] + load(p + k * W);
  }
  for (int k = 0; k < K; ++k) store(acc + j + k * W, s[k]);
}
// Same for sum (x - m)^2 (into acc) and sum (x - m) (into acc1) with m per position.
template <int K, typename T, typename V>
inline void col_m2(const T* q, int64_t np, int64_t P, int64_t j, const typename V::A* m,
                   typename V::A* acc, typename V::A* acc1, const T* next) {
  constexpr int W = V::W;
  V s[K], t[K], mv[K];
  for (int k = 0; k < K; ++k) {
    s[k] = V::zero();
    t[k] = V::zero();
    mv[k] = load(m + j + k * W);
  }
  for (int64_t r = 0; r < np; ++r) {
    const T* p = q + r * P + j;
    if (next) prefetch_span<int(K * W * sizeof(T))>(next + r * P + j);
    for (int k = 0; k < K; ++k) {
      V d = load(p + k * W) - mv[k];
      t[k] = t[k] + d;
      s[k] = fmadd(d, d, s[k]);
    }
  }
  for (int k = 0; k < K; ++k) {
    store(acc + j + k * W, s[k]);
    store(acc1 + j + k * W, t[k]);
  }
}
// Calls f(integral_constant<int, K>, j) over [0, nvec * W) in blocks of 8, 4, 2, 1 vectors.
template <int W, typename F> inline void for_col_blocks(int64_t nvec, F&& f) {
  int64_t v = 0;
  for (; v + 8 <= nvec; v += 8) f(std::integral_constant<int, 8>{}, v * W);
  if (v + 4 <= nvec) { f(std::integral_constant<int, 4>{}, v * W); v += 4; }
  if (v + 2 <= nvec) { f(std::integral_constant<int, 2>{}, v * W); v += 2; }
  if (v < nvec) f(std::integral_constant<int, 1>{}, v * W);
}

// Group moments of rows [0, rows) of a channels-last sample (x at the first row),
// merged into gm[0..G).
template <typename T, typename V>
void rows_moments(const T* x, int64_t rows, int64_t C, int64_t G, const Period& per,
                  ClScratch<typename V::A>& sc, Moments* gm) {
  using A = typename V::A;
  constexpr int W = V::W;
  const int64_t Cg = C / G, P = per.P;
  const int64_t chunk_rows = chunk_rows_for(per);
  A* acc = sc.acc.data();
  A* mpos = sc.mpos.data();
  std::vector<A> gmean(G);
  std::vector<double> m2(G), m1(G);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, rows - r0);
    const int64_t E = nr * C;
    const T* q = x + r0 * C;
    // Whole periods column-blocked in registers (P a multiple of W), the rest generic.
    const int64_t np = P % W == 0 ? E / P : 0;
    const double cntd = static_cast<double>(nr * Cg);
    // The next chunk (when it holds as many whole periods) streams into L2 during the
    // first pass over this one.
    const T* next = r0 + 2 * chunk_rows <= rows ? q + E : nullptr;
    bool fetched = false;
    // One pass shifted by the running group means when they verify as centred (see
    // range_moments); else chunk means first, then the pass about them.
    bool shifted = gm[0].n > 0;
    for (int pass = 0; pass < 2; ++pass) {
      if (shifted) {
        for (int64_t g = 0; g < G; ++g) gmean[g] = static_cast<A>(gm[g].mean);
      } else {
        if (np > 0) {
          for_col_blocks<W>(P / W, [&](auto k, int64_t j) {
            col_sums<decltype(k)::value, T, V>(q, np, P, j, acc, next);
          });
          fetched = true;
        } else {
          std::fill(acc, acc + P, A(0));
        }
        for_period<W>(E - np * P, P, [&](int64_t o, int64_t j, int n) {
          V v = n == W ? load(q + np * P + o) : load_n(q + np * P + o, n);
          store_pos<V>(acc, j, load_pos<V>(acc, j, n) + v, n);
        });
        // Per-group chunk means (positions past the last partial period hold zeros).
        std::fill(gmean.begin(), gmean.end(), A(0));
        for (int64_t j0 = 0; j0 < P; j0 += C)
          for (int64_t g = 0; g < G; ++g) {
            A t = 0;
            for (int64_t cl = 0; cl < Cg; ++cl) t += acc[j0 + g * Cg + cl];
            gmean[g] += t;
          }
        const A cnt = static_cast<A>(nr * Cg);
        for (int64_t g = 0; g < G; ++g) gmean[g] /= cnt;
      }
      for (int64_t j0 = 0; j0 < P; j0 += C)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t cl = 0; cl < Cg; ++cl) mpos[j0 + g * Cg + cl] = gmean[g];
      A* acc1 = sc.acc2.data();
      if (np > 0) {
        for_col_blocks<W>(P / W, [&](auto k, int64_t j) {
          col_m2<decltype(k)::value, T, V>(q, np, P, j, mpos, acc, acc1, fetched ? nullptr : next);
        });
        fetched = true;
      } else {
        std::fill(acc, acc + P, A(0));
        std::fill(acc1, acc1 + P, A(0));
      }
      for_period<W>(E - np * P, P, [&](int64_t o, int64_t j, int n) {
        const T* qq = q + np * P;
        V d = n == W ? load(qq + o) - load(mpos + j) : keep_first(load_n(qq + o, n) - load_n(mpos + j, n), n);
        store_pos<V>(acc1, j, load_pos<V>(acc1, j, n) + d, n);
        store_pos<V>(acc, j, fmadd(d, d, load_pos<V>(acc, j, n)), n);
      });
      std::fill(m2.begin(), m2.end(), 0.0);
      std::fill(m1.begin(), m1.end(), 0.0);
      for (int64_t j0 = 0; j0 < P; j0 += C)
        for (int64_t g = 0; g < G; ++g) {
          A t = 0, u = 0;
          for (int64_t cl = 0; cl < Cg; ++cl) {
            t += acc[j0 + g * Cg + cl];
            u += acc1[j0 + g * Cg + cl];
          }
          m2[g] += static_cast<double>(t);
          m1[g] += static_cast<double>(u);
        }
      if (!shifted) break;
      bool ok = true;
      for (int64_t g = 0; g < G && ok; ++g) ok = shift_ok(cntd, m1[g], m2[g]);
      if (ok) break;
      shifted = false;
    }
    for (int64_t g = 0; g < G; ++g)
      gm[g].merge(cntd, static_cast<double>(gmean[g]) + m1[g] / cntd,
                  std::max(0.0, m2[g] - m1[g] * m1[g] / cntd));
  }
}

// ------------------------------------------------------------------- parameters
template <typename A> struct Params {
  const A *w, *b, *s, *sh;  // any may be null
  int64_t C;
  A weight(int64_t c) const { return w ? w[c] : A(1); }
  A bias(int64_t c) const { return b ? b[c] : A(0); }
  A film(int64_t n, int64_t c) const { return s ? A(1) + s[n * C + c] : A(1); }
  A shift(int64_t n, int64_t c) const { return sh ? sh[n * C + c] : A(0); }
  // h = (x - mean) * coef_a + coef_b
  A coef_a(int64_t n, int64_t c, A rstd) const { return rstd * weight(c) * film(n, c); }
  A coef_b(int64_t n, int64_t c) const { return bias(c) * film(n, c) + shift(n, c); }
};

template <typename A> inline void finish_stats(const Moments& m, double eps, A* mean, A* rstd) {
  const double var = m.n > 0 ? std::max(m.m2 / m.n, 0.0) : 0.0;
  *mean = static_cast<A>(m.mean);
  *rstd = static_cast<A>(1.0 / std::sqrt(var + eps));
}

// Work split of [0, total) among nt parts, boundaries multiples of `align`.
inline void split_range(int64_t total, int part, int nt, int64_t align, int64_t* b, int64_t* e) {
  const int64_t units = (total + align - 1) / align;
  *b = std::min(total, units * part / nt * align);
  *e = std::min(total, units * (part + 1) / nt * align);
}

// Chooses whole tiles per thread (true) or the team split (false).
inline bool whole_tiles(int64_t tiles, int threads, int64_t tile_bytes, int64_t max_bytes) {
  if (threads <= 1) return true;
  if (tiles < threads) return false;
  if (tile_bytes > max_bytes && tiles < 4 * threads) return false;
  return tiles % threads == 0 || tiles >= 4 * threads;
}

// ---------------------------------------------------------------------- forward
// The second pass (y from x) walks its range front to back, as the statistics pass did:
// walking it backwards from the end (which the caches still hold) measured 20% slower,
// the hardware prefetchers losing the stream at every block.
constexpr int64_t kNormBlock = 4096;

// Calls f(b, e) for consecutive sub-ranges of [p0, p1) of at most about kNormBlock
// elements, block boundaries multiples of `align` from p0.
template <typename F> inline void for_blocks(int64_t p0, int64_t p1, int64_t align, F&& f) {
  const int64_t block = std::max<int64_t>(align, kNormBlock / align * align);
  for (int64_t b = p0; b < p1; b += block) f(b, std::min(p1, b + block));
}

// y = act((x - mean) * a + b) over a contiguous run; pf (or null): data of the next
// tile to pull into L2 meanwhile, so its statistics pass does not wait on memory.
template <Activation act, typename T, typename V>
inline void fwd_run(const T* x, T* y, int64_t len, typename V::A mean, typename V::A a,
                    typename V::A b, const T* pf) {
  constexpr int W = V::W;
  using A = typename V::A;
  // 16-bit outputs: fold the mean into the offset (x a + (b - mean a)); its rounding
  // (float eps * |mean| a) is far below their half-ulp. Wider outputs subtract first.
  constexpr bool fold = sizeof(T) == 2;
  constexpr bool lo = sizeof(T) == 2;
  const V mv = V::set1(fold ? A(0) : mean), av = V::set1(a);
  const V bv = V::set1(fold ? static_cast<A>(static_cast<double>(b) - static_cast<double>(mean) * a) : b);
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {  // four independent chains in flight
    if (pf) prefetch_span<int(4 * W * sizeof(T))>(pf + i);
    V h[4];
    for (int k = 0; k < 4; ++k)
      h[k] = fold ? fmadd(load(x + i + k * W), av, bv) : fmadd(load(x + i + k * W) - mv, av, bv);
    for (int k = 0; k < 4; ++k) store(y + i + k * W, act_fwd<act, lo>(h[k]));
  }
  for (; i + W <= len; i += W) store(y + i, act_fwd<act, lo>(fmadd(load(x + i) - mv, av, bv)));
  if (i < len) {
    const int n = static_cast<int>(len - i);
    store_n(y + i, act_fwd<act, lo>(fmadd(load_n(x + i, n) - mv, av, bv)), n);
  }
}

// Contiguous layout, elements [p0, p1) of slice (n, g).
template <Activation act, typename T, typename V>
void fwd_slice_part(const T* xs, T* ys, int64_t p0, int64_t p1, int64_t n, int64_t g, int64_t S,
                    int64_t Cg, typename V::A mean, typename V::A rstd, const typename V::A* wf,
                    const typename V::A* bf, const T* pf) {
  using A = typename V::A;
  constexpr int W = V::W;
  constexpr bool fold = sizeof(T) == 2;  // as in fwd_run
  if (S % W == 0 && S < 4 * W && p0 % W == 0 && p1 % W == 0) {
    // Channels of one to three vectors (4x4 and 8x8 maps): four vectors per step whatever
    // their channel, each with its channel's coefficients broadcast (per-channel runs
    // would keep a single dependency chain of the activation in flight).
    const V mv = V::set1(fold ? A(0) : mean);
    auto coefs = [&](int64_t i, V* av, V* bv) {
      const int64_t c = g * Cg + i / S;
      const A a = rstd * wf[c];
      *av = V::set1(a);
      *bv = V::set1(fold ? static_cast<A>(static_cast<double>(bf[c]) - static_cast<double>(mean) * a) : bf[c]);
    };
    int64_t i = p0;
    for (; i + 4 * W <= p1; i += 4 * W) {
      V h[4];
      for (int k = 0; k < 4; ++k) {
        V av, bv;
        coefs(i + k * W, &av, &bv);
        h[k] = fmadd(load(xs + i + k * W) - mv, av, bv);
      }
      for (int k = 0; k < 4; ++k) store(ys + i + k * W, act_fwd<act, fold>(h[k]));
    }
    for (; i < p1; i += W) {
      V av, bv;
      coefs(i, &av, &bv);
      store(ys + i, act_fwd<act, fold>(fmadd(load(xs + i) - mv, av, bv)));
    }
    return;
  }
  for_blocks(p0, p1, V::W, [&](int64_t b0, int64_t b1) {
    for (int64_t cl = b0 / S; cl < Cg && cl * S < b1; ++cl) {
      const int64_t b = std::max(b0, cl * S), e = std::min(b1, (cl + 1) * S);
      if (b >= e) continue;
      const int64_t c = g * Cg + cl;  // wf, bf point at sample n's row
      const A a = rstd * wf[c];
      fwd_run<act, T, V>(xs + b, ys + b, e - b, mean, a, bf[c], pf ? pf + b : nullptr);
    }
  });
}

// Whole periods, K vectors per step (K * W divides P); the per-position coefficients
// come from L1 in each step (hoisting them would spill on AVX2's 16 registers).
constexpr int64_t kAheadBytes = 2048;  // software prefetch distance of the second pass
constexpr int64_t kStreamBytes = int64_t(16) << 20;  // from this output size y is streamed

template <Activation act, typename T, typename V, int K, bool kStream = false>
inline void fwd_period_steps(const T* x, T* y, int64_t periods, int64_t P, const ClScratch<typename V::A>& sc,
                             const T* next) {
  constexpr int W = V::W;
  constexpr bool fold = sizeof(T) == 2;  // mean folded into bpos (see fill_fwd_pos)
  const auto* mp = sc.mpos.data();
  const auto* ap = sc.apos.data();
  const auto* bp = sc.bpos.data();
  for (int64_t r = 0; r < periods; ++r, x += P, y += P) {
    for (int64_t j = 0; j < P; j += K * W) {
      // ahead of the hardware prefetchers, which stop at every 4 KiB page
      prefetch_span<int(K * W * sizeof(T))>(x + j + kAheadBytes / int64_t(sizeof(T)));
      if (next) prefetch_span<int(K * W * sizeof(T))>(next + r * P + j);
      V h[K];
      for (int k = 0; k < K; ++k) {
        const int64_t o = j + k * W;
        h[k] = fold ? fmadd(load(x + o), load(ap + o), load(bp + o))
                    : fmadd(load(x + o) - load(mp + o), load(ap + o), load(bp + o));
      }
      for (int k = 0; k < K; ++k) {
        if constexpr (kStream) store_stream(y + j + k * W, act_fwd<act, fold>(h[k]));
        else store(y + j + k * W, act_fwd<act, fold>(h[k]));
      }
    }
  }
}

// Channels-last: y for rows [0, rows) with per-position mean/a/b, in blocks of whole
// periods.
template <Activation act, typename T, typename V>
void fwd_rows(const T* x, T* y, int64_t rows, int64_t C, const Period& per,
              const ClScratch<typename V::A>& sc, bool stream, const T* next = nullptr) {
  constexpr int W = V::W;
  const auto* mp = sc.mpos.data();
  const auto* ap = sc.apos.data();
  const auto* bp = sc.bpos.data();
  const int64_t P = per.P, E = rows * C;
  for_blocks(0, E, P, [&](int64_t b0, int64_t b1) {
    int64_t done = b0;
    const int64_t periods = (b1 - b0) / P;
    if (periods > 0 && P % (4 * W) == 0) {
      if constexpr (std::is_same_v<T, float>) {
        if (stream && reinterpret_cast<uintptr_t>(y + b0) % (W * sizeof(float)) == 0)
          fwd_period_steps<act, T, V, 4, true>(x + b0, y + b0, periods, P, sc, next ? next + b0 : nullptr);
        else
          fwd_period_steps<act, T, V, 4>(x + b0, y + b0, periods, P, sc, next ? next + b0 : nullptr);
      } else {
        fwd_period_steps<act, T, V, 4>(x + b0, y + b0, periods, P, sc, next ? next + b0 : nullptr);
      }
      done += periods * P;
    } else if (periods > 0 && P % (2 * W) == 0) {
      fwd_period_steps<act, T, V, 2>(x + b0, y + b0, periods, P, sc, next ? next + b0 : nullptr);
      done += periods * P;
    }
    for_period<W>(b1 - done, P, [&](int64_t o, int64_t j, int n) {
      const int64_t oo = done + o;
      if (n == W) {
        V h = fmadd(load(x + oo) - load(mp + j), load(ap + j), load(bp + j));
        store(y + oo, act_fwd<act, sizeof(T) == 2>(h));
      } else {
        V h = fmadd(load_n(x + oo, n) - load_n(mp + j, n), load_n(ap + j, n), load_n(bp + j, n));
        store_n(y + oo, act_fwd<act, sizeof(T) == 2>(h), n);
      }
    });
  });
}

// Per-position forward coefficients of sample n from its stats (G means/rstds):
// h = (x - mpos) apos + bpos, or with fold (16-bit outputs, as in fwd_run) mpos = 0 and
// bpos = b - mean a.
template <typename A>
void fill_fwd_pos(ClScratch<A>& sc, const Period& per, int64_t n, int64_t C, int64_t G,
                  const A* mean, const A* rstd, const Params<A>& pr, bool fold) {
  const int64_t Cg = C / G;
  for_positions_g(per.P, C, Cg, [&](int64_t j, int64_t c, int64_t g) {
    const A m = mean[n * G + g], a = pr.coef_a(n, c, rstd[n * G + g]), b = pr.coef_b(n, c);
    sc.mpos[j] = fold ? A(0) : m;
    sc.apos[j] = a;
    sc.bpos[j] = fold ? static_cast<A>(static_cast<double>(b) - static_cast<double>(m) * a) : b;
  });
}

template <Activation act, typename T>
void gn_forward(const T* x, T* y, typename VecOf<T>::type::A* mean, typename VecOf<T>::type::A* rstd,
                const Params<typename VecOf<T>::type::A>& pr, int64_t N, int64_t C, int64_t S,
                int64_t G, double eps, bool channels_last, int threads) {
  using V = typename VecOf<T>::type;
  using A = typename V::A;
  const int64_t Cg = C / G;
  threads = pick_threads(threads, N * C * S);
  if (!channels_last) {
    const int64_t D = Cg * S, tiles = N * G;
    const bool whole = whole_tiles(tiles, threads, D * int64_t(sizeof(T)), int64_t(1) << 20);
    // Pull the next tile into L2 during the second pass while two tiles fit beside each other.
    const bool prefetch_next = D * int64_t(sizeof(T)) <= (int64_t(1) << 18);
    std::vector<Moments> part(2 * threads);
    // Per (n, c): h = (x - mean) rstd wf + bf, wf = w (1 + scale), bf = b (1 + scale) + shift.
    std::vector<A> wf(N * C), bf(N * C);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        wf[n * C + c] = pr.weight(c) * pr.film(n, c);
        bf[n * C + c] = pr.coef_b(n, c);
      }
#pragma omp parallel num_threads(threads)
    {
      if (whole) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t n = t / G, g = t % G;
          Moments m;
          range_moments<T, V>(x + t * D, D, m);
          finish_stats(m, eps, &mean[t], &rstd[t]);
          fwd_slice_part<act, T, V>(x + t * D, y + t * D, 0, D, n, g, S, Cg, mean[t], rstd[t], &wf[n * C],
                                    &bf[n * C],
                                    prefetch_next && t + 1 < tiles ? x + (t + 1) * D : nullptr);
        }
      } else {
        const int tid = thread_id(), nt = team_size();
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t n = t / G, g = t % G;
          int64_t b, e;
          split_range(D, tid, nt, 64, &b, &e);
          Moments& mine = part[(t & 1) * threads + tid];
          mine = Moments();
          range_moments<T, V>(x + t * D + b, e - b, mine);
#pragma omp barrier
          Moments m;
          for (int k = 0; k < nt; ++k) m.merge(part[(t & 1) * threads + k]);
          A mu, rs;
          finish_stats(m, eps, &mu, &rs);
          if (tid == 0) {
            mean[t] = mu;
            rstd[t] = rs;
          }
          fwd_slice_part<act, T, V>(x + t * D, y + t * D, b, e, n, g, S, Cg, mu, rs, &wf[n * C], &bf[n * C],
                                    prefetch_next && t + 1 < tiles ? x + (t + 1) * D : nullptr);
        }
      }
    }
    return;
  }
  // channels-last
  const Period per = make_period<V::W>(C);
  const int64_t L = S * C;
  // float outputs far beyond the caches bypass them: no read for ownership of y's lines
  // (1x512x128x128 and 1x128x256x256 forward 1.08-1.19x; no gain at 2-4 MB)
  const bool stream = std::is_same_v<T, float> && N * L * int64_t(sizeof(T)) >= kStreamBytes;
  const bool whole = whole_tiles(N, threads, L * int64_t(sizeof(T)), int64_t(1) << 19);
  std::vector<Moments> part(2 * threads * G);
#pragma omp parallel num_threads(threads)
  {
    ClScratch<A> sc;
    sc.init(per.P, C);
    std::vector<Moments> gm(G);
    if (whole) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        std::fill(gm.begin(), gm.end(), Moments());
        rows_moments<T, V>(x + n * L, S, C, G, per, sc, gm.data());
        for (int64_t g = 0; g < G; ++g) finish_stats(gm[g], eps, &mean[n * G + g], &rstd[n * G + g]);
        fill_fwd_pos(sc, per, n, C, G, mean, rstd, pr, sizeof(T) == 2);
        // the next sample into L2 meanwhile (this one's rows come from L2): 8x128x32x32,
        // 64x128x16x16, 8x64x32x32 forward 1.01-1.19x on both variants
        fwd_rows<act, T, V>(x + n * L, y + n * L, S, C, per, sc, stream, n + 1 < N ? x + (n + 1) * L : nullptr);
      }
      if (stream) stream_fence();
    } else {
      const int tid = thread_id(), nt = team_size();
      std::vector<A> mu(G), rs(G);
      for (int64_t n = 0; n < N; ++n) {
        int64_t b, e;
        split_range(S, tid, nt, 1, &b, &e);
        Moments* mine = &part[((n & 1) * threads + tid) * G];
        for (int64_t g = 0; g < G; ++g) mine[g] = Moments();
        rows_moments<T, V>(x + n * L + b * C, e - b, C, G, per, sc, mine);
#pragma omp barrier
        for (int64_t g = 0; g < G; ++g) {
          Moments m;
          for (int k = 0; k < nt; ++k) m.merge(part[((n & 1) * threads + k) * G + g]);
          finish_stats(m, eps, &mu[g], &rs[g]);
          if (tid == 0) {
            mean[n * G + g] = mu[g];
            rstd[n * G + g] = rs[g];
          }
        }
        // Local copies: thread 0 may not have stored mean/rstd yet.
        fill_fwd_pos(sc, per, 0, C, G, mu.data(), rs.data(), Params<A>{pr.w, pr.b,
                     pr.s ? pr.s + n * C : nullptr, pr.sh ? pr.sh + n * C : nullptr, C}, sizeof(T) == 2);
        fwd_rows<act, T, V>(x + n * L + b * C, y + n * L + b * C, e - b, C, per, sc, stream);
        if (stream) stream_fence();
      }
    }
  }
}

// --------------------------------------------------------------------- backward
// Sums over a contiguous run of channel c: s1 += dh, s2 += dh * xhat, where
// dh = gy * act'(h), h = (x - mean) * a + b, xhat = (x - mean) * rstd. dhs (or null)
// keeps dh for the gx pass, so the activation's derivative is evaluated once.
template <Activation act, typename T, typename V>
inline void bwd_sums_run(const T* gy, const T* x, int64_t len, typename V::A mean,
                         typename V::A rstd, typename V::A a, typename V::A b,
                         double* s1, double* s2, typename V::A* dhs) {
  constexpr int W = V::W;
  const V mv = V::set1(mean), rv = V::set1(rstd), av = V::set1(a), bv = V::set1(b);
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    const int64_t k = std::min(kChunk, len - c0);
    V a1 = V::zero(), a2 = V::zero(), b1 = V::zero(), b2 = V::zero();
    int64_t i = c0;
    for (; i + 2 * W <= c0 + k; i += 2 * W) {
      V d0 = load(x + i) - mv, d1 = load(x + i + W) - mv;
      V g0 = load(gy + i), g1 = load(gy + i + W);
      if (act != Activation::None) {
        g0 = g0 * act_grad<act, sizeof(T) == 2>(fmadd(d0, av, bv));
        g1 = g1 * act_grad<act, sizeof(T) == 2>(fmadd(d1, av, bv));
      }
      if (dhs) {
        store(dhs + i, g0);
        store(dhs + i + W, g1);
      }
      a1 = a1 + g0;
      b1 = b1 + g1;
      a2 = fmadd(g0, d0, a2);
      b2 = fmadd(g1, d1, b2);
    }
    for (; i < c0 + k; i += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, c0 + k - i));
      V d = load_n(x + i, n) - mv;
      V g = load_n(gy + i, n);
      if (act != Activation::None) g = g * act_grad<act, sizeof(T) == 2>(fmadd(d, av, bv));
      g = keep_first(g, n);
      if (dhs) store_n(dhs + i, g, n);
      a1 = a1 + g;
      a2 = fmadd(g, d, a2);
    }
    *s1 += static_cast<double>(hsum(a1 + b1));
    *s2 += static_cast<double>(hsum((a2 + b2) * rv));
  }
}

// gx = k1 * dh + (x - mean) * k3 + k2 over a contiguous run (dh from dhs when given).
// pfx, pfg (or null): the same run of the next tile's x and gy, pulled into L2 meanwhile
// so that tile's sums pass does not wait on memory (as the forward's fwd_run does).
template <Activation act, typename T, typename V>
inline void bwd_gx_run(const T* gy, const T* x, T* gx, int64_t len, typename V::A mean,
                       typename V::A a, typename V::A b, typename V::A k1, typename V::A k2,
                       typename V::A k3, const typename V::A* dhs, const T* pfx = nullptr,
                       const T* pfg = nullptr) {
  constexpr int W = V::W;
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));  // elements per cache line
  const V mv = V::set1(mean), av = V::set1(a), bv = V::set1(b);
  const V k1v = V::set1(k1), k2v = V::set1(k2), k3v = V::set1(k3);
  for (int64_t i = 0; i < len; i += W) {
    if (pfx && i % kLine == 0) {
      prefetch_l2(pfx + i);
      prefetch_l2(pfg + i);
    }
    const int n = static_cast<int>(std::min<int64_t>(W, len - i));
    V d, g;
    if (n == W) {
      d = load(x + i) - mv;
      g = dhs ? load(dhs + i) : load(gy + i);
    } else {
      d = load_n(x + i, n) - mv;
      g = dhs ? load_n(dhs + i, n) : load_n(gy + i, n);
    }
    if (act != Activation::None && !dhs) g = g * act_grad<act, sizeof(T) == 2>(fmadd(d, av, bv));
    V r = fmadd(k1v, g, fmadd(d, k3v, k2v));
    if (n == W) store(gx + i, r);
    else store_n(gx + i, r, n);
  }
}

// Contiguous tile of D = Cg S elements whose channels hold one to three vectors (S % W
// == 0, S < 4 W: the 4x4 and 8x8 maps): the two passes of bwd_sums_run / bwd_gx_run,
// four vectors per step whatever their channel (per-channel runs would keep a single
// dependency chain of the activation's derivative in flight). ca, cb: the tile's
// per-channel h coefficients; s1, s2: its per-channel sums.
template <Activation act, typename T, typename V>
void bwd_sums_short(const T* gy, const T* x, int64_t D, int64_t S, typename V::A mean, typename V::A rstd,
                    const typename V::A* ca, const typename V::A* cb, double* s1, double* s2,
                    typename V::A* dhs) {
  constexpr int W = V::W;
  const V mv = V::set1(mean);
  for (int64_t i = 0; i < D; i += 4 * W) {
    const int kn = static_cast<int>(std::min<int64_t>(4, (D - i) / W));
    V d[4], g[4];
    for (int k = 0; k < kn; ++k) {
      const int64_t o = i + k * W, cl = o / S;
      d[k] = load(x + o) - mv;
      g[k] = load(gy + o);
      if (act != Activation::None)
        g[k] = g[k] * act_grad<act, sizeof(T) == 2>(fmadd(d[k], V::set1(ca[cl]), V::set1(cb[cl])));
    }
    for (int k = 0; k < kn; ++k) {
      const int64_t o = i + k * W, cl = o / S;
      if (dhs) store(dhs + o, g[k]);
      s1[cl] += static_cast<double>(hsum(g[k]));
      s2[cl] += static_cast<double>(hsum(g[k] * d[k])) * static_cast<double>(rstd);
    }
  }
}

template <Activation act, typename T, typename V>
void bwd_gx_short(const T* gy, const T* x, T* gx, int64_t D, int64_t S, typename V::A mean,
                  const typename V::A* ca, const typename V::A* cb, const typename V::A* k1, typename V::A k2,
                  typename V::A k3, const typename V::A* dhs) {
  constexpr int W = V::W;
  const V mv = V::set1(mean), k2v = V::set1(k2), k3v = V::set1(k3);
  for (int64_t i = 0; i < D; i += 4 * W) {
    const int kn = static_cast<int>(std::min<int64_t>(4, (D - i) / W));
    V r[4];
    for (int k = 0; k < kn; ++k) {
      const int64_t o = i + k * W, cl = o / S;
      const V d = load(x + o) - mv;
      V g = dhs ? load(dhs + o) : load(gy + o);
      if (act != Activation::None && !dhs)
        g = g * act_grad<act, sizeof(T) == 2>(fmadd(d, V::set1(ca[cl]), V::set1(cb[cl])));
      r[k] = fmadd(V::set1(k1[cl]), g, fmadd(d, k3v, k2v));
    }
    for (int k = 0; k < kn; ++k) store(gx + i + k * W, r[k]);
  }
}

// Channels-last sums for rows [0, rows): per-channel s1 (+= dh), s2 (+= dh * xhat)
// accumulated into sc.chan1/chan2, using per-position mpos/apos/bpos/rpos.
template <Activation act, typename T, typename V>
void bwd_sums_rows(const T* gy, const T* x, int64_t rows, int64_t C, const Period& per,
                   ClScratch<typename V::A>& sc, typename V::A* dhs) {
  using A = typename V::A;
  constexpr int W = V::W;
  const int64_t P = per.P;
  const int64_t chunk_rows = chunk_rows_for(per);
  A* acc = sc.acc.data();
  A* acc2 = sc.acc2.data();
  const A* mp = sc.mpos.data();
  const A* ap = sc.apos.data();
  const A* bp = sc.bpos.data();
  const A* rp = sc.rpos.data();
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, rows - r0);
    const int64_t E = nr * C;
    const T* xq = x + r0 * C;
    const T* gq = gy + r0 * C;
    std::fill(acc, acc + P, A(0));
    std::fill(acc2, acc2 + P, A(0));
    for_period<W>(E, P, [&](int64_t o, int64_t j, int n) {
      V d, g;
      if (n == W) {
        d = load(xq + o) - load(mp + j);
        g = load(gq + o);
        if (act != Activation::None) g = g * act_grad<act, sizeof(T) == 2>(fmadd(d, load(ap + j), load(bp + j)));
        if (dhs) store(dhs + r0 * C + o, g);
        store(acc + j, load(acc + j) + g);
        store(acc2 + j, fmadd(g, d * load(rp + j), load(acc2 + j)));
      } else {
        d = load_n(xq + o, n) - load_n(mp + j, n);
        g = load_n(gq + o, n);
        if (act != Activation::None) g = g * act_grad<act, sizeof(T) == 2>(fmadd(d, load_n(ap + j, n), load_n(bp + j, n)));
        g = keep_first(g, n);
        if (dhs) store_n(dhs + r0 * C + o, g, n);
        store_n(acc + j, load_n(acc + j, n) + g, n);
        store_n(acc2 + j, fmadd(g, d * load_n(rp + j, n), load_n(acc2 + j, n)), n);
      }
    });
    for_positions(P, C, [&](int64_t j, int64_t c) {
      sc.chan1[c] += static_cast<double>(acc[j]);
      sc.chan2[c] += static_cast<double>(acc2[j]);
    });
  }
}

template <Activation act, typename T, typename V>
void bwd_gx_rows(const T* gy, const T* x, T* gx, int64_t rows, int64_t C, const Period& per,
                 const ClScratch<typename V::A>& sc, const typename V::A* dhs) {
  constexpr int W = V::W;
  const auto* mp = sc.mpos.data();
  const auto* ap = sc.apos.data();
  const auto* bp = sc.bpos.data();
  const auto* k1 = sc.k1.data();
  const auto* k2 = sc.k2.data();
  const auto* k3 = sc.k3.data();
  for_period<W>(rows * C, per.P, [&](int64_t o, int64_t j, int n) {
    if (n == W) {
      V d = load(x + o) - load(mp + j);
      V g = dhs ? load(dhs + o) : load(gy + o);
      if (act != Activation::None && !dhs) g = g * act_grad<act, sizeof(T) == 2>(fmadd(d, load(ap + j), load(bp + j)));
      store(gx + o, fmadd(load(k1 + j), g, fmadd(d, load(k3 + j), load(k2 + j))));
    } else {
      V d = load_n(x + o, n) - load_n(mp + j, n);
      V g = dhs ? load_n(dhs + o, n) : load_n(gy + o, n);
      if (act != Activation::None && !dhs) g = g * act_grad<act, sizeof(T) == 2>(fmadd(d, load_n(ap + j, n), load_n(bp + j, n)));
      store_n(gx + o, fmadd(load_n(k1 + j, n), g, fmadd(d, load_n(k3 + j, n), load_n(k2 + j, n))), n);
    }
  });
}

// For group (n, g) with per-channel sums s1, s2 (Cg entries): gx = k1_c dh + (x-mean) k3 + k2.
template <typename A>
inline void gx_coefs(const Params<A>& pr, int64_t n, int64_t g, int64_t Cg, int64_t S, A rstd,
                     const double* s1, const double* s2, A* k1, A* k2, A* k3) {
  double c1 = 0.0, c2 = 0.0;
  for (int64_t cl = 0; cl < Cg; ++cl) {
    const int64_t c = g * Cg + cl;
    const double m = static_cast<double>(pr.weight(c)) * static_cast<double>(pr.film(n, c));
    c1 += m * s1[cl];
    c2 += m * s2[cl];
  }
  const double D = static_cast<double>(Cg * S), r = static_cast<double>(rstd);
  for (int64_t cl = 0; cl < Cg; ++cl) {
    const int64_t c = g * Cg + cl;
    k1[cl] = static_cast<A>(r * static_cast<double>(pr.weight(c)) * static_cast<double>(pr.film(n, c)));
  }
  *k2 = static_cast<A>(-r * c1 / D);
  *k3 = static_cast<A>(-r * r * c2 / D);
}

template <Activation act, typename T>
void gn_backward(const T* gy, const T* x, const typename VecOf<T>::type::A* mean,
                 const typename VecOf<T>::type::A* rstd, const Params<typename VecOf<T>::type::A>& pr,
                 T* gx, typename VecOf<T>::type::A* gw, typename VecOf<T>::type::A* gb,
                 typename VecOf<T>::type::A* gs, typename VecOf<T>::type::A* gsh, int64_t N,
                 int64_t C, int64_t S, int64_t G, bool channels_last, int threads) {
  using V = typename VecOf<T>::type;
  using A = typename V::A;
  const int64_t Cg = C / G;
  threads = pick_threads(threads, N * C * S);
  std::vector<double> S1(N * C, 0.0), S2(N * C, 0.0);  // per (n, c): sum dh, sum dh * xhat
  if (!channels_last) {
    const int64_t D = Cg * S, tiles = N * G;
    const bool whole = whole_tiles(tiles, threads, 2 * D * int64_t(sizeof(T)), int64_t(1) << 20);
    const bool short_runs = S % V::W == 0 && S < 4 * V::W;
    // Pull the next tile's x and gy into L2 during the gx pass while both tiles fit there.
    const bool prefetch_next = 4 * D * int64_t(sizeof(T)) <= (int64_t(1) << 19);
    std::vector<double> part(2 * threads * 2 * Cg);
#pragma omp parallel num_threads(threads)
    {
      std::vector<A> k1(Cg), ca(short_runs ? Cg : 0), cb(short_runs ? Cg : 0);
      // dh of the current tile (or part), when there is an activation to differentiate.
      const bool keep_dh = gx && act != Activation::None;
      std::vector<A> dh_buf(keep_dh ? size_t(D) + 16 : 0);
      A* dh = keep_dh ? dh_buf.data() : nullptr;
      if (whole) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t n = t / G, g = t % G;
          const A mu = mean[t], rs = rstd[t];
          double* s1 = &S1[n * C + g * Cg];
          double* s2 = &S2[n * C + g * Cg];
          if (short_runs) {
            for (int64_t cl = 0; cl < Cg; ++cl) {
              ca[cl] = pr.coef_a(n, g * Cg + cl, rs);
              cb[cl] = pr.coef_b(n, g * Cg + cl);
            }
            bwd_sums_short<act, T, V>(gy + t * D, x + t * D, D, S, mu, rs, ca.data(), cb.data(), s1, s2, dh);
            if (!gx) continue;
            A k2, k3;
            gx_coefs(pr, n, g, Cg, S, rs, s1, s2, k1.data(), &k2, &k3);
            bwd_gx_short<act, T, V>(gy + t * D, x + t * D, gx + t * D, D, S, mu, ca.data(), cb.data(), k1.data(),
                                    k2, k3, dh);
            continue;
          }
          for (int64_t cl = 0; cl < Cg; ++cl) {
            const int64_t c = g * Cg + cl, o = t * D + cl * S;
            bwd_sums_run<act, T, V>(gy + o, x + o, S, mu, rs, pr.coef_a(n, c, rs), pr.coef_b(n, c),
                                    &s1[cl], &s2[cl], dh ? dh + cl * S : nullptr);
          }
          if (!gx) continue;
          A k2, k3;
          gx_coefs(pr, n, g, Cg, S, rs, s1, s2, k1.data(), &k2, &k3);
          const bool pf = prefetch_next && t + 1 < tiles;
          for (int64_t cl = 0; cl < Cg; ++cl) {
            const int64_t c = g * Cg + cl, o = t * D + cl * S;
            bwd_gx_run<act, T, V>(gy + o, x + o, gx + o, S, mu, pr.coef_a(n, c, rs), pr.coef_b(n, c),
                                  k1[cl], k2, k3, dh ? dh + cl * S : nullptr, pf ? x + o + D : nullptr,
                                  pf ? gy + o + D : nullptr);
          }
        }
      } else {
        const int tid = thread_id(), nt = team_size();
        std::vector<double> s1(Cg), s2(Cg);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t n = t / G, g = t % G;
          const A mu = mean[t], rs = rstd[t];
          int64_t b, e;
          split_range(D, tid, nt, 64, &b, &e);
          double* mine = &part[((t & 1) * threads + tid) * 2 * Cg];
          std::fill(mine, mine + 2 * Cg, 0.0);
          for (int64_t cl = b / S; cl < Cg && cl * S < e; ++cl) {
            const int64_t lo = std::max(b, cl * S), hi = std::min(e, (cl + 1) * S);
            if (lo >= hi) continue;
            const int64_t c = g * Cg + cl;
            bwd_sums_run<act, T, V>(gy + t * D + lo, x + t * D + lo, hi - lo, mu, rs, pr.coef_a(n, c, rs),
                                    pr.coef_b(n, c), &mine[cl], &mine[Cg + cl], dh ? dh + (lo - b) : nullptr);
          }
#pragma omp barrier
          for (int64_t cl = 0; cl < Cg; ++cl) {
            s1[cl] = s2[cl] = 0.0;
            for (int k = 0; k < nt; ++k) {
              s1[cl] += part[((t & 1) * threads + k) * 2 * Cg + cl];
              s2[cl] += part[((t & 1) * threads + k) * 2 * Cg + Cg + cl];
            }
          }
          if (tid == 0) {
            std::copy(s1.begin(), s1.end(), &S1[n * C + g * Cg]);
            std::copy(s2.begin(), s2.end(), &S2[n * C + g * Cg]);
          }
          if (!gx) continue;
          A k2, k3;
          gx_coefs(pr, n, g, Cg, S, rs, s1.data(), s2.data(), k1.data(), &k2, &k3);
          for (int64_t cl = b / S; cl < Cg && cl * S < e; ++cl) {
            const int64_t lo = std::max(b, cl * S), hi = std::min(e, (cl + 1) * S);
            if (lo >= hi) continue;
            const int64_t c = g * Cg + cl, o = t * D + lo;
            bwd_gx_run<act, T, V>(gy + o, x + o, gx + o, hi - lo, mu, pr.coef_a(n, c, rs), pr.coef_b(n, c),
                                  k1[cl], k2, k3, dh ? dh + (lo - b) : nullptr);
          }
        }
      }
    }
  } else {
    const Period per = make_period<V::W>(C);
    const int64_t L = S * C;
    const bool whole = whole_tiles(N, threads, 2 * L * int64_t(sizeof(T)), int64_t(1) << 19);
    std::vector<double> part(2 * threads * 2 * C);
#pragma omp parallel num_threads(threads)
    {
      ClScratch<A> sc;
      sc.init(per.P, C);
      std::vector<A> k1(Cg), k2(G), k3(G);
      std::vector<double> s1(C), s2(C);
      const bool keep_dh = gx && act != Activation::None;
      std::vector<A> dh_buf(keep_dh ? size_t(whole ? L : ((S + threads - 1) / threads + 1) * C) + 16 : 0);
      A* dh = keep_dh ? dh_buf.data() : nullptr;
      auto fill_pos = [&](int64_t n) {
        for_positions_g(per.P, C, Cg, [&](int64_t j, int64_t c, int64_t g) {
          const A rs = rstd[n * G + g];
          sc.mpos[j] = mean[n * G + g];
          sc.rpos[j] = rs;
          sc.apos[j] = pr.coef_a(n, c, rs);
          sc.bpos[j] = pr.coef_b(n, c);
        });
      };
      auto fill_gx = [&](int64_t n, const double* t1, const double* t2) {
        for (int64_t g = 0; g < G; ++g) {
          gx_coefs(pr, n, g, Cg, S, rstd[n * G + g], t1 + g * Cg, t2 + g * Cg, k1.data(), &k2[g], &k3[g]);
          for (int64_t j = g * Cg; j < per.P; j += C)
            for (int64_t cl = 0; cl < Cg; ++cl) {
              sc.k1[j + cl] = k1[cl];
              sc.k2[j + cl] = k2[g];
              sc.k3[j + cl] = k3[g];
            }
        }
      };
      if (whole) {
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
          fill_pos(n);
          std::fill(sc.chan1.begin(), sc.chan1.end(), 0.0);
          std::fill(sc.chan2.begin(), sc.chan2.end(), 0.0);
          bwd_sums_rows<act, T, V>(gy + n * L, x + n * L, S, C, per, sc, dh);
          std::copy(sc.chan1.begin(), sc.chan1.end(), &S1[n * C]);
          std::copy(sc.chan2.begin(), sc.chan2.end(), &S2[n * C]);
          if (!gx) continue;
          fill_gx(n, &S1[n * C], &S2[n * C]);
          bwd_gx_rows<act, T, V>(gy + n * L, x + n * L, gx + n * L, S, C, per, sc, dh);
        }
      } else {
        const int tid = thread_id(), nt = team_size();
        for (int64_t n = 0; n < N; ++n) {
          int64_t b, e;
          split_range(S, tid, nt, 1, &b, &e);
          fill_pos(n);
          std::fill(sc.chan1.begin(), sc.chan1.end(), 0.0);
          std::fill(sc.chan2.begin(), sc.chan2.end(), 0.0);
          bwd_sums_rows<act, T, V>(gy + n * L + b * C, x + n * L + b * C, e - b, C, per, sc, dh);
          double* mine = &part[((n & 1) * threads + tid) * 2 * C];
          std::copy(sc.chan1.begin(), sc.chan1.end(), mine);
          std::copy(sc.chan2.begin(), sc.chan2.end(), mine + C);
#pragma omp barrier
          for (int64_t c = 0; c < C; ++c) {
            s1[c] = s2[c] = 0.0;
            for (int k = 0; k < nt; ++k) {
              s1[c] += part[((n & 1) * threads + k) * 2 * C + c];
              s2[c] += part[((n & 1) * threads + k) * 2 * C + C + c];
            }
          }
          if (tid == 0) {
            std::copy(s1.begin(), s1.end(), &S1[n * C]);
            std::copy(s2.begin(), s2.end(), &S2[n * C]);
          }
          if (!gx) continue;
          fill_gx(n, s1.data(), s2.data());
          bwd_gx_rows<act, T, V>(gy + n * L + b * C, x + n * L + b * C, gx + n * L + b * C, e - b, C, per, sc,
                                 dh);
        }
      }
    }
  }
  // Parameter gradients from the per-(n, c) sums, sample by sample along contiguous rows.
  std::vector<double> wacc(gw ? C : 0, 0.0), bacc(gb ? C : 0, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    const double* s1 = &S1[n * C];
    const double* s2 = &S2[n * C];
    const A* sc = pr.s ? pr.s + n * C : nullptr;
    if (gw || gb)
      for (int64_t c = 0; c < C; ++c) {
        const double f = sc ? 1.0 + static_cast<double>(sc[c]) : 1.0;
        if (gw) wacc[c] += f * s2[c];
        if (gb) bacc[c] += f * s1[c];
      }
    if (gs)
      for (int64_t c = 0; c < C; ++c)
        gs[n * C + c] = static_cast<A>((pr.w ? static_cast<double>(pr.w[c]) : 1.0) * s2[c] +
                                       (pr.b ? static_cast<double>(pr.b[c]) : 0.0) * s1[c]);
    if (gsh)
      for (int64_t c = 0; c < C; ++c) gsh[n * C + c] = static_cast<A>(s1[c]);
  }
  for (int64_t c = 0; gw && c < C; ++c) gw[c] = static_cast<A>(wacc[c]);
  for (int64_t c = 0; gb && c < C; ++c) gb[c] = static_cast<A>(bacc[c]);
}

}  // namespace

void group_norm_fwd(uintptr_t x, uintptr_t y, uintptr_t mean, uintptr_t rstd, uintptr_t w, uintptr_t b,
                    uintptr_t s, uintptr_t sh, int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                    bool channels_last, int dtype, int activation, int threads) {
  with_activation(activation, [&](auto tag) {
    constexpr Activation act = decltype(tag)::value;
    auto run = [&](auto type_tag, auto acc_tag) {
      using T = decltype(type_tag);
      using A = decltype(acc_tag);
      Params<A> pr{ptr<const A>(w), ptr<const A>(b), ptr<const A>(s), ptr<const A>(sh), C};
      gn_forward<act, T>(ptr<const T>(x), ptr<T>(y), ptr<A>(mean), ptr<A>(rstd), pr, N, C, S, G, eps,
                         channels_last, threads);
    };
    with_storage(dtype, run);
  });
}

void group_norm_bwd(uintptr_t gy, uintptr_t x, uintptr_t mean, uintptr_t rstd, uintptr_t w, uintptr_t b,
                    uintptr_t s, uintptr_t sh, uintptr_t gx, uintptr_t gw, uintptr_t gb, uintptr_t gs,
                    uintptr_t gsh, int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, int dtype,
                    int activation, int threads) {
  with_activation(activation, [&](auto tag) {
    constexpr Activation act = decltype(tag)::value;
    auto run = [&](auto type_tag, auto acc_tag) {
      using T = decltype(type_tag);
      using A = decltype(acc_tag);
      Params<A> pr{ptr<const A>(w), ptr<const A>(b), ptr<const A>(s), ptr<const A>(sh), C};
      gn_backward<act, T>(ptr<const T>(gy), ptr<const T>(x), ptr<const A>(mean), ptr<const A>(rstd), pr,
                          ptr<T>(gx), ptr<A>(gw), ptr<A>(gb), ptr<A>(gs), ptr<A>(gsh), N, C, S, G,
                          channels_last, threads);
    };
    with_storage(dtype, run);
  });
}

}  // namespace IMAGEN_FAST_ISA_NS
}  // namespace cpu
}  // namespace imagen_fast

#include "isa_end.h"
