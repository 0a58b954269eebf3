// nx-kernels-cpu: grouped int8 / 4-bit linear layers for nx's s4 and grouped s8 paths (GGUF Q4_0,
// Q4_1, Q4_K, Q8_0), called from XLA:CPU through the typed FFI.
//
// Contract (the math of nx.ops.quant._grouped_matmul on its int8 path):
//   x f32 [m, k] is split into two int8 terms per row, hi and lo, with per-row scales s_hi, s_lo
//   (common.h, QuantizeRows: as the s8 kernel and nx.ops.quant.int8_terms round them);
//   the weight's values v [n, k] come in groups of `gs` consecutive inputs of a row, with scales
//   d [n, k / gs] (f32 or f16) and for affine weights offsets z [n, k / gs] (f32 or f16):
//     bits 8: q int8 [n, k], v = q;
//     bits 4: q uint8 [n, k / 2], two values a byte in llama.cpp's order within a group (byte j of a
//       group holds value j in its low nibble, value j + gs / 2 in its high one), v = nibble - 8
//       (symmetric) or v = nibble (affine);
//   y[i, j] = sum_g d[j, g] * (s_hi * dot(hi_i, v_j)_g + s_lo * dot(lo_i, v_j)_g)
//             + sum_g z[j, g] * sum(x[i, group g]),  f32 [m, n],
//   each group's dot exact in int32; the sum over groups is in f32, in this kernel's order (not
//   XLA's), so results agree with the XLA path to f32 rounding, not bit for bit.
// Supported: bits 4 or 8; gs a multiple of 32 that divides 512 (32 ... 512) or that 512 divides
// (the SIMD levels load a row's scales 16 groups or 512 values at a time); any m (nx sends <= 16).
//
// The weight is read once per call, packed, and its nibbles unpacked in registers. Per weight row:
//   2 AVX-512 VNNI: 64 values a step: 32 packed bytes (or 64 int8) as u8, vpdpbusd with each term
//     row, the int32 lanes converted and multiplied into f32 accumulators by their group's scale;
//     4-bit values enter as the unsigned nibble n (v + 8), int8 ones as w ^ 0x80 (w + 128); the
//     offset's share (8 or 128 times the group's activation sum) is taken off once per row after
//     the loop, as one small f32 dot over the groups. The activation terms are stored in the order
//     the unpacked bytes come out of a register (low nibbles of 32 bytes, then high ones), so no
//     shuffle is needed;
//   1 AVX2 (with FMA and F16C): 32 values a step: vpmaddubsw(n, a) for 4-bit (offset as above),
//     vpmaddubsw(|w|, sign(a, w)) for int8, then vpmaddwd with ones, scaled into f32 the same way;
//   0 scalar: signed values, int32 dot per group, f32 sum.

#include "common.h"

namespace {

using namespace nxk;

// f16 bits -> f32 (subnormals, infinities and NaN included), for the scalar level.
float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400));
    bits = sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

bool HasFmaF16c() {
#ifdef NX_X86
  static const bool has = (__builtin_cpu_init(), HasFma() && __builtin_cpu_supports("f16c"));
  return has;
#else
  return false;
#endif
}

// The weight as the call passes it.
struct GroupedWeight {
  int n = 0, k = 0, bits = 8, gs = 32, groups = 0;
  const uint8_t* q = nullptr;
  size_t row_bytes = 0;
  const void* scale = nullptr;
  bool scale_f16 = false;
  const void* zero = nullptr;  // null: symmetric
  bool zero_f16 = false;
};

// The activations, prepared once per call. `a`: the terms, row 2i hi and 2i + 1 lo of token row i
// (scales `s`), at the SIMD levels in the order the weight's bytes come out of a register. Per token
// row and 4-byte lane of that order (the bytes an int32 lane of the dot sums, all of one group):
// `cl` the unsigned offset's share, -offset * (s_hi * sum(hi) + s_lo * sum(lo)), which the tile
// multiplies by the lane's group scale, and `xl` the sum of x, multiplied by the lane's group
// offset (affine weights). The scalar level keeps the natural order and dots `xsum` (per group)
// with the offsets.
struct GroupedActs {
  int m = 0, r = 0, kp = 0, lanes = 0, gp = 0;  // lanes = kp / 4; gp: groups rounded up to 8
  int offset = 0;                              // 0, 8 (4-bit unsigned nibbles) or 128 (w ^ 0x80)
  std::vector<int8_t> a;
  std::vector<float> s;
  std::vector<float> cl;    // [m, lanes], empty when offset is 0
  std::vector<float> xl;    // [m, lanes], SIMD levels with offsets
  std::vector<float> xsum;  // [m, gp], the scalar level with offsets
  // Step s (of 8) of a block of scales: each lane's group, from the block's first (see the tiles).
  alignas(64) int32_t lane_group[8][16] = {};
};

// Value index (within the row) of packed byte p's low nibble, and of its high nibble.
inline int LowValue(int p, int gs) { return p / (gs / 2) * gs + p % (gs / 2); }
inline int HighValue(int p, int gs) { return LowValue(p, gs) + gs / 2; }

// order[b]: the value (or -1, padding) byte b of the level's unpacked weight row holds. 4-bit
// weights unpack `pw` packed bytes a step (32 for AVX-512, 16 for AVX2) to their low nibbles then
// their high ones; int8 and the scalar level keep the natural order.
std::vector<int> ValueOrder(int k, int kp, int gs, int bits, int level) {
  std::vector<int> order(kp, -1);
  if (bits == 8 || level == kScalar) {
    for (int v = 0; v < k; ++v) order[v] = v;
    return order;
  }
  const int pw = level >= kAvx512Vnni ? 32 : 16, half = gs / 2;
  int b = 0, i = 0;  // packed byte p = b + i, b a multiple of pw (no divisions: this runs every call)
  for (int g0 = 0; g0 < k; g0 += gs)
    for (int o = 0; o < half; ++o) {
      order[2 * b + i] = g0 + o;
      order[2 * b + pw + i] = g0 + half + o;
      if (++i == pw) {
        i = 0;
        b += pw;
      }
    }
  return order;
}

void PrepareActs(const float* x, int m, int k, const GroupedWeight& w, int level, GroupedActs& g) {
  Terms t;
  QuantizeRows(x, m, k, t);
  const int gs = w.gs;
  g.m = m;
  g.r = t.r;
  g.kp = t.kp;
  g.lanes = t.kp / 4;
  g.gp = (w.groups + 7) / 8 * 8;
  g.offset = level == kScalar ? 0 : w.bits == 4 ? (w.zero ? 0 : 8) : (level >= kAvx512Vnni ? 128 : 0);
  const std::vector<int> order = ValueOrder(k, t.kp, gs, w.bits, level);
  // AVX-512: step s's lane l holds values of share A (from value 64 s) or B (64 s + 32): 4-bit
  // lanes [A x4, B x4, A x4, B x4] (low nibbles of both shares, then high ones), int8 [A x8, B x8].
  // AVX2: step s's lanes hold the 32 values from 32 s.
  const int shift = __builtin_ctz(static_cast<unsigned>(gs));  // gs a power of two, or >= 512 (all 0)
  for (int s = 0; s < 8; ++s)
    for (int l = 0; l < 16; ++l) {
      const int v = level >= kAvx512Vnni ? 64 * s + 32 * (w.bits == 4 ? (l / 4) & 1 : l / 8) : 32 * s;
      g.lane_group[s][l] = gs > 512 ? 0 : v >> shift;
    }
  g.a.assign(t.a.size(), 0);
  g.s.resize(t.r);
  for (int i = 0; i < m; ++i)
    for (int h = 0; h < 2; ++h) {  // hi (t's row i), lo (t's row m + i)
      const int8_t* src = t.a.data() + static_cast<size_t>(h * m + i) * t.kp;
      int8_t* dst = g.a.data() + static_cast<size_t>(2 * i + h) * t.kp;
      for (int b = 0; b < t.kp; ++b) dst[b] = order[b] < 0 ? 0 : src[order[b]];
      g.s[2 * i + h] = t.scale[h * m + i];
    }
  if (g.offset) {
    g.cl.assign(static_cast<size_t>(m) * g.lanes, 0.0f);
    for (int i = 0; i < m; ++i) {
      const int8_t* hi = g.a.data() + static_cast<size_t>(2 * i) * t.kp;
      const int8_t* lo = hi + t.kp;
      for (int l = 0; l < g.lanes; ++l) {
        const int sh = hi[4 * l] + hi[4 * l + 1] + hi[4 * l + 2] + hi[4 * l + 3];
        const int sl = lo[4 * l] + lo[4 * l + 1] + lo[4 * l + 2] + lo[4 * l + 3];
        g.cl[static_cast<size_t>(i) * g.lanes + l] =
            -static_cast<float>(g.offset) * (g.s[2 * i] * static_cast<float>(sh) + g.s[2 * i + 1] * static_cast<float>(sl));
      }
    }
  }
  if (w.zero && level != kScalar) {
    g.xl.assign(static_cast<size_t>(m) * g.lanes, 0.0f);
    for (int i = 0; i < m; ++i)
      for (int b = 0; b < t.kp; ++b)
        if (order[b] >= 0) g.xl[static_cast<size_t>(i) * g.lanes + b / 4] += x[static_cast<size_t>(i) * k + order[b]];
  }
  if (w.zero && level == kScalar) {
    g.xsum.assign(static_cast<size_t>(m) * g.gp, 0.0f);
    for (int i = 0; i < m; ++i)
      for (int v = 0; v < k; ++v) g.xsum[static_cast<size_t>(i) * g.gp + v / gs] += x[static_cast<size_t>(i) * k + v];
  }
}

// count f32 or f16 values at src to f32 dst (the scalar level).
void ToFloat(const void* src, bool f16, int count, float* dst) {
  if (!f16) {
    std::memcpy(dst, src, sizeof(float) * count);
    return;
  }
  const auto* h = static_cast<const uint16_t*>(src);
  for (int i = 0; i < count; ++i) dst[i] = HalfToFloat(h[i]);
}

// ---- scalar: signed values in natural order, an int32 dot per group ----

// y[i * n + j] for every token row i.
void RowScalar(const GroupedActs& g, const GroupedWeight& w, int j, float* y, int n) {
  const int k = w.k, gs = w.gs;
  thread_local std::vector<int8_t> v;
  thread_local std::vector<float> d, z;
  v.resize(k);
  d.assign(g.gp, 0.0f);
  z.assign(g.gp, 0.0f);
  const size_t row = static_cast<size_t>(j) * w.groups;
  ToFloat(static_cast<const char*>(w.scale) + row * (w.scale_f16 ? 2 : 4), w.scale_f16, w.groups, d.data());
  if (w.zero) ToFloat(static_cast<const char*>(w.zero) + row * (w.zero_f16 ? 2 : 4), w.zero_f16, w.groups, z.data());
  const uint8_t* qj = w.q + static_cast<size_t>(j) * w.row_bytes;
  if (w.bits == 8) {
    std::memcpy(v.data(), qj, k);
  } else {
    const int off = w.zero ? 0 : 8;
    for (int p = 0; p < k / 2; ++p) {
      v[LowValue(p, gs)] = static_cast<int8_t>((qj[p] & 0xF) - off);
      v[HighValue(p, gs)] = static_cast<int8_t>((qj[p] >> 4) - off);
    }
  }
  for (int i = 0; i < g.m; ++i) {
    float out = 0.0f;
    for (int h = 0; h < 2; ++h) {
      const int8_t* a = g.a.data() + static_cast<size_t>(2 * i + h) * g.kp;
      float acc = 0.0f;
      for (int gi = 0; gi < w.groups; ++gi) {
        int32_t dot = 0;
        for (int q = gi * gs; q < (gi + 1) * gs; ++q) dot += static_cast<int32_t>(a[q]) * v[q];
        acc += static_cast<float>(dot) * d[gi];
      }
      out += acc * g.s[2 * i + h];
    }
    if (w.zero)
      for (int gi = 0; gi < w.groups; ++gi) out += z[gi] * g.xsum[static_cast<size_t>(i) * g.gp + gi];
    y[static_cast<size_t>(i) * n + j] = out;
  }
}

#ifdef NX_X86

// ---- AVX2: 32 values (one group's share) a step ----

#define NX_AVX2 "avx2,fma,f16c"

__attribute__((target(NX_AVX2))) inline float HsumPs256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// count (1..8) f32 or f16 scales at p[i] as f32 lanes (zero beyond count).
template <bool F16>
__attribute__((target(NX_AVX2))) inline __m256 Scales8(const void* p, size_t i, int count) {
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if constexpr (F16) {
    const auto* h = static_cast<const uint16_t*>(p) + i;
    if (count == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
    alignas(16) uint16_t buf[8] = {};
    std::memcpy(buf, h, 2 * count);
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  return _mm256_maskload_ps(static_cast<const float*>(p) + i, mask);
}

// Token rows [i0, i0 + T) of weight row j: y[i * n + j].
template <int Bits, int T, bool Zero, bool F16>
__attribute__((target(NX_AVX2))) void TileAvx2(const GroupedActs& g, const GroupedWeight& w, int j, int i0, float* y,
                                              int n) {
  const int units = w.k / 32, gs = w.gs;
  const bool corr = g.offset != 0;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* qj = w.q + static_cast<size_t>(j) * w.row_bytes;
  const size_t row = static_cast<size_t>(j) * w.groups;
  __m256 acc[2 * T], ext[T];
  for (int u = 0; u < 2 * T; ++u) acc[u] = _mm256_setzero_ps();
  for (int u = 0; u < T; ++u) ext[u] = _mm256_setzero_ps();
  const int8_t* ar = g.a.data() + static_cast<size_t>(2 * i0) * g.kp;
  const float* cl = corr ? g.cl.data() + static_cast<size_t>(i0) * g.lanes : nullptr;
  const float* xl = Zero ? g.xl.data() + static_cast<size_t>(i0) * g.lanes : nullptr;
  __m256 d8 = _mm256_setzero_ps(), z8 = _mm256_setzero_ps();
  for (int c = 0; c < units; ++c) {
    if (c % 8 == 0) {  // the scales (offsets) of the next 8 steps' groups
      const int base = c * 32 / gs;
      d8 = Scales8<F16>(w.scale, row + base, std::min(8, w.groups - base));
      if constexpr (Zero) z8 = Scales8<F16>(w.zero, row + base, std::min(8, w.groups - base));
    }
    const __m256i gidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(g.lane_group[c % 8]));
    const __m256 dv = _mm256_permutevar8x32_ps(d8, gidx);
    __m256i wv, aw;
    if constexpr (Bits == 4) {
      const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qj + 16 * c));
      wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), low4);  // nibbles n, u8
      aw = wv;
    } else {
      wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qj + 32 * c));
      aw = _mm256_sign_epi8(wv, wv);  // |w| as u8 (-128 -> 128)
    }
    for (int u = 0; u < 2 * T; ++u) {
      __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar + static_cast<size_t>(u) * g.kp + 32 * c));
      if constexpr (Bits == 8) av = _mm256_sign_epi8(av, wv);
      const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, av), ones);
      acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), dv, acc[u]);
    }
    if (corr)
      for (int u = 0; u < T; ++u)
        ext[u] = _mm256_fmadd_ps(dv, _mm256_loadu_ps(cl + static_cast<size_t>(u) * g.lanes + 8 * c), ext[u]);
    if constexpr (Zero) {
      const __m256 zv = _mm256_permutevar8x32_ps(z8, gidx);
      for (int u = 0; u < T; ++u)
        ext[u] = _mm256_fmadd_ps(zv, _mm256_loadu_ps(xl + static_cast<size_t>(u) * g.lanes + 8 * c), ext[u]);
    }
  }
  for (int u = 0; u < T; ++u) {
    const int i = i0 + u;
    const __m256 v = _mm256_fmadd_ps(acc[2 * u], _mm256_set1_ps(g.s[2 * i]),
                                     _mm256_fmadd_ps(acc[2 * u + 1], _mm256_set1_ps(g.s[2 * i + 1]), ext[u]));
    y[static_cast<size_t>(i) * n + j] = HsumPs256(v);
  }
}

// ---- AVX-512 VNNI: 64 values (two 32-value shares, of one or two groups) a step ----

#define NX_AVX512 "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"

// count (1..16) f32 or f16 scales at p[i] as f32 lanes (zero beyond count).
template <bool F16>
__attribute__((target(NX_AVX512))) inline __m512 Scales16(const void* p, size_t i, int count) {
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  if constexpr (F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
  return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
}

template <int Bits, int T, bool Zero, bool F16>
__attribute__((target(NX_AVX512))) void TileVnni(const GroupedActs& g, const GroupedWeight& w, int j, int i0, float* y,
                                                 int n) {
  const int k = w.k, gs = w.gs;
  const int steps = (k + 63) / 64;
  const bool corr = g.offset != 0;
  // Scales are loaded 16 at a time, for the groups of 8 steps (512 values; gs divides 512 or 512
  // divides gs), and each step's lanes pick theirs (g.lane_group).
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const uint8_t* qj = w.q + static_cast<size_t>(j) * w.row_bytes;
  const size_t row = static_cast<size_t>(j) * w.groups;
  __m512 acc[2 * T], ext[T];
  for (int u = 0; u < 2 * T; ++u) acc[u] = _mm512_setzero_ps();
  for (int u = 0; u < T; ++u) ext[u] = _mm512_setzero_ps();
  const int8_t* ar = g.a.data() + static_cast<size_t>(2 * i0) * g.kp;
  const float* cl = corr ? g.cl.data() + static_cast<size_t>(i0) * g.lanes : nullptr;
  const float* xl = Zero ? g.xl.data() + static_cast<size_t>(i0) * g.lanes : nullptr;
  __m512 d16 = _mm512_setzero_ps(), z16 = _mm512_setzero_ps();
  for (int c = 0; c < steps; ++c) {
    const bool full = 64 * c + 64 <= k;
    if (c % 8 == 0) {
      const int base = 64 * c / gs;
      d16 = Scales16<F16>(w.scale, row + base, std::min(16, w.groups - base));
      if constexpr (Zero) z16 = Scales16<F16>(w.zero, row + base, std::min(16, w.groups - base));
    }
    const __m512i gidx = _mm512_load_si512(g.lane_group[c % 8]);
    const __m512 dv = _mm512_permutexvar_ps(gidx, d16);  // (a half step's missing share: scale 0)
    __m512i wv;
    if constexpr (Bits == 4) {
      const __m256i p = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qj + 32 * c))
                             : _mm256_maskz_loadu_epi8(0xFFFFu, qj + 32 * c);
      wv = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(p), _mm256_srli_epi16(p, 4), 1), low4);
    } else {
      const __m512i p = full ? _mm512_loadu_si512(qj + 64 * c) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, qj + 64 * c);
      wv = _mm512_xor_si512(p, flip);  // w + 128 as u8 (the masked tail meets zero activations)
    }
    for (int u = 0; u < 2 * T; ++u) {
      const __m512i av = _mm512_loadu_si512(ar + static_cast<size_t>(u) * g.kp + 64 * c);
      const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, av);
      acc[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dv, acc[u]);
    }
    if (corr)
      for (int u = 0; u < T; ++u)
        ext[u] = _mm512_fmadd_ps(dv, _mm512_loadu_ps(cl + static_cast<size_t>(u) * g.lanes + 16 * c), ext[u]);
    if constexpr (Zero) {
      const __m512 zv = _mm512_permutexvar_ps(gidx, z16);
      for (int u = 0; u < T; ++u)
        ext[u] = _mm512_fmadd_ps(zv, _mm512_loadu_ps(xl + static_cast<size_t>(u) * g.lanes + 16 * c), ext[u]);
    }
  }
  for (int u = 0; u < T; ++u) {
    const int i = i0 + u;
    const __m512 v = _mm512_fmadd_ps(acc[2 * u], _mm512_set1_ps(g.s[2 * i]),
                                     _mm512_fmadd_ps(acc[2 * u + 1], _mm512_set1_ps(g.s[2 * i + 1]), ext[u]));
    y[static_cast<size_t>(i) * n + j] = _mm512_reduce_add_ps(v);
  }
}

// Every token row of weight row j, eight (AVX-512: 32 registers) or four (AVX2: 16) a pass; the
// weight row stays in L1 between passes. Eight rows take batch-8 s4 decode's lm head from 13.1 to
// 11.4 ms with AVX-512 (one thread, loaded machine), and spill with AVX2's registers.
#define NX_ROW(Tile, Wide)                                                                            \
  template <int Bits, bool Zero, bool F16>                                                            \
  void Row##Tile(const GroupedActs& g, const GroupedWeight& w, int j, float* y, int n) {              \
    int i0 = 0;                                                                                       \
    if constexpr (Wide)                                                                               \
      for (; i0 + 8 <= g.m; i0 += 8) Tile<Bits, 8, Zero, F16>(g, w, j, i0, y, n);                     \
    for (; i0 + 4 <= g.m; i0 += 4) Tile<Bits, 4, Zero, F16>(g, w, j, i0, y, n);                       \
    switch (g.m - i0) {                                                                               \
      case 3: Tile<Bits, 3, Zero, F16>(g, w, j, i0, y, n); break;                                     \
      case 2: Tile<Bits, 2, Zero, F16>(g, w, j, i0, y, n); break;                                     \
      case 1: Tile<Bits, 1, Zero, F16>(g, w, j, i0, y, n); break;                                     \
      default: break;                                                                                 \
    }                                                                                                 \
  }
NX_ROW(TileAvx2, false)
NX_ROW(TileVnni, true)
#undef NX_ROW

using RowFn = void (*)(const GroupedActs&, const GroupedWeight&, int, float*, int);

template <int Bits, bool Zero, bool F16>
RowFn Pick(int level) {
  return level >= kAvx512Vnni ? RowTileVnni<Bits, Zero, F16> : RowTileAvx2<Bits, Zero, F16>;
}

#endif  // NX_X86

// The row function for this weight at `level`.
using RowFnAll = void (*)(const GroupedActs&, const GroupedWeight&, int, float*, int);

RowFnAll PickRow(int level, const GroupedWeight& w) {
#ifdef NX_X86
  if (level >= kAvx2) {
    const bool z = w.zero != nullptr, h = w.scale_f16;
    // offsets come in the scales' precision (GGUF: both f16; nx: both f32)
    if (z && w.zero_f16 != h) return nullptr;
    if (w.bits == 4) return z ? (h ? Pick<4, true, true>(level) : Pick<4, true, false>(level))
                              : (h ? Pick<4, false, true>(level) : Pick<4, false, false>(level));
    return z ? (h ? Pick<8, true, true>(level) : Pick<8, true, false>(level))
             : (h ? Pick<8, false, true>(level) : Pick<8, false, false>(level));
  }
#endif
  return RowScalar;
}

ffi::Error GroupedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::AnyBuffer scale,
                             ffi::AnyBuffer zero, ffi::ResultBuffer<ffi::F32> y, int32_t bits, int32_t group_size,
                             int32_t level, int32_t threads) {
  const auto xd = x.dimensions();
  const auto qd = q.dimensions();
  const auto bad = [] {
    return ffi::Error::InvalidArgument(
        "nx_kernels_cpu grouped_matmul: x f32 [m, k]; q int8 [n, k] (bits 8) or uint8 [n, k / 2] (bits 4); "
        "scale and zero (or an empty array) f32 or f16 [n, k / group_size]; group_size a multiple of 32 "
        "that divides 512 or that 512 divides");
  };
  if (xd.size() != 2 || qd.size() != 2 || (bits != 4 && bits != 8) || group_size <= 0 || group_size % 32 ||
      (512 % group_size && group_size % 512))
    return bad();
  GroupedWeight w;
  w.bits = bits;
  w.gs = group_size;
  w.k = static_cast<int>(xd[1]);
  w.n = static_cast<int>(qd[0]);
  if (w.k % w.gs) return bad();
  w.groups = w.k / w.gs;
  const auto qtype = bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8;
  w.row_bytes = static_cast<size_t>(bits == 4 ? w.k / 2 : w.k);
  if (q.element_type() != qtype || static_cast<size_t>(qd[1]) != w.row_bytes) return bad();
  const auto is_float = [](ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::F16; };
  const size_t ng = static_cast<size_t>(w.n) * w.groups;
  if (!is_float(scale.element_type()) || scale.element_count() != ng) return bad();
  w.q = static_cast<const uint8_t*>(q.untyped_data());
  w.scale = scale.untyped_data();
  w.scale_f16 = scale.element_type() == ffi::DataType::F16;
  if (zero.element_count() != 0) {
    if (!is_float(zero.element_type()) || zero.element_count() != ng) return bad();
    w.zero = zero.untyped_data();
    w.zero_f16 = zero.element_type() == ffi::DataType::F16;
  }
  int lvl = ClampLevel(level);
  if (lvl >= kAvx2 && !HasFmaF16c()) lvl = kScalar;
  RowFnAll row = PickRow(lvl, w);
  if (row == nullptr) {  // scales and offsets of different precisions: the scalar level
    lvl = kScalar;
    row = RowScalar;
  }
  const int m = static_cast<int>(xd[0]), n = w.n;
  GroupedActs g;
  PrepareActs(x.typed_data(), m, w.k, w, lvl, g);
  float* yp = y->typed_data();
  ParallelRows(pool, n, Threads(pool, threads), static_cast<int64_t>(g.r) * w.k, [&](int j0, int j1) {
    for (int j = j0; j < j1; ++j) row(g, w, j, yp, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NxGroupedMatmul, GroupedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("group_size")
                                  .Attr<int32_t>("level")
                                  .Attr<int32_t>("threads"));
