// Dynamic thresholding and the fused sampler step on the CPU.
//
// The percentile is exact: torch.quantile's linear interpolation between the order
// statistics at floor(p (n-1)) and the next one, with no sort and no 2^24-element
// limit. Selection works on the bit patterns of |x| (for non-negative IEEE floats the
// unsigned bit order is the value order):
//  1. estimate: the same ranks in a strided sample of 1024 elements give a key range
//     [lo, hi] that very likely holds both order statistics;
//  2. one vectorised pass counts the keys below lo, gathers those in [lo, hi] (a few
//     percent of the sample) and keeps the smallest key above hi;
//  3. if the wanted ranks fall inside, a branch-free quickselect on the gathered keys
//     gives them exactly. Otherwise (adversarial data) a radix selection takes over:
//     a 4096-bin histogram of the top bits names the bucket holding the rank, a second
//     level on the next bits runs only if that bucket is still large, and its keys are
//     gathered and ranked. Either way the answer is exact; only the time differs.
// dynamic_threshold: that pass plus the output pass. sampler_step: x0 is computed,
// stored and scanned in one pass, then one pass writes z_s.
//
// Samples go whole to threads when there are enough of them; otherwise all threads
// work on each sample (counts and candidates merged after barriers), so batch 1 uses
// every core too.
#include "isa_begin.h"
#include "vec.h"

namespace imagen_fast {
namespace cpu {
namespace IMAGEN_FAST_ISA_NS {
namespace {

template <typename T> using AccOf = typename VecOf<T>::type::A;

template <typename A> struct KeyOf;
template <> struct KeyOf<float> {
  using K = uint32_t;
};
template <> struct KeyOf<double> {
  using K = uint64_t;
};

constexpr int kBinBits = 12;
constexpr int kBins = 1 << kBinBits;
constexpr int64_t kBlock = 1024;  // keys computed per block

// Bit pattern of |v| in the accumulation type: ordered like the value.
template <typename T> inline typename KeyOf<AccOf<T>>::K abs_key(T v) {
  using A = AccOf<T>;
  using K = typename KeyOf<A>::K;
  A a = to_acc(v);
  K k;
  std::memcpy(&k, &a, sizeof(k));
  return k & (~K(0) >> 1);
}
template <typename K, typename A> inline A key_value(K k) {
  A a;
  std::memcpy(&a, &k, sizeof(a));
  return a;
}

// keys of |x[0..n)|, n <= kBlock.
template <typename T> inline void abs_keys(const T* x, int64_t n, typename KeyOf<AccOf<T>>::K* out) {
#if IMAGEN_FAST_AVX512
  if constexpr (!std::is_same<T, double>::value) {
    const __m512i mask = _mm512_set1_epi32(0x7fffffff);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_si512(out + i, _mm512_and_si512(_mm512_castps_si512(load(x + i).v), mask));
    if (i < n) {
      const int r = static_cast<int>(n - i);
      _mm512_mask_storeu_epi32(out + i, first_n(r),
                               _mm512_and_si512(_mm512_castps_si512(load_n(x + i, r).v), mask));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = abs_key(x[i]);
}

// One level of the radix selection over x[b, e): histogram of bits [shift, shift + nb)
// of the keys whose bits above `shift + nb` equal `prefix`.
template <typename T>
void histogram(const T* x, int64_t b, int64_t e, typename KeyOf<AccOf<T>>::K prefix, int shift, int nb,
               bool all, uint32_t* hist) {
  using K = typename KeyOf<AccOf<T>>::K;
  std::fill(hist, hist + kBins, 0u);
  alignas(64) K keys[kBlock];
  // Four copies break the store-to-load chains of runs of equal bins (data clusters in a
  // few dozen bins, so only those lines are hot).
  std::vector<uint32_t> extra(3 * size_t(kBins), 0u);
  uint32_t* h1 = extra.data();
  uint32_t* h2 = h1 + kBins;
  uint32_t* h3 = h2 + kBins;
  const K mask = (K(1) << nb) - 1;
  for (int64_t i0 = b; i0 < e; i0 += kBlock) {
    const int64_t n = std::min(kBlock, e - i0);
    abs_keys(x + i0, n, keys);
    if (all) {
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) {
        ++hist[(keys[i] >> shift) & mask];
        ++h1[(keys[i + 1] >> shift) & mask];
        ++h2[(keys[i + 2] >> shift) & mask];
        ++h3[(keys[i + 3] >> shift) & mask];
      }
      for (; i < n; ++i) ++hist[(keys[i] >> shift) & mask];
    } else {
      for (int64_t i = 0; i < n; ++i)
        if ((keys[i] >> (shift + nb)) == prefix) ++hist[(keys[i] >> shift) & mask];
    }
  }
  for (int i = 0; i < kBins; ++i) hist[i] += h1[i] + h2[i] + h3[i];
}

// A growable array that never zero-fills what it is about to overwrite.
template <typename K> struct KeyBuf {
  std::vector<K> v;  // capacity
  size_t n = 0;      // used
  void clear() { n = 0; }
  K* reserve_more(size_t m) {
    if (n + m > v.size()) v.resize(std::max(n + m, 2 * v.size()));
    return v.data() + n;
  }
  K* begin() { return v.data(); }
  K* end() { return v.data() + n; }
};

// Keys of x[b, e) whose bits from `shift` up equal `prefix` are appended to out; the
// smallest key above that bucket is min-merged into *above.
template <typename T>
void gather(const T* x, int64_t b, int64_t e, typename KeyOf<AccOf<T>>::K prefix, int shift,
            KeyBuf<typename KeyOf<AccOf<T>>::K>& out, typename KeyOf<AccOf<T>>::K* above) {
  using K = typename KeyOf<AccOf<T>>::K;
  alignas(64) K keys[kBlock];
  K amin = *above;
  for (int64_t i0 = b; i0 < e; i0 += kBlock) {
    const int64_t n = std::min(kBlock, e - i0);
    abs_keys(x + i0, n, keys);
    K* dst = out.reserve_more(static_cast<size_t>(n) + 16);  // slack for full-vector stores
    size_t cnt = 0;
    int64_t i = 0;
#if IMAGEN_FAST_AVX512
    if constexpr (sizeof(K) == 4) {
      // 16 keys a step: compress-store the bucket's keys, masked min of those above it.
      const __m512i pv = _mm512_set1_epi32(static_cast<int>(prefix));
      const __m128i sh = _mm_cvtsi32_si128(shift);
      __m512i mn = _mm512_set1_epi32(-1);
      for (; i + 16 <= n; i += 16) {
        const __m512i kv = _mm512_load_si512(keys + i);
        const __m512i top = _mm512_srl_epi32(kv, sh);
        const __mmask16 eq = _mm512_cmpeq_epu32_mask(top, pv);
        const __mmask16 gt = _mm512_cmpgt_epu32_mask(top, pv);
        _mm512_storeu_si512(dst + cnt, _mm512_maskz_compress_epi32(eq, kv));
        cnt += static_cast<size_t>(__builtin_popcount(eq));
        mn = _mm512_mask_min_epu32(mn, gt, mn, kv);
      }
      const K m = static_cast<K>(_mm512_reduce_min_epu32(mn));
      amin = m < amin ? m : amin;
    }
#endif
    for (; i < n; ++i) {
      const K k = keys[i];
      const K top = k >> shift;
      dst[cnt] = k;
      cnt += top == prefix;
      amin = (top > prefix && k < amin) ? k : amin;
    }
    out.n += cnt;
  }
  *above = amin;
}

// k-th smallest (0-based) of a[0, n); a may be reordered but keeps its keys. For 32-bit
// keys with AVX-512: a branch-free quickselect (three-way partitions by compress into
// registers); else std::nth_element, whose unpredictable branches cost ~10x more.
template <typename K> K kth_smallest(K* a, size_t n, size_t k) {
#if IMAGEN_FAST_AVX512
  if constexpr (sizeof(K) == 4) {
    // a keeps its keys (callers scan it again); partitions go to three scratch buffers.
    thread_local std::vector<K> buf[3];
    for (auto& b : buf)
      if (b.size() < n + 16) b.resize(n + 16);
    K* cur = a;
    while (n > 256) {
      K p0 = cur[0], p1 = cur[n / 2], p2 = cur[n - 1];
      const K pivot = std::max(std::min(p0, p1), std::min(std::max(p0, p1), p2));
      const __m512i pv = _mm512_set1_epi32(static_cast<int>(pivot));
      K* outs[2];
      int no = 0;
      for (auto& b : buf)
        if (b.data() != cur && no < 2) outs[no++] = b.data();
      K* lo = outs[0];
      K* hi = outs[1];
      size_t nl = 0, nh = 0, i = 0;
      for (; i + 16 <= n; i += 16) {
        const __m512i kv = _mm512_loadu_si512(cur + i);
        const __mmask16 lt = _mm512_cmplt_epu32_mask(kv, pv);
        const __mmask16 gt = _mm512_cmpgt_epu32_mask(kv, pv);
        _mm512_storeu_si512(lo + nl, _mm512_maskz_compress_epi32(lt, kv));
        _mm512_storeu_si512(hi + nh, _mm512_maskz_compress_epi32(gt, kv));
        nl += static_cast<size_t>(__builtin_popcount(lt));
        nh += static_cast<size_t>(__builtin_popcount(gt));
      }
      for (; i < n; ++i) {
        const K v = cur[i];
        if (v < pivot) lo[nl++] = v;
        else if (v > pivot) hi[nh++] = v;
      }
      const size_t ne = n - nl - nh;
      if (k < nl) {
        cur = lo;
        n = nl;
      } else if (k < nl + ne) {
        return pivot;
      } else {
        k -= nl + ne;
        cur = hi;
        n = nh;
      }
    }
    std::nth_element(cur, cur + k, cur + n);
    return cur[k];
  }
#endif
  std::nth_element(a, a + k, a + n);
  return a[k];
}

// The (k+1)-th smallest given lo = the k-th: lo again when more than k+1 keys are <= lo,
// else the smallest key above lo (or `above` when there is none in a).
template <typename K> K next_smallest(const K* a, size_t n, size_t k, K lo, K above) {
  size_t le = 0;
  K mn = above;
  for (size_t i = 0; i < n; ++i) {
    le += a[i] <= lo;
    mn = (a[i] > lo && a[i] < mn) ? a[i] : mn;
  }
  return le > k + 1 ? lo : mn;
}

// Shared state of a team selecting on one sample.
// One pass around an estimated key range [lo, hi]: counts the keys below it, gathers
// the keys inside it (up to cap) and keeps the smallest key above it.
template <typename K> struct RangeScan {
  K lo = 0, hi = 0;
  int64_t less = 0, between = 0;
  size_t cap = 0;
  bool overflow = false;
  K above = std::numeric_limits<K>::max();
  KeyBuf<K> cand;
  void reset(K l, K h, size_t c) {
    lo = l;
    hi = h;
    less = between = 0;
    cap = c;
    overflow = false;
    above = std::numeric_limits<K>::max();
    cand.clear();
  }
  void feed(const K* keys, int64_t n) {
    int64_t i = 0, nless = 0, nbetween = 0;
    K amin = above;
#if IMAGEN_FAST_AVX512
    if constexpr (sizeof(K) == 4) {
      const __m512i lov = _mm512_set1_epi32(static_cast<int>(lo)), hiv = _mm512_set1_epi32(static_cast<int>(hi));
      __m512i mn = _mm512_set1_epi32(-1);
      if (cand.n + static_cast<size_t>(n) <= cap) {
        // Room for the whole block: branch-free compress-stores.
        K* dst = cand.reserve_more(static_cast<size_t>(n) + 16);
        size_t cnt = 0;
        for (; i + 16 <= n; i += 16) {
          const __m512i kv = _mm512_loadu_si512(keys + i);
          const __mmask16 lt = _mm512_cmplt_epu32_mask(kv, lov);
          const __mmask16 le = _mm512_cmple_epu32_mask(kv, hiv);
          const __mmask16 in = static_cast<__mmask16>(le & ~lt);
          nless += __builtin_popcount(lt);
          // compress in a register, then a plain store (compress-to-memory is
          // microcoded and slow on AMD Zen 4/5); the reserve left 16 keys of slack.
          _mm512_storeu_si512(dst + cnt, _mm512_maskz_compress_epi32(in, kv));
          cnt += static_cast<size_t>(__builtin_popcount(in));
          mn = _mm512_mask_min_epu32(mn, static_cast<__mmask16>(~le), mn, kv);
        }
        cand.n += cnt;
        nbetween += static_cast<int64_t>(cnt);
      } else {
        overflow = true;  // candidates beyond the cap: only count
        for (; i + 16 <= n; i += 16) {
          const __m512i kv = _mm512_loadu_si512(keys + i);
          const __mmask16 lt = _mm512_cmplt_epu32_mask(kv, lov);
          const __mmask16 le = _mm512_cmple_epu32_mask(kv, hiv);
          nless += __builtin_popcount(lt);
          nbetween += __builtin_popcount(static_cast<__mmask16>(le & ~lt));
          mn = _mm512_mask_min_epu32(mn, static_cast<__mmask16>(~le), mn, kv);
        }
      }
      const K m = static_cast<K>(_mm512_reduce_min_epu32(mn));
      amin = m < amin ? m : amin;
    }
#endif
    for (; i < n; ++i) {
      const K k = keys[i];
      if (k < lo) {
        ++nless;
      } else if (k <= hi) {
        ++nbetween;
        if (cand.n < cap) {
          *cand.reserve_more(1) = k;
          ++cand.n;
        } else {
          overflow = true;
        }
      } else if (k < amin) {
        amin = k;
      }
    }
    less += nless;
    between += nbetween;
    above = amin;
  }
};

template <typename K> struct TeamState {
  std::vector<uint32_t> hist;             // threads * kBins
  std::vector<KeyBuf<K>> cand;            // per thread
  std::vector<K> above;                   // per thread
  std::vector<RangeScan<K>> scan;         // per thread
  K lo = 0, hi = 0;
  bool ok = false;
  explicit TeamState(int threads)
      : hist(size_t(threads) * kBins), cand(threads), above(threads), scan(threads) {}
};

inline void team_barrier(bool team) {
  if (team) {
#pragma omp barrier
  }
}

// Order statistics qr.lo and qr.hi of |x| over x[0, n), by the calling team (team =
// all threads of the enclosing parallel region call it; otherwise one thread alone).
// Each thread scans its part [b, e).
template <typename T>
void select_pair(const T* x, int64_t n, int64_t b, int64_t e, const QuantileRank& qr, bool team, int tid,
                 int nt, TeamState<typename KeyOf<AccOf<T>>::K>& st,
                 typename KeyOf<AccOf<T>>::K* lo_out, typename KeyOf<AccOf<T>>::K* hi_out) {
  using K = typename KeyOf<AccOf<T>>::K;
  constexpr int B = 8 * sizeof(K);
  // Few enough candidates to rank directly: below this, another histogram level costs more.
  const int64_t cap = std::max<int64_t>(4096, n / 32);
  int64_t k = qr.lo;
  K prefix = 0;
  int pbits = 0;
  for (int level = 0;; ++level) {
    const int nb = std::min(kBinBits, B - 1 - pbits);
    const int shift = B - 1 - pbits - nb;
    uint32_t* mine = st.hist.data() + size_t(tid) * kBins;
    histogram(x, b, e, prefix, shift, nb, level == 0, mine);
    team_barrier(team);
    int64_t below = 0, count = 0;
    int bin = 0;
    for (; bin < (1 << nb); ++bin) {
      int64_t c = 0;
      for (int t = 0; t < nt; ++t) c += st.hist[size_t(t) * kBins + bin];
      if (below + c > k) {
        count = c;
        break;
      }
      below += c;
    }
    team_barrier(team);  // the histograms may be overwritten from here on
    k -= below;
    prefix = (prefix << nb) | K(bin);
    pbits += nb;
    const int rest = B - 1 - pbits;  // bits below the resolved prefix
    if (rest == 0 || count <= cap) {
      st.cand[tid].clear();
      st.above[tid] = std::numeric_limits<K>::max();
      if (rest == 0) {
        // Every key of the bucket equals prefix: only the key above may be needed.
        if (k + 1 >= count && qr.hi != qr.lo) gather(x, b, e, prefix, 0, st.cand[tid], &st.above[tid]);
      } else {
        gather(x, b, e, prefix, rest, st.cand[tid], &st.above[tid]);
      }
      team_barrier(team);
      if (tid == 0) {
        K lo, hi;
        K above = std::numeric_limits<K>::max();
        for (int t = 0; t < nt; ++t) above = std::min(above, st.above[t]);
        if (rest == 0) {
          lo = prefix;
          hi = k + 1 < count ? prefix : above;
        } else {
          KeyBuf<K>& all = st.cand[0];
          for (int t = 1; t < nt; ++t) {
            K* dst = all.reserve_more(st.cand[t].n);
            std::copy(st.cand[t].begin(), st.cand[t].end(), dst);
            all.n += st.cand[t].n;
          }
          lo = kth_smallest(all.begin(), all.n, static_cast<size_t>(k));
          hi = next_smallest(all.begin(), all.n, static_cast<size_t>(k), lo, above);
        }
        if (qr.hi == qr.lo || hi == std::numeric_limits<K>::max()) hi = lo;
        st.lo = lo;
        st.hi = hi;
      }
      team_barrier(team);
      *lo_out = st.lo;
      *hi_out = st.hi;
      return;
    }
  }
}

// Key range that very likely holds the order statistics qr.lo and qr.hi, from a strided
// sample of 1024 keys (key_at(i) = key of element i): the sample ranks 4 standard
// deviations (+4) around the target. Small inputs take everything. Returns the share
// of all keys expected inside.
template <typename K, typename F>
double estimate_range(int64_t L, const QuantileRank& qr, F&& key_at, K* lo, K* hi) {
  const K kmax = ~K(0) >> 1;
  if (L <= 8192) {
    *lo = 0;
    *hi = kmax;
    return 1.0;
  }
  constexpr int64_t m = 1024;
  K smp[m];
  for (int64_t i = 0; i < m; ++i) smp[i] = key_at((2 * i + 1) * L / (2 * m));
  const double q = static_cast<double>(qr.lo) / static_cast<double>(L - 1);
  const double j = q * static_cast<double>(m - 1);
  const int64_t d = static_cast<int64_t>(std::ceil(4.0 * std::sqrt(m * q * (1.0 - q)) + 4.0));
  const int64_t jl = static_cast<int64_t>(std::floor(j)) - d, jh = static_cast<int64_t>(std::ceil(j)) + 1 + d;
  if (jl <= 0) {
    *lo = 0;
  } else {
    *lo = kth_smallest(smp, static_cast<size_t>(m), static_cast<size_t>(jl));
  }
  if (jh >= m - 1) {
    *hi = kmax;
  } else {
    *hi = kth_smallest(smp, static_cast<size_t>(m), static_cast<size_t>(jh));
  }
  return static_cast<double>(std::min(jh, m - 1) - std::max<int64_t>(jl, 0) + 1) / m;
}

// After every thread scanned its part with st.scan[tid]: did the range hold both order
// statistics? If so *lo_out / *hi_out are set. Same answer on every thread of the team.
template <typename K>
bool resolve_scan(const QuantileRank& qr, bool team, int tid, int nt, TeamState<K>& st, K* lo_out, K* hi_out) {
  team_barrier(team);
  if (tid == 0) {
    int64_t less = 0, between = 0;
    bool overflow = false;
    K above = std::numeric_limits<K>::max();
    for (int t = 0; t < nt; ++t) {
      less += st.scan[t].less;
      between += st.scan[t].between;
      overflow = overflow || st.scan[t].overflow;
      above = std::min(above, st.scan[t].above);
    }
    const int64_t k = qr.lo - less;
    st.ok = !overflow && k >= 0 && k < between;
    if (st.ok) {
      KeyBuf<K>& all = st.scan[0].cand;
      for (int t = 1; t < nt; ++t) {
        K* dst = all.reserve_more(st.scan[t].cand.n);
        std::copy(st.scan[t].cand.begin(), st.scan[t].cand.end(), dst);
        all.n += st.scan[t].cand.n;
      }
      K lo = kth_smallest(all.begin(), all.n, static_cast<size_t>(k));
      K hi = next_smallest(all.begin(), all.n, static_cast<size_t>(k), lo, above);
      if (qr.hi == qr.lo || hi == std::numeric_limits<K>::max()) hi = lo;
      st.lo = lo;
      st.hi = hi;
    }
  }
  team_barrier(team);
  *lo_out = st.lo;
  *hi_out = st.hi;
  return st.ok;
}

inline size_t scan_cap(double share, int64_t L) {
  return static_cast<size_t>(std::min<double>(static_cast<double>(L), 2.0 * share * static_cast<double>(L) + 4096.0));
}

// below + (above - below) * frac in A, rounded after each operation like torch's
// quantile_linear (no fused multiply-add).
template <typename A> A lerp_exact(A below, A above, double frac) {
  volatile A d = above - below;
  volatile A m = d * static_cast<A>(frac);
  return below + m;
}

inline bool whole_samples(int64_t N, int threads) {
  if (threads <= 1) return true;
  if (N < threads) return false;
  return N % threads == 0 || N >= 4 * threads;
}

inline void split_range(int64_t total, int part, int nt, int64_t* b, int64_t* e) {
  const int64_t align = 64, units = (total + align - 1) / align;
  *b = std::min(total, units * part / nt * align);
  *e = std::min(total, units * (part + 1) / nt * align);
}

// Runs body(n, b, e, team, tid, nt) for every sample n, either whole per thread or
// split over the team.
template <typename F> void for_samples(int64_t N, int64_t L, int threads, F&& body) {
  const bool whole = whole_samples(N, threads);
#pragma omp parallel num_threads(threads)
  {
    if (whole) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) body(n, int64_t(0), L, false, 0, 1);
    } else {
      const int tid = thread_id(), nt = team_size();
      int64_t b, e;
      split_range(L, tid, nt, &b, &e);
      for (int64_t n = 0; n < N; ++n) body(n, b, e, true, tid, nt);
    }
  }
}

// ----------------------------------------------------------------- dynamic threshold
template <typename T>
void threshold_out(const T* x, T* y, int64_t b, int64_t e, AccOf<T> s) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  const V sv = V::set1(s);
  int64_t i = b;
  for (; i + W <= e; i += W) store(y + i, clamp_sym(load(x + i), sv) / sv);
  if (i < e) {
    const int r = static_cast<int>(e - i);
    store_n(y + i, clamp_sym(load_n(x + i, r), sv) / sv, r);
  }
}

// Order statistics qr.lo, qr.hi of |xs[0, L)|: one counting/gathering pass around a
// sampled estimate, and the radix selection if the estimate missed (or radix_only).
template <typename T>
void select_sample(const T* xs, int64_t L, int64_t b, int64_t e, const QuantileRank& qr, bool team, int tid,
                   int nt, TeamState<typename KeyOf<AccOf<T>>::K>& st, bool radix_only,
                   typename KeyOf<AccOf<T>>::K* lo, typename KeyOf<AccOf<T>>::K* hi) {
  using K = typename KeyOf<AccOf<T>>::K;
  if (!radix_only) {
    K elo, ehi;
    const double share = estimate_range<K>(L, qr, [&](int64_t i) { return abs_key(xs[i]); }, &elo, &ehi);
    RangeScan<K>& rs = st.scan[tid];
    rs.reset(elo, ehi, scan_cap(share, L));
    alignas(64) K keys[kBlock];
    for (int64_t i0 = b; i0 < e; i0 += kBlock) {
      const int64_t m = std::min(kBlock, e - i0);
      abs_keys(xs + i0, m, keys);
      rs.feed(keys, m);
    }
    if (resolve_scan(qr, team, tid, nt, st, lo, hi)) return;
  }
  select_pair(xs, L, b, e, qr, team, tid, nt, st, lo, hi);
}

template <typename T>
void dynamic_threshold_impl(const T* x, T* y, int64_t N, int64_t L, double p, double min_value,
                            double max_value, int threads) {
  using A = AccOf<T>;
  using K = typename KeyOf<A>::K;
  threads = pick_threads(threads, N * L);
  const QuantileRank qr = quantile_rank(p, L);
  const bool whole = whole_samples(N, threads);
  TeamState<K> shared(threads);
  std::vector<TeamState<K>> own;
  if (whole) own.assign(threads, TeamState<K>(1));
  for_samples(N, L, threads, [&](int64_t n, int64_t b, int64_t e, bool team, int tid, int nt) {
    TeamState<K>& st = team ? shared : own[thread_id()];
    const T* xs = x + n * L;
    K lo, hi;
    select_sample(xs, L, b, e, qr, team, tid, nt, st, false, &lo, &hi);
    A s = lerp_exact(key_value<K, A>(lo), key_value<K, A>(hi), qr.frac);
    s = std::max(s, static_cast<A>(min_value));
    if (max_value < static_cast<double>(s)) s = static_cast<A>(max_value);
    threshold_out(xs, y + n * L, b, e, s);
  });
}

// ---------------------------------------------------------------------- sampler step
enum class Thresh : int { None = 0, Static = 1, Dynamic = 2 };

template <typename T> struct StepArgs {
  const T *z, *cond, *uncond, *noise;
  T* out;
  const double* coefs;  // sample n's [a, b, c_x0, c_z, c_noise] at coefs + n * coef_stride
  int64_t coef_stride;  // 5, or 0: one row for every sample
  int64_t N, L;
  double w;
};

// x0 = a z + b pred for x[b, e) of sample n into dst (type A); on_block(p, m) sees each
// finished block of up to kBlock values while it is still in L1.
template <typename T, typename F>
void compute_x0(const StepArgs<T>& g, int64_t n, int64_t b, int64_t e, AccOf<T>* dst, F&& on_block) {
  using V = typename VecOf<T>::type;
  using A = AccOf<T>;
  constexpr int W = V::W;
  const double* c = g.coefs + n * g.coef_stride;
  const V av = V::set1(static_cast<A>(c[0])), bv = V::set1(static_cast<A>(c[1]));
  const V wv = V::set1(static_cast<A>(g.w));
  const int64_t off = n * g.L;
  const T *z = g.z + off, *pc = g.cond + off, *pu = g.uncond ? g.uncond + off : nullptr;
  for (int64_t i0 = b; i0 < e; i0 += kBlock) {
    const int64_t e0 = std::min(e, i0 + kBlock);
    for (int64_t i = i0; i < e0; i += W) {
      const int r = static_cast<int>(std::min<int64_t>(W, e0 - i));
      V zz = r == W ? load(z + i) : load_n(z + i, r);
      V pred = r == W ? load(pc + i) : load_n(pc + i, r);
      if (pu) {
        V u = r == W ? load(pu + i) : load_n(pu + i, r);
        pred = u + wv * (pred - u);
      }
      V x0 = av * zz + bv * pred;
      if (r == W) store(dst + i, x0);
      else store_n(dst + i, x0, r);
    }
    on_block(dst + i0, e0 - i0);
  }
}

// The same x0 for one element (for the sampled estimate of the percentile).
template <typename T> AccOf<T> x0_at(const StepArgs<T>& g, int64_t n, int64_t i) {
  using A = AccOf<T>;
  const double* c = g.coefs + n * g.coef_stride;
  const int64_t o = n * g.L + i;
  A pred = to_acc(g.cond[o]);
  if (g.uncond) {
    const A u = to_acc(g.uncond[o]);
    pred = u + static_cast<A>(g.w) * (pred - u);
  }
  return static_cast<A>(c[0]) * to_acc(g.z[o]) + static_cast<A>(c[1]) * pred;
}

// out = c_x0 * q(x0) + c_z z + c_noise noise over [b, e) of sample n, q the threshold map.
template <Thresh mode, typename T, typename X0>
void step_out(const StepArgs<T>& g, int64_t n, int64_t b, int64_t e, const X0* x0src, bool x0_is_sample_local,
              AccOf<T> s) {
  using V = typename VecOf<T>::type;
  using A = AccOf<T>;
  constexpr int W = V::W;
  const double* c = g.coefs + n * g.coef_stride;
  const V cx = V::set1(static_cast<A>(c[2])), cz = V::set1(static_cast<A>(c[3]));
  const V cn = V::set1(static_cast<A>(c[4]));
  const V av = V::set1(static_cast<A>(c[0])), bv = V::set1(static_cast<A>(c[1]));
  const V wv = V::set1(static_cast<A>(g.w));
  const V sv = V::set1(s);
  const int64_t off = n * g.L;
  const T *z = g.z + off, *pc = g.cond + off, *pu = g.uncond ? g.uncond + off : nullptr;
  const T* nz = g.noise ? g.noise + off : nullptr;
  T* out = g.out + off;
  for (int64_t i = b; i < e; i += W) {
    const int r = static_cast<int>(std::min<int64_t>(W, e - i));
    const bool full = r == W;
    V zz = full ? load(z + i) : load_n(z + i, r);
    V x0;
    if (x0src) {
      const X0* xp = x0_is_sample_local ? x0src + i : x0src + off + i;
      x0 = full ? load(xp) : load_n(xp, r);
    } else {
      V pred = full ? load(pc + i) : load_n(pc + i, r);
      if (pu) {
        V u = full ? load(pu + i) : load_n(pu + i, r);
        pred = u + wv * (pred - u);
      }
      x0 = av * zz + bv * pred;
    }
    if constexpr (mode == Thresh::Dynamic) x0 = clamp_sym(x0, sv) / sv;
    if constexpr (mode == Thresh::Static) x0 = clamp_sym(x0, V::set1(A(1)));
    V res = cx * x0 + cz * zz;
    if (nz) res = res + cn * (full ? load(nz + i) : load_n(nz + i, r));
    if (full) store(out + i, res);
    else store_n(out + i, res, r);
  }
}

template <typename T>
void sampler_step_impl(const StepArgs<T>& g, Thresh mode, double p, double min_value, int threads) {
  using A = AccOf<T>;
  using K = typename KeyOf<A>::K;
  const int64_t N = g.N, L = g.L;
  threads = pick_threads(threads, N * L);
  if (mode != Thresh::Dynamic) {
    // One pass, no per-sample reduction: flat split over all elements.
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t blk = 0; blk < N * ((L + 4095) / 4096); ++blk) {
      const int64_t per = (L + 4095) / 4096, n = blk / per, b = (blk % per) * 4096;
      const int64_t e = std::min(L, b + 4096);
      if (mode == Thresh::Static) step_out<Thresh::Static, T, A>(g, n, b, e, nullptr, false, A(1));
      else step_out<Thresh::None, T, A>(g, n, b, e, nullptr, false, A(1));
    }
    return;
  }
  const QuantileRank qr = quantile_rank(p, L);
  const bool whole = whole_samples(N, threads);
  // x0 lives in the output when it has x0's type, else in float scratch.
  constexpr bool in_place = std::is_same<T, A>::value;
  std::vector<A> team_buf(in_place || whole ? 0 : size_t(L));
  std::vector<std::vector<A>> own_buf(in_place || !whole ? 0 : threads);
  TeamState<K> shared(threads);
  std::vector<TeamState<K>> own;
  if (whole) own.assign(threads, TeamState<K>(1));
  for_samples(N, L, threads, [&](int64_t n, int64_t b, int64_t e, bool team, int tid, int nt) {
    TeamState<K>& st = team ? shared : own[thread_id()];
    A* x0;
    if constexpr (in_place) {
      x0 = reinterpret_cast<A*>(g.out) + n * L;
    } else if (team) {
      x0 = team_buf.data();
    } else {
      std::vector<A>& v = own_buf[thread_id()];
      if (v.empty()) v.resize(size_t(L));
      x0 = v.data();
    }
    // One pass: x0 into its buffer, and its keys counted/gathered around the sampled
    // estimate while each block is in L1. The radix selection over x0 if it missed.
    K elo, ehi;
    const double share = estimate_range<K>(L, qr, [&](int64_t i) { return abs_key(x0_at(g, n, i)); }, &elo, &ehi);
    RangeScan<K>& rs = st.scan[tid];
    rs.reset(elo, ehi, scan_cap(share, L));
    alignas(64) K keys[kBlock];
    compute_x0(g, n, b, e, x0, [&](const A* p, int64_t m) {
      abs_keys(p, m, keys);
      rs.feed(keys, m);
    });
    K lo, hi;
    if (!resolve_scan(qr, team, tid, nt, st, &lo, &hi))
      select_pair<A>(x0, L, b, e, qr, team, tid, nt, st, &lo, &hi);
    A s = lerp_exact(key_value<K, A>(lo), key_value<K, A>(hi), qr.frac);
    s = std::max(s, static_cast<A>(min_value));
    // (each thread reads back only its own part [b, e) of x0: no barrier needed)
    step_out<Thresh::Dynamic, T, A>(g, n, b, e, x0, true, s);
  });
}

}  // namespace

template <typename F> void with_dtype(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::Float16: f(Half{}); break;
    case DType::BFloat16: f(BFloat16{}); break;
  }
}

void dynamic_threshold(uintptr_t x, uintptr_t y, int64_t N, int64_t L, int dtype, double percentile,
                       double min_value, double max_value, int threads) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dynamic_threshold_impl<T>(ptr<const T>(x), ptr<T>(y), N, L, percentile, min_value, max_value, threads);
  });
}

void sampler_step(uintptr_t z, uintptr_t cond, uintptr_t uncond, uintptr_t noise, uintptr_t out, uintptr_t coefs,
                  int64_t coef_stride, int64_t N, int64_t L, int dtype, double guidance_scale, int threshold,
                  double percentile, double min_value, int threads) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    StepArgs<T> g{ptr<const T>(z), ptr<const T>(cond), ptr<const T>(uncond), ptr<const T>(noise), ptr<T>(out),
                  ptr<const double>(coefs), coef_stride, N, L, guidance_scale};
    sampler_step_impl<T>(g, static_cast<Thresh>(threshold), percentile, min_value, threads);
  });
}

void quantile_abs(uintptr_t x, int64_t N, int64_t L, int dtype, double percentile, int threads, bool radix_only,
                  double* out) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccOf<T>;
    using K = typename KeyOf<A>::K;
    const T* xs = ptr<const T>(x);
    const int th = pick_threads(threads, N * L);
    const QuantileRank qr = quantile_rank(percentile, L);
    const bool whole = whole_samples(N, th);
    TeamState<K> shared(th);
    std::vector<TeamState<K>> own;
    if (whole) own.assign(th, TeamState<K>(1));
    for_samples(N, L, th, [&](int64_t n, int64_t b, int64_t e, bool team, int tid, int nt) {
      TeamState<K>& st = team ? shared : own[thread_id()];
      K lo, hi;
      select_sample(xs + n * L, L, b, e, qr, team, tid, nt, st, radix_only, &lo, &hi);
      if (tid == 0) out[n] = static_cast<double>(lerp_exact(key_value<K, A>(lo), key_value<K, A>(hi), qr.frac));
    });
  });
}

}  // namespace IMAGEN_FAST_ISA_NS
}  // namespace cpu
}  // namespace imagen_fast

#include "isa_end.h"
