// nx-kernels-cpu: f32 linear layers for nx's decode (the default precision), called from XLA:CPU
// through the typed FFI.
//
// Contract: y = x @ w.T in f32 [m, n] for w f32 [n, k] (rows along the outputs, as nx stores
// weights) and x f32 [m, k]; each product is fused into its f32 sum (a multiply-add; rounded
// separately in the scalar path) and the sums run in another order than XLA's: results equal the
// XLA path's (nx.ops.linear._products) to f32 summation error, not bit for bit.
// Why: decode's matmuls of a few token rows only stream the weights; XLA:CPU's f32 dot streams them
// below the memory's speed (BENCHMARKS.md, "f32 decode kernel").
//
// Dispatch (`level`, fixed when the program is traced; common.h):
//   2-3 AVX-512F: 16 f32 lanes a fused multiply-add;
//   1 AVX2 + FMA: 8 lanes (scalar without FMA);
//   0 scalar.
// Each weight row is streamed from memory once per call. AVX-512 with 1-2 x rows: one weight row
// after another, 4 (1 row) or 2 (2 rows) independent accumulators per x row, a software prefetch
// kAheadBytes ahead. From 3 x rows (kTileFrom), register tiles of 4 weight rows x up to 6 x rows
// (tinyBLAS's scheme, as the bf16 kernel's): every x row served while a tile of weight rows is in
// L1 and the next tile prefetched, so many x rows cost about the weight traffic of one. AVX2: tiles
// of kRows weight rows against up to 2 x rows, each weight vector loaded once for the x rows, each x
// vector once for the weight rows. The x rows (zero padded to whole vectors) stay in L1/L2. Output
// rows are split over XLA's intra-op threads (ParallelRows, chunks of 4 rows).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace nxk;  // levels, HasFma, ParallelRows, Threads, ClampLevel, Reduce4*, StoreSums (common.h)

// The activations: rows [m, kp], kp = k rounded up to 16, zero padded (so full vectors read them).
struct Acts {
  int m = 0, k = 0, kp = 0;
  std::vector<float> f;
  const float* row(int u) const { return f.data() + static_cast<size_t>(u) * kp; }
};

void Prepare(const float* x, int m, int k, Acts& a) {
  a.m = m, a.k = k, a.kp = (k + 15) / 16 * 16;
  a.f.assign(static_cast<size_t>(m) * a.kp, 0.0f);
  for (int i = 0; i < m; ++i) std::memcpy(a.f.data() + static_cast<size_t>(i) * a.kp, x + static_cast<size_t>(i) * k, 4 * k);
}

// y[u, j] (row stride ldy) for the x rows u and the weight rows j in [j0, j1).
void DotScalar(const Acts& a, const float* w, int j0, int j1, float* y, int ldy) {
  for (int j = j0; j < j1; ++j) {
    const float* wj = w + static_cast<size_t>(j) * a.k;
    for (int u = 0; u < a.m; ++u) {
      const float* x = a.row(u);
      float acc = 0.0f;
      for (int p = 0; p < a.k; ++p) acc += x[p] * wj[p];
      y[static_cast<size_t>(u) * ldy + j] = acc;
    }
  }
}

#ifdef NX_X86

constexpr int kRows = 4;  // weight rows an AVX2 tile
constexpr int kAheadBytes = 2048;  // software prefetch distance along each weight row
// Up to this many x rows, AVX-512 streams weight rows one after another (RowAvx512), the order the
// hardware prefetcher follows best; from here on register tiles (each x vector shared by the rows).
constexpr int kTileFrom = 3;

// Where to prefetch for the weight row `wr` (of a tile of R rows of k) at offset p: kAheadBytes
// ahead, or past the row's end the same row of the next tile (the rows between are this tile's).
template <int R>
inline const char* Ahead(const float* wr, int p, int k) {
  const int q = p + kAheadBytes / 4;
  return reinterpret_cast<const char*>(wr + (q < k ? q : q + static_cast<size_t>(R - 1) * k));
}

// ---- AVX2 + FMA: 8 lanes ----

// R weight rows [j, j + R) against x rows [r0, r0 + T).
template <int R, int T>
__attribute__((target("avx2,fma"))) void TileAvx2(const Acts& a, const float* w, int j, int r0, float* y, int ldy) {
  const int k = a.k;
  __m256 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < T; ++u) acc[i][u] = _mm256_setzero_ps();
  const float* wr[R];
  for (int i = 0; i < R; ++i) wr[i] = w + static_cast<size_t>(j + i) * k;
  const float* xr[T];
  for (int u = 0; u < T; ++u) xr[u] = a.row(r0 + u);
  int p = 0;
  for (; p + 8 <= k; p += 8) {
    __m256 wv[R];
    for (int i = 0; i < R; ++i) {
      if ((p & 15) == 0) _mm_prefetch(Ahead<R>(wr[i], p, k), _MM_HINT_T0);  // a 64-byte line each
      wv[i] = _mm256_loadu_ps(wr[i] + p);
    }
    for (int u = 0; u < T; ++u) {
      const __m256 xv = _mm256_loadu_ps(xr[u] + p);
      for (int i = 0; i < R; ++i) acc[i][u] = _mm256_fmadd_ps(wv[i], xv, acc[i][u]);
    }
  }
  if (p < k) {  // the tail: weights under a mask, x zero padded
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(k - p), lane);
    for (int i = 0; i < R; ++i) {
      const __m256 wv = _mm256_maskload_ps(wr[i] + p, mask);
      for (int u = 0; u < T; ++u) acc[i][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr[u] + p), acc[i][u]);
    }
  }
  for (int u = 0; u < T; ++u) {
    float* yu = y + static_cast<size_t>(r0 + u) * ldy + j;
    if constexpr (R == 4)
      _mm_storeu_ps(yu, Reduce4Avx2(acc[0][u], acc[1][u], acc[2][u], acc[3][u]));
    else
      for (int i = 0; i < R; ++i) yu[i] = HsumAvx2(acc[i][u]);
  }
}

template <int R>
__attribute__((target("avx2,fma"))) void RowsAvx2(const Acts& a, const float* w, int j, float* y, int ldy) {
  int r = 0;
  for (; r + 2 <= a.m; r += 2) TileAvx2<R, 2>(a, w, j, r, y, ldy);
  if (r < a.m) TileAvx2<R, 1>(a, w, j, r, y, ldy);
}

__attribute__((target("avx2,fma"))) void DotAvx2(const Acts& a, const float* w, int j0, int j1, float* y, int ldy) {
  int j = j0;
  for (; j + kRows <= j1; j += kRows) RowsAvx2<kRows>(a, w, j, y, ldy);
  for (; j < j1; ++j) RowsAvx2<1>(a, w, j, y, ldy);
}

// ---- AVX-512F: 16 lanes ----

// Register tiles (tinyBLAS's scheme, as the bf16 kernel's): RM weight rows x RN x rows of FMA
// accumulators; each k-step loads the RM weight vectors and the RN x vectors once and runs RM * RN
// multiply-adds with them. RM = 4, RN <= 6: 24 accumulators + 4 weight vectors + 1 x vector of the
// 32 zmm registers.
constexpr int kRm = 4;
constexpr int kMaxRn = 6;
// With several x-row blocks the k range is cut into spans of this many elements, so the tile's
// weight rows (4 x 2 KiB) and an x block (6 x 2 KiB) stay in L1 while each x block reuses them.
constexpr int kSpan = 512;

// One k-step (16 elements at p, `mask` on the last) of the tile below.
template <int RM, int RN>
__attribute__((target(NX_AVX512F), always_inline)) inline void StepAvx512(__m512 (&acc)[RN][RM],
                                                                         const float* const (&wr)[RM],
                                                                         const float* const (&xr)[RN], int p,
                                                                         __mmask16 mask) {
  __m512 wv[RM];
  NX_UNROLL for (int i = 0; i < RM; ++i) wv[i] = _mm512_maskz_loadu_ps(mask, wr[i] + p);
  NX_UNROLL for (int u = 0; u < RN; ++u) {
    const __m512 xv = _mm512_loadu_ps(xr[u] + p);
    NX_UNROLL for (int i = 0; i < RM; ++i) acc[u][i] = _mm512_fmadd_ps(wv[i], xv, acc[u][i]);
  }
}

// Weight rows [j, j + RM) x x rows [r0, r0 + RN) over k in [p0, p1) (p0 a multiple of 16): dots
// added to y (`add`) or stored. `next` (or null): the weight rows after these, prefetched into L2
// while these stream (one cache line per row and k-step, one tile ahead).
template <int RM, int RN>
__attribute__((target(NX_AVX512F))) void TileAvx512(const Acts& a, const float* w, int j, int r0, int p0, int p1,
                                                   float* y, int ldy, bool add, const float* next) {
  const int k = a.k;
  __m512 acc[RN][RM];
  NX_UNROLL for (int u = 0; u < RN; ++u)
    NX_UNROLL for (int i = 0; i < RM; ++i) acc[u][i] = _mm512_setzero_ps();
  const float* wr[RM];
  NX_UNROLL for (int i = 0; i < RM; ++i) wr[i] = w + static_cast<size_t>(j + i) * k;
  const float* xr[RN];
  NX_UNROLL for (int u = 0; u < RN; ++u) xr[u] = a.row(r0 + u);
  int p = p0;
  for (; p + 16 <= p1; p += 16) {
    if (next)
      NX_UNROLL for (int i = 0; i < RM; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<size_t>(i) * k + p), _MM_HINT_T1);
    StepAvx512<RM, RN>(acc, wr, xr, p, 0xffff);
  }
  if (p < p1) StepAvx512<RM, RN>(acc, wr, xr, p, static_cast<__mmask16>((1u << (p1 - p)) - 1));  // x zero padded
  const __m512 z = _mm512_setzero_ps();
  NX_UNROLL for (int u = 0; u < RN; ++u) {
    __m512 v[4] = {z, z, z, z};
    NX_UNROLL for (int i = 0; i < RM; ++i) v[i] = acc[u][i];
    StoreSums<RM>(v[0], v[1], v[2], v[3], y + static_cast<size_t>(r0 + u) * ldy + j, add);
  }
}

// One tile shape of RM weight rows for rn (1 ... kMaxRn) x rows, chosen at run time.
template <int RM, int RN = kMaxRn>
__attribute__((target(NX_AVX512F))) void TileAvx512Rows(int rn, const Acts& a, const float* w, int j, int r0, int p0,
                                                       int p1, float* y, int ldy, bool add, const float* next) {
  if constexpr (RN > 1)
    if (rn < RN) return TileAvx512Rows<RM, RN - 1>(rn, a, w, j, r0, p0, p1, y, ldy, add, next);
  TileAvx512<RM, RN>(a, w, j, r0, p0, p1, y, ldy, add, next);
}

// One weight row j against x rows [r0, r0 + T), U accumulators per x row (independent chains),
// the software prefetch kAheadBytes ahead along the weight (rows are contiguous).
template <int T>
__attribute__((target(NX_AVX512F))) void RowAvx512(const Acts& a, const float* w, int j, int r0, float* y, int ldy) {
  constexpr int U = T == 1 ? 4 : 2;
  const int k = a.k;
  const float* wj = w + static_cast<size_t>(j) * k;
  __m512 acc[U][T];
  for (int s = 0; s < U; ++s)
    for (int u = 0; u < T; ++u) acc[s][u] = _mm512_setzero_ps();
  const float* xr[T];
  for (int u = 0; u < T; ++u) xr[u] = a.row(r0 + u);
  int p = 0;
  for (; p + 16 * U <= k; p += 16 * U) {
    for (int s = 0; s < U; ++s) {
      _mm_prefetch(reinterpret_cast<const char*>(wj + p + 16 * s) + kAheadBytes, _MM_HINT_T0);
      const __m512 wv = _mm512_loadu_ps(wj + p + 16 * s);
      for (int u = 0; u < T; ++u) acc[s][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr[u] + p + 16 * s), acc[s][u]);
    }
  }
  for (; p < k; p += 16) {  // the rest, the last vector under a mask (x zero padded)
    const __mmask16 mask = p + 16 <= k ? 0xffff : static_cast<__mmask16>((1u << (k - p)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, wj + p);
    for (int u = 0; u < T; ++u) acc[0][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr[u] + p), acc[0][u]);
  }
  for (int u = 0; u < T; ++u) {
    __m512 sum = acc[0][u];
    for (int s = 1; s < U; ++s) sum = _mm512_add_ps(sum, acc[s][u]);
    y[static_cast<size_t>(r0 + u) * ldy + j] = _mm512_reduce_add_ps(sum);
  }
}

// Weight rows [j0, j1) against every x row: a pass over each tile of weight rows serves all x rows
// (split into near-equal blocks of at most kMaxRn), so every weight byte streams from memory once a
// call; the first x block prefetches the next tile's rows. 1-2 x rows: one weight row after another.
__attribute__((target(NX_AVX512F))) void DotAvx512(const Acts& a, const float* w, int j0, int j1, float* y, int ldy) {
  if (a.m < kTileFrom) {
    for (int j = j0; j < j1; ++j) a.m == 1 ? RowAvx512<1>(a, w, j, 0, y, ldy) : RowAvx512<2>(a, w, j, 0, y, ldy);
    return;
  }
  const int blocks = (a.m + kMaxRn - 1) / kMaxRn;
  const int span = blocks > 1 ? kSpan : a.k;
  for (int j = j0; j < j1; j += kRm) {
    const int rm = std::min(kRm, j1 - j);
    const float* next = j + 2 * kRm <= j1 ? w + static_cast<size_t>(j + kRm) * a.k : nullptr;
    for (int p0 = 0; p0 < a.k; p0 += span) {
      const int p1 = std::min(a.k, p0 + span);
      for (int b = 0, r0 = 0; b < blocks; ++b) {
        const int rn = (a.m - r0) / (blocks - b);  // near-equal blocks, the larger ones last
        const float* pf = b == 0 ? next : nullptr;
        if (rm == kRm)
          TileAvx512Rows<kRm>(rn, a, w, j, r0, p0, p1, y, ldy, p0 > 0, pf);
        else
          for (int i = 0; i < rm; ++i) TileAvx512Rows<1>(rn, a, w, j + i, r0, p0, p1, y, ldy, p0 > 0, nullptr);
        r0 += rn;
      }
    }
  }
}

#endif  // NX_X86

enum class Path { kScalar, kAvx2, kAvx512 };

Path Choose(int level) {
#ifdef NX_X86
  if (level >= kAvx512Vnni) return Path::kAvx512;
  if (level >= kAvx2 && HasFma()) return Path::kAvx2;
#endif
  return Path::kScalar;
}

void Dot(Path path, const Acts& a, const float* w, int j0, int j1, float* y, int ldy) {
  switch (path) {
#ifdef NX_X86
    case Path::kAvx512: return DotAvx512(a, w, j0, j1, y, ldy);
    case Path::kAvx2: return DotAvx2(a, w, j0, j1, y, ldy);
#endif
    default: return DotScalar(a, w, j0, j1, y, ldy);
  }
}

ffi::Error F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> y, int32_t level, int32_t threads) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("nx_kernels_cpu f32_matmul: x [m, k], w [n, k] expected");
  const int m = static_cast<int>(xd[0]), k = static_cast<int>(xd[1]), n = static_cast<int>(wd[0]);
  float* yp = y->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  const Path path = Choose(ClampLevel(level));
  Acts a;
  Prepare(x.typed_data(), m, k, a);
  const float* wp = w.typed_data();
  ParallelRows(pool, n, Threads(pool, threads), static_cast<int64_t>(m) * k,
               [&](int j0, int j1) { Dot(path, a, wp, j0, j1, yp, n); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NxF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("level")
                                  .Attr<int32_t>("threads"));
