// nx-kernels-cpu: grouped int8 / 4-bit linear layers for nx's s4 and grouped s8 paths (GGUF Q4_0,
// Q4_1, Q4_K, Q8_0), called from XLA:CPU through the typed FFI.
//
// Contract (the math of nx.ops.quant._grouped_matmul on its int8 path):
//   x f32 [m, k] is rounded to ONE int8 term per block of 32 inputs, a with scale sx[i, b]
//   (common.h, QuantizeBlocks: amax / 127, rounded half to even, as nx.ops.quant.block_terms);
//   the weight's values v [n, k] come in groups of `gs` consecutive inputs of a row (gs a multiple
//   of 32, so a group holds whole blocks), with scales d [n, k / gs] (f32 or f16) and for affine
//   weights offsets z [n, k / gs] (f32 or f16):
//     bits 8: q int8 [n, k], v = q;
//     bits 4: q uint8 [n, k / 2], two values a byte in llama.cpp's order within a group (byte j of a
//       group holds value j in its low nibble, value j + gs / 2 in its high one), v = nibble - 8
//       (symmetric) or v = nibble (affine);
//     with `panel` (gs 32, n a multiple of 16), the same bytes and scales in the panel layout nx
//     transposes them to once, at load: q [n / 16, k / 32, 64 * bits], byte 64 d + 4 r + t of
//     [P, b] being byte 4 d + t of block b of row 16 P + r; d and z [n / 16, k / 32, 16], [P, b, r]
//     being row 16 P + r's of block b;
//   y[i, j] = sum_g d[j, g] * sum_{b in g} sx[i, b] * dot(a_i, v_j)_b
//             + sum_g z[j, g] * sum(x[i, group g]),  f32 [m, n],
//   each block's dot exact in int32 (the same integers as the XLA path; symmetric 4-bit at the SIMD
//   levels in two exact parts, the unsigned nibbles' dot and 8 times the block's term sum, joined in
//   f32); the f32 sums over blocks and groups run in this kernel's order (not XLA's), so results
//   agree to f32 rounding.
// Why one term a block (llama.cpp's q8_0 activations) rather than the s8 kernel's two a row: half
// the dot work, and a block's own scale keeps ~8 bits of each block instead of ~15 of the row.
// Supported: bits 4 or 8; gs a multiple of 32 that divides 512 (32 ... 512) or that 512 divides
// (the SIMD levels load a row's scales 16 groups or 512 values at a time); any m: decode and
// prompts (cache-blocked: chunks of weight rows against tiles of token rows, see GroupedMatmulImpl).
//
// The weight is read once per call, packed, and its nibbles unpacked in registers.
// 4-bit weights with groups of 32 (s4's default, GGUF Q4_0 and Q4_1) run at the SIMD levels in
// panels of 16 (AVX-512 VNNI) or 8 (AVX2) weight rows, transposed in registers so that each int32
// lane holds one row's whole block dot (see PanelRows; llama.cpp gets the same lanes by repacking
// Q4_0 at load, this needs no other layout); in the panel layout they read the transposed bytes and
// scales directly (PackedTile: no transposes, one sequential stream), and so do int8 weights with
// groups of 32 (grouped s8, GGUF Q8_0). Other weights, per weight row:
//   2 AVX-512 VNNI: 64 values a step: 32 packed bytes (or 64 int8) as u8, vpdpbusd with each token
//     row's terms; every int32 lane sums 4 values of one block, and is converted and multiplied
//     into f32 accumulators by its block's scale times its group's scale. Symmetric 4-bit values
//     enter as the unsigned nibble n = v + 8, as llama.cpp does, and 8 * sx * sum(block's terms)
//     is taken off once per block and token row (in f32, weighted by the group scale); int8 ones as
//     |w| against the terms negated where w < 0 (exact, no offset). The activation terms are stored
//     in the order the unpacked bytes come out of a register (low nibbles of 32 bytes, then high
//     ones), so no shuffle is needed; the block scales in the order the lanes meet their blocks;
//   1 AVX2 (with FMA and F16C): 32 values a step: vpmaddubsw(n, a) for 4-bit (offset as above),
//     vpmaddubsw(|w|, sign(a, w)) for int8, then vpmaddwd with ones, scaled into f32 the same way;
//   0 scalar: signed values, int32 dot per block, f32 sums.

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
  bool panel = false;  // the panel layout (gs 32, n a multiple of 16; see the file comment)
};

// Where weight row j's packed byte p (of k / 2) and its scale (offset) of group gi are.
inline size_t ByteAt(const GroupedWeight& w, int j, int p) {
  if (!w.panel) return static_cast<size_t>(j) * w.row_bytes + p;
  const int bb = 4 * w.bits;  // a block's bytes in a row
  const size_t block = static_cast<size_t>(j / 16) * w.groups + p / bb;
  return 16 * bb * block + 64 * (p % bb / 4) + 4 * (j % 16) + p % 4;
}
inline size_t ScaleAt(const GroupedWeight& w, int j, int gi) {
  if (!w.panel) return static_cast<size_t>(j) * w.groups + gi;
  return 16 * (static_cast<size_t>(j / 16) * w.groups + gi) + j % 16;
}

// The activations, prepared once per call: one int8 term per block of 32 inputs (common.h,
// QuantizeBlocks), `a` [m, kp], at the SIMD levels in the order the weight's bytes come out of a
// register. The SIMD levels run windows of 8 steps (AVX-512: 512 unpacked values, 16 blocks;
// AVX2: 256, 8 blocks); per token row and window, in the order the window's lanes first meet
// their blocks (`lane_block`): `sx` the block scales, `cb` the unsigned offset's share of each
// block, -offset * sx * sum(a), and `xb` the block sums of x (affine weights), which the tiles
// weight by the blocks' group scales (`block_group`) and offsets. The scalar level keeps the
// natural order, the block scales in `sx` [m, nb] and dots `xsum` (per group) with the offsets.
struct GroupedActs {
  int m = 0, kp = 0, nb = 0, gp = 0;  // nb = k / 32; gp: groups rounded up to 8
  int bw = 0;                         // blocks a window (16, 8; the scalar level: 0)
  int wb = 0;                         // per token row: windows * bw (the scalar level: nb)
  int offset = 0;                     // 8 (symmetric 4-bit: unsigned nibbles) or 0
  int level = kScalar;                // the call's dispatch level (the rounding's instructions)
  std::vector<int8_t> a;
  std::vector<float> sx;    // [m, wb]
  std::vector<float> cb;    // [m, wb], empty when offset is 0
  std::vector<float> xb;    // [m, wb], SIMD levels with offsets
  std::vector<float> xsum;  // [m, gp], the scalar level (and panels) with offsets
  std::vector<int32_t> asum;  // [m, nb], panels of symmetric 4-bit or int8 rows: each block's term sum
  std::vector<int> blocks;  // [wb]: the block (or -1) of each window position
  // Step s (of 8) of a window: each lane's group, from the window's first (see the tiles), and
  // each lane's block position in the window; each window position's group.
  alignas(64) int32_t lane_group[8][16] = {};
  alignas(64) int32_t lane_block[8][16] = {};
  alignas(64) int32_t block_group[16] = {};
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

// Token rows [i0, i1) of g from x, once the sizes, the order and the buffers are set.
void PrepareRows(const float* x, int k, const GroupedWeight& w, const std::vector<int>& order, int i0, int i1,
                 GroupedActs& g) {
  if (g.bw == 0) {  // the scalar level and panels: natural order
    QuantizeBlocks(x, k, i0, i1, g.a.data(), g.sx.data(), g.level);
    if (w.zero)
      for (int i = i0; i < i1; ++i)
        for (int v = 0; v < k; ++v) g.xsum[static_cast<size_t>(i) * g.gp + v / w.gs] += x[static_cast<size_t>(i) * k + v];
    if (!g.asum.empty())
      for (int i = i0; i < i1; ++i)
        for (int b = 0; b < g.nb; ++b) {
          const int8_t* a = g.a.data() + static_cast<size_t>(i) * k + 32 * b;
          int32_t sum = 0;
          for (int t = 0; t < 32; ++t) sum += a[t];
          g.asum[static_cast<size_t>(i) * g.nb + b] = sum;
        }
    return;
  }
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> sx;
  q.resize(static_cast<size_t>(k));
  sx.resize(g.nb);
  for (int i = i0; i < i1; ++i) {
    const float* xi = x + static_cast<size_t>(i) * k;
    QuantizeBlocks(xi, k, 0, 1, q.data(), sx.data(), g.level);
    int8_t* a = g.a.data() + static_cast<size_t>(i) * g.kp;
    for (int b = 0; b < g.kp; ++b) a[b] = order[b] < 0 ? 0 : q[order[b]];
    const size_t r = static_cast<size_t>(i) * g.wb;
    for (int p = 0; p < g.wb; ++p) {
      const int b = g.blocks[p];
      if (b < 0) continue;
      g.sx[r + p] = sx[b];
      int sum = 0;
      float xs = 0.0f;
      for (int t = 32 * b; t < 32 * b + 32; ++t) {
        sum += q[t];
        xs += xi[t];
      }
      if (g.offset) g.cb[r + p] = -static_cast<float>(g.offset) * sx[b] * static_cast<float>(sum);
      if (w.zero) g.xb[r + p] = xs;
    }
  }
}

// `panel`: for the panel kernels (natural order, as the scalar level, with the blocks' term sums).
void PrepareActs(ffi::ThreadPool& pool, int threads, const float* x, int m, int k, const GroupedWeight& w, int level,
                 bool panel, GroupedActs& g) {
  const int gs = w.gs;
  g.m = m;
  g.level = level;
  g.nb = k / 32;
  g.gp = (w.groups + 7) / 8 * 8;
  const bool simd = level != kScalar && !panel;
  g.kp = simd ? (k + 63) / 64 * 64 : k;
  g.offset = simd && w.bits == 4 && !w.zero ? 8 : 0;
  const std::vector<int> order = simd ? ValueOrder(k, g.kp, gs, w.bits, level) : std::vector<int>();  // unused otherwise
  g.a.assign(static_cast<size_t>(m) * g.kp, 0);
  if (simd) {
    // AVX-512: step s's lane l holds values of share A (from value 64 s) or B (64 s + 32): 4-bit
    // lanes [A x4, B x4, A x4, B x4] (low nibbles of both shares, then high ones), int8 [A x8, B x8].
    // AVX2: step s's lanes hold the 32 values from 32 s.
    const int shift = __builtin_ctz(static_cast<unsigned>(gs));  // gs a power of two, or >= 512 (all 0)
    for (int s = 0; s < 8; ++s)
      for (int l = 0; l < 16; ++l) {
        const int v = level >= kAvx512Vnni ? 64 * s + 32 * (w.bits == 4 ? (l / 4) & 1 : l / 8) : 32 * s;
        g.lane_group[s][l] = gs > 512 ? 0 : v >> shift;
      }
    // Windows: the blocks their lanes meet, in order; every window has the same pattern (groups
    // divide 512 values or are whole multiples of it), so window 0's sets the lane tables.
    const int step = level >= kAvx512Vnni ? 64 : 32, lanes = step / 4, per = 8 * step;
    g.bw = per / 32;
    const int windows = (g.kp + per - 1) / per;
    g.wb = windows * g.bw;
    g.blocks.assign(g.wb, -1);
    for (int wi = 0; wi < windows; ++wi) {
      int used = 0;
      for (int s = 0; s < 8; ++s)
        for (int l = 0; l < lanes; ++l) {
          const int byte = wi * per + s * step + 4 * l;
          const int v = byte < g.kp ? order[byte] : -1;
          if (v < 0) continue;
          int pos = 0;
          while (pos < used && g.blocks[wi * g.bw + pos] != v / 32) ++pos;
          if (pos == used) g.blocks[wi * g.bw + used++] = v / 32;
          if (wi == 0) g.lane_block[s][l] = pos;
        }
    }
    for (int p = 0; p < g.bw; ++p) {
      const int b = g.blocks[p];  // window 0: groups from 0
      g.block_group[p] = b < 0 || gs > 512 ? 0 : 32 * b / gs;
    }
    g.sx.assign(static_cast<size_t>(m) * g.wb, 0.0f);
    if (g.offset) g.cb.assign(static_cast<size_t>(m) * g.wb, 0.0f);
    if (w.zero) g.xb.assign(static_cast<size_t>(m) * g.wb, 0.0f);
  } else {
    g.wb = g.nb;
    g.sx.assign(static_cast<size_t>(m) * g.nb, 1.0f);
    if (w.zero) g.xsum.assign(static_cast<size_t>(m) * g.gp, 0.0f);
    if (panel && (!w.zero || w.bits == 8)) g.asum.assign(static_cast<size_t>(m) * g.nb, 0);
  }
  // prompts: a few ms of rounding, over the threads too
  ParallelRows(pool, m, threads, 64 * static_cast<int64_t>(k),
               [&](int i0, int i1) { PrepareRows(x, k, w, order, i0, i1, g); });
}

// Element i of f32 or f16 values at src, as f32 (the scalar level).
inline float ValueAt(const void* src, bool f16, size_t i) {
  return f16 ? HalfToFloat(static_cast<const uint16_t*>(src)[i]) : static_cast<const float*>(src)[i];
}

// ---- scalar: signed values in natural order, an int32 dot per block ----

// y[i * n + j] for token rows i in [i0, i1).
void RowScalar(const GroupedActs& g, const GroupedWeight& w, int j, int i0, int i1, float* y, int n) {
  const int k = w.k, gs = w.gs, per = gs / 32;
  thread_local std::vector<int8_t> v;
  thread_local std::vector<float> d, z;
  v.resize(k);
  d.assign(g.gp, 0.0f);
  z.assign(g.gp, 0.0f);
  for (int gi = 0; gi < w.groups; ++gi) {
    d[gi] = ValueAt(w.scale, w.scale_f16, ScaleAt(w, j, gi));
    if (w.zero) z[gi] = ValueAt(w.zero, w.zero_f16, ScaleAt(w, j, gi));
  }
  if (w.bits == 8) {
    for (int p = 0; p < k; ++p) v[p] = static_cast<int8_t>(w.q[ByteAt(w, j, p)]);
  } else {
    const int off = w.zero ? 0 : 8;
    for (int p = 0; p < k / 2; ++p) {
      const uint8_t byte = w.q[ByteAt(w, j, p)];
      v[LowValue(p, gs)] = static_cast<int8_t>((byte & 0xF) - off);
      v[HighValue(p, gs)] = static_cast<int8_t>((byte >> 4) - off);
    }
  }
  for (int i = i0; i < i1; ++i) {
    const int8_t* a = g.a.data() + static_cast<size_t>(i) * g.kp;
    const float* sx = g.sx.data() + static_cast<size_t>(i) * g.wb;
    float out = 0.0f;
    for (int gi = 0; gi < w.groups; ++gi) {
      float acc = 0.0f;
      for (int b = gi * per; b < (gi + 1) * per; ++b) {
        int32_t dot = 0;
        for (int q = 32 * b; q < 32 * b + 32; ++q) dot += static_cast<int32_t>(a[q]) * v[q];
        acc += sx[b] * static_cast<float>(dot);
      }
      out += d[gi] * acc;
      if (w.zero) out += z[gi] * g.xsum[static_cast<size_t>(i) * g.gp + gi];
    }
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
  __m256 acc[T], ext[T];
  for (int u = 0; u < T; ++u) acc[u] = ext[u] = _mm256_setzero_ps();
  const int8_t* ar = g.a.data() + static_cast<size_t>(i0) * g.kp;
  const size_t r0 = static_cast<size_t>(i0) * g.wb;
  const __m256i bgrp = _mm256_load_si256(reinterpret_cast<const __m256i*>(g.block_group));
  __m256 d8 = _mm256_setzero_ps(), z8 = _mm256_setzero_ps();
  for (int c = 0; c < units; ++c) {
    if (c % 8 == 0) {  // a window: the scales (offsets) of its groups; the blocks' offset and affine shares
      const int base = c * 32 / gs;
      d8 = Scales8<F16>(w.scale, row + base, std::min(8, w.groups - base));
      if constexpr (Zero) z8 = Scales8<F16>(w.zero, row + base, std::min(8, w.groups - base));
      const size_t o = r0 + c;  // window c / 8 at 8 (c / 8)
      if (corr) {
        const __m256 db = _mm256_permutevar8x32_ps(d8, bgrp);
        for (int u = 0; u < T; ++u)
          ext[u] = _mm256_fmadd_ps(db, _mm256_loadu_ps(g.cb.data() + o + static_cast<size_t>(u) * g.wb), ext[u]);
      }
      if constexpr (Zero) {
        const __m256 zb = _mm256_permutevar8x32_ps(z8, bgrp);
        for (int u = 0; u < T; ++u)
          ext[u] = _mm256_fmadd_ps(zb, _mm256_loadu_ps(g.xb.data() + o + static_cast<size_t>(u) * g.wb), ext[u]);
      }
    }
    const __m256i gidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(g.lane_group[c % 8]));
    const __m256i bidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(g.lane_block[c % 8]));
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
    const float* sxw = g.sx.data() + r0 + (c & ~7);
    for (int u = 0; u < T; ++u) {
      __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar + static_cast<size_t>(u) * g.kp + 32 * c));
      if constexpr (Bits == 8) av = _mm256_sign_epi8(av, wv);
      const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, av), ones);
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sxw + static_cast<size_t>(u) * g.wb), bidx);
      acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(sv, dv), acc[u]);
    }
  }
  for (int u = 0; u < T; ++u) y[static_cast<size_t>(i0 + u) * n + j] = HsumPs256(_mm256_add_ps(acc[u], ext[u]));
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
  const uint8_t* qj = w.q + static_cast<size_t>(j) * w.row_bytes;
  const size_t row = static_cast<size_t>(j) * w.groups;
  __m512 acc[T], ext[T];
  for (int u = 0; u < T; ++u) acc[u] = ext[u] = _mm512_setzero_ps();
  const int8_t* ar = g.a.data() + static_cast<size_t>(i0) * g.kp;
  const size_t r0 = static_cast<size_t>(i0) * g.wb;
  const __m512i bgrp = _mm512_load_si512(g.block_group);
  __m512 d16 = _mm512_setzero_ps(), z16 = _mm512_setzero_ps();
  for (int c = 0; c < steps; ++c) {
    const bool full = 64 * c + 64 <= k;
    if (c % 8 == 0) {  // a window: the scales (offsets) of its groups; the blocks' offset and affine shares
      const int base = 64 * c / gs;
      d16 = Scales16<F16>(w.scale, row + base, std::min(16, w.groups - base));
      if constexpr (Zero) z16 = Scales16<F16>(w.zero, row + base, std::min(16, w.groups - base));
      const size_t o = r0 + 2 * c;  // window c / 8 at 16 (c / 8)
      if (corr) {
        const __m512 db = _mm512_permutexvar_ps(bgrp, d16);
        for (int u = 0; u < T; ++u)
          ext[u] = _mm512_fmadd_ps(db, _mm512_loadu_ps(g.cb.data() + o + static_cast<size_t>(u) * g.wb), ext[u]);
      }
      if constexpr (Zero) {
        const __m512 zb = _mm512_permutexvar_ps(bgrp, z16);
        for (int u = 0; u < T; ++u)
          ext[u] = _mm512_fmadd_ps(zb, _mm512_loadu_ps(g.xb.data() + o + static_cast<size_t>(u) * g.wb), ext[u]);
      }
    }
    const __m512i gidx = _mm512_load_si512(g.lane_group[c % 8]);
    const __m512i bidx = _mm512_load_si512(g.lane_block[c % 8]);
    const __m512 dv = _mm512_permutexvar_ps(gidx, d16);  // (a half step's missing share: scale 0)
    __m512i wv;
    __mmask64 neg = 0;  // int8: the negative weights, whose activations change sign
    if constexpr (Bits == 4) {
      const __m256i p = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qj + 32 * c))
                             : _mm256_maskz_loadu_epi8(0xFFFFu, qj + 32 * c);
      wv = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(p), _mm256_srli_epi16(p, 4), 1), low4);
    } else {
      const __m512i p = full ? _mm512_loadu_si512(qj + 64 * c) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, qj + 64 * c);
      neg = _mm512_movepi8_mask(p);
      wv = _mm512_abs_epi8(p);  // |w| as u8 (-128 -> 128)
    }
    const float* sxw = g.sx.data() + r0 + 2 * (c & ~7);
    for (int u = 0; u < T; ++u) {
      __m512i av = _mm512_loadu_si512(ar + static_cast<size_t>(u) * g.kp + 64 * c);
      if constexpr (Bits == 8) av = _mm512_mask_sub_epi8(av, neg, _mm512_setzero_si512(), av);  // sign(a, w)
      const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, av);
      const __m512 sv = _mm512_permutexvar_ps(bidx, _mm512_loadu_ps(sxw + static_cast<size_t>(u) * g.wb));
      acc[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sv, dv), acc[u]);
    }
  }
  for (int u = 0; u < T; ++u) y[static_cast<size_t>(i0 + u) * n + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[u], ext[u]));
}

// ---- 4-bit with groups of 32 at the SIMD levels: panels of P weight rows ----
//
// A panel is P consecutive weight rows (AVX-512: 16, AVX2: 8). For each block, its 16 packed bytes
// in the panel's rows are transposed in registers (4x4 dword transposes) to 4 vectors, vector d
// holding bytes 4d ... 4d + 3 of every row, so each int32 lane belongs to one row; their low
// nibbles (values 4d ... 4d + 3) and high ones (16 + 4d ...) meet broadcast activation terms in the
// natural order, and after the block's 8 dot steps each lane holds that row's whole block dot,
// exact in int32 (symmetric: the unsigned nibbles' dot started from -8 times the block's term sum,
// which is the signed values' dot). One convert and one fma with the P rows' scales (times the
// token row's block scale) then finish the block for all P rows.
// Why: the f32 work once per block and P rows rather than per 4 values and row (the row kernels'),
// one activation broadcast serves P rows, and the transposed weight serves the tile's T token rows.
// A panel past n reads zero rows (copied) and stores only its first n - j0 outputs.

// r[i] lane t -> r[t] lane i, for 8 rows (AVX2; Transpose16 in common.h for 16).
__attribute__((target(NX_AVX2))) inline void Transpose8(__m256* r) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    const __m256 a = r[i], b = r[4 + i];
    r[i] = _mm256_permute2f128_ps(a, b, 0x20);
    r[4 + i] = _mm256_permute2f128_ps(a, b, 0x31);
  }
}

inline int32_t Load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A panel as the tiles read it: its packed rows (stride rb), its scales and offsets transposed (see
// Scales), and the bytes to prefetch while the first tile runs: the next panel's rows, `pf_step`
// bytes a window of 4 blocks (null: none). Why: a panel reads P rows at once, P streams the
// hardware prefetchers do not follow from memory, while the rows of P consecutive panels are one
// sequential stream.
struct Panel {
  const uint8_t* q;
  size_t rb;
  const float* ds;
  const float* zs;
  const char* pf;
  size_t pf_step;

  inline void Prefetch(int window) const {
    if (pf == nullptr) return;
    for (size_t l = 0; l < pf_step; l += 64) _mm_prefetch(pf + window * pf_step + l, _MM_HINT_T1);
  }
};

// A panel in the panel layout (GroupedWeight::panel) as PackedTile reads it: block b's vector d at
// q + 64 bits b + 64 d (d < bits), its rows' scales (offsets) at element s0 + 16 b of ds (zs), f32 or f16. AVX2's
// half panels start 32 bytes and 8 scales in. Why: the weight is one sequential stream and needs
// no transposes (the bytes and scales were transposed once, at load).
struct Packed {
  const uint8_t* q;
  const void* ds;
  const void* zs;
  size_t s0;

  // Block b + kAhead / (64 Bits)'s bytes into L1, in tiles of several token rows and for 4-bit
  // weights. Why: a tile's work per block keeps the core's own loads and the hardware prefetchers
  // only a few blocks ahead of the stream, far below the memory's speed (BENCHMARKS.md, "Prefetch in
  // the grouped tiles and the attention kernel"); the scales' stream (1/8 of the bytes) needs none.
  static constexpr int kAhead = 8192;
  template <int Bits, int T>
  inline void Prefetch(int b) const {
    if constexpr (T > 1 || Bits == 4) {
      const char* qa = reinterpret_cast<const char*>(q) + 64 * Bits * static_cast<size_t>(b) + kAhead;
      for (int e = 0; e < Bits; ++e) _mm_prefetch(qa + 64 * e, _MM_HINT_T0);
    }
  }
};

// AVX-512 VNNI: panels of 16 rows, 8 token rows a tile (32 registers).
struct PanelVnni {
  static constexpr int kRows = 16, kWide = 8;

  // out[16 b + r]: the scale (or offset) of panel row r (rows past n: 0) for block b.
  template <bool F16>
  __attribute__((target(NX_AVX512))) static void Scales(const void* src, const GroupedWeight& w, int j0, float* out) {
    for (int b0 = 0; b0 < w.groups; b0 += 16) {
      const int count = std::min(16, w.groups - b0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < w.n ? Scales16<F16>(src, static_cast<size_t>(j0 + i) * w.groups + b0, count)
                            : _mm512_setzero_ps();
      Transpose16(r);
      for (int t = 0; t < count; ++t) _mm512_storeu_ps(out + 16 * (b0 + t), r[t]);
    }
  }

  // The transposed scales (offsets) of block b (Scales' out), or zeros where unused.
  template <bool Use = true>
  __attribute__((target(NX_AVX512))) static inline __m512 Lanes(const float* p, int b) {
    return Use ? _mm512_loadu_ps(p + 16 * b) : _mm512_setzero_ps();
  }

  // Block b of token rows [i0, i0 + T) into acc: s[d] lane r holds bytes 4d ... 4d + 3 of row r's block.
  template <int T, bool Zero>
  __attribute__((target(NX_AVX512))) static inline void Block(const GroupedActs& g, const __m512i* s, __m512 d16,
                                                              __m512 z16, int i0, int b, __m512* acc) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i u[8];  // low nibbles: values 4d ... 4d + 3; high ones: 16 + 4d ...
    for (int d = 0; d < 4; ++d) {
      u[d] = _mm512_and_si512(s[d], low4);
      u[4 + d] = _mm512_and_si512(_mm512_srli_epi16(s[d], 4), low4);
    }
    Dots<T, Zero, Zero ? 0 : 8>(g, u, d16, z16, i0, b, acc);
  }

  // As Block for an int8 block in the panel layout: s[e] lane r holds values 4e ... 4e + 3 of row r,
  // which enter as unsigned values with the sign bit flipped (v + 128).
  template <int T, bool Zero>
  __attribute__((target(NX_AVX512))) static inline void Block8(const GroupedActs& g, const __m512i* s, __m512 d16,
                                                               __m512 z16, int i0, int b, __m512* acc) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512i u[8];
    for (int e = 0; e < 8; ++e) u[e] = _mm512_xor_si512(s[e], flip);
    Dots<T, Zero, 128>(g, u, d16, z16, i0, b, acc);
  }

  // Block b of token rows [i0, i0 + T) into acc: u[e] lane r holds values 4e ... 4e + 3 of row r's
  // block as unsigned bytes, the signed values plus Off (8: symmetric 4-bit nibbles, 128: int8 with
  // its sign bit flipped, 0: affine 4-bit nibbles as they are), Off times the block's term sum taken
  // off in int32 (exact: |dot| <= 32 * 255 * 127). The token rows' dot chains are interleaved step by
  // step. Why: one row's 8 dependent vpdpbusd at a time left the core waiting on their latency.
  template <int T, bool Zero, int Off>
  __attribute__((target(NX_AVX512))) static inline void Dots(const GroupedActs& g, const __m512i* u, __m512 d16,
                                                             __m512 z16, int i0, int b, __m512* acc) {
    const int8_t* a = g.a.data() + static_cast<size_t>(i0) * g.kp + 32 * b;
    __m512i dot[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
      dot[t] = Off ? _mm512_set1_epi32(-Off * g.asum[static_cast<size_t>(i0 + t) * g.nb + b]) : _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int e = 0; e < 8; ++e)
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t)
        dot[t] = _mm512_dpbusd_epi32(dot[t], u[e], _mm512_set1_epi32(Load4(a + t * static_cast<size_t>(g.kp) + 4 * e)));
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const size_t i = static_cast<size_t>(i0 + t);
      const __m512 scale = _mm512_mul_ps(d16, _mm512_set1_ps(g.sx[i * g.wb + b]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t]), scale, acc[t]);
      if constexpr (Zero) acc[t] = _mm512_fmadd_ps(z16, _mm512_set1_ps(g.xsum[i * g.gp + b]), acc[t]);
    }
  }

  // y[i * n + j0 + r] for token rows i in [i0, i0 + T), from panel pn at weight row j0. Four
  // blocks (a 64-byte line of each row) at a time, one 16x16 dword transpose: whole lines, as rows
  // 4 KB apart share an L1 set; the last blocks one at a time.
  template <int T, bool Zero>
  __attribute__((target(NX_AVX512))) static void Tile(const GroupedActs& g, const Panel& pn, int i0, float* y, int n,
                                                      int j0) {
    const uint8_t* q = pn.q;
    const size_t rb = pn.rb;
    const float *ds = pn.ds, *zs = pn.zs;
    __m512 acc[T];
    for (int u = 0; u < T; ++u) acc[u] = _mm512_setzero_ps();
    int b = 0;
    for (; b + 4 <= g.nb; b += 4) {
      pn.Prefetch(b / 4);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(q + i * rb + 16 * b));
      Transpose16(r);  // r[4c + d]: bytes 4d ... 4d + 3 of block b + c, of every row
      for (int c = 0; c < 4; ++c) {
        const __m512i s[4] = {_mm512_castps_si512(r[4 * c]), _mm512_castps_si512(r[4 * c + 1]),
                              _mm512_castps_si512(r[4 * c + 2]), _mm512_castps_si512(r[4 * c + 3])};
        Block<T, Zero>(g, s, Lanes(ds, b + c), Lanes<Zero>(zs, b + c), i0, b + c, acc);
      }
    }
    for (; b < g.nb; ++b) {
      const uint8_t* qb = q + 16 * static_cast<size_t>(b);
      __m512i z[4];  // z[a]'s 128-bit lane i: row 4 i + a
      for (int a = 0; a < 4; ++a) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + a * rb)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + (4 + a) * rb)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + (8 + a) * rb)), 2);
        z[a] = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + (12 + a) * rb)), 3);
      }
      const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
      const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
      const __m512i s[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                            _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};  // lane r: row r
      Block<T, Zero>(g, s, Lanes(ds, b), Lanes<Zero>(zs, b), i0, b, acc);
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min(16, n - j0)) - 1);
    for (int u = 0; u < T; ++u) _mm512_mask_storeu_ps(y + static_cast<size_t>(i0 + u) * n + j0, mask, acc[u]);
  }

  // As Tile, for a panel already in the panel layout (Packed): no transposes.
  template <int Bits, int T, bool Zero, bool F16>
  __attribute__((target(NX_AVX512))) static void PackedTile(const GroupedActs& g, const Packed& pk, int i0, float* y,
                                                            int n, int j0) {
    __m512 acc[T];
    for (int u = 0; u < T; ++u) acc[u] = _mm512_setzero_ps();
    for (int b = 0; b < g.nb; ++b) {
      const uint8_t* qb = pk.q + 64 * Bits * static_cast<size_t>(b);
      pk.Prefetch<Bits, T>(b);
      __m512i s[Bits];
      for (int e = 0; e < Bits; ++e) s[e] = _mm512_loadu_si512(qb + 64 * e);
      const size_t at = pk.s0 + 16 * static_cast<size_t>(b);
      const __m512 d16 = Scales16<F16>(pk.ds, at, 16);
      const __m512 z16 = Zero ? Scales16<F16>(pk.zs, at, 16) : _mm512_setzero_ps();
      if constexpr (Bits == 4)
        Block<T, Zero>(g, s, d16, z16, i0, b, acc);
      else
        Block8<T, Zero>(g, s, d16, z16, i0, b, acc);
    }
    for (int u = 0; u < T; ++u) _mm512_storeu_ps(y + static_cast<size_t>(i0 + u) * n + j0, acc[u]);
  }
};

// AVX2: panels of 8 rows, vpmaddubsw (int16 sums of 2 products, |.| <= 2 * 15 * 127; the block's 8
// added stay below 2^15) and one vpmaddwd with ones a block; 4 token rows a tile (16 registers).
struct PanelAvx2 {
  static constexpr int kRows = 8, kWide = 4;

  template <bool F16>
  __attribute__((target(NX_AVX2))) static void Scales(const void* src, const GroupedWeight& w, int j0, float* out) {
    for (int b0 = 0; b0 < w.groups; b0 += 8) {
      const int count = std::min(8, w.groups - b0);
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = j0 + i < w.n ? Scales8<F16>(src, static_cast<size_t>(j0 + i) * w.groups + b0, count)
                            : _mm256_setzero_ps();
      Transpose8(r);
      for (int t = 0; t < count; ++t) _mm256_storeu_ps(out + 8 * (b0 + t), r[t]);
    }
  }

  template <bool Use = true>
  __attribute__((target(NX_AVX2))) static inline __m256 Lanes(const float* p, int b) {
    return Use ? _mm256_loadu_ps(p + 8 * b) : _mm256_setzero_ps();
  }

  template <int T, bool Zero>
  __attribute__((target(NX_AVX2))) static inline void Block(const GroupedActs& g, const __m256i* s, __m256 d8,
                                                            __m256 z8, int i0, int b, __m256* acc) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i lo[4], hi[4];
    for (int d = 0; d < 4; ++d) {
      lo[d] = _mm256_and_si256(s[d], low4);
      hi[d] = _mm256_and_si256(_mm256_srli_epi16(s[d], 4), low4);
    }
    for (int u = 0; u < T; ++u) {
      const size_t i = static_cast<size_t>(i0 + u);
      const int8_t* a = g.a.data() + i * g.kp + 32 * b;
      __m256i p = _mm256_setzero_si256();
      for (int d = 0; d < 4; ++d) {
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[d], _mm256_set1_epi32(Load4(a + 4 * d))));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[d], _mm256_set1_epi32(Load4(a + 16 + 4 * d))));
      }
      __m256i dot = _mm256_madd_epi16(p, ones);
      if constexpr (!Zero) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(8 * g.asum[i * g.nb + b]));
      const __m256 scale = _mm256_mul_ps(d8, _mm256_set1_ps(g.sx[i * g.wb + b]));
      acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[u]);
      if constexpr (Zero)
        acc[u] = _mm256_fmadd_ps(z8, _mm256_set1_ps(g.xsum[i * g.gp + b]), acc[u]);
    }
  }

  // As Block for an int8 block in the panel layout (s[e] lane r: values 4e ... 4e + 3 of row r):
  // vpmaddubsw(|w|, sign(a, w)), whose pairs (<= 2 * 128 * 127) fit int16, widened by vpmaddwd
  // each step (unsigned w + 128 would overflow int16 pairs).
  template <int T, bool Zero>
  __attribute__((target(NX_AVX2))) static inline void Block8(const GroupedActs& g, const __m256i* s, __m256 d8,
                                                             __m256 z8, int i0, int b, __m256* acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i aw[8];
    for (int e = 0; e < 8; ++e) aw[e] = _mm256_sign_epi8(s[e], s[e]);  // |w| as u8 (-128 -> 128)
    for (int t = 0; t < T; ++t) {
      const size_t i = static_cast<size_t>(i0 + t);
      const int8_t* a = g.a.data() + i * g.kp + 32 * b;
      __m256i dot = _mm256_setzero_si256();
      for (int e = 0; e < 8; ++e) {
        const __m256i av = _mm256_sign_epi8(_mm256_set1_epi32(Load4(a + 4 * e)), s[e]);
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(aw[e], av), ones));
      }
      const __m256 scale = _mm256_mul_ps(d8, _mm256_set1_ps(g.sx[i * g.wb + b]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[t]);
      if constexpr (Zero) acc[t] = _mm256_fmadd_ps(z8, _mm256_set1_ps(g.xsum[i * g.gp + b]), acc[t]);
    }
  }

  // As PanelVnni::Tile: four blocks (a line of each row) at a time, two 8x8 dword transposes.
  template <int T, bool Zero>
  __attribute__((target(NX_AVX2))) static void Tile(const GroupedActs& g, const Panel& pn, int i0, float* y, int n,
                                                    int j0) {
    const uint8_t* q = pn.q;
    const size_t rb = pn.rb;
    const float *ds = pn.ds, *zs = pn.zs;
    __m256 acc[T];
    for (int u = 0; u < T; ++u) acc[u] = _mm256_setzero_ps();
    int b = 0;
    for (; b + 4 <= g.nb; b += 4) {
      pn.Prefetch(b / 4);
      for (int half = 0; half < 2; ++half) {  // blocks b + 2 half, b + 2 half + 1
        __m256 r[8];
        for (int i = 0; i < 8; ++i)
          r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(q + i * rb + 16 * b + 32 * half));
        Transpose8(r);  // r[4c + d]: bytes 4d ... 4d + 3 of block b + 2 half + c, of every row
        for (int c = 0; c < 2; ++c) {
          const __m256i s[4] = {_mm256_castps_si256(r[4 * c]), _mm256_castps_si256(r[4 * c + 1]),
                                _mm256_castps_si256(r[4 * c + 2]), _mm256_castps_si256(r[4 * c + 3])};
          Block<T, Zero>(g, s, Lanes(ds, b + 2 * half + c), Lanes<Zero>(zs, b + 2 * half + c), i0, b + 2 * half + c, acc);
        }
      }
    }
    for (; b < g.nb; ++b) {
      const uint8_t* qb = q + 16 * static_cast<size_t>(b);
      __m256i z[4];  // z[a]'s 128-bit lane i: row 4 i + a
      for (int a = 0; a < 4; ++a)
        z[a] = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + a * rb))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + (4 + a) * rb)), 1);
      const __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
      const __m256i s[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                            _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};  // lane r: row r
      Block<T, Zero>(g, s, Lanes(ds, b), Lanes<Zero>(zs, b), i0, b, acc);
    }
    const __m256i mask =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(std::min(8, n - j0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int u = 0; u < T; ++u) _mm256_maskstore_ps(y + static_cast<size_t>(i0 + u) * n + j0, mask, acc[u]);
  }

  // As Tile, for half a panel in the panel layout (Packed, its q and s0 at the half): no transposes.
  template <int Bits, int T, bool Zero, bool F16>
  __attribute__((target(NX_AVX2))) static void PackedTile(const GroupedActs& g, const Packed& pk, int i0, float* y,
                                                          int n, int j0) {
    __m256 acc[T];
    for (int u = 0; u < T; ++u) acc[u] = _mm256_setzero_ps();
    for (int b = 0; b < g.nb; ++b) {
      const uint8_t* qb = pk.q + 64 * Bits * static_cast<size_t>(b);
      pk.Prefetch<Bits, T>(b);
      __m256i s[Bits];
      for (int e = 0; e < Bits; ++e) s[e] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 64 * e));
      const size_t at = pk.s0 + 16 * static_cast<size_t>(b);
      const __m256 d8 = Scales8<F16>(pk.ds, at, 8);
      const __m256 z8 = Zero ? Scales8<F16>(pk.zs, at, 8) : _mm256_setzero_ps();
      if constexpr (Bits == 4)
        Block<T, Zero>(g, s, d8, z8, i0, b, acc);
      else
        Block8<T, Zero>(g, s, d8, z8, i0, b, acc);
    }
    for (int u = 0; u < T; ++u) _mm256_storeu_ps(y + static_cast<size_t>(i0 + u) * n + j0, acc[u]);
  }
};

// tile(std::integral_constant<int, T>, i) for tiles of T = Wide (if 8), 4, 3, 2, 1 token rows from
// i = i0 until i1.
template <int Wide, class F>
inline void EachTile(int i0, int i1, F&& tile) {
  if constexpr (Wide >= 8)
    for (; i0 + 8 <= i1; i0 += 8) tile(std::integral_constant<int, 8>{}, i0);
  for (; i0 + 4 <= i1; i0 += 4) tile(std::integral_constant<int, 4>{}, i0);
  switch (i1 - i0) {
    case 3: tile(std::integral_constant<int, 3>{}, i0); break;
    case 2: tile(std::integral_constant<int, 2>{}, i0); break;
    case 1: tile(std::integral_constant<int, 1>{}, i0); break;
    default: break;
  }
}

// Token rows [i0, i1) of the panel from weight row j0: its scales (offsets) transposed once, then
// tiles of kWide, 4, 3, 2, 1 token rows; the panel's weight bytes stay in L1/L2 between tiles. The
// next panel's scales, and (during the first tile) its rows, are prefetched in memory order.
template <class L, bool Zero, bool F16>
void PanelRows(const GroupedActs& g, const GroupedWeight& w, int j0, int i0, int i1, float* y, int n) {
  constexpr int P = L::kRows;
  thread_local std::vector<float> ds, zs;
  thread_local std::vector<uint8_t> tail;
  if (j0 + P < n) {  // the next panel's scales (and offsets), for its Scales
    const size_t sb = w.scale_f16 ? 2 : 4, at = static_cast<size_t>(j0 + P) * w.groups * sb;
    const size_t len = static_cast<size_t>(P) * w.groups * sb;
    for (size_t l = 0; l < len; l += 64) {
      _mm_prefetch(static_cast<const char*>(w.scale) + at + l, _MM_HINT_T1);
      if constexpr (Zero) _mm_prefetch(static_cast<const char*>(w.zero) + at + l, _MM_HINT_T1);
    }
  }
  ds.resize(static_cast<size_t>(P) * w.groups);
  L::template Scales<F16>(w.scale, w, j0, ds.data());
  if constexpr (Zero) {
    zs.resize(ds.size());
    L::template Scales<F16>(w.zero, w, j0, zs.data());
  }
  const uint8_t* q = w.q + static_cast<size_t>(j0) * w.row_bytes;
  if (j0 + P > n) {  // the last panel: its rows, then zeros
    tail.assign(P * w.row_bytes, 0);
    std::memcpy(tail.data(), q, (n - j0) * w.row_bytes);
    q = tail.data();
  }
  Panel pn{q, w.row_bytes, ds.data(), zs.data(), nullptr, 0};
  const size_t bytes = P * w.row_bytes;  // the next panel's rows, over this one's windows
  const int windows = g.nb / 4;
  if (j0 + P < n && windows > 0) {
    pn.pf = reinterpret_cast<const char*>(w.q) + static_cast<size_t>(j0 + P) * w.row_bytes;
    pn.pf_step = (bytes / windows + 127) / 64 * 64;
  }
  EachTile<L::kWide>(i0, i1, [&](auto t, int i) {  // the first tile prefetches
    L::template Tile<decltype(t)::value, Zero>(g, pn, i, y, n, j0);
    pn.pf = nullptr;
  });
}

// As PanelRows for a weight in the panel layout (j0 a multiple of 16): its 16 rows (AVX2: two
// halves of 8), tiles read straight from the layout.
template <class L, int Bits, bool Zero, bool F16>
void PackedRows(const GroupedActs& g, const GroupedWeight& w, int j0, int i0, int i1, float* y, int n) {
  const size_t panel = static_cast<size_t>(j0 / 16) * w.groups;  // the panel's first block
  for (int h = 0; h < 16 / L::kRows; ++h) {
    const Packed pk{w.q + 64 * Bits * panel + 32 * h, w.scale, w.zero, 16 * panel + 8 * h};
    EachTile<L::kWide>(i0, i1, [&](auto t, int i) {
      L::template PackedTile<Bits, decltype(t)::value, Zero, F16>(g, pk, i, y, n, j0 + L::kRows * h);
    });
  }
}

// Token rows [i0, i1) of weight row j, eight (AVX-512: 32 registers) or four (AVX2: 16) a pass; the
// weight row stays in L1 between passes.
#define NX_ROW(Tile, Wide)                                                                            \
  template <int Bits, bool Zero, bool F16>                                                            \
  void Row##Tile(const GroupedActs& g, const GroupedWeight& w, int j, int i0, int i1, float* y, int n) { \
    if constexpr (Wide)                                                                               \
      for (; i0 + 8 <= i1; i0 += 8) Tile<Bits, 8, Zero, F16>(g, w, j, i0, y, n);                      \
    for (; i0 + 4 <= i1; i0 += 4) Tile<Bits, 4, Zero, F16>(g, w, j, i0, y, n);                        \
    switch (i1 - i0) {                                                                                \
      case 3: Tile<Bits, 3, Zero, F16>(g, w, j, i0, y, n); break;                                     \
      case 2: Tile<Bits, 2, Zero, F16>(g, w, j, i0, y, n); break;                                     \
      case 1: Tile<Bits, 1, Zero, F16>(g, w, j, i0, y, n); break;                                     \
      default: break;                                                                                 \
    }                                                                                                 \
  }
NX_ROW(TileAvx2, false)
NX_ROW(TileVnni, true)
#undef NX_ROW

using RowFn = void (*)(const GroupedActs&, const GroupedWeight&, int, int, int, float*, int);

template <int Bits, bool Zero, bool F16>
RowFn Pick(int level) {
  return level >= kAvx512Vnni ? RowTileVnni<Bits, Zero, F16> : RowTileAvx2<Bits, Zero, F16>;
}

#endif  // NX_X86

// The row function for this weight at `level`.
using RowFnAll = void (*)(const GroupedActs&, const GroupedWeight&, int, int, int, float*, int);

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

#ifdef NX_X86
template <class L>
RowFnAll PickPanelAt(const GroupedWeight& w) {
  const bool z = w.zero != nullptr, h = w.scale_f16;
  if (w.panel && w.bits == 8)
    return z ? (h ? PackedRows<L, 8, true, true> : PackedRows<L, 8, true, false>)
             : (h ? PackedRows<L, 8, false, true> : PackedRows<L, 8, false, false>);
  if (w.panel)
    return z ? (h ? PackedRows<L, 4, true, true> : PackedRows<L, 4, true, false>)
             : (h ? PackedRows<L, 4, false, true> : PackedRows<L, 4, false, false>);
  return z ? (h ? PanelRows<L, true, true> : PanelRows<L, true, false>)
           : (h ? PanelRows<L, false, true> : PanelRows<L, false, false>);
}
#endif

// The panel function for this weight at `level` (4-bit with groups of 32 at the SIMD levels, scales
// and offsets of one precision) and its rows a panel; else null (the row functions).
RowFnAll PickPanel(int level, const GroupedWeight& w, int* rows) {
#ifdef NX_X86
  if (level >= kAvx2 && (w.bits == 4 || w.panel) && w.gs == 32 && (!w.zero || w.zero_f16 == w.scale_f16)) {
    *rows = w.panel ? 16 : level >= kAvx512Vnni ? PanelVnni::kRows : PanelAvx2::kRows;
    return level >= kAvx512Vnni ? PickPanelAt<PanelVnni>(w) : PickPanelAt<PanelAvx2>(w);
  }
#endif
  *rows = 1;
  return nullptr;
}

// Cache blocking for prompts: a thread's weight rows in chunks of about kChunkBytes, each run
// against every token row, kTileBytes of prepared activations (terms, scales, offsets) at a time,
// so the packed weight streams from memory once per call and each chunk is reused from L2.
constexpr int64_t kChunkBytes = 64 << 10;
constexpr int64_t kTileBytes = 128 << 10;

ffi::Error GroupedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::AnyBuffer scale,
                             ffi::AnyBuffer zero, ffi::ResultBuffer<ffi::F32> y, int32_t bits, int32_t group_size,
                             int32_t level, int32_t threads, int32_t panel) {
  const auto xd = x.dimensions();
  const auto qd = q.dimensions();
  const auto bad = [] {
    return ffi::Error::InvalidArgument(
        "nx_kernels_cpu grouped_matmul: x f32 [m, k]; q int8 [n, k] (bits 8) or uint8 [n, k / 2] (bits 4), "
        "or with panel [n / 16, k / 32, 64 * bits] (group_size 32); scale and zero (or an empty "
        "array) f32 or f16 with n * k / group_size values; group_size a multiple of 32 that divides 512 or "
        "that 512 divides");
  };
  if (xd.size() != 2 || qd.size() != (panel ? 3u : 2u) || (bits != 4 && bits != 8) || group_size <= 0 ||
      group_size % 32 || (512 % group_size && group_size % 512) || (panel && group_size != 32))
    return bad();
  GroupedWeight w;
  w.bits = bits;
  w.gs = group_size;
  w.k = static_cast<int>(xd[1]);
  w.panel = panel != 0;
  w.n = static_cast<int>(qd[0]) * (w.panel ? 16 : 1);
  if (w.k % w.gs) return bad();
  w.groups = w.k / w.gs;
  const auto qtype = bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8;
  w.row_bytes = static_cast<size_t>(bits == 4 ? w.k / 2 : w.k);
  if (q.element_type() != qtype) return bad();
  if (w.panel ? qd[1] != w.groups || qd[2] != 64 * bits : static_cast<size_t>(qd[1]) != w.row_bytes) return bad();
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
  int unit = 1;  // weight rows a call of `row` covers from its first (a panel's, or one)
  if (RowFnAll panels = PickPanel(lvl, w, &unit)) {
    row = panels;
  } else if (row == nullptr || w.panel) {  // mixed scale and offset precisions; the panel layout: scalar
    lvl = kScalar;
    row = RowScalar;
  }
  const int m = static_cast<int>(xd[0]), n = w.n, nthreads = Threads(pool, threads);
  GroupedActs g;
  PrepareActs(pool, nthreads, x.typed_data(), m, w.k, w, lvl, unit > 1, g);
  float* yp = y->typed_data();
  const int64_t act_bytes = g.kp + 12 * static_cast<int64_t>(g.wb);  // a row's terms and its per-block f32 data
  const int64_t unit_bytes = static_cast<int64_t>(unit) * static_cast<int64_t>(w.row_bytes);
  const int chunk = static_cast<int>(std::max<int64_t>(unit > 1 ? 1 : 4, kChunkBytes / unit_bytes));  // in units
  const int tile = static_cast<int>(std::max<int64_t>(8, kTileBytes / act_bytes / 8 * 8));
  const int units = (n + unit - 1) / unit;
  ParallelRows(pool, units, nthreads, static_cast<int64_t>(unit) * m * w.k, [&](int u0, int u1) {
    for (int c0 = u0; c0 < u1; c0 += chunk) {
      const int c1 = std::min(u1, c0 + chunk);
      for (int i0 = 0; i0 < m; i0 += tile)
        for (int u = c0; u < c1; ++u) row(g, w, u * unit, i0, std::min(m, i0 + tile), yp, n);
    }
  }, 4, 16, m == 1);
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
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("panel"));
