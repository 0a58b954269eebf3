// nx-kernels-cpu: the AVX-512 dots of the f32-accumulating kernels (bf16_linear.cc at level 3,
// f32_linear.cc at levels 2-3), templated on the kernel's k-step.
//
// DotTiles: weight rows [j0, j1) against every x row, each weight row streamed from memory once a
// call. Up to 2 x rows (below kTileFrom): one weight row after another (Row), the order the
// hardware prefetcher follows best, 4 (1 row) or 2 (2 rows) independent accumulators per x row.
// More: register tiles (tinyBLAS's scheme) of RM weight rows x RN x rows of 16-lane f32
// accumulators; each k-step loads the RM weight vectors and the RN x vectors once and runs RM * RN
// dots with them. RM = 4, RN <= 6: 24 accumulators + 4 weight vectors + 1 x vector of the 32 zmm
// registers. A pass over each tile of weight rows serves all x rows (near-equal blocks of at most
// kTileMaxRn) while the tile is in cache, and the first x block prefetches the next tile's rows
// into L2. With several x blocks the k range is cut into spans of P::kSpan elements, so that the
// tile's weight rows and an x block stay in cache while each x block reuses them.
//
// The step policy P (the kernel's): T, the element type of w and x; kStep, the elements of a
// k-step; V, a vector of them (64 bytes: one cache line of a row); Mask, V's lane mask; kSpan, a
// multiple of kStep; kRowAhead, Row's software prefetch distance along the weight row in bytes (0:
// none); always_inline operations Load(p) and LoadMasked(p, mask) (lanes not in `mask` zero), the V
// at p, and Dot(acc, w, x), the f32 vector acc plus the products of w and x.
//
// Included once per kernel's source, with NX_TILES_TARGET (that kernel's target attribute string)
// defined first: a target attribute cannot be a template parameter, and P's operations inline only
// into functions of their ISA. The anonymous namespace keeps each source's copy its own.

#pragma once

#include <algorithm>
#include <cstddef>

#include "common.h"

#ifndef NX_TILES_TARGET
#error "define NX_TILES_TARGET (the kernel's target attribute) before including tiles.h"
#endif

#ifdef NX_X86

namespace nxk {
namespace {

// From this many x rows on, register tiles; below, weight rows one after another.
constexpr int kTileFrom = 3;
constexpr int kTileRm = 4;
constexpr int kTileMaxRn = 6;

// A dot's operands: x rows [m, ldx] (zero padded to whole k-steps), w [n, k] (rows along the
// outputs), y [m, ldy] f32.
template <class T>
struct TileOperands {
  const T* x;
  int m, ldx;
  const T* w;
  int k;
  float* y;
  int ldy;
};

// One k-step of the tile below: RM weight vectors and RN x vectors at p (`mask`: the weight
// elements read; x is zero padded), RM * RN dots.
template <class P, int RM, int RN>
__attribute__((target(NX_TILES_TARGET), always_inline)) inline void Step(__m512 (&acc)[RN][RM],
                                                                        const typename P::T* const (&wr)[RM],
                                                                        const typename P::T* const (&xr)[RN], int p,
                                                                        typename P::Mask mask) {
  typename P::V wv[RM];
  NX_UNROLL for (int i = 0; i < RM; ++i) wv[i] = P::LoadMasked(wr[i] + p, mask);
  NX_UNROLL for (int u = 0; u < RN; ++u) {
    const typename P::V xv = P::Load(xr[u] + p);
    NX_UNROLL for (int i = 0; i < RM; ++i) acc[u][i] = P::Dot(acc[u][i], wv[i], xv);
  }
}

// Weight rows [j, j + RM) x x rows [r0, r0 + RN) over k in [p0, p1) (p0 a multiple of P::kStep):
// dots added to y (`add`) or stored. `next` (or null): the weight rows after these, prefetched into
// L2 while these stream (one cache line per row and k-step, one tile ahead). The operands go by
// value: a reference's pointer would take a register the k-loop's row pointers need.
template <class P, int RM, int RN>
__attribute__((target(NX_TILES_TARGET))) void Tile(TileOperands<typename P::T> o, int j, int r0, int p0,
                                                   int p1, bool add, const typename P::T* next) {
  using T = typename P::T;
  static_assert(P::kStep * sizeof(T) == 64, "a k-step reads one cache line of each weight row");
  const int k = o.k;
  __m512 acc[RN][RM];
  NX_UNROLL for (int u = 0; u < RN; ++u)
    NX_UNROLL for (int i = 0; i < RM; ++i) acc[u][i] = _mm512_setzero_ps();
  const T* wr[RM];
  NX_UNROLL for (int i = 0; i < RM; ++i) wr[i] = o.w + static_cast<size_t>(j + i) * k;
  const T* xr[RN];
  NX_UNROLL for (int u = 0; u < RN; ++u) xr[u] = o.x + static_cast<size_t>(r0 + u) * o.ldx;
  int p = p0;
  for (; p + P::kStep <= p1; p += P::kStep) {
    if (next)
      NX_UNROLL for (int i = 0; i < RM; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<size_t>(i) * k + p), _MM_HINT_T1);
    Step<P, RM, RN>(acc, wr, xr, p, static_cast<typename P::Mask>(~0ull));
  }
  if (p < p1)  // the last step, under a mask (x is zero padded)
    Step<P, RM, RN>(acc, wr, xr, p, static_cast<typename P::Mask>((1ull << (p1 - p)) - 1));
  const __m512 z = _mm512_setzero_ps();
  NX_UNROLL for (int u = 0; u < RN; ++u) {
    __m512 v[4] = {z, z, z, z};
    NX_UNROLL for (int i = 0; i < RM; ++i) v[i] = acc[u][i];
    StoreSums<RM>(v[0], v[1], v[2], v[3], o.y + static_cast<size_t>(r0 + u) * o.ldy + j, add);
  }
}

// Tile<P, RM, rn> for rn in 1 ... RN, chosen at run time.
template <class P, int RM, int RN = kTileMaxRn>
__attribute__((target(NX_TILES_TARGET))) void TileRows(int rn, const TileOperands<typename P::T>& o, int j, int r0,
                                                       int p0, int p1, bool add, const typename P::T* next) {
  if constexpr (RN > 1)
    if (rn < RN) return TileRows<P, RM, RN - 1>(rn, o, j, r0, p0, p1, add, next);
  Tile<P, RM, RN>(o, j, r0, p0, p1, add, next);
}

// One weight row j against x rows [r0, r0 + RN), U independent accumulator chains per x row (a
// dot's latency), the weight prefetched P::kRowAhead bytes ahead (rows are contiguous).
template <class P, int RN>
__attribute__((target(NX_TILES_TARGET))) void Row(const TileOperands<typename P::T>& o, int j, int r0) {
  using T = typename P::T;
  constexpr int U = RN == 1 ? 4 : 2;
  constexpr int S = P::kStep;
  const int k = o.k;
  const T* wj = o.w + static_cast<size_t>(j) * k;
  __m512 acc[U][RN];
  NX_UNROLL for (int s = 0; s < U; ++s)
    NX_UNROLL for (int u = 0; u < RN; ++u) acc[s][u] = _mm512_setzero_ps();
  const T* xr[RN];
  NX_UNROLL for (int u = 0; u < RN; ++u) xr[u] = o.x + static_cast<size_t>(r0 + u) * o.ldx;
  int p = 0;
  for (; p + S * U <= k; p += S * U) {
    NX_UNROLL for (int s = 0; s < U; ++s) {
      if constexpr (P::kRowAhead > 0)
        _mm_prefetch(reinterpret_cast<const char*>(wj + p + S * s) + P::kRowAhead, _MM_HINT_T0);
      const typename P::V wv = P::Load(wj + p + S * s);
      NX_UNROLL for (int u = 0; u < RN; ++u) acc[s][u] = P::Dot(acc[s][u], wv, P::Load(xr[u] + p + S * s));
    }
  }
  for (; p < k; p += S) {  // the rest, the last step under a mask (x is zero padded)
    const auto mask = static_cast<typename P::Mask>(p + S <= k ? ~0ull : (1ull << (k - p)) - 1);
    const typename P::V wv = P::LoadMasked(wj + p, mask);
    NX_UNROLL for (int u = 0; u < RN; ++u) acc[0][u] = P::Dot(acc[0][u], wv, P::Load(xr[u] + p));
  }
  NX_UNROLL for (int u = 0; u < RN; ++u) {
    __m512 sum = acc[0][u];
    NX_UNROLL for (int s = 1; s < U; ++s) sum = _mm512_add_ps(sum, acc[s][u]);
    o.y[static_cast<size_t>(r0 + u) * o.ldy + j] = _mm512_reduce_add_ps(sum);
  }
}

// y[u, j] for every x row u and the weight rows j in [j0, j1) (above).
template <class P>
__attribute__((target(NX_TILES_TARGET))) void DotTiles(const TileOperands<typename P::T>& o, int j0, int j1) {
  using T = typename P::T;
  static_assert(P::kSpan % P::kStep == 0, "spans start at whole k-steps");
  if (o.m < kTileFrom) {  // a loop per row count: no choice per weight row in the streaming loop
    if (o.m == 1)
      for (int j = j0; j < j1; ++j) Row<P, 1>(o, j, 0);
    else
      for (int j = j0; j < j1; ++j) Row<P, 2>(o, j, 0);
    return;
  }
  const int blocks = (o.m + kTileMaxRn - 1) / kTileMaxRn;
  const int span = blocks > 1 ? P::kSpan : o.k;
  for (int j = j0; j < j1; j += kTileRm) {
    const int rm = std::min(kTileRm, j1 - j);
    const T* next = j + 2 * kTileRm <= j1 ? o.w + static_cast<size_t>(j + kTileRm) * o.k : nullptr;
    for (int p0 = 0; p0 < o.k; p0 += span) {
      const int p1 = std::min(o.k, p0 + span);
      for (int b = 0, r0 = 0; b < blocks; ++b) {
        const int rn = (o.m - r0) / (blocks - b);  // near-equal blocks, the larger ones last
        const T* pf = b == 0 ? next : nullptr;
        if (rm == kTileRm)
          TileRows<P, kTileRm>(rn, o, j, r0, p0, p1, p0 > 0, pf);
        else
          for (int i = 0; i < rm; ++i) TileRows<P, 1>(rn, o, j + i, r0, p0, p1, p0 > 0, nullptr);
        r0 += rn;
      }
    }
  }
}

}  // namespace
}  // namespace nxk

#endif  // NX_X86
