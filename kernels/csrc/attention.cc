// nx-kernels-cpu: decode attention over nx's KV cache, called from XLA:CPU through the typed FFI.
//
// Contract (nx.ops.attention._attend for a few query tokens): cache row r is kv head h of batch
// row b (r = h * B + b); its J query rows (the G query heads that read kv head h, times the T
// tokens of row b: query j is token j % T) attend over the first W positions of the caches,
//   s[j, p] = scale * sum_d q[r, j, d] * K[r, d, p]       (keys transposed: K [R, D, P])
//   s[j, p] = -1e30 where mask[b, j % T, p] is false      (mask [B, T, W], W <= P)
//   e[j, p] = exp(s[j, p] - max_p s[j, p]),  total[j] = sum_p e[j, p]
//   out[r, j, :] = sum_p e'[j, p] * V[r, p, :] / total[j]   (V [R, P, D])
// where e' is e rounded to bf16 for bf16 caches (as _attend rounds it to the values' dtype), else
// e. q f32 [R, J, D]; caches f32, or bf16 held as their uint16 bits (`bf16` = 1); out f32. Sums run
// in another order than XLA's and exp is a polynomial: results equal the XLA path's to f32 rounding.
// Why: XLA:CPU runs decode's two small attention dots as general matrix products (~10-20 us each a
// layer on the EPYC) and copies the window out of the cache first; this reads the cache where it
// lies, once (BENCHMARKS.md, "Decode attention kernel"), and only the positions a row's mask allows
// (Live): a decode window is a shape bucket, mostly unfilled, and at batch 8 the cache read is the
// step's largest cost after the weights.
//
// Dispatch (`level`, fixed when the program is traced; common.h): 2-3 AVX-512F (16 positions or
// head dims a vector, exp by polynomial and scalef); 0-1 scalar. Cache rows are split over XLA's
// intra-op threads (ParallelRows).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

namespace {

using namespace nxk;

constexpr float kNegInf = -1e30f;  // nx.ops.attention.NEG_INF

struct Problem {
  int rows = 0, batch = 0, tokens = 0, queries = 0, dim = 0, positions = 0, window = 0;
  float scale = 1.0f;
  bool bf16 = false;
  const float* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const bool* mask = nullptr;
  float* out = nullptr;
  // Per batch row: positions [lo, hi) hold every position its tokens may see (whole vectors of 16
  // at the SIMD level, from 0), or the whole window where none may (Live).
  std::vector<int> lo, hi;
};

// The live range of each batch row: the first and last positions any of its tokens' masks allow,
// widened to whole vectors of `align` positions (within W); a row with a token whose mask allows
// none keeps the whole window (that token's softmax is uniform over it, as XLA's). Why: positions
// outside it score -1e30 and weigh exactly 0, so skipping them changes no bit of the result, and a
// decode window is a bucket that the filled positions only reach at its end (the cache read is
// most of the kernel's time at batch 8).
// The first and last of the W positions mask row `m` allows; false where it allows none.
inline bool TokenRange(const bool* m, int W, int& first, int& last) {
  int p = 0, e = W - 1;
  while (p < W && !m[p]) ++p;
  if (p == W) return false;
  while (!m[e]) --e;
  first = p;
  last = e;
  return true;
}

void Live(Problem& pr, int align) {
  const int W = pr.window;
  pr.lo.assign(pr.batch, 0);
  pr.hi.assign(pr.batch, W);
  for (int b = 0; b < pr.batch; ++b) {
    int first = W, last = -1;
    bool blind = false;  // a token that may see nothing
    for (int t = 0; t < pr.tokens; ++t) {
      int p, e;
      blind = !TokenRange(pr.mask + (static_cast<size_t>(b) * pr.tokens + t) * W, W, p, e);
      if (blind) break;
      first = std::min(first, p);
      last = std::max(last, e);
    }
    if (blind) continue;
    pr.lo[b] = first / align * align;
    pr.hi[b] = std::min(W, (last + align) / align * align);
  }
}

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// f32 -> nearest bf16 (ties to even) -> f32, as XLA's convert rounds (NaN kept a NaN).
inline float RoundBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return f;
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float Cache(const Problem& pr, const void* c, size_t i) {
  return pr.bf16 ? Bf16ToFloat(static_cast<const uint16_t*>(c)[i]) : static_cast<const float*>(c)[i];
}

// Softmax of s [p0, p1) in place (e, rounded to bf16 where the caches are), its total returned.
inline float Softmax(const Problem& pr, float* s, int p0, int p1) {
  float mx = kNegInf;
  for (int p = p0; p < p1; ++p) mx = std::max(mx, s[p]);
  float total = 0.0f;
  for (int p = p0; p < p1; ++p) {
    const float e = std::exp(s[p] - mx);
    total += e;
    s[p] = pr.bf16 ? RoundBf16(e) : e;
  }
  return total;
}

void RowScalar(const Problem& pr, int r, std::vector<float>& s) {
  const int b = r % pr.batch, W = pr.window, D = pr.dim, P = pr.positions, p0 = pr.lo[b], p1 = pr.hi[b];
  s.resize(static_cast<size_t>(W));
  for (int j = 0; j < pr.queries; ++j) {
    const float* q = pr.q + (static_cast<size_t>(r) * pr.queries + j) * D;
    const bool* m = pr.mask + (static_cast<size_t>(b) * pr.tokens + j % pr.tokens) * W;
    for (int p = p0; p < p1; ++p) {
      float acc = 0.0f;
      for (int d = 0; d < D; ++d) acc += q[d] * Cache(pr, pr.k, (static_cast<size_t>(r) * D + d) * P + p);
      s[p] = m[p] ? acc * pr.scale : kNegInf;
    }
    const float total = Softmax(pr, s.data(), p0, p1);
    float* o = pr.out + (static_cast<size_t>(r) * pr.queries + j) * D;
    for (int d = 0; d < D; ++d) {
      float acc = 0.0f;
      for (int p = p0; p < p1; ++p) acc += s[p] * Cache(pr, pr.v, (static_cast<size_t>(r) * P + p) * D + d);
      o[d] = acc / total;
    }
  }
}

#ifdef NX_X86
#define NX_ATTN_TARGET "avx512f,avx512bw,avx512vl"

// Lanes [0, n) of a vector of 16 (none for n <= 0): the positions from p of a window of W are
// LanesBelow(W - p).
inline __mmask16 LanesBelow(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// 16 cache values at c[i ..] as f32 (lanes outside `m` zero).
template <bool BF>
__attribute__((target(NX_ATTN_TARGET))) inline __m512 Load16(const void* c, size_t i, __mmask16 m) {
  if constexpr (BF) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(c) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(c) + i);
}

// How many head dims ahead Scores prefetches the keys (into L1; past the row's last dim, the next
// row's first). Why: each line of keys feeds a few loads, multiply-adds and stores per query, and
// at that pace the hardware prefetchers stay too few lines ahead: the kernel read its caches at
// ~20 GB/s, ~40 with this (BENCHMARKS.md, "Prefetch in the grouped tiles and the attention kernel").
constexpr int kAheadD = 8;

// Queries [j0, j0 + QN) of cache row r: scores into s [QN][ws] (ws: W rounded up to 16). The keys
// are read in their memory order (a head dim's positions, then the next dim's), the sums kept in
// s (L1), so the cache streams in once.
template <bool BF, int QN>
__attribute__((target(NX_ATTN_TARGET))) void Scores(const Problem& pr, int r, int j0, float* s, int ws) {
  const int b = r % pr.batch, W = pr.window, D = pr.dim, P = pr.positions, p0 = pr.lo[b], p1 = pr.hi[b];
  const float* q = pr.q + (static_cast<size_t>(r) * pr.queries + j0) * D;
  NX_UNROLL for (int i = 0; i < QN; ++i) std::memset(s + i * ws + p0, 0, sizeof(float) * (p1 - p0));
  const int nr = r + 1 < pr.rows ? r + 1 : r, nb = nr % pr.batch;
  for (int d = 0; d < D; ++d) {
    if (j0 == 0) {  // the live keys kAheadD head dims on, in this row or the next
      const int dd = d + kAheadD, rr = dd < D ? r : nr, pa = dd < D ? p0 : pr.lo[nb], pz = dd < D ? p1 : pr.hi[nb];
      constexpr int kBytes = BF ? 2 : 4;
      const char* line = static_cast<const char*>(pr.k) + ((static_cast<size_t>(rr) * D + dd % D) * P + pa) * kBytes;
      for (int l = 0; l < (pz - pa) * kBytes; l += 64) _mm_prefetch(line + l, _MM_HINT_T0);
    }
    __m512 qd[QN];
    NX_UNROLL for (int i = 0; i < QN; ++i) qd[i] = _mm512_set1_ps(q[i * D + d]);
    const size_t row = (static_cast<size_t>(r) * D + d) * P;
    for (int p = p0; p < p1; p += 16) {
      const __mmask16 m = LanesBelow(W - p);
      const __m512 kv = Load16<BF>(pr.k, row + p, m);
      NX_UNROLL for (int i = 0; i < QN; ++i) {
        float* si = s + i * ws + p;
        _mm512_storeu_ps(si, _mm512_fmadd_ps(qd[i], kv, _mm512_loadu_ps(si)));
      }
    }
  }
  const __m512 scale = _mm512_set1_ps(pr.scale), neg = _mm512_set1_ps(kNegInf);
  NX_UNROLL for (int i = 0; i < QN; ++i) {
    const bool* mrow = pr.mask + (static_cast<size_t>(b) * pr.tokens + (j0 + i) % pr.tokens) * W;
    for (int p = p0; p < p1; p += 16) {
      const __mmask16 m = LanesBelow(W - p);
      const __m128i bytes = _mm_maskz_loadu_epi8(m, mrow + p);
      const __mmask16 seen = _mm_test_epi8_mask(bytes, bytes);
      float* si = s + i * ws + p;
      _mm512_storeu_ps(si, _mm512_mask_blend_ps(seen, neg, _mm512_mul_ps(_mm512_loadu_ps(si), scale)));
    }
  }
}

// Softmax of s [p0, p1) (p0 a multiple of 16; positions from W on are ignored and left 0), its
// total returned.
__attribute__((target(NX_ATTN_TARGET))) float Softmax16(const Problem& pr, float* s, int p0, int p1) {
  const int W = pr.window;
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int p = p0; p < p1; p += 16) {
    const __mmask16 m = LanesBelow(W - p);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(s + p));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 total = _mm512_setzero_ps();
  for (int p = p0; p < p1; p += 16) {
    const __mmask16 m = LanesBelow(W - p);
    const __m512 e = _mm512_maskz_mov_ps(m, Exp16(_mm512_sub_ps(_mm512_loadu_ps(s + p), top)));
    total = _mm512_add_ps(total, e);
    // bf16 caches: e rounded to bf16, ties to even (vcvtneps2bf16 needs AVX512_BF16; the integer
    // form rounds alike, and e is never NaN)
    __m512 out = e;
    if (pr.bf16) {
      const __m512i u = _mm512_castps_si512(e);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
      out = _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }
    _mm512_storeu_ps(s + p, out);
  }
  return _mm512_reduce_add_ps(total);
}

// out[r, j0 + i, d0 .. d0 + 16 DN) for QN queries from their weights e (s [QN][ws]) at positions
// [p0, p1).
template <bool BF, int QN, int DN>
__attribute__((target(NX_ATTN_TARGET))) void Values(const Problem& pr, int r, int j0, int d0, const float* s, int ws,
                                                    const float* total, int p0, int p1) {
  const int D = pr.dim, P = pr.positions;
  __m512 acc[QN][DN];
  NX_UNROLL for (int i = 0; i < QN; ++i) NX_UNROLL for (int u = 0; u < DN; ++u) acc[i][u] = _mm512_setzero_ps();
  for (int p = p0; p < p1; ++p) {
    __m512 vv[DN];
    const size_t at = (static_cast<size_t>(r) * P + p) * D + d0;
    NX_UNROLL for (int u = 0; u < DN; ++u) vv[u] = Load16<BF>(pr.v, at + 16 * u, 0xFFFF);
    NX_UNROLL for (int i = 0; i < QN; ++i) {
      const __m512 e = _mm512_set1_ps(s[i * ws + p]);
      NX_UNROLL for (int u = 0; u < DN; ++u) acc[i][u] = _mm512_fmadd_ps(e, vv[u], acc[i][u]);
    }
  }
  NX_UNROLL for (int i = 0; i < QN; ++i) {
    float* o = pr.out + (static_cast<size_t>(r) * pr.queries + j0 + i) * D + d0;
    const __m512 t = _mm512_set1_ps(total[i]);
    NX_UNROLL for (int u = 0; u < DN; ++u) _mm512_storeu_ps(o + 16 * u, _mm512_div_ps(acc[i][u], t));
  }
}

template <bool BF, int QN>
__attribute__((target(NX_ATTN_TARGET))) void Queries(const Problem& pr, int r, int j0, float* s, int ws) {
  Scores<BF, QN>(pr, r, j0, s, ws);
  const int b = r % pr.batch;
  float total[QN];
  for (int i = 0; i < QN; ++i) total[i] = Softmax16(pr, s + i * ws, pr.lo[b], pr.hi[b]);
  int d0 = 0;
  for (; d0 + 64 <= pr.dim; d0 += 64) Values<BF, QN, 4>(pr, r, j0, d0, s, ws, total, pr.lo[b], pr.hi[b]);
  for (; d0 < pr.dim; d0 += 16) Values<BF, QN, 1>(pr, r, j0, d0, s, ws, total, pr.lo[b], pr.hi[b]);
}

template <bool BF>
void RowAvx512(const Problem& pr, int r, std::vector<float>& s) {
  const int ws = (pr.window + 15) / 16 * 16;
  s.resize(static_cast<size_t>(4) * ws);
  for (int j = 0; j < pr.queries; j += 4) {
    switch (std::min(4, pr.queries - j)) {
      case 4: Queries<BF, 4>(pr, r, j, s.data(), ws); break;
      case 3: Queries<BF, 3>(pr, r, j, s.data(), ws); break;
      case 2: Queries<BF, 2>(pr, r, j, s.data(), ws); break;
      default: Queries<BF, 1>(pr, r, j, s.data(), ws);
    }
  }
}

// Prompt scores of QN queries [j0, j0 + QN) of cache row r at positions [p0, p1) (p0 a multiple
// of 16, p1 of 16 or W) into s [QN][ws], scaled and masked as `Scores`. Each step keeps 2 x QN
// sums of 16 positions in registers over every head dim, so one load of 32 keys feeds 2 QN
// multiply-adds. Why: a prompt's queries are many; `Scores` adds into s in memory once per head
// dim, which suits a decode row's few queries.
template <bool BF, int QN>
__attribute__((target(NX_ATTN_TARGET))) void PromptScores(const Problem& pr, int r, int j0, int p0, int p1, float* s,
                                                          int ws) {
  const int b = r % pr.batch, W = pr.window, D = pr.dim, P = pr.positions;
  const float* q = pr.q + (static_cast<size_t>(r) * pr.queries + j0) * D;
  const __m512 scale = _mm512_set1_ps(pr.scale), neg = _mm512_set1_ps(kNegInf);
  for (int p = p0; p < p1; p += 32) {
    const __mmask16 m0 = LanesBelow(W - p), m1 = p + 16 < p1 ? LanesBelow(W - p - 16) : 0;
    __m512 acc[QN][2];
    _Pragma("GCC unroll 16") for (int i = 0; i < QN; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const size_t at = static_cast<size_t>(r) * D * P + p;
    for (int d = 0; d < D; ++d) {
      const __m512 k0 = Load16<BF>(pr.k, at + static_cast<size_t>(d) * P, m0);
      const __m512 k1 = Load16<BF>(pr.k, at + static_cast<size_t>(d) * P + 16, m1);
      _Pragma("GCC unroll 16") for (int i = 0; i < QN; ++i) {
        const __m512 qd = _mm512_set1_ps(q[i * D + d]);
        acc[i][0] = _mm512_fmadd_ps(qd, k0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(qd, k1, acc[i][1]);
      }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < QN; ++i) {
      const bool* mrow = pr.mask + (static_cast<size_t>(b) * pr.tokens + (j0 + i) % pr.tokens) * W + p;
      for (int h = 0; h < 2; ++h) {
        const __mmask16 m = h ? m1 : m0;
        if (h && p + 16 >= p1) break;
        const __m128i bytes = _mm_maskz_loadu_epi8(m, mrow + 16 * h);
        const __mmask16 seen = _mm_test_epi8_mask(bytes, bytes);
        _mm512_storeu_ps(s + i * ws + p + 16 * h, _mm512_mask_blend_ps(seen, neg, _mm512_mul_ps(acc[i][h], scale)));
      }
    }
  }
}

// Queries [j0, j0 + QN) of cache row r over positions [p0, p1): scores, softmax and values.
template <bool BF, int QN>
__attribute__((target(NX_ATTN_TARGET))) void PromptQueries(const Problem& pr, int r, int j0, int p0, int p1,
                                                           float* s, int ws) {
  static_assert(QN % 6 == 0, "values run 6 queries at a time");
  PromptScores<BF, QN>(pr, r, j0, p0, p1, s, ws);
  float total[QN];
  for (int i = 0; i < QN; ++i) total[i] = Softmax16(pr, s + i * ws, p0, p1);
  for (int i = 0; i < QN; i += 6) {
    int d0 = 0;
    for (; d0 + 64 <= pr.dim; d0 += 64) Values<BF, 6, 4>(pr, r, j0 + i, d0, s + i * ws, ws, total + i, p0, p1);
    for (; d0 < pr.dim; d0 += 16) Values<BF, 6, 1>(pr, r, j0 + i, d0, s + i * ws, ws, total + i, p0, p1);
  }
}

// One tile of the prompt path's work (below): queries [j0, j1) of cache row r. Queries whose mask
// allows no position get the values' mean over the whole window (XLA's uniform softmax of all
// -1e30 scores), from `blind` (this row's, filled once); the others attend over the positions any
// of them may see (first / last: per token of the row's batch row, W where none).
template <bool BF>
__attribute__((target(NX_ATTN_TARGET))) void PromptTile(const Problem& pr, const std::vector<int>& first,
                                                        const std::vector<int>& last, int r, int j0, int j1,
                                                        std::vector<float>& s, std::vector<float>& blind,
                                                        int& blind_row) {
  constexpr int kQ = 12;
  const int b = r % pr.batch, T = pr.tokens, W = pr.window, D = pr.dim, ws = (W + 15) / 16 * 16;
  int lo = W, hi = 0;
  bool any_blind = false;
  for (int j = j0; j < j1; ++j) {
    const int t = b * T + j % T;
    if (first[t] == W) {
      any_blind = true;
    } else {
      lo = std::min(lo, first[t]);
      hi = std::max(hi, last[t] + 1);
    }
  }
  if (lo < hi) {
    lo = lo / 16 * 16;
    hi = std::min(ws, (hi + 15) / 16 * 16);
    s.resize(static_cast<size_t>(kQ) * ws);
    if (j1 - j0 == kQ) {
      PromptQueries<BF, kQ>(pr, r, j0, lo, hi, s.data(), ws);
    } else {  // the row's last queries: decode's tiles of up to 4
      for (int j = j0; j < j1; j += 4) {
        const int n = std::min(4, j1 - j);
        float total[4];
        switch (n) {
          case 4: PromptScores<BF, 4>(pr, r, j, lo, hi, s.data(), ws); break;
          case 3: PromptScores<BF, 3>(pr, r, j, lo, hi, s.data(), ws); break;
          case 2: PromptScores<BF, 2>(pr, r, j, lo, hi, s.data(), ws); break;
          default: PromptScores<BF, 1>(pr, r, j, lo, hi, s.data(), ws);
        }
        for (int i = 0; i < n; ++i) total[i] = Softmax16(pr, s.data() + i * ws, lo, hi);
        for (int i = 0; i < n; ++i)
          for (int d0 = 0; d0 < D; d0 += 16) Values<BF, 1, 1>(pr, r, j + i, d0, s.data() + i * ws, ws, total + i, lo, hi);
      }
    }
  }
  if (!any_blind) return;
  if (blind_row != r) {  // the mean of the window's values, as XLA's sum of weight-1 rows over W
    blind.assign(D, 0.0f);
    for (int p = 0; p < W; ++p)
      for (int d = 0; d < D; ++d) blind[d] += Cache(pr, pr.v, (static_cast<size_t>(r) * pr.positions + p) * D + d);
    for (int d = 0; d < D; ++d) blind[d] /= static_cast<float>(W);
    blind_row = r;
  }
  for (int j = j0; j < j1; ++j)
    if (first[b * T + j % T] == W)
      std::memcpy(pr.out + (static_cast<size_t>(r) * pr.queries + j) * D, blind.data(), sizeof(float) * D);
}
#endif  // NX_X86

// The first and last positions each token's mask allows ([B * T] each; first = W where none).
void TokenRanges(const Problem& pr, std::vector<int>& first, std::vector<int>& last) {
  const int W = pr.window, n = pr.batch * pr.tokens;
  first.assign(n, W);
  last.assign(n, -1);
  for (int t = 0; t < n; ++t) TokenRange(pr.mask + static_cast<size_t>(t) * W, W, first[t], last[t]);
}

// Validates the shared arguments of both handlers into `pr` (an InvalidArgument naming the
// contract when they do not fit it).
ffi::Error Parse(Problem& pr, const char* name, ffi::Buffer<ffi::F32>& q, ffi::AnyBuffer& k, ffi::AnyBuffer& v,
                 ffi::Buffer<ffi::PRED>& mask, ffi::ResultBuffer<ffi::F32>& out, float scale, int32_t bf16) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  const auto bad = [name] {
    return ffi::Error::InvalidArgument(
        std::string("nx_kernels_cpu ") + name +
        ": q f32 [R, J, D]; k [R, D, P] and v [R, P, D], both f32 or both "
        "uint16 holding bf16 (bf16 = 1); mask bool [B, T, W] with R a multiple of B, J of T, and W <= P");
  };
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 3) return bad();
  pr.rows = static_cast<int>(qd[0]);
  pr.queries = static_cast<int>(qd[1]);
  pr.dim = static_cast<int>(qd[2]);
  pr.positions = static_cast<int>(kd[2]);
  pr.batch = static_cast<int>(md[0]);
  pr.tokens = static_cast<int>(md[1]);
  pr.window = static_cast<int>(md[2]);
  const auto want = bf16 ? ffi::DataType::U16 : ffi::DataType::F32;
  if (k.element_type() != want || v.element_type() != want) return bad();
  if (kd[0] != pr.rows || kd[1] != pr.dim || vd[0] != pr.rows || vd[1] != pr.positions || vd[2] != pr.dim)
    return bad();
  if (pr.batch <= 0 || pr.tokens <= 0 || pr.rows % pr.batch || pr.queries % pr.tokens || pr.window > pr.positions ||
      pr.window <= 0)
    return bad();
  pr.scale = scale;
  pr.bf16 = bf16 != 0;
  pr.q = q.typed_data();
  pr.k = k.untyped_data();
  pr.v = v.untyped_data();
  pr.mask = mask.typed_data();
  pr.out = out->typed_data();
  return ffi::Error::Success();
}

// The decode path: every cache row's queries over its batch row's live range, a row per thread.
ffi::Error DecodeRows(ffi::ThreadPool& pool, Problem& pr, int32_t level, int32_t threads) {
  void (*row)(const Problem&, int, std::vector<float>&) = RowScalar;
  int align = 1;
#ifdef NX_X86
  if (ClampLevel(level) >= kAvx512Vnni && pr.dim % 16 == 0) {  // whole vectors of head dims
    row = pr.bf16 ? RowAvx512<true> : RowAvx512<false>;
    align = 16;
  }
#endif
  Live(pr, align);
  // a part of the pool at least kPartWork multiply-adds: batch 1 of a small model (~0.3M in all)
  // runs on the caller, which measured faster than waking a helper (BENCHMARKS.md)
  constexpr int64_t kPartWork = int64_t{1} << 18;
  const int64_t work = 2LL * pr.queries * pr.window * pr.dim;
  const int fewest = static_cast<int>(std::max<int64_t>(1, kPartWork / std::max<int64_t>(1, work)));
  ParallelRows(pool, pr.rows, Threads(pool, threads), work, [&](int r0, int r1) {
    thread_local std::vector<float> s;
    for (int r = r0; r < r1; ++r) row(pr, r, s);
  }, /*align=*/1, fewest);
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out, float scale, int32_t bf16,
                               int32_t level, int32_t threads) {
  Problem pr;
  if (auto err = Parse(pr, "decode_attention", q, k, v, mask, out, scale, bf16); err.failure()) return err;
  return DecodeRows(pool, pr, level, threads);
}

// The prompt path: the same contract for many query tokens a row. Work items are tiles of 12
// queries of one cache row, each attending over the positions its own tokens may see (a causal
// prompt's early tiles read few keys), dealt to the threads so that each chunk pairs early tiles
// with late ones. Why: XLA's path masks and exponentiates every query's whole window and runs
// its two dots as general matrix products over f32 score arrays (BENCHMARKS.md, "Prompt
// attention kernel"); at the scalar levels the decode path's rows serve.
ffi::Error PromptAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out, float scale, int32_t bf16,
                               int32_t level, int32_t threads) {
  Problem pr;
  if (auto err = Parse(pr, "prompt_attention", q, k, v, mask, out, scale, bf16); err.failure()) return err;
#ifdef NX_X86
  if (ClampLevel(level) >= kAvx512Vnni && pr.dim % 16 == 0) {
    std::vector<int> first, last;
    TokenRanges(pr, first, last);
    constexpr int kQ = 12;
    const int tiles = (pr.queries + kQ - 1) / kQ;
    const auto tile = pr.bf16 ? PromptTile<true> : PromptTile<false>;
    const int64_t work = 2LL * kQ * pr.window * pr.dim;
    ParallelRows(pool, pr.rows * tiles, Threads(pool, threads), work, [&](int i0, int i1) {
      thread_local std::vector<float> s, blind;
      int blind_row = -1;
      for (int i = i0; i < i1; ++i) {
        const int r = i / tiles, n = i % tiles, t = n % 2 ? tiles - 1 - n / 2 : n / 2;  // 0, last, 1, ...
        const int j0 = t * kQ;
        tile(pr, first, last, r, j0, std::min(pr.queries, j0 + kQ), s, blind, blind_row);
      }
    }, /*align=*/2, /*fewest=*/1);
    return ffi::Error::Success();
  }
#endif
  return DecodeRows(pool, pr, level, threads);
}

// Both handlers' arguments and attributes: one contract, two ways of computing it.
auto AttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::PRED>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<float>("scale")
      .Attr<int32_t>("bf16")
      .Attr<int32_t>("level")
      .Attr<int32_t>("threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NxPromptAttention, PromptAttentionImpl, AttentionBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NxDecodeAttention, DecodeAttentionImpl, AttentionBinding());
