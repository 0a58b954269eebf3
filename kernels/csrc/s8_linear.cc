// nx-kernels-cpu: int8 linear layers for nx's s8 path, called from XLA:CPU through the typed FFI.
//
// Contract (the same math as nx.ops.quant.matmul with per-row scales, `int8_dot`):
//   x f32 [m, k] is split into two int8 terms per row: hi = round(x / s_hi) with
//   s_hi = max|x| / 127 (1 for an all-zero row), lo the same rounding of x - hi * s_hi;
//   acc = terms @ w.T exactly in int32 (w int8 [n, k], rows along the outputs);
//   y[i, j] = (acc_hi * s_hi + acc_lo * s_lo) * scale[j], f32 [m, n].
// The int8 activations are in [-127, 127]; weights may take any int8 value (-128 included).
//
// Dispatch: `level` (an attribute fixed when the program is traced) picks the inner dot:
//   2 AVX-512 VNNI: vpdpbusd(u8 = w ^ 0x80 = w + 128, s8 = a), minus 128 * sum(a) per activation
//     row (the offset moved to the unsigned side costs one xor per weight vector, shared by every
//     activation row, and its correction is one sum per activation row);
//   1 AVX2: vpmaddubsw(|w|, sign(a, w)) then vpmaddwd with ones (pairs stay below 2^15: 128*127*2);
//   0 scalar.
// The Python side never asks for a level the CPU lacks (nx_kernels_cpu_isa()).
// Any number of token rows: decode (nx sends up to 16) and prompts (nx.ops.cpu_kernels.MAX_ROWS).
// Up to 2 token rows the weight rows stream one after another; more run register tiles (4 weight
// rows x up to 6 activation rows at AVX-512, 4 x 2 at AVX2, accumulators kept in registers) in
// which every weight and activation vector is loaded once per k-step for the whole tile, so the
// dots run near vpdpbusd's throughput. Prompts are cache-blocked (S8MatmulImpl): chunks of weight
// rows against tiles of token rows, the weight streamed from memory once per call.
// Threads and activation terms: common.h (at AVX-512 the rows are rounded in vectors, alike).

#include "common.h"

namespace {

using namespace nxk;

// y[j] = (hi[j] * s_hi + lo[j] * s_lo) * scale[j], the sum contracted as XLA:CPU contracts it
// (one fused multiply-add, hi's product inside it) where the CPU has FMA.
#ifdef NX_X86
__attribute__((target("avx2,fma"))) void EpilogueFma(const int32_t* hi, const int32_t* lo, float s_hi, float s_lo,
                                                     const float* scale, int n, float* y) {
  for (int j = 0; j < n; ++j)
    y[j] = std::fma(static_cast<float>(hi[j]), s_hi, static_cast<float>(lo[j]) * s_lo) * scale[j];
}
#endif

void Epilogue(const int32_t* hi, const int32_t* lo, float s_hi, float s_lo, const float* scale, int n, float* y) {
#ifdef NX_X86
  if (HasFma()) return EpilogueFma(hi, lo, s_hi, s_lo, scale, n, y);
#endif
  for (int j = 0; j < n; ++j) {
    const float a = static_cast<float>(hi[j]) * s_hi;
    const float b = static_cast<float>(lo[j]) * s_lo;
    y[j] = (a + b) * scale[j];
  }
}

// out[r, j] for rows j in [j0, j1): int32 dots of the terms with weight rows (ldo: out's row stride).
void DotScalar(const Terms& t, const int8_t* w, int j0, int j1, int32_t* out, int ldo) {
  for (int j = j0; j < j1; ++j) {
    const int8_t* wj = w + static_cast<size_t>(j) * t.k;
    for (int r = 0; r < t.r; ++r) {
      const int8_t* a = t.a.data() + static_cast<size_t>(r) * t.kp;
      int32_t acc = 0;
      for (int i = 0; i < t.k; ++i) acc += static_cast<int32_t>(a[i]) * wj[i];
      out[static_cast<size_t>(r) * ldo + j] = acc;
    }
  }
}

#ifdef NX_X86

// Up to this many activation rows (2 per token row) the dot reads weight rows one at a time, in
// order, the order the hardware prefetcher streams best; more rows run register tiles of kTileRm
// weight rows x up to L::kMaxRn activation rows (BENCHMARKS.md, "CPU kernels").
constexpr int kStreamTerms = 4;
// Weight rows per register tile: each k-step loads their vectors once for all the tile's
// activation rows, and their sums leave the registers in one transposing reduction (Reduce4).
constexpr int kTileRm = 4;
// How many tiles ahead the first activation block of a tile prefetches the weight rows, into L2
// (into L1 they evict the tiles' rows: 10-20% slower at 8 rows of the 1B and lm head shapes), so
// the weights stream from memory while the tiles compute.
constexpr int kPrefetchTiles = 8;
// From this k on, the second activation block also moves the next tile's rows from L2 into L1, so
// the next tile's first block does not wait for them (1.3-1.4x at 8-16 rows of the 1B shapes; at
// k = 576 it cost 5-20%).
constexpr int kNearMinK = 1024;

// ---- AVX2: 32 int8 a step, vpmaddubsw(|w|, sign(a, w)) then vpmaddwd with ones ----

__attribute__((target("avx2"))) inline int32_t HsumAvx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

struct Avx2 {
  // 16 ymm registers: 4 x 2 accumulators, 2 activation vectors, a weight vector, |w|, ones, temps.
  static constexpr int kMaxRn = 2;

  // Weight rows [j, j + RM) x activation rows [r0, r0 + RN): int32 dots stored to out. `next` (or
  // null): weight rows prefetched at the same offsets while these stream, into L1 (`l1`) or L2.
  template <int RM, int RN>
  __attribute__((target("avx2"))) static void Tile(const Terms& t, const int8_t* w, int j, int r0, int32_t* out,
                                                   int ldo, const int8_t* next, bool l1) {
    const int k = t.k;
    const __m256i ones = _mm256_set1_epi16(1);
    __v8si acc[RM][RN];  // typed as int32 lanes, so GCC keeps them in registers (see Vnni::Tile)
    NX_UNROLL for (int i = 0; i < RM; ++i)
      NX_UNROLL for (int u = 0; u < RN; ++u) acc[i][u] = __v8si{};
    const int8_t* wr[RM];
    NX_UNROLL for (int i = 0; i < RM; ++i) wr[i] = w + static_cast<size_t>(j + i) * k;
    const int8_t* ar[RN];
    NX_UNROLL for (int u = 0; u < RN; ++u) ar[u] = t.a.data() + static_cast<size_t>(r0 + u) * t.kp;
    const int kv = k / 32 * 32;
    for (int p = 0; p < kv; p += 32) {
      if (next && (p & 63) == 0)
        NX_UNROLL for (int i = 0; i < RM; ++i)
          l1 ? _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<size_t>(i) * k + p), _MM_HINT_T0)
             : _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<size_t>(i) * k + p), _MM_HINT_T1);
      __m256i av[RN];
      NX_UNROLL for (int u = 0; u < RN; ++u) av[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar[u] + p));
      NX_UNROLL for (int i = 0; i < RM; ++i) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[i] + p));
        const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as u8 (-128 -> 128)
        NX_UNROLL for (int u = 0; u < RN; ++u) {
          const __m256i pr = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(av[u], wv));
          acc[i][u] += (__v8si)_mm256_madd_epi16(pr, ones);
        }
      }
    }
    NX_UNROLL for (int i = 0; i < RM; ++i)
      NX_UNROLL for (int u = 0; u < RN; ++u) {
        int32_t s = HsumAvx2((__m256i)acc[i][u]);
        for (int q = kv; q < k; ++q) s += static_cast<int32_t>(ar[u][q]) * wr[i][q];
        out[static_cast<size_t>(r0 + u) * ldo + j + i] = s;
      }
  }
};

// ---- AVX-512 VNNI: 64 int8 a step, vpdpbusd(w + 128 as u8, a) ----

#define NX_AVX512 "avx512f,avx512bw,avx512vl,avx512vnni"

// [sum(a), sum(b), sum(c), sum(d)] of four int32 vectors.
__attribute__((target(NX_AVX512))) inline __m128i Reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i v = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// One k-step (64 bytes at p; `mask`: the weight bytes read, the rest enter as 0 + 128 against
// zero-padded activations) of the tile below.
template <int RM, int RN>
__attribute__((target(NX_AVX512), always_inline)) inline void StepVnni(__v16si (&acc)[RN][RM],
                                                                       const int8_t* const (&wr)[RM],
                                                                       const int8_t* const (&ar)[RN], int p,
                                                                       __mmask64 mask) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i wu[RM];
  NX_UNROLL for (int i = 0; i < RM; ++i) wu[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wr[i] + p), flip);
  NX_UNROLL for (int u = 0; u < RN; ++u) {
    const __m512i av = _mm512_loadu_si512(ar[u] + p);
    NX_UNROLL for (int i = 0; i < RM; ++i) acc[u][i] = (__v16si)_mm512_dpbusd_epi32((__m512i)acc[u][i], wu[i], av);
  }
}

// The tile's sums for one activation row, less the offset's 128 * sum(a), into out[0, RM). The
// accumulators go by value: an array's address would keep GCC storing them to the stack at every
// k-step.
template <int RM>
__attribute__((target(NX_AVX512))) inline void StoreVnni(__m512i v0, __m512i v1, __m512i v2, __m512i v3,
                                                          int32_t sum, int32_t* out) {
  const __m128i s = _mm_sub_epi32(Reduce4(v0, v1, v2, v3), _mm_set1_epi32(128 * sum));
  _mm_mask_storeu_epi32(out, static_cast<__mmask8>((1u << RM) - 1), s);
}

struct Vnni {
  // 32 zmm registers: 4 x 6 accumulators, 4 weight vectors, an activation vector, the 0x80 mask.
  static constexpr int kMaxRn = 6;

  // As Avx2::Tile.
  template <int RM, int RN>
  __attribute__((target(NX_AVX512))) static void Tile(const Terms& t, const int8_t* w, int j, int r0, int32_t* out,
                                                      int ldo, const int8_t* next, bool l1) {
    const int k = t.k;
    __v16si acc[RN][RM];  // int32 lanes typed as such: an __m512i array is cast at every vpdpbusd and
                          // GCC then keeps it in memory (BENCHMARKS.md, "s8 kernel: register tiles")
    NX_UNROLL for (int u = 0; u < RN; ++u)
      NX_UNROLL for (int i = 0; i < RM; ++i) acc[u][i] = __v16si{};
    const int8_t* wr[RM];
    NX_UNROLL for (int i = 0; i < RM; ++i) wr[i] = w + static_cast<size_t>(j + i) * k;
    const int8_t* ar[RN];
    NX_UNROLL for (int u = 0; u < RN; ++u) ar[u] = t.a.data() + static_cast<size_t>(r0 + u) * t.kp;
    int p = 0;
    for (; p + 64 <= k; p += 64) {
      if (next)
        NX_UNROLL for (int i = 0; i < RM; ++i)
          l1 ? _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<size_t>(i) * k + p), _MM_HINT_T0)
             : _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<size_t>(i) * k + p), _MM_HINT_T1);
      StepVnni<RM, RN>(acc, wr, ar, p, ~0ULL);
    }
    if (p < k) StepVnni<RM, RN>(acc, wr, ar, p, (~0ULL) >> (64 - (k - p)));
    const __m512i z = _mm512_setzero_si512();
    NX_UNROLL for (int u = 0; u < RN; ++u) {
      __m512i v[4] = {z, z, z, z};
      NX_UNROLL for (int i = 0; i < RM; ++i) v[i] = (__m512i)acc[u][i];
      StoreVnni<RM>(v[0], v[1], v[2], v[3], t.sum[r0 + u], out + static_cast<size_t>(r0 + u) * ldo + j);
    }
  }
};

// L::Tile<RM, rn> for rn in 1 ... RN, chosen at run time.
template <class L, int RM, int RN = L::kMaxRn>
void TileRows(int rn, const Terms& t, const int8_t* w, int j, int r0, int32_t* out, int ldo, const int8_t* next,
              bool l1) {
  if constexpr (RN > 1)
    if (rn < RN) return TileRows<L, RM, RN - 1>(rn, t, w, j, r0, out, ldo, next, l1);
  L::template Tile<RM, RN>(t, w, j, r0, out, ldo, next, l1);
}

// out[r, j] (row stride ldo) for every activation row r and weight rows j in [j0, j1) of w, which
// holds `rows` rows (the prefetch stays inside it). Up to kStreamTerms activation rows: weight
// rows one after another. More: each tile of weight rows serves every activation row (near-equal
// blocks of at most L::kMaxRn) while it is in cache, so every weight byte streams from memory once
// a call; the first block prefetches the rows kPrefetchTiles tiles ahead, the second the next tile.
template <class L>
void DotTiles(const Terms& t, const int8_t* w, int rows, int j0, int j1, int32_t* out, int ldo) {
  const int blocks = (t.r + L::kMaxRn - 1) / L::kMaxRn;
  if (t.r <= kStreamTerms) {
    for (int j = j0; j < j1; ++j)
      for (int b = 0, r0 = 0; b < blocks; ++b) {
        const int rn = (t.r - r0) / (blocks - b);
        TileRows<L, 1>(rn, t, w, j, r0, out, ldo, nullptr, false);
        r0 += rn;
      }
    return;
  }
  for (int j = j0; j < j1; j += kTileRm) {
    const int rm = std::min(kTileRm, j1 - j);
    const int ahead = j + kTileRm * kPrefetchTiles;
    const int8_t* next = ahead + kTileRm <= rows ? w + static_cast<size_t>(ahead) * t.k : nullptr;
    const bool near = t.k >= kNearMinK && j + 2 * kTileRm <= rows;
    for (int b = 0, r0 = 0; b < blocks; ++b) {
      const int rn = (t.r - r0) / (blocks - b);  // near-equal blocks, the larger ones last
      const int8_t* pf = b == 0 ? next : b == 1 && near ? w + static_cast<size_t>(j + kTileRm) * t.k : nullptr;
      if (rm == kTileRm)
        TileRows<L, kTileRm>(rn, t, w, j, r0, out, ldo, pf, b == 1);
      else
        for (int i = 0; i < rm; ++i) TileRows<L, 1>(rn, t, w, j + i, r0, out, ldo, nullptr, false);
      r0 += rn;
    }
  }
}

#endif  // NX_X86

void Dot(int level, const Terms& t, const int8_t* w, int rows, int j0, int j1, int32_t* out, int ldo) {
#ifdef NX_X86
  if (level >= kAvx512Vnni) return DotTiles<Vnni>(t, w, rows, j0, j1, out, ldo);
  if (level >= kAvx2) return DotTiles<Avx2>(t, w, rows, j0, j1, out, ldo);
#endif
  DotScalar(t, w, j0, j1, out, ldo);
}

// Cache blocking for prompts: a thread's weight rows in chunks of about kChunkBytes, each run
// against the token rows kTileBytes of activation terms at a time (and those terms' int32 sums,
// then their epilogue), so the weight streams from memory once per call, each chunk is reused from
// L2 and the int32 sums stay small. Decode (up to 16 token rows) is one tile.
constexpr int64_t kChunkBytes = 128 << 10;
constexpr int64_t kTileBytes = 256 << 10;
constexpr int kMinTile = 16;

ffi::Error S8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int32_t level,
                        int32_t threads) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || scale.element_count() != static_cast<size_t>(wd[0]))
    return ffi::Error::InvalidArgument("nx_kernels_cpu s8_matmul: x [m, k], w [n, k], scale [n] expected");
  const int m = static_cast<int>(xd[0]), k = static_cast<int>(xd[1]), n = static_cast<int>(wd[0]);
  if (m == 0 || n == 0) return ffi::Error::Success();
  const int lvl = ClampLevel(level);
  const int kp = (k + 63) / 64 * 64;
  const int tile = static_cast<int>(std::max<int64_t>(kMinTile, kTileBytes / (2 * std::max(64, kp))));
  const int chunk = static_cast<int>(std::max<int64_t>(kTileRm, kChunkBytes / std::max(1, k) / kTileRm * kTileRm));
  // token tiles [i0, i0 + tile): their terms (hi rows then lo rows) in one Terms each
  std::vector<Terms> tiles((m + tile - 1) / tile);
  for (size_t c = 0; c < tiles.size(); ++c) {
    const int i0 = static_cast<int>(c) * tile;
    const float* xi = x.typed_data() + static_cast<size_t>(i0) * k;
#ifdef NX_X86
    if (lvl >= kAvx512Vnni) {
      QuantizeRows<RoundRowAvx512>(xi, std::min(tile, m - i0), k, tiles[c]);
      SumRows(tiles[c]);
      continue;
    }
#endif
    QuantizeRows(xi, std::min(tile, m - i0), k, tiles[c]);
  }
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  ParallelRows(pool, n, Threads(pool, threads), 2 * static_cast<int64_t>(m) * k, [&](int j0, int j1) {
    // int32 sums of one chunk and tile, in a per-thread buffer: a [2m, n] one would be allocated
    // (and page-faulted) anew at every call of a large weight (the lm head).
    thread_local std::vector<int32_t> buf;
    for (int c0 = j0; c0 < j1; c0 += chunk) {
      const int cn = std::min(j1, c0 + chunk) - c0;
      const int8_t* wc = wp + static_cast<size_t>(c0) * k;
      for (size_t c = 0; c < tiles.size(); ++c) {
        const Terms& t = tiles[c];
        const int i0 = static_cast<int>(c) * tile, tm = t.r / 2;
        if (buf.size() < static_cast<size_t>(t.r) * cn) buf.resize(static_cast<size_t>(t.r) * cn);
        Dot(lvl, t, wc, n - c0, 0, cn, buf.data(), cn);
        for (int i = 0; i < tm; ++i) {
          const int32_t* hi = buf.data() + static_cast<size_t>(i) * cn;
          const int32_t* lo = buf.data() + static_cast<size_t>(tm + i) * cn;
          Epilogue(hi, lo, t.scale[i], t.scale[tm + i], sp + c0, cn, yp + static_cast<size_t>(i0 + i) * n + c0);
        }
      }
    }
  }, 4, 16, m == 1);
  return ffi::Error::Success();
}

ffi::Error S8DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::S8> w,
                     ffi::ResultBuffer<ffi::S32> out, int32_t level, int32_t threads) {
  const auto ad = a.dimensions();
  const auto wd = w.dimensions();
  if (ad.size() != 2 || wd.size() != 2 || ad[1] != wd[1])
    return ffi::Error::InvalidArgument("nx_kernels_cpu s8_dot: a [r, k], w [n, k] expected");
  const int r = static_cast<int>(ad[0]), k = static_cast<int>(ad[1]), n = static_cast<int>(wd[0]);
  const int lvl = ClampLevel(level);
  Terms t;
  t.r = r;
  t.k = k;
  t.kp = (k + 63) / 64 * 64;
  t.a.assign(static_cast<size_t>(r) * t.kp, 0);
  for (int i = 0; i < r; ++i)
    std::memcpy(t.a.data() + static_cast<size_t>(i) * t.kp, a.typed_data() + static_cast<size_t>(i) * k, k);
  t.sum.assign(r, 0);
  if (lvl >= kAvx512Vnni) SumRows(t);
  const int8_t* wp = w.typed_data();
  int32_t* op = out->typed_data();
  ParallelRows(pool, n, Threads(pool, threads), static_cast<int64_t>(r) * k,
               [&](int j0, int j1) { Dot(lvl, t, wp, n, j0, j1, op, n); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NxS8Matmul, S8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("level")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NxS8Dot, S8DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("level")
                                  .Attr<int32_t>("threads"));

// The best level this CPU runs: 0 scalar, 1 AVX2, 2 AVX-512 VNNI, 3 AVX-512 VNNI + BF16 (common.h).
extern "C" __attribute__((visibility("default"))) int nx_kernels_cpu_isa() { return DetectIsa(); }
