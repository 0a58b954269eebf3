// nx-kernels-cpu: decode attention, one query token per batch row over one layer's KV cache.
//
// q f32 [B, H, d]; the cache as nx.ops.attention lays it out, kv-head major (row kh * B + b):
// keys [kvh * B, d, P] (transposed), values [kvh * B, P, d], f32 or the uint16 bits of bf16 or
// f16 values (`kind`). Row b's query heads kh * G .. kh * G + G - 1 (G = H / kvh) read kv head kh
// at the positions lo[b] .. hi[b] (clamped to the first `window`), and only those: the positions
// XLA's formulation masks are never read. out f32 [B, H, d]:
//
//   s = (q . k_j) * scale, e_j = exp(s_j - max s), out = sum_j round(e_j) v_j / sum_j e_j
//
// as nx.ops.attention._attend computes it: scores and softmax in f32, the weights rounded to the
// cache's type before the values' dot (its bf16 or f16 operand), the division after it. A row with
// no position to read (lo > hi: padding) gives zeros.
//
// The loops are plain C++ over contiguous f32 spans, compiled once per level (AVX-512, AVX2,
// baseline) and vectorized by the compiler; 16-bit caches are widened a span at a time. Work is
// split over (batch row, kv head) units. Why: XLA:CPU runs decode attention as two batched dots
// whose per-call cost dwarfs their work at decode's sizes, over every position of the window
// (BENCHMARKS.md, "Decode attention kernel").

#include "common.h"

namespace {

using namespace nxk;

constexpr int kF32 = 0;
constexpr int kBf16 = 1;
constexpr int kF16 = 2;
constexpr int kSpan = 256;  // positions whose scores one pass over the keys' rows accumulates

#define NX_INLINE inline __attribute__((always_inline))

NX_INLINE float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

NX_INLINE uint32_t ToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// f16 bits -> f32, exact and branch-free: the magnitude's bits shifted into f32 place and scaled
// by 2^112 give normals and subnormals alike; infinities and NaNs get the all-ones exponent.
NX_INLINE float HalfToFloat(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  uint32_t u = ToBits(FromBits(em << 13) * 0x1p112f) | (static_cast<uint32_t>(h & 0x8000u) << 16);
  if (em >= 0x7c00u) u |= 0x7f800000u;
  return FromBits(u);
}

template <int Kind>
NX_INLINE void Widen(const void* src, int n, float* __restrict dst) {
  if constexpr (Kind == kF32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int i = 0; i < n; ++i) dst[i] = Kind == kBf16 ? FromBits(static_cast<uint32_t>(s[i]) << 16) : HalfToFloat(s[i]);
  }
}

// x (finite, >= 0) rounded to the nearest value of the cache's type, ties to even, as XLA's convert.
template <int Kind>
NX_INLINE float Narrow(float x) {
  if constexpr (Kind == kBf16) {
    const uint32_t u = ToBits(x);
    return FromBits((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
  } else if constexpr (Kind == kF16) {
    const uint32_t u = ToBits(x);
    const float normal = FromBits((u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u);
    const float tiny = ((x * 0x1p24f + 0x1.8p23f) - 0x1.8p23f) * 0x1p-24f;  // f16 subnormals: steps of 2^-24
    return x < 0x1p-14f ? tiny : normal;
  } else {
    return x;
  }
}

// exp(x) for x <= 0 to ~1 ulp, branch-free: 2^n times a degree-6 polynomial on |r| <= ln2 / 2
// (Cody-Waite reduction); 0 below -87.3 (where f32 results turn subnormal).
NX_INLINE float Exp(float x) {
  const float c = x < -87.3f ? -87.3f : x;
  const float n = (c * 1.44269504f + 0x1.8p23f) - 0x1.8p23f;
  const float r = (c - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float y = p * FromBits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.3f ? 0.0f : y;
}

struct Args {
  const float* q;
  const void* k;
  const void* v;
  const int32_t* lo;
  const int32_t* hi;
  float* out;
  int b, h, kvh, d, p, window;
  float scale;
};

// Query heads of kv head `kh`, batch row `row`: the scores of positions [lo, lo + len) into
// s [G, len], softmax weights in place, then the values' sums into out.
template <int Kind>
NX_INLINE void Unit(const Args& a, int row, int kh, std::vector<float>& scratch) {
  const int g = a.h / a.kvh, d = a.d;
  float* __restrict out = a.out + (static_cast<size_t>(row) * a.h + static_cast<size_t>(kh) * g) * d;
  const int lo = std::max(a.lo[row], 0);
  const int hi = std::min({a.hi[row], a.window - 1, a.p - 1});
  const int len = hi - lo + 1;
  if (len <= 0) {
    std::fill(out, out + static_cast<size_t>(g) * d, 0.0f);
    return;
  }
  const size_t bytes = Kind == kF32 ? 4 : 2;
  const size_t r = static_cast<size_t>(kh) * a.b + row;
  const char* k = static_cast<const char*>(a.k) + r * d * a.p * bytes;
  const char* v = static_cast<const char*>(a.v) + r * a.p * d * bytes;
  const float* q = a.q + (static_cast<size_t>(row) * a.h + static_cast<size_t>(kh) * g) * d;
  scratch.resize(static_cast<size_t>(g) * len + kSpan + static_cast<size_t>(g) * d + g + d);
  float* __restrict s = scratch.data();
  float* __restrict span = s + static_cast<size_t>(g) * len;
  float* __restrict acc = span + kSpan;
  float* __restrict total = acc + static_cast<size_t>(g) * d;
  float* __restrict vrow = total + g;

  std::fill(s, s + static_cast<size_t>(g) * len, 0.0f);
  for (int j0 = 0; j0 < len; j0 += kSpan) {
    const int n = std::min(kSpan, len - j0);
    for (int i = 0; i < d; ++i) {
      Widen<Kind>(k + (static_cast<size_t>(i) * a.p + lo + j0) * bytes, n, span);
      for (int t = 0; t < g; ++t) {
        const float qi = q[static_cast<size_t>(t) * d + i];
        float* __restrict st = s + static_cast<size_t>(t) * len + j0;
        for (int j = 0; j < n; ++j) st[j] += qi * span[j];
      }
    }
  }
  for (int t = 0; t < g; ++t) {
    float* __restrict st = s + static_cast<size_t>(t) * len;
    float m = -INFINITY;
    for (int j = 0; j < len; ++j) {
      st[j] *= a.scale;
      m = std::max(m, st[j]);
    }
    float sum = 0.0f;
    for (int j = 0; j < len; ++j) {
      const float e = Exp(st[j] - m);
      sum += e;
      st[j] = Narrow<Kind>(e);
    }
    total[t] = sum;
  }
  std::fill(acc, acc + static_cast<size_t>(g) * d, 0.0f);
  for (int j = 0; j < len; ++j) {
    Widen<Kind>(v + static_cast<size_t>(lo + j) * d * bytes, d, vrow);
    for (int t = 0; t < g; ++t) {
      const float e = s[static_cast<size_t>(t) * len + j];
      float* __restrict at = acc + static_cast<size_t>(t) * d;
      for (int i = 0; i < d; ++i) at[i] += e * vrow[i];
    }
  }
  for (int t = 0; t < g; ++t)
    for (int i = 0; i < d; ++i) out[static_cast<size_t>(t) * d + i] = acc[static_cast<size_t>(t) * d + i] / total[t];
}

template <int Kind>
NX_INLINE void Units(const Args& a, int u0, int u1) {
  thread_local std::vector<float> scratch;
  for (int u = u0; u < u1; ++u) Unit<Kind>(a, u % a.b, u / a.b, scratch);
}

#define NX_ATTENTION_LEVEL(Name, ...)                                       \
  __VA_ARGS__ void Name(const Args& a, int kind, int u0, int u1) {          \
    if (kind == kBf16) return Units<kBf16>(a, u0, u1);                      \
    if (kind == kF16) return Units<kF16>(a, u0, u1);                        \
    return Units<kF32>(a, u0, u1);                                          \
  }

NX_ATTENTION_LEVEL(UnitsScalar)
#ifdef NX_X86
NX_ATTENTION_LEVEL(UnitsAvx2, __attribute__((target("avx2,fma"))))

// ---- AVX-512: the same steps on 16 positions or head-dim values a vector ----

#define NX_AVX512 __attribute__((target(NX_AVX512F), always_inline)) inline

// 16 cache values from element `at` as f32 (lanes outside `m` zero).
template <int Kind>
NX_AVX512 __m512 Load16(const void* base, size_t at, __mmask16 m) {
  if constexpr (Kind == kF32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + at);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + at);
    if constexpr (Kind == kBf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
}

// Exp above, lane for lane.
NX_AVX512 __m512 Exp16(__m512 x) {
  const __m512 c = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 big = _mm512_set1_ps(0x1.8p23f);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504f)), big), big);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(c, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float k : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(k));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), y);
}

template <int Kind>
NX_AVX512 __m512 Narrow16(__m512 x) {
  if constexpr (Kind == kBf16) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  } else if constexpr (Kind == kF16) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return x;
  }
}

NX_AVX512 __mmask16 Tail(int n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }

// One query head's output: sum_j e_j v_j / total, v_j the value rows first + j (DV vectors of 16).
template <int Kind, int DV>
NX_AVX512 void Values(const float* e, const void* v, size_t first, int len, float total, float* out) {
  __m512 acc[DV];
  NX_UNROLL for (int c = 0; c < DV; ++c) acc[c] = _mm512_setzero_ps();
  for (int j = 0; j < len; ++j) {
    const __m512 w = _mm512_set1_ps(e[j]);
    const size_t row = (first + j) * (16 * DV);
    NX_UNROLL for (int c = 0; c < DV; ++c) acc[c] = _mm512_fmadd_ps(w, Load16<Kind>(v, row + 16 * c, 0xffff), acc[c]);
  }
  NX_UNROLL for (int c = 0; c < DV; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_div_ps(acc[c], _mm512_set1_ps(total)));
}

template <int Kind>
__attribute__((target(NX_AVX512F))) void UnitAvx512(const Args& a, int row, int kh, std::vector<float>& scratch) {
  const int g = a.h / a.kvh, d = a.d;
  float* out = a.out + (static_cast<size_t>(row) * a.h + static_cast<size_t>(kh) * g) * d;
  const int lo = std::max(a.lo[row], 0);
  const int hi = std::min({a.hi[row], a.window - 1, a.p - 1});
  const int len = hi - lo + 1;
  if (len <= 0) {
    std::fill(out, out + static_cast<size_t>(g) * d, 0.0f);
    return;
  }
  const size_t r = static_cast<size_t>(kh) * a.b + row;
  const size_t kbase = r * d * a.p, vbase = r * a.p * d;
  const float* q = a.q + (static_cast<size_t>(row) * a.h + static_cast<size_t>(kh) * g) * d;
  const int lp = (len + 15) / 16 * 16;
  scratch.resize(static_cast<size_t>(g) * lp);
  float* s = scratch.data();
  for (int t = 0; t < g; ++t) {
    const float* qt = q + static_cast<size_t>(t) * d;
    float* st = s + static_cast<size_t>(t) * lp;
    for (int j0 = 0; j0 < len; j0 += 16) {
      const __mmask16 m = Tail(len - j0);
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      const size_t at = kbase + lo + j0;
      int i = 0;
      for (; i + 4 <= d; i += 4)
        NX_UNROLL for (int u = 0; u < 4; ++u)
          acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(qt[i + u]), Load16<Kind>(a.k, at + static_cast<size_t>(i + u) * a.p, m), acc[u]);
      for (; i < d; ++i)
        acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(qt[i]), Load16<Kind>(a.k, at + static_cast<size_t>(i) * a.p, m), acc[0]);
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
      _mm512_storeu_ps(st + j0, _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m, _mm512_mul_ps(sum, _mm512_set1_ps(a.scale))));
    }
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < lp; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(st + j));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 total = _mm512_setzero_ps();
    for (int j = 0; j < lp; j += 16) {
      const __m512 e = Exp16(_mm512_sub_ps(_mm512_loadu_ps(st + j), mx));  // padding lanes: exp(-inf) = 0
      total = _mm512_add_ps(total, e);
      _mm512_storeu_ps(st + j, Narrow16<Kind>(e));
    }
    const float sum = _mm512_reduce_add_ps(total);
    float* ot = out + static_cast<size_t>(t) * d;
    switch (d) {
      case 64: Values<Kind, 4>(st, a.v, vbase / d + lo, len, sum, ot); break;
      case 128: Values<Kind, 8>(st, a.v, vbase / d + lo, len, sum, ot); break;
      case 32: Values<Kind, 2>(st, a.v, vbase / d + lo, len, sum, ot); break;
      case 80: Values<Kind, 5>(st, a.v, vbase / d + lo, len, sum, ot); break;
      case 96: Values<Kind, 6>(st, a.v, vbase / d + lo, len, sum, ot); break;
      default: {  // other head sizes: the same sums a value at a time
        for (int c = 0; c < d; ++c) {
          float acc = 0.0f;
          for (int j = 0; j < len; ++j) {
            float vj;
            Widen<Kind>(static_cast<const char*>(a.v) + (vbase + static_cast<size_t>(lo + j) * d + c) * (Kind == kF32 ? 4 : 2), 1, &vj);
            acc += st[j] * vj;
          }
          ot[c] = acc / sum;
        }
      }
    }
  }
}

__attribute__((target(NX_AVX512F))) void UnitsAvx512(const Args& a, int kind, int u0, int u1) {
  thread_local std::vector<float> scratch;
  for (int u = u0; u < u1; ++u) {
    if (kind == kBf16) UnitAvx512<kBf16>(a, u % a.b, u / a.b, scratch);
    else if (kind == kF16) UnitAvx512<kF16>(a, u % a.b, u / a.b, scratch);
    else UnitAvx512<kF32>(a, u % a.b, u / a.b, scratch);
  }
}
#endif

void Run(int level, const Args& a, int kind, int u0, int u1) {
#ifdef NX_X86
  if (level >= kAvx512Vnni) return UnitsAvx512(a, kind, u0, u1);
  if (level >= kAvx2 && HasFma()) return UnitsAvx2(a, kind, u0, u1);
#endif
  UnitsScalar(a, kind, u0, u1);
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, ffi::ResultBuffer<ffi::F32> out,
                               float scale, int32_t window, int32_t kind, int32_t level, int32_t threads) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto want = kind == kF32 ? ffi::DataType::F32 : ffi::DataType::U16;
  if (kind < kF32 || kind > kF16 || k.element_type() != want || v.element_type() != want)
    return ffi::Error::InvalidArgument("nx_kernels_cpu decode_attention: caches f32 (kind 0) or uint16 (bf16 1, f16 2)");
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3)
    return ffi::Error::InvalidArgument("nx_kernels_cpu decode_attention: q [B, H, d], k [R, d, P], v [R, P, d]");
  Args a{q.typed_data(), k.untyped_data(), v.untyped_data(), lo.typed_data(), hi.typed_data(), out->typed_data(),
         static_cast<int>(qd[0]), static_cast<int>(qd[1]), 0, static_cast<int>(qd[2]), static_cast<int>(kd[2]),
         window, scale};
  if (a.b == 0 || a.h == 0 || a.d == 0) return ffi::Error::Success();
  a.kvh = static_cast<int>(kd[0]) / a.b;
  if (a.kvh * a.b != kd[0] || a.kvh == 0 || a.h % a.kvh || kd[1] != a.d || vd[0] != kd[0] || vd[1] != a.p ||
      vd[2] != a.d || lo.element_count() != a.b || hi.element_count() != a.b)
    return ffi::Error::InvalidArgument(
        "nx_kernels_cpu decode_attention: k [kvh * B, d, P], v [kvh * B, P, d], lo and hi [B], H a multiple of kvh");
  const int lvl = ClampLevel(level);
  const int units = a.b * a.kvh;
  // a unit's work: its heads' multiply-adds (keys and values) over the rows' mean span of positions
  int64_t positions = 0;
  for (int i = 0; i < a.b; ++i)
    positions += std::max(0, std::min({a.hi[i], a.window - 1, a.p - 1}) - std::max(a.lo[i], 0) + 1);
  const int64_t work = 2LL * (a.h / a.kvh) * a.d * std::max<int64_t>(1, positions / a.b);
  ParallelUnits(pool, units, Threads(pool, threads), work, [&](int u0, int u1) { Run(lvl, a, kind, u0, u1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window")
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("level")
                                  .Attr<int32_t>("threads"));
