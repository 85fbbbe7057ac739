// Attention of a few queries over a padded key sequence on the CPU, forward and backward:
//   out_i = softmax_j(scale q_i . k_j | mask_j) v,  lse_i = log sum_j exp(scale q_i . k_j)
// over the keys whose mask is true; a query with no such key gets out = 0, lse = -inf
// and zero gradients.
//
// For the short query sequences where torch's flash-attention kernel is all overhead
// (Imagen's attention pooling of the text: one query over the text tokens): one pass per
// (batch, head) with no tiling, scores of the valid keys in a small per-thread buffer,
// float arithmetic for float / half / bfloat16 storage. q, k, v, grad_out: (B, H, L, D)
// with unit stride on D and any strides on B, H, L; outputs contiguous; the forward's lse
// may be null (not written).
#include <memory>

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
  VF sum = VF::zero(), sum2 = VF::zero();
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {   // two vectors at a time: the exp chains overlap
    const VF e = vexp(load(s + j) - mv), e2 = vexp(load(s + j + W) - mv);
    store(p + j, e);
    store(p + j + W, e2);
    sum = sum + e;
    sum2 = sum2 + e2;
  }
  sum = sum + sum2;
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

// Software prefetch into L2 of the rows the next work item reads (one head's inputs are
// tens of KB read once from memory, and the hardware prefetchers restart at every short
// row), spread a few lines at a time over the current item's tiles.
class RowPrefetch {
 public:
  explicit RowPrefetch(int64_t row_bytes) : lines_per_row_((row_bytes + 127) / 64) {}
  void clear() {
    rows_.clear();
    row_ = 0;
    line_ = 0;
  }
  void add(const void* row) { rows_.push_back(static_cast<const char*>(row)); }
  int64_t lines() const { return static_cast<int64_t>(rows_.size()) * lines_per_row_; }
  void issue(int64_t n) {
    for (; n > 0 && row_ < rows_.size(); --n) {
      prefetch_l2(rows_[row_] + line_ * 64);
      if (++line_ == lines_per_row_) {
        line_ = 0;
        ++row_;
      }
    }
  }

 private:
  int64_t lines_per_row_;
  std::vector<const char*> rows_;
  size_t row_ = 0;
  int64_t line_ = 0;
};

template <typename T>
void forward(const T* q, const T* k, const T* v, const uint8_t* mask, T* out, float* lse, int64_t B, int64_t H,
             int64_t Lq, int64_t Lk, int64_t D, float scale, Strides sq, Strides sk, Strides sv, int threads) {
  const auto keys = valid_keys(mask, B, Lk);
  // A thread team only where the work is worth waking it (the text pooling is not).
  threads = pick_threads(threads, B * H * Lq * Lk * D / 2);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> s(static_cast<size_t>(Lk) + VF::W);
    RowPrefetch ahead(D * static_cast<int64_t>(sizeof(T)));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const auto& kv = keys[b];
      const int64_t nk = static_cast<int64_t>(kv.size());
      const auto v_row = [&](int64_t t) { return row(v, sv, b, h, kv[t]); };
      // the next (batch, head)'s rows, a few lines per key of this one (a head's keys are
      // a few KB: the hardware prefetchers barely start before they end)
      ahead.clear();
      if (bh + 1 < B * H) {
        const int64_t nb = (bh + 1) / H, nh = (bh + 1) % H;
        for (int64_t i = 0; i < Lq; ++i) ahead.add(row(q, sq, nb, nh, i));
        for (const int32_t j : keys[nb]) {
          ahead.add(row(k, sk, nb, nh, j));
          ahead.add(row(v, sv, nb, nh, j));
        }
      }
      const int64_t per_key = (ahead.lines() + Lq * nk - 1) / std::max<int64_t>(1, Lq * nk);
      for (int64_t i = 0; i < Lq; ++i) {
        T* o = out + (bh * Lq + i) * D;
        if (nk == 0) {
          zero_row(o, D);
          if (lse) lse[bh * Lq + i] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const T* qi = row(q, sq, b, h, i);
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < nk; ++t) {
          s[t] = scale * dot(qi, row(k, sk, b, h, kv[t]), D);
          m = std::max(m, s[t]);
          ahead.issue(per_key);
        }
        const float sum = exp_shifted(s.data(), s.data(), nk, m);
        weighted_sum<T>(o, s.data(), nk, v_row, D, 1.0f / sum);
        if (lse) lse[bh * Lq + i] = m + std::log(sum);
      }
    }
  }
}

// ---------------------------------------------------------------- tiled forward
// For more than kPerQuery queries (the per-query forward above reads every key once per
// query; from 4 queries on this one wins, 1.3-2.6x SDPA at 8x8x{4,8,16}x64x32 against
// 1.0-2.5x, and 1.1-1.5x at 16 queries where the per-query one was 0.74-1.04x): per (batch, head) the valid keys are packed once per thread
// (K transposed into strips of kStrip columns, V as rows of Dp floats, 16-bit storage
// widened), then blocks of up to kBlock queries run S = (scale Q) K^T into a buffer, a
// row softmax over the valid keys (the masked ones were never packed), and O = P V, both
// products in register tiles. Scores stay in the L2 cache, so no online rescaling.
constexpr int64_t kPerQuery = 2;                  // at most this many queries: the per-query forward
constexpr int kStripV = VF::W == 16 ? 4 : 2;       // vectors per score-tile row
constexpr int kStrip = kStripV * VF::W;             // key columns per strip
constexpr int kScoreRows = 6;                       // score tile: rows x kStripV vectors
constexpr int kOutRows = 6;                          // output tile: rows x up to kOutVecs vectors
constexpr int kOutVecs = VF::W == 16 ? 4 : 2;
constexpr int64_t kBlock = 64;                      // queries per work item

// The register tiles: acc[R][NV] vectors, updated by rank-1 products acc[r][c] += a(r) b[c].
template <int R, int NV> IF_VINLINE void zero_tile(VF (&acc)[R][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = VF::zero();
}

template <int R, int NV, typename AFn> IF_VINLINE void rank1(VF (&acc)[R][NV], const VF (&b)[NV], AFn a) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const VF ar = VF::set1(a(r));
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = fmadd(ar, b[c], acc[r][c]);
  }
}

// s[r][0, NV W) = sum_d qs[r][d] kt[d][0, NV W) for r < R (qs rows D apart, kt rows kStrip
// apart, s rows lds apart).
template <int R, int NV>
IF_VINLINE void score_tile(const float* qs, int64_t D, const float* kt, float* s, int64_t lds) {
  constexpr int W = VF::W;
  VF acc[R][NV];
  zero_tile(acc);
  for (int64_t d = 0; d < D; ++d) {
    VF kv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) kv[c] = load(kt + d * kStrip + c * W);
    rank1(acc, kv, [&](int r) { return qs[r * D + d]; });
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) store(s + r * lds + c * W, acc[r][c]);
}

// out[r][c0, c0 + NV W) = inv[r] sum_{t < n} p[r][t] vrows[t][c0, ...) for r < R, columns
// past D not stored (vrows hold at least c0 + NV W floats).
template <int R, int NV, typename T>
IF_VINLINE void out_tile(const float* p, int64_t ldp, int64_t n, const float* const* vrows, int64_t c0,
                         const float* inv, T* out, int64_t ldo, int64_t D) {
  constexpr int W = VF::W;
  VF acc[R][NV];
  zero_tile(acc);
  for (int64_t t = 0; t < n; ++t) {
    const float* vrow = vrows[t] + c0;
    VF vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = load(vrow + c * W);
    rank1(acc, vv, [&](int r) { return p[r * ldp + t]; });
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const VF iv = VF::set1(inv[r]);
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      const int64_t col = c0 + c * W;
      if (col + W <= D) store(out + r * ldo + col, acc[r][c] * iv);
      else if (col < D) store_n(out + r * ldo + col, acc[r][c] * iv, static_cast<int>(D - col));
    }
  }
}

template <int R, int NV>
void score_rows(int rows, const float* qs, int64_t D, const float* kt, float* s, int64_t lds) {
  if constexpr (R > 1) {
    if (rows < R) return score_rows<R - 1, NV>(rows, qs, D, kt, s, lds);
  }
  score_tile<R, NV>(qs, D, kt, s, lds);
}

// Scores of up to kScoreRows queries against one strip of nv vectors of keys.
inline void score_strip(int rows, int nv, const float* qs, int64_t D, const float* kt, float* s, int64_t lds) {
  if (nv == kStripV) return score_rows<kScoreRows, kStripV>(rows, qs, D, kt, s, lds);
  if constexpr (kStripV > 3) {
    if (nv == 3) return score_rows<kScoreRows, 3>(rows, qs, D, kt, s, lds);
  }
  if constexpr (kStripV > 2) {
    if (nv == 2) return score_rows<kScoreRows, 2>(rows, qs, D, kt, s, lds);
  }
  score_rows<kScoreRows, 1>(rows, qs, D, kt, s, lds);
}

template <int R, int NV, typename T>
void out_rows(int rows, const float* p, int64_t ldp, int64_t n, const float* const* vrows, int64_t c0,
              const float* inv, T* out, int64_t ldo, int64_t D) {
  if constexpr (R > 1) {
    if (rows < R) return out_rows<R - 1, NV>(rows, p, ldp, n, vrows, c0, inv, out, ldo, D);
  }
  out_tile<R, NV>(p, ldp, n, vrows, c0, inv, out, ldo, D);
}

// Output rows of up to kOutRows queries over a chunk of nv vectors of columns.
template <typename T>
inline void out_chunk(int rows, int nv, const float* p, int64_t ldp, int64_t n, const float* const* vrows,
                      int64_t c0, const float* inv, T* out, int64_t D) {
  if (nv == kOutVecs) return out_rows<kOutRows, kOutVecs>(rows, p, ldp, n, vrows, c0, inv, out, D, D);
  if constexpr (kOutVecs > 3) {
    if (nv == 3) return out_rows<kOutRows, 3>(rows, p, ldp, n, vrows, c0, inv, out, D, D);
  }
  if constexpr (kOutVecs > 2) {
    if (nv == 2) return out_rows<kOutRows, 2>(rows, p, ldp, n, vrows, c0, inv, out, D, D);
  }
  out_rows<kOutRows, 1>(rows, p, ldp, n, vrows, c0, inv, out, D, D);
}

struct RowSoftmax {
  float max, sum;
};

// Row softmax of s[0, n): p in place, returns (max, sum of exp(s - max)).
inline RowSoftmax softmax_row(float* s, int64_t n) {
  constexpr int W = VF::W;
  // four running maxima: one would wait for the previous compare at every vector
  VF m0 = VF::set1(-std::numeric_limits<float>::infinity()), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    m0 = vmax(m0, load(s + j));
    m1 = vmax(m1, load(s + j + W));
    m2 = vmax(m2, load(s + j + 2 * W));
    m3 = vmax(m3, load(s + j + 3 * W));
  }
  for (; j + W <= n; j += W) m0 = vmax(m0, load(s + j));
  float m = hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
  for (; j < n; ++j) m = std::max(m, s[j]);
  return {m, exp_shifted(s, s, n, m)};
}

// dst[j * ld + i] = src[i][j] for an 8 x 8 block (src: 8 row pointers).
inline void transpose8(const float* const* src, float* dst, int64_t ld) {
#if defined(__AVX__)
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src[i]);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {   // rows 4h .. 4h + 3: t[4h .. 4h + 3]
    const __m256 a = t[4 * h], b = t[4 * h + 1], c = t[4 * h + 2], d = t[4 * h + 3];
    r[4 * h] = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * h + 1] = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * h + 2] = _mm256_shuffle_ps(b, d, _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * h + 3] = _mm256_shuffle_ps(b, d, _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ld, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ld, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ld + i] = src[i][j];
#endif
}

// The valid keys' rows transposed into strips: kt[t / kStrip][d][t % kStrip] = k_t[d], the
// columns of the last strip past nk zero. krow(t): key t's row (D elements of T).
template <typename T, typename RowFn> void pack_keys(float* kt, int64_t nk, int64_t D, RowFn krow) {
  const int64_t nkp = (nk + kStrip - 1) / kStrip * kStrip;
  if (nk < nkp) std::fill(kt + (nkp - kStrip) * D, kt + nkp * D, 0.0f);
  float wide[8][8];
  const float* src[8];
  int64_t t0 = 0;
  for (; t0 + 8 <= nk; t0 += 8) {
    float* strip = kt + t0 / kStrip * kStrip * D + t0 % kStrip;
    int64_t d0 = 0;
    for (; d0 + 8 <= D; d0 += 8) {
      for (int i = 0; i < 8; ++i) {
        if constexpr (std::is_same_v<T, float>) {
          src[i] = krow(t0 + i) + d0;
        } else {
          for (int j = 0; j < 8; ++j) wide[i][j] = to_acc(krow(t0 + i)[d0 + j]);
          src[i] = wide[i];
        }
      }
      transpose8(src, strip + d0 * kStrip, kStrip);
    }
    for (int i = 0; i < 8; ++i)
      for (int64_t d = d0; d < D; ++d) strip[d * kStrip + i] = to_acc(krow(t0 + i)[d]);
  }
  for (; t0 < nk; ++t0) {
    float* dst = kt + t0 / kStrip * kStrip * D + t0 % kStrip;
    const T* kr = krow(t0);
    for (int64_t d = 0; d < D; ++d) dst[d * kStrip] = to_acc(kr[d]);
  }
}

// A float buffer left uninitialised (a std::vector would zero it: 160 KB per thread and
// call at 64 queries x 320 keys x D 64, a few percent of a 0.3 ms call).
class Floats {
 public:
  explicit Floats(int64_t n) : p_(new float[static_cast<size_t>(n)]) {}
  float* data() { return p_.get(); }
  float& operator[](int64_t i) { return p_[static_cast<size_t>(i)]; }

 private:
  std::unique_ptr<float[]> p_;
};

template <typename T>
void forward_tiled(const T* q, const T* k, const T* v, const uint8_t* mask, T* out, float* lse, int64_t B,
                   int64_t H, int64_t Lq, int64_t Lk, int64_t D, float scale, Strides sq, Strides sk, Strides sv,
                   int threads) {
  constexpr int W = VF::W;
  const auto keys = valid_keys(mask, B, Lk);
  const int64_t Dp = (D + W - 1) / W * W;
  const int64_t Lkp = (Lk + kStrip - 1) / kStrip * kStrip;
  const int64_t nblocks = (Lq + kBlock - 1) / kBlock;
  // float rows of D a multiple of the vector width are read where they are; others widened
  constexpr bool kFloat = std::is_same_v<T, float>;
  const bool v_in_place = kFloat && D == Dp;
  threads = pick_threads(threads, B * H * Lq * Lk * D / 2);
#pragma omp parallel num_threads(threads)
  {
    Floats kt(Lkp * D), vp(v_in_place ? 0 : Lk * Dp);
    const int64_t rows = std::min(kBlock, Lq);
    Floats qs(rows * D), s(rows * Lkp);
    std::vector<float> inv(static_cast<size_t>(kBlock));
    std::vector<const float*> vrows(static_cast<size_t>(Lk));
    int64_t packed = -1;
    RowPrefetch ahead(D * static_cast<int64_t>(sizeof(T)));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < B * H * nblocks; ++item) {
      const int64_t bh = item / nblocks, i0 = item % nblocks * kBlock;
      const int64_t b = bh / H, h = bh % H, mb = std::min(kBlock, Lq - i0);
      const auto& kv = keys[b];
      const int64_t nk = static_cast<int64_t>(kv.size());
      if (nk == 0) {
        for (int64_t i = i0; i < i0 + mb; ++i) {
          zero_row(out + (bh * Lq + i) * D, D);
          if (lse) lse[bh * Lq + i] = -std::numeric_limits<float>::infinity();
        }
        continue;
      }
      const int64_t nkp = (nk + W - 1) / W * W;  // score row length: the last strip may be narrower
      if (packed != bh) {
        pack_keys<T>(kt.data(), nk, D, [&](int64_t t) { return row(k, sk, b, h, kv[t]); });
        for (int64_t t = 0; t < nk; ++t) {
          const T* vr = row(v, sv, b, h, kv[t]);
          if constexpr (kFloat) {
            if (v_in_place) {
              vrows[t] = vr;
              continue;
            }
          }
          float* vd = vp.data() + t * Dp;
          for (int64_t d = 0; d < D; ++d) vd[d] = to_acc(vr[d]);
          for (int64_t d = D; d < Dp; ++d) vd[d] = 0.0f;
          vrows[t] = vd;
        }
        packed = bh;
      }
      for (int64_t r = 0; r < mb; ++r) {
        const T* qr = row(q, sq, b, h, i0 + r);
        for (int64_t d = 0; d < D; ++d) qs[r * D + d] = scale * to_acc(qr[d]);
      }
      ahead.clear();
      if (item + 1 < B * H * nblocks) {
        const int64_t nbh = (item + 1) / nblocks, ni0 = (item + 1) % nblocks * kBlock;
        const int64_t nb = nbh / H, nh = nbh % H;
        for (int64_t i = ni0; i < std::min(Lq, ni0 + kBlock); ++i) ahead.add(row(q, sq, nb, nh, i));
        if (nbh != bh)
          for (const int32_t j : keys[nb]) {
            ahead.add(row(k, sk, nb, nh, j));
            ahead.add(row(v, sv, nb, nh, j));
          }
      }
      const int64_t tiles = (nkp + kStrip - 1) / kStrip * ((mb + kScoreRows - 1) / kScoreRows);
      const int64_t per_tile = (ahead.lines() + tiles - 1) / tiles;
      for (int64_t j0 = 0; j0 < nkp; j0 += kStrip) {
        const int nv = static_cast<int>(std::min<int64_t>(kStrip, nkp - j0) / W);
        for (int64_t r = 0; r < mb; r += kScoreRows) {
          score_strip(static_cast<int>(std::min<int64_t>(kScoreRows, mb - r)), nv, qs.data() + r * D, D,
                      kt.data() + j0 * D, s.data() + r * nkp + j0, nkp);
          ahead.issue(per_tile);
        }
      }
      for (int64_t r = 0; r < mb; ++r) {
        const RowSoftmax sm = softmax_row(s.data() + r * nkp, nk);
        inv[r] = 1.0f / sm.sum;
        if (lse) lse[bh * Lq + i0 + r] = sm.max + std::log(sm.sum);
      }
      // column chunks outside the row tiles: the chunk's V rows stay in L1 across the tiles
      T* o = out + (bh * Lq + i0) * D;
      for (int64_t c0 = 0; c0 < Dp; c0 += kOutVecs * W) {
        const int nv = static_cast<int>(std::min<int64_t>(kOutVecs, (Dp - c0) / W));
        for (int64_t r = 0; r < mb; r += kOutRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kOutRows, mb - r));
          const float* pr = s.data() + r * nkp;
          const float* iv = inv.data() + r;
          T* orow = o + r * D;
          out_chunk(rows, nv, pr, nkp, nk, vrows.data(), c0, iv, orow, D);
        }
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
    (Lq <= kPerQuery ? forward<T> : forward_tiled<T>)(ptr<const T>(q), ptr<const T>(k), ptr<const T>(v), ptr<const uint8_t>(mask), ptr<T>(out),
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
