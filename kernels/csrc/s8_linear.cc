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
// Threads and activation terms: common.h.

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

// How far ahead (in weight rows) the four-row SIMD loops fetch weights, which stream from memory
// once while the activation terms stay in L1: 32 rows (18 KB at k = 576) measured best on the
// 2-core EPYC; the one-row loops do better on the hardware prefetcher alone (BENCHMARKS.md,
// "CPU kernels").
constexpr int kPrefetchRows = 32;

// Up to this many activation rows (2 per token row) the dot reads weight rows one at a time, in
// order; more rows read four weight rows together, sharing each activation load among them. Four
// interleaved rows (576 bytes apart) stream from memory at ~11 GB/s on the 2-core EPYC, one row at
// a time at 15-20 (BENCHMARKS.md, "CPU kernels").
constexpr int kStreamTerms = 4;

// ---- AVX2 ----

__attribute__((target("avx2"))) inline int32_t HsumAvx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// R weight rows x T activation rows per pass over k.
template <int R, int T>
__attribute__((target("avx2"))) void TileAvx2(const Terms& t, const int8_t* w, int j, int r0, int32_t* out,
                                              int ldo) {
  const int k = t.k;
  const int kv = k / 32 * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < T; ++u) acc[i][u] = _mm256_setzero_si256();
  const int8_t* wr[R];
  for (int i = 0; i < R; ++i) wr[i] = w + static_cast<size_t>(j + i) * k;
  const int8_t* ar[T];
  for (int u = 0; u < T; ++u) ar[u] = t.a.data() + static_cast<size_t>(r0 + u) * t.kp;
  const int64_t pf = R > 1 && r0 == 0 ? static_cast<int64_t>(kPrefetchRows) * k : -1;
  for (int p = 0; p < kv; p += 32) {
    __m256i av[T];
    for (int u = 0; u < T; ++u) av[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar[u] + p));
    if (pf > 0 && (p & 63) == 0)
      for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(wr[i] + p + pf), _MM_HINT_T0);
    for (int i = 0; i < R; ++i) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[i] + p));
      const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as u8 (-128 -> 128)
      for (int u = 0; u < T; ++u) {
        const __m256i sa = _mm256_sign_epi8(av[u], wv);
        const __m256i pr = _mm256_maddubs_epi16(aw, sa);
        acc[i][u] = _mm256_add_epi32(acc[i][u], _mm256_madd_epi16(pr, ones));
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < T; ++u) {
      int32_t s = HsumAvx2(acc[i][u]);
      for (int q = kv; q < k; ++q) s += static_cast<int32_t>(ar[u][q]) * wr[i][q];
      out[static_cast<size_t>(r0 + u) * ldo + j + i] = s;
    }
}

template <int R>
__attribute__((target("avx2"))) void RowsAvx2(const Terms& t, const int8_t* w, int j, int32_t* out, int ldo) {
  int r0 = 0;
  for (; r0 + 2 <= t.r; r0 += 2) TileAvx2<R, 2>(t, w, j, r0, out, ldo);
  if (r0 < t.r) TileAvx2<R, 1>(t, w, j, r0, out, ldo);
}

__attribute__((target("avx2"))) void DotAvx2(const Terms& t, const int8_t* w, int j0, int j1, int32_t* out,
                                             int ldo) {
  int j = j0;
  if (t.r <= kStreamTerms) {  // weight rows one after another (see kStreamTerms)
    for (; j < j1; ++j) RowsAvx2<1>(t, w, j, out, ldo);
    return;
  }
  for (; j + 4 <= j1; j += 4) RowsAvx2<4>(t, w, j, out, ldo);
  for (; j < j1; ++j) RowsAvx2<1>(t, w, j, out, ldo);
}

// ---- AVX-512 VNNI ----

#define NX_AVX512 "avx512f,avx512bw,avx512vl,avx512vnni"

// [sum(a), sum(b), sum(c), sum(d)] of four int32 vectors.
__attribute__((target(NX_AVX512))) inline __m128i Reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i v = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

template <int R, int T>
__attribute__((target(NX_AVX512))) void TileVnni(const Terms& t, const int8_t* w, int j, int r0, int32_t* out,
                                                 int ldo) {
  const int k = t.k;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < T; ++u) acc[i][u] = _mm512_setzero_si512();
  const int8_t* wr[R];
  for (int i = 0; i < R; ++i) wr[i] = w + static_cast<size_t>(j + i) * k;
  const int8_t* ar[T];
  for (int u = 0; u < T; ++u) ar[u] = t.a.data() + static_cast<size_t>(r0 + u) * t.kp;
  const int kv = k / 64 * 64;
  int p = 0;
  // Prefetch on the first pass over this row block only (the next passes find it in L1).
  const int64_t pf = R > 1 && r0 == 0 ? static_cast<int64_t>(kPrefetchRows) * k : -1;
  for (; p < kv; p += 64) {
    __m512i av[T];
    for (int u = 0; u < T; ++u) av[u] = _mm512_loadu_si512(ar[u] + p);
    if (pf > 0)
      for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(wr[i] + p + pf), _MM_HINT_T0);
    for (int i = 0; i < R; ++i) {
      const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(wr[i] + p), flip);  // w + 128 as u8
      for (int u = 0; u < T; ++u) acc[i][u] = _mm512_dpbusd_epi32(acc[i][u], wu, av[u]);
    }
  }
  if (p < k) {  // the tail: terms are zero padded to kp; weights read under a mask (+128 * 0)
    const __mmask64 mask = (~0ULL) >> (64 - (k - p));
    __m512i av[T];
    for (int u = 0; u < T; ++u) av[u] = _mm512_loadu_si512(ar[u] + p);
    for (int i = 0; i < R; ++i) {
      const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wr[i] + p), flip);
      for (int u = 0; u < T; ++u) acc[i][u] = _mm512_dpbusd_epi32(acc[i][u], wu, av[u]);
    }
  }
  for (int u = 0; u < T; ++u) {
    int32_t* o = out + static_cast<size_t>(r0 + u) * ldo + j;
    if constexpr (R == 4) {  // four rows' sums at once: half the shuffles of four reductions
      const __m128i s = _mm_sub_epi32(Reduce4(acc[0][u], acc[1][u], acc[2][u], acc[3][u]),
                                      _mm_set1_epi32(128 * t.sum[r0 + u]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), s);
    } else {
      for (int i = 0; i < R; ++i) o[i] = _mm512_reduce_add_epi32(acc[i][u]) - 128 * t.sum[r0 + u];
    }
  }
}

template <int R>
__attribute__((target(NX_AVX512))) void RowsVnni(const Terms& t, const int8_t* w, int j, int32_t* out, int ldo) {
  int r0 = 0;
  for (; r0 + 4 <= t.r; r0 += 4) TileVnni<R, 4>(t, w, j, r0, out, ldo);
  switch (t.r - r0) {
    case 3: TileVnni<R, 3>(t, w, j, r0, out, ldo); break;
    case 2: TileVnni<R, 2>(t, w, j, r0, out, ldo); break;
    case 1: TileVnni<R, 1>(t, w, j, r0, out, ldo); break;
    default: break;
  }
}

__attribute__((target(NX_AVX512))) void DotVnni(const Terms& t, const int8_t* w, int j0, int j1, int32_t* out,
                                                int ldo) {
  int j = j0;
  if (t.r <= kStreamTerms) {  // weight rows one after another: one sequential stream from memory
    for (; j < j1; ++j) RowsVnni<1>(t, w, j, out, ldo);
    return;
  }
  for (; j + 4 <= j1; j += 4) RowsVnni<4>(t, w, j, out, ldo);
  for (; j < j1; ++j) RowsVnni<1>(t, w, j, out, ldo);
}

#endif  // NX_X86

void Dot(int level, const Terms& t, const int8_t* w, int j0, int j1, int32_t* out, int ldo) {
#ifdef NX_X86
  if (level >= kAvx512Vnni) return DotVnni(t, w, j0, j1, out, ldo);
  if (level >= kAvx2) return DotAvx2(t, w, j0, j1, out, ldo);
#endif
  DotScalar(t, w, j0, j1, out, ldo);
}

ffi::Error S8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int32_t level,
                        int32_t threads) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || scale.element_count() != static_cast<size_t>(wd[0]))
    return ffi::Error::InvalidArgument("nx_kernels_cpu s8_matmul: x [m, k], w [n, k], scale [n] expected");
  const int m = static_cast<int>(xd[0]), k = static_cast<int>(xd[1]), n = static_cast<int>(wd[0]);
  const int lvl = ClampLevel(level);
  Terms t;
  QuantizeRows(x.typed_data(), m, k, t);
  if (lvl >= kAvx512Vnni) SumRows(t);
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  ParallelRows(pool, n, Threads(pool, threads), static_cast<int64_t>(t.r) * k, [&](int j0, int j1) {
    // int32 sums of this chunk's rows only, in a per-thread buffer: a [2m, n] one would be
    // allocated (and page-faulted) anew at every call of a large weight (the lm head).
    const int cn = j1 - j0;
    thread_local std::vector<int32_t> buf;
    if (buf.size() < static_cast<size_t>(t.r) * cn) buf.resize(static_cast<size_t>(t.r) * cn);
    Dot(lvl, t, wp + static_cast<size_t>(j0) * k, 0, cn, buf.data(), cn);
    for (int i = 0; i < m; ++i) {
      const int32_t* hi = buf.data() + static_cast<size_t>(i) * cn;
      const int32_t* lo = buf.data() + static_cast<size_t>(m + i) * cn;
      Epilogue(hi, lo, t.scale[i], t.scale[m + i], sp + j0, cn, yp + static_cast<size_t>(i) * n + j0);
    }
  });
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
               [&](int j0, int j1) { Dot(lvl, t, wp, j0, j1, op, n); });
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
