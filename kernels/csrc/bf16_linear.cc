// nx-kernels-cpu: bf16 linear layers for nx's decode and prompts (amp="bf16"), called from XLA:CPU
// through the typed FFI.
//
// Contract: y = x @ w.T [m, n] for w bf16 [n, k] (rows along the outputs, as nx stores weights) and
// x bf16 or f32 [m, k]; products are exact (bf16 x bf16 fits in f32; f32 x bf16 inside a fused
// multiply-add, but rounded once in the scalar path) and the sums are f32, in another order than
// XLA's: results equal the XLA path's (nx.ops.linear._products, f32 accumulation) to f32 summation
// error, not bit for bit. y is f32, or bf16: the same f32 sums rounded to nearest even (F32ToBf16,
// XLA's convert) as they are stored, so the layer needs no rounding pass of its own.
// bf16 subnormals may be flushed to zero at level 3 (vdpbf16ps does).
//
// Dispatch (`level`, fixed when the program is traced; common.h):
//   3 AVX512_BF16, bf16 x: vdpbf16ps, 32 bf16 products per instruction (16 f32 lanes, a pair each);
//     from PanelFrom() x rows (prompt chunks) as outer products over packed x panels (below);
//   2-3 AVX-512F (f32 x at level 3): each 32-bf16 weight vector widened by shifts into its even and
//     odd elements as f32 (w << 16, w & 0xffff0000), fused multiply-adds with x rows stored as f32
//     in the same even/odd order per block (prepared once per call);
//   1 AVX2 + FMA: the same on 16-bf16 blocks (scalar without FMA);
//   0 scalar.
// Any number of x rows (nx.ops.cpu_kernels.BF16_MAX_ROWS and its siblings say how many nx sends).
// Weight rows stream from memory once per call: up to 2 x rows one weight row after another (the
// order the hardware prefetcher follows best, BENCHMARKS.md "CPU kernels"); from 3 x rows
// (kTileRows), at level 3, register tiles (tiles.h, as the f32 kernel's) of 4 weight rows x up to 6
// x rows (tinyBLAS's scheme: every weight and x block loaded once per k-step for the whole tile),
// all x rows served while a tile of weight rows is in cache and the next tile prefetched, so batch
// 16 costs about the same weight traffic as batch 1; levels 1-2 keep 4 weight rows x up to 4
// (AVX-512F) or 2 (AVX2) x rows. Output rows are split over XLA's intra-op threads (ParallelRows).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
// The ISA of the vdpbf16ps path (level 3), the one its dots (tiles.h) are compiled for.
#define NX_AVX512BF16 "avx512f,avx512bw,avx512vl,avx512bf16"
#define NX_TILES_TARGET NX_AVX512BF16
#include "tiles.h"

namespace {

// levels, HasFma, ParallelRows, Threads, ClampLevel, NX_UNROLL (common.h); DotTiles (tiles.h)
using namespace nxk;

inline float Bf16ToF32(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// f32 -> bf16, rounded to nearest even (NaN kept quiet), as XLA's convert: results stored as bf16.
inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

// Columns [j0, j1) of the f32 rows y [m, ldy] into the bf16 rows out [m, ldy].
void RoundColumns(const float* y, int m, int ldy, int j0, int j1, uint16_t* out) {
  for (int r = 0; r < m; ++r)
    for (int j = j0; j < j1; ++j) out[static_cast<size_t>(r) * ldy + j] = F32ToBf16(y[static_cast<size_t>(r) * ldy + j]);
}

// silu(g) * u as nx's XLA path rounds it (SiluMul, below, in vectors), for the paths without panels.
inline float SiluMulScalar(float g, float u) {
  g = Bf16ToF32(F32ToBf16(g));
  const float a = Bf16ToF32(F32ToBf16(g * (1.0f / (1.0f + std::exp(-g)))));
  return a * Bf16ToF32(F32ToBf16(u));
}

// y [m, n / 2] bf16 = silu(gate) * up for the f32 sums [m, n] of the weight's halves [gate; up].
void GluColumns(const float* sums, int m, int n, uint16_t* y) {
  const int half = n / 2;
  for (int r = 0; r < m; ++r)
    for (int j = 0; j < half; ++j) {
      const float* row = sums + static_cast<size_t>(r) * n;
      y[static_cast<size_t>(r) * half + j] = F32ToBf16(SiluMulScalar(row[j], row[half + j]));
    }
}

// The activations as the chosen dot reads them: rows [m, kp], kp = k rounded up to 32, zero padded.
//   bf16 (level 3, bf16 x): the bf16 bits as given;
//   f32 split by `block` (32 at AVX-512, 16 at AVX2): in each block the even elements then the odd
//     ones (the order a weight block widens into); block 1: in order (scalar).
struct Acts {
  int m = 0, k = 0, kp = 0, block = 1;
  std::vector<uint16_t> b;
  std::vector<float> f;
};

void PrepareBf16(const uint16_t* x, int m, int k, Acts& a) {
  a.m = m, a.k = k, a.kp = (k + 31) / 32 * 32;
  a.b.assign(static_cast<size_t>(m) * a.kp, 0);
  for (int i = 0; i < m; ++i) std::memcpy(a.b.data() + static_cast<size_t>(i) * a.kp, x + static_cast<size_t>(i) * k, 2 * k);
}

template <typename T>
void PrepareF32(const T* x, int m, int k, int block, Acts& a) {
  a.m = m, a.k = k, a.kp = (k + 31) / 32 * 32, a.block = block;
  a.f.assign(static_cast<size_t>(m) * a.kp, 0.0f);
  const int half = block / 2;
  for (int i = 0; i < m; ++i) {
    const T* xi = x + static_cast<size_t>(i) * k;
    float* fi = a.f.data() + static_cast<size_t>(i) * a.kp;
    for (int p = 0; p < k; ++p) {
      float v;
      if constexpr (sizeof(T) == 2) v = Bf16ToF32(xi[p]); else v = xi[p];
      const int b0 = p / block * block, q = p - b0;
      fi[block == 1 ? p : b0 + (q & 1) * half + q / 2] = v;
    }
  }
}

// y[u, j] (row stride ldy) for the x rows u and the weight rows j in [j0, j1).
void DotScalar(const Acts& a, const uint16_t* w, int j0, int j1, float* y, int ldy) {
  for (int j = j0; j < j1; ++j) {
    const uint16_t* wj = w + static_cast<size_t>(j) * a.k;
    for (int u = 0; u < a.m; ++u) {
      const float* x = a.f.data() + static_cast<size_t>(u) * a.kp;
      float acc = 0.0f;
      for (int p = 0; p < a.k; ++p) acc += x[p] * Bf16ToF32(wj[p]);
      y[static_cast<size_t>(u) * ldy + j] = acc;
    }
  }
}

#ifdef NX_X86

// From this many x rows on, the dots read four weight rows together (each x block loaded once for
// the four, one transposing reduction for four outputs): compute-bound there. Below it, weight rows
// one after another, the order the prefetcher streams best (BENCHMARKS.md, "CPU kernels").
constexpr int kTileRows = 3;

// ---- AVX2 + FMA: 16-bf16 blocks ----

// One weight row j against x rows [r0, r0 + T).
template <int T>
__attribute__((target("avx2,fma"))) void TileAvx2(const Acts& a, const uint16_t* wj, int r0, float* y, int ldy,
                                                  int j) {
  const int k = a.k;
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 ae[T], ao[T];
  NX_UNROLL for (int u = 0; u < T; ++u) ae[u] = ao[u] = _mm256_setzero_ps();
  const float* xr[T];
  NX_UNROLL for (int u = 0; u < T; ++u) xr[u] = a.f.data() + static_cast<size_t>(r0 + u) * a.kp;
  alignas(32) uint16_t tail[16] = {0};
  for (int p = 0; p < k; p += 16) {
    const uint16_t* src = wj + p;
    if (p + 16 > k) {  // the last partial block, zero padded (as x is)
      std::memcpy(tail, src, 2 * (k - p));
      src = tail;
    }
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
    const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, odd));
    NX_UNROLL for (int u = 0; u < T; ++u) {
      ae[u] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xr[u] + p), ae[u]);
      ao[u] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xr[u] + p + 8), ao[u]);
    }
  }
  NX_UNROLL for (int u = 0; u < T; ++u) y[static_cast<size_t>(r0 + u) * ldy + j] = HsumAvx2(_mm256_add_ps(ae[u], ao[u]));
}

// Four weight rows [j, j + 4) against x rows [r0, r0 + T): each x block loaded once for four rows.
template <int T>
__attribute__((target("avx2,fma"))) void Tile4Avx2(const Acts& a, const uint16_t* w, int j, int r0, float* y,
                                                   int ldy) {
  const int k = a.k;
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 acc[4][T];
  NX_UNROLL for (int i = 0; i < 4; ++i)
    NX_UNROLL for (int u = 0; u < T; ++u) acc[i][u] = _mm256_setzero_ps();
  const uint16_t* wr[4];
  NX_UNROLL for (int i = 0; i < 4; ++i) wr[i] = w + static_cast<size_t>(j + i) * k;
  const float* xr[T];
  NX_UNROLL for (int u = 0; u < T; ++u) xr[u] = a.f.data() + static_cast<size_t>(r0 + u) * a.kp;
  alignas(32) uint16_t tail[4][16] = {};
  for (int p = 0; p < k; p += 16) {
    __m256 xe[T], xo[T];
    NX_UNROLL for (int u = 0; u < T; ++u) xe[u] = _mm256_loadu_ps(xr[u] + p), xo[u] = _mm256_loadu_ps(xr[u] + p + 8);
    NX_UNROLL for (int i = 0; i < 4; ++i) {
      const uint16_t* src = wr[i] + p;
      if (p + 16 > k) {  // the last partial block, zero padded (as x is)
        std::memcpy(tail[i], src, 2 * (k - p));
        src = tail[i];
      }
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, odd));
      NX_UNROLL for (int u = 0; u < T; ++u) acc[i][u] = _mm256_fmadd_ps(wo, xo[u], _mm256_fmadd_ps(we, xe[u], acc[i][u]));
    }
  }
  NX_UNROLL for (int u = 0; u < T; ++u)
    _mm_storeu_ps(y + static_cast<size_t>(r0 + u) * ldy + j, Reduce4Avx2(acc[0][u], acc[1][u], acc[2][u], acc[3][u]));
}

__attribute__((target("avx2,fma"))) void DotAvx2(const Acts& a, const uint16_t* w, int j0, int j1, float* y,
                                                 int ldy) {
  int j = j0;
  if (a.m >= kTileRows)
    for (; j + 4 <= j1; j += 4) {
      int r = 0;
      for (; r + 2 <= a.m; r += 2) Tile4Avx2<2>(a, w, j, r, y, ldy);
      if (r < a.m) Tile4Avx2<1>(a, w, j, r, y, ldy);
    }
  for (; j < j1; ++j) {
    const uint16_t* wj = w + static_cast<size_t>(j) * a.k;
    int r = 0;
    for (; r + 4 <= a.m; r += 4) TileAvx2<4>(a, wj, r, y, ldy, j);
    if (r + 2 <= a.m) TileAvx2<2>(a, wj, r, y, ldy, j), r += 2;
    if (r < a.m) TileAvx2<1>(a, wj, r, y, ldy, j);
  }
}

// ---- AVX-512F: 32-bf16 blocks ----

template <int T>
__attribute__((target(NX_AVX512F))) void TileAvx512(const Acts& a, const uint16_t* wj, int r0, float* y, int ldy,
                                                    int j) {
  const int k = a.k;
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 ae[T], ao[T];
  NX_UNROLL for (int u = 0; u < T; ++u) ae[u] = ao[u] = _mm512_setzero_ps();
  const float* xr[T];
  NX_UNROLL for (int u = 0; u < T; ++u) xr[u] = a.f.data() + static_cast<size_t>(r0 + u) * a.kp;
  for (int p = 0; p < k; p += 32) {
    const __mmask32 mask = p + 32 <= k ? ~0u : (1u << (k - p)) - 1;  // the tail: zeros (as x is)
    const __m512i wv = _mm512_maskz_loadu_epi16(mask, wj + p);
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, odd));
    NX_UNROLL for (int u = 0; u < T; ++u) {
      ae[u] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xr[u] + p), ae[u]);
      ao[u] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xr[u] + p + 16), ao[u]);
    }
  }
  NX_UNROLL for (int u = 0; u < T; ++u) y[static_cast<size_t>(r0 + u) * ldy + j] = _mm512_reduce_add_ps(_mm512_add_ps(ae[u], ao[u]));
}

// Four weight rows [j, j + 4) against x rows [r0, r0 + T): each x block loaded once for four rows.
template <int T>
__attribute__((target(NX_AVX512F))) void Tile4Avx512(const Acts& a, const uint16_t* w, int j, int r0, float* y,
                                                     int ldy) {
  const int k = a.k;
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 acc[4][T];
  NX_UNROLL for (int i = 0; i < 4; ++i)
    NX_UNROLL for (int u = 0; u < T; ++u) acc[i][u] = _mm512_setzero_ps();
  const uint16_t* wr[4];
  NX_UNROLL for (int i = 0; i < 4; ++i) wr[i] = w + static_cast<size_t>(j + i) * k;
  const float* xr[T];
  NX_UNROLL for (int u = 0; u < T; ++u) xr[u] = a.f.data() + static_cast<size_t>(r0 + u) * a.kp;
  for (int p = 0; p < k; p += 32) {
    const __mmask32 mask = p + 32 <= k ? ~0u : (1u << (k - p)) - 1;
    __m512 we[4], wo[4];
    NX_UNROLL for (int i = 0; i < 4; ++i) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, wr[i] + p);
      we[i] = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
      wo[i] = _mm512_castsi512_ps(_mm512_and_si512(wv, odd));
    }
    NX_UNROLL for (int u = 0; u < T; ++u) {
      const __m512 xe = _mm512_loadu_ps(xr[u] + p), xo = _mm512_loadu_ps(xr[u] + p + 16);
      NX_UNROLL for (int i = 0; i < 4; ++i) acc[i][u] = _mm512_fmadd_ps(wo[i], xo, _mm512_fmadd_ps(we[i], xe, acc[i][u]));
    }
  }
  NX_UNROLL for (int u = 0; u < T; ++u)
    _mm_storeu_ps(y + static_cast<size_t>(r0 + u) * ldy + j, Reduce4Avx512(acc[0][u], acc[1][u], acc[2][u], acc[3][u]));
}

__attribute__((target(NX_AVX512F))) void DotAvx512(const Acts& a, const uint16_t* w, int j0, int j1, float* y,
                                                   int ldy) {
  int j = j0;
  if (a.m >= kTileRows)
    for (; j + 4 <= j1; j += 4) {
      int r = 0;
      for (; r + 4 <= a.m; r += 4) Tile4Avx512<4>(a, w, j, r, y, ldy);
      if (r + 2 <= a.m) Tile4Avx512<2>(a, w, j, r, y, ldy), r += 2;
      if (r < a.m) Tile4Avx512<1>(a, w, j, r, y, ldy);
    }
  for (; j < j1; ++j) {
    const uint16_t* wj = w + static_cast<size_t>(j) * a.k;
    int r = 0;
    for (; r + 8 <= a.m; r += 8) TileAvx512<8>(a, wj, r, y, ldy, j);
    if (r + 4 <= a.m) TileAvx512<4>(a, wj, r, y, ldy, j), r += 4;
    if (r + 2 <= a.m) TileAvx512<2>(a, wj, r, y, ldy, j), r += 2;
    if (r < a.m) TileAvx512<1>(a, wj, r, y, ldy, j);
  }
}

// ---- AVX512_BF16: vdpbf16ps ----

// The k-step of the level-3 dots (tiles.h): 32 bf16 values, vdpbf16ps (16 f32 lanes, a pair each).
struct Bf16Dot {
  using T = uint16_t;
  using V = __m512bh;
  using Mask = __mmask32;
  static constexpr int kStep = 32;
  // The tile's weight rows (4 x 2 KiB) and x rows (16 x 2 KiB) stay in L1/L2 for the x blocks.
  static constexpr int kSpan = 1024;
  static constexpr int kRowAhead = 0;

  __attribute__((target(NX_AVX512BF16), always_inline)) static V Load(const uint16_t* p) {
    return (__m512bh)_mm512_loadu_si512(p);
  }
  __attribute__((target(NX_AVX512BF16), always_inline)) static V LoadMasked(const uint16_t* p, Mask mask) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
  }
  __attribute__((target(NX_AVX512BF16), always_inline)) static __m512 Dot(__m512 acc, V w, V x) {
    return _mm512_dpbf16_ps(acc, w, x);
  }
};

// ---- AVX512_BF16 panels: prompts ----
//
// From PanelFrom() x rows (prompt chunks), outer products instead of dots. x is packed once a call
// into panels of 32 rows (a last one of 16 where at most 16 rows remain), [k / 2][rows] pairs of
// bf16, one 32-bit lane a row; each k-pair step loads a panel's 2 vectors once and multiplies them
// by kPanelNr weight pairs, each broadcast from its row (vdpbf16ps, whose pair sum is the dot's
// k-reduction): 2 x 12 accumulators of 16 rows x 1 output, 2 + 12 loads a 24 dots, no horizontal
// sums, and the 12 weight rows (12 x 2k bytes) stay in L1 while every panel passes by; the first
// panel's pass prefetches the next 12 rows. Every thread of the call packs a share of the panels
// first (16 rows at a time, transposed in registers). Why: the dot tiles above reload both operands
// every k-step and sum each accumulator horizontally; at 128 rows they ran no faster than XLA's
// GEMM (BENCHMARKS.md, "bf16 prompt panels").
constexpr int kPanelNr = 12;
// NX_UNROLL for loops over up to kPanelNr weight rows.
#define NX_UNROLL_NR _Pragma("GCC unroll 16")

// x packed as panels; filled by the call's threads together (Pack).
struct Panels {
  const uint16_t* x = nullptr;
  int m = 0, k = 0, pairs = 0;
  std::vector<uint32_t> data;  // 32-row panels, then a 16-row one if the rest fits it
  std::atomic<int> next{0}, done{0};  // 16-row groups claimed, packed

  Panels(const uint16_t* x_, int m_, int k_) : x(x_), m(m_), k(k_), pairs((k_ + 1) / 2) {
    data.resize(static_cast<size_t>(Rows()) * pairs);
  }
  int Lanes(int r0) const { return m - r0 <= 16 ? 16 : 32; }
  int Rows() const { return m % 32 > 16 ? (m + 31) / 32 * 32 : (m + 15) / 16 * 16; }
  int Groups() const { return (m + 15) / 16; }
  const uint32_t* At(int r0) const { return data.data() + static_cast<size_t>(r0) * pairs; }
  // Claims 16-row groups until none is left, then waits for the others' (each thread of the job).
  void Pack() {
    for (int g; (g = next.fetch_add(1, std::memory_order_relaxed)) < Groups();) {
      PackGroup(16 * g);
      done.fetch_add(1, std::memory_order_release);
    }
    while (done.load(std::memory_order_acquire) < Groups()) Pause();
  }
  void PackGroup(int g0);
};

__attribute__((target(NX_AVX512F))) void Panels::PackGroup(int g0) {
  const int r0 = g0 / 32 * 32, lanes = Lanes(r0), off = g0 - r0, rn = std::min(16, m - g0);
  uint32_t* out = data.data() + static_cast<size_t>(r0) * pairs + off;
  const int whole = rn == 16 ? k / 32 : 0;  // 16 x 16 pair blocks, transposed in registers
  for (int q = 0; q < whole; ++q) {
    __m512 r[16];
    for (int t = 0; t < 16; ++t) r[t] = _mm512_loadu_ps(x + static_cast<size_t>(g0 + t) * k + 32 * q);
    Transpose16(r);
    for (int t = 0; t < 16; ++t) _mm512_storeu_ps(out + static_cast<size_t>(16 * q + t) * lanes, r[t]);
  }
  for (int t = 0; t < 16; ++t) {  // the rest: pairs one at a time, rows past m zero
    const uint16_t* xr = x + static_cast<size_t>(g0 + t) * k;
    for (int p = 16 * whole; p < pairs; ++p) {
      uint32_t v = 0;
      if (t < rn) {
        std::memcpy(&v, xr + 2 * p, 2);
        if (2 * p + 1 < k) v |= static_cast<uint32_t>(xr[2 * p + 1]) << 16;
      }
      out[static_cast<size_t>(p) * lanes + t] = v;
    }
  }
}

// F32ToBf16 on 16 lanes.
__attribute__((target(NX_AVX512F), always_inline)) inline __m256i RoundBf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// f32 lanes rounded to bf16 (nearest even, NaN kept, subnormals flushed: vcvtneps2bf16), as f32 again.
__attribute__((target(NX_AVX512BF16), always_inline)) inline __m512 Bf16Values(__m512 v) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// silu(g) * u as nx's XLA path rounds it (nx.ops.linear.gated_linear): g and u rounded to bf16 (the
// products' results), silu in f32 as g * (1 / (1 + exp(-g))) rounded to bf16, then the product in
// f32 (rounded to bf16 by the caller's store). exp: Exp16 (common.h), whose polynomial may differ
// from XLA's by an f32 ulp, so a result can sit one bf16 ulp away where silu lies at a rounding
// boundary; the intermediate roundings flush subnormals (below 1.2e-38) to zero.
__attribute__((target(NX_AVX512BF16), always_inline)) inline __m512 SiluMul(__m512 g, __m512 u) {
  g = Bf16Values(g);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = Exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(89.0f)));
  const __m512 a = Bf16Values(_mm512_mul_ps(g, _mm512_div_ps(one, _mm512_add_ps(one, e))));
  return _mm512_mul_ps(a, Bf16Values(u));
}

// Where a panel tile's results go: y [m, ldy] as f32 or (`bf16`) rounded to bf16. With GLU (bf16
// only) y[:, j] = silu(x @ w[j]) * (x @ w[ldy + j]): the weight's halves [gate; up] are ldy rows each.
struct PanelOut {
  void* y;
  int ldy;
  bool bf16;
};

// The panel of x rows [r0, r0 + 16 RA) (RA vectors of 16 lanes) against G outputs from column j:
// weight rows [j, j + G), or with GLU also the up rows [ldy + j, ldy + j + G) (NR = 2G, a gate and
// its up in the same tile); `prefetch`: the next G outputs' rows, during this tile.
template <int RA, int G, bool GLU>
__attribute__((target(NX_AVX512BF16))) void PanelTile(const Panels& pn, const uint16_t* w, int j, int r0,
                                                      const PanelOut& out, bool prefetch) {
  constexpr int NR = GLU ? 2 * G : G;
  const int k = pn.k, full = k / 2;
  const uint32_t* xp = pn.At(r0);
  __m512 acc[RA][NR];
  NX_UNROLL_NR for (int i = 0; i < RA; ++i)
    NX_UNROLL_NR for (int c = 0; c < NR; ++c) acc[i][c] = _mm512_setzero_ps();
  const uint16_t* wr[NR];
  NX_UNROLL_NR for (int c = 0; c < NR; ++c) wr[c] = w + static_cast<size_t>(c < G ? j + c : out.ldy + j + c - G) * k;
  const size_t ahead = static_cast<size_t>(G) * k;  // the next tile's rows
  for (int p = 0; p < full; ++p) {
    if (prefetch && (p & 15) == 0)  // one cache line of each next row per 16 pairs
      NX_UNROLL_NR for (int c = 0; c < NR; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(wr[c] + ahead + 2 * p), _MM_HINT_T0);
    __m512bh a[RA];
    NX_UNROLL_NR for (int i = 0; i < RA; ++i) a[i] = (__m512bh)_mm512_loadu_si512(xp + (static_cast<size_t>(p) * RA + i) * 16);
    NX_UNROLL_NR for (int c = 0; c < NR; ++c) {
      uint32_t v;
      std::memcpy(&v, wr[c] + 2 * p, 4);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(v));
      NX_UNROLL_NR for (int i = 0; i < RA; ++i) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], a[i], b);
    }
  }
  if (full * 2 < k) {  // odd k: the last weight element alone (its pair's other half is x's zero)
    __m512bh a[RA];
    NX_UNROLL_NR for (int i = 0; i < RA; ++i) a[i] = (__m512bh)_mm512_loadu_si512(xp + (static_cast<size_t>(full) * RA + i) * 16);
    NX_UNROLL_NR for (int c = 0; c < NR; ++c) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(wr[c][k - 1]);
      NX_UNROLL_NR for (int i = 0; i < RA; ++i) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], a[i], b);
    }
  }
  // acc[i][c] lane t is output (r0 + 16 i + t, j + c) (GLU: c < G the gate, c + G its up):
  // transposed to rows of G outputs
  const __mmask16 cols = static_cast<__mmask16>((1u << G) - 1);
  NX_UNROLL_NR for (int i = 0; i < RA; ++i) {
    __m512 r[16];
    NX_UNROLL_NR for (int c = 0; c < 16; ++c) {
      if (c >= G) r[c] = _mm512_setzero_ps();
      else if constexpr (GLU) r[c] = SiluMul(acc[i][c], acc[i][c + G]);
      else r[c] = acc[i][c];
    }
    Transpose16(r);
    const int rn = std::min(16, pn.m - r0 - 16 * i);
    for (int t = 0; t < rn; ++t) {
      const size_t o = static_cast<size_t>(r0 + 16 * i + t) * out.ldy + j;
      if (out.bf16)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out.y) + o, cols, RoundBf16(r[t]));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(out.y) + o, cols, r[t]);
    }
  }
}

// PanelTile<RA, g, GLU> for g in 1 ... G, chosen at run time (the last outputs of a part).
template <int RA, int G, bool GLU>
__attribute__((target(NX_AVX512BF16))) void PanelTiles(int g, const Panels& pn, const uint16_t* w, int j, int r0,
                                                       const PanelOut& out, bool prefetch) {
  if constexpr (G > 1)
    if (g < G) return PanelTiles<RA, G - 1, GLU>(g, pn, w, j, r0, out, prefetch);
  PanelTile<RA, G, GLU>(pn, w, j, r0, out, prefetch);
}

// Outputs [j0, j1) for every x row, G (kPanelNr, or half of it with GLU) at a time: each group of
// kPanelNr weight rows against every panel while the group is in L1.
template <bool GLU>
__attribute__((target(NX_AVX512BF16))) void DotPanels(const Panels& pn, const uint16_t* w, int j0, int j1,
                                                      const PanelOut& out) {
  constexpr int G = GLU ? kPanelNr / 2 : kPanelNr;
  for (int j = j0; j < j1; j += G) {
    const int g = std::min(G, j1 - j);
    const bool next = j + 2 * G <= j1;
    for (int r0 = 0; r0 < pn.m; r0 += 32) {
      if (pn.Lanes(r0) == 32)
        PanelTiles<2, G, GLU>(g, pn, w, j, r0, out, next && r0 == 0);
      else
        PanelTiles<1, G, GLU>(g, pn, w, j, r0, out, next && r0 == 0);
    }
  }
}

#endif  // NX_X86

enum class Path { kScalar, kAvx2, kAvx512, kBf16, kPanels };

// From this many x rows on, the level-3 path runs panels (above) rather than dot tiles.
int PanelFrom() {
  static const int rows = static_cast<int>(EnvCount("NX_KERNELS_PANEL_FROM", 16));
  return rows;
}

Path Choose(int level, bool x_bf16, int m) {
#ifdef NX_X86
  if (level >= kAvx512Bf16 && x_bf16) return m >= PanelFrom() ? Path::kPanels : Path::kBf16;
  if (level >= kAvx512Vnni) return Path::kAvx512;
  if (level >= kAvx2 && HasFma()) return Path::kAvx2;
#endif
  return Path::kScalar;
}

void Dot(Path path, const Acts& a, const uint16_t* w, int j0, int j1, float* y, int ldy) {
  switch (path) {
#ifdef NX_X86
    case Path::kBf16: return DotTiles<Bf16Dot>({a.b.data(), a.m, a.kp, w, a.k, y, ldy}, j0, j1);
    case Path::kAvx512: return DotAvx512(a, w, j0, j1, y, ldy);
    case Path::kAvx2: return DotAvx2(a, w, j0, j1, y, ldy);
#endif
    default: return DotScalar(a, w, j0, j1, y, ldy);
  }
}

ffi::Error Bf16MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::BF16> w,
                          ffi::Result<ffi::AnyBuffer> y, int32_t level, int32_t threads, int32_t glu) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  const bool x_bf16 = x.element_type() == ffi::DataType::BF16;
  if (!x_bf16 && x.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("nx_kernels_cpu bf16_matmul: x must be bf16 or f32");
  const bool y_bf16 = y->element_type() == ffi::DataType::BF16;
  if (!y_bf16 && y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("nx_kernels_cpu bf16_matmul: y must be f32 or bf16");
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("nx_kernels_cpu bf16_matmul: x [m, k], w [n, k] expected");
  if (glu != 0 && (glu != 1 || !y_bf16 || wd[0] % 2))
    return ffi::Error::InvalidArgument("nx_kernels_cpu bf16_matmul: glu 1 (silu) needs an even n and a bf16 y");
  const int m = static_cast<int>(xd[0]), k = static_cast<int>(xd[1]), n = static_cast<int>(wd[0]);
  const int outs = glu ? n / 2 : n;  // y's columns
  if (yd.size() != 2 || yd[0] != m || yd[1] != outs)
    return ffi::Error::InvalidArgument("nx_kernels_cpu bf16_matmul: y [m, n] (glu: [m, n / 2]) expected");
  if (m == 0 || n == 0) return ffi::Error::Success();
  const Path path = Choose(ClampLevel(level), x_bf16, m);
  const uint16_t* wp = w.typed_data();
  const int parts = Threads(pool, threads);
  const int64_t work = static_cast<int64_t>(m) * k;  // per weight row
#ifdef NX_X86
  if (path == Path::kPanels) {
    Panels pn(static_cast<const uint16_t*>(x.untyped_data()), m, k);
    const PanelOut out{y->untyped_data(), outs, y_bf16};
    ParallelRows(pool, outs, parts, work * (n / outs), [&](int j0, int j1) {  // an output: 1 or 2 rows
      pn.Pack();
      if (glu)
        DotPanels<true>(pn, wp, j0, j1, out);
      else
        DotPanels<false>(pn, wp, j0, j1, out);
    }, glu ? kPanelNr / 2 : kPanelNr);
    return ffi::Error::Success();
  }
#endif
  Acts a;
  if (path == Path::kBf16) {
    PrepareBf16(static_cast<const uint16_t*>(x.untyped_data()), m, k, a);
  } else {
    const int block = path == Path::kAvx512 ? 32 : path == Path::kAvx2 ? 16 : 1;
    if (x_bf16)
      PrepareF32(static_cast<const uint16_t*>(x.untyped_data()), m, k, block, a);
    else
      PrepareF32(static_cast<const float*>(x.untyped_data()), m, k, block, a);
  }
  std::vector<float> sums(y_bf16 ? static_cast<size_t>(m) * n : 0);  // f32, rounded by column block
  float* yp = y_bf16 ? sums.data() : static_cast<float*>(y->untyped_data());
  uint16_t* rounded = static_cast<uint16_t*>(y->untyped_data());
  ParallelRows(pool, n, parts, work, [&](int j0, int j1) {
    Dot(path, a, wp, j0, j1, yp, n);
    if (y_bf16 && !glu) RoundColumns(yp, m, n, j0, j1, rounded);
  });
  if (glu) GluColumns(yp, m, n, rounded);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NxBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("level")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("glu"));
