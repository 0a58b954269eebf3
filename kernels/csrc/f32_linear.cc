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
// Each weight row is streamed from memory once per call. AVX-512 (tiles.h, as the bf16 kernel's
// level 3) with 1-2 x rows: one weight row after another, 4 (1 row) or 2 (2 rows) independent
// accumulators per x row, a software prefetch kAheadBytes ahead. From 3 x rows, register tiles of 4
// weight rows x up to 6 x rows (tinyBLAS's scheme): every x row served while a tile of weight rows
// is in L1 and the next tile prefetched, so many x rows cost about the weight traffic of one. AVX2:
// tiles of kRows weight rows against up to 2 x rows, each weight vector loaded once for the x rows,
// each x vector once for the weight rows. The x rows (zero padded to whole vectors) stay in L1/L2.
// Output rows are split over XLA's intra-op threads (ParallelRows, chunks of 4 rows).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#define NX_TILES_TARGET NX_AVX512F
#include "tiles.h"

namespace {

// levels, HasFma, ParallelRows, Threads, ClampLevel, HsumAvx2, Reduce4Avx2 (common.h); DotTiles (tiles.h)
using namespace nxk;

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

// The k-step of the AVX-512 dots (tiles.h): 16 f32 lanes, a fused multiply-add.
struct F32Fma {
  using T = float;
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kStep = 16;
  // The tile's weight rows (4 x 2 KiB) and an x block (6 x 2 KiB) stay in L1 for the x blocks.
  static constexpr int kSpan = 512;
  static constexpr int kRowAhead = kAheadBytes;

  __attribute__((target(NX_AVX512F), always_inline)) static V Load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target(NX_AVX512F), always_inline)) static V LoadMasked(const float* p, Mask mask) {
    return _mm512_maskz_loadu_ps(mask, p);
  }
  __attribute__((target(NX_AVX512F), always_inline)) static __m512 Dot(__m512 acc, V w, V x) {
    return _mm512_fmadd_ps(w, x, acc);
  }
};

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
    case Path::kAvx512: return DotTiles<F32Fma>({a.f.data(), a.m, a.kp, w, a.k, y, ldy}, j0, j1);
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
               [&](int j0, int j1) { Dot(path, a, wp, j0, j1, yp, n); }, 4, 16, m == 1);
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
