// nx-kernels-cpu: what the kernels share: ISA detection, the int8 activation terms of a row (two
// per row, the s8 kernel) or of a block of 32 inputs (one per block, the grouped kernel), output
// rows split over XLA's intra-op thread pool.
//
// Threads: output rows are cut into chunks claimed from an atomic counter by the calling thread and
// by tasks scheduled on XLA's intra-op thread pool; the caller waits only for chunks another thread
// has claimed, so a pool that is busy (or absent) never blocks it.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NX_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace nxk {


// Levels, in one order (each implies the ones below; ClampLevel lowers a request to the CPU's):
// 0 scalar; 1 AVX2; 2 AVX-512 F/BW/VL/VNNI; 3 the same + AVX512_BF16 (the int8 kernels run it as
// 2, the bf16 kernel runs 2 on AVX-512F without vdpbf16ps).
constexpr int kScalar = 0;
constexpr int kAvx2 = 1;
constexpr int kAvx512Vnni = 2;
constexpr int kAvx512Bf16 = 3;

inline int DetectIsa() {
#ifdef NX_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512Vnni;
  if (__builtin_cpu_supports("avx2")) return kAvx2;
#endif
  return kScalar;
}

// Activation terms: rows [r, kp] of int8 (kp = k rounded up to 64, zero padded), their sums.
struct Terms {
  int r = 0, k = 0, kp = 0;
  std::vector<int8_t> a;
  std::vector<int32_t> sum;
  std::vector<float> scale;
};

// The symmetric per-row int8 rounding of nx.ops.quant.int8_terms, in the f32 operations XLA:CPU runs.
inline void RoundRow(const float* v, int k, int8_t* out, float* scale_out) {
  float amax = 0.0f;
  for (int i = 0; i < k; ++i) amax = std::max(amax, std::fabs(v[i]));
  // XLA:CPU rewrites both divisions as products with reciprocals; so does this, to round alike.
  float s = amax * (1.0f / 127.0f);
  if (!(s > 0.0f)) s = 1.0f;
  const float inv = 1.0f / s;
  for (int i = 0; i < k; ++i) out[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
  *scale_out = s;
}

inline bool HasFma() {
#ifdef NX_X86
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2"));
  return has;
#else
  return false;
#endif
}

// x - hi * s as XLA:CPU computes it: one fused multiply-add where the CPU has FMA (XLA's LLVM
// contracts the pair there), a product then a difference elsewhere.
#ifdef NX_X86
inline __attribute__((target("avx2,fma"))) void RemainderFma(const float* x, const int8_t* hi, float s, int k, float* rem) {
  for (int j = 0; j < k; ++j) rem[j] = std::fma(-static_cast<float>(hi[j]), s, x[j]);
}
#endif

inline void Remainder(const float* x, const int8_t* hi, float s, int k, float* rem) {
#ifdef NX_X86
  if (HasFma()) return RemainderFma(x, hi, s, k, rem);
#endif
  for (int j = 0; j < k; ++j) {
    const float prod = static_cast<float>(hi[j]) * s;  // no contraction: -ffp-contract=off
    rem[j] = x[j] - prod;
  }
}

// Round: RoundRow or a vector version of it that rounds alike (the s8 kernel's AVX-512 one).
template <void (*Round)(const float*, int, int8_t*, float*) = RoundRow>
inline void QuantizeRows(const float* x, int m, int k, Terms& t) {
  t.r = 2 * m;
  t.k = k;
  t.kp = (k + 63) / 64 * 64;
  t.a.assign(static_cast<size_t>(t.r) * t.kp, 0);
  t.sum.assign(t.r, 0);
  t.scale.assign(t.r, 1.0f);
  std::vector<float> rem(k);
  for (int i = 0; i < m; ++i) {
    const float* xi = x + static_cast<size_t>(i) * k;
    int8_t* hi = t.a.data() + static_cast<size_t>(i) * t.kp;
    int8_t* lo = t.a.data() + static_cast<size_t>(m + i) * t.kp;
    Round(xi, k, hi, &t.scale[i]);
    const float s_hi = t.scale[i];
    Remainder(xi, hi, s_hi, k, rem.data());
    Round(rem.data(), k, lo, &t.scale[m + i]);
  }
}

#ifdef NX_X86
// RoundRow in vectors: max|v| (NaN ignored alike: max returns its second operand when one is NaN),
// then round(v * inv) half to even (the MXCSR default, as nearbyint), so the same terms and scale
// in a fraction of the scalar loop's time (whose nearbyint is a libm call at the baseline ISA).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void RoundRowAvx512(const float* v, int k, int8_t* out,
                                                                                  float* scale_out) {
  __m512 mx = _mm512_setzero_ps();
  for (int i = 0; i < k; i += 16) {
    const __mmask16 mask = i + 16 <= k ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    mx = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(mask, v + i)), mx);
  }
  float s = _mm512_reduce_max_ps(mx) * (1.0f / 127.0f);
  if (!(s > 0.0f)) s = 1.0f;
  const __m512 inv = _mm512_set1_ps(1.0f / s);
  for (int i = 0; i < k; i += 16) {
    const __mmask16 mask = i + 16 <= k ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, v + i), inv),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_mask_cvtepi32_storeu_epi8(out + i, mask, q);
  }
  *scale_out = s;
}

// The same at AVX2, for k a multiple of 8.
__attribute__((target("avx2,fma"))) inline void RoundRowAvx2(const float* v, int k, int8_t* out, float* scale_out) {
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < k; i += 8) mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + i), abs), mx);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float s = _mm_cvtss_f32(m4) * (1.0f / 127.0f);
  if (!(s > 0.0f)) s = 1.0f;
  const __m256 inv = _mm256_set1_ps(1.0f / s);
  alignas(32) int32_t q[8];
  for (int i = 0; i < k; i += 8) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i), inv)));
    for (int t = 0; t < 8; ++t) out[i + t] = static_cast<int8_t>(q[t]);
  }
  *scale_out = s;
}
#endif

// One int8 term per block of 32 inputs (llama.cpp's q8_0 activations): x[i, 32 b + t] ~=
// a[i, 32 b + t] * scale[i, b], rounded as nx.ops.quant.block_terms (RoundRow on each block) for
// rows [i0, i1) of x [m, k] (k a multiple of 32); a [m, k], scale [m, k / 32]. `level` (a clamped
// dispatch level) picks the instructions; every level rounds alike.
inline void QuantizeBlocks(const float* x, int k, int i0, int i1, int8_t* a, float* scale, int level) {
  using Round = void (*)(const float*, int, int8_t*, float*);
  Round round = RoundRow;
#ifdef NX_X86
  if (level >= kAvx512Vnni) round = RoundRowAvx512;
  else if (level >= kAvx2 && HasFma()) round = RoundRowAvx2;
#endif
  const int nb = k / 32;
  for (int i = i0; i < i1; ++i)
    for (int b = 0; b < nb; ++b) {
      const size_t o = static_cast<size_t>(i) * k + 32 * b;
      round(x + o, 32, a + o, scale + static_cast<size_t>(i) * nb + b);
    }
}

inline void SumRows(Terms& t) {
  for (int r = 0; r < t.r; ++r) {
    int32_t s = 0;
    const int8_t* a = t.a.data() + static_cast<size_t>(r) * t.kp;
    for (int i = 0; i < t.k; ++i) s += a[i];
    t.sum[r] = s;
  }
}

// Output rows [0, n) in chunks, run by the caller and by up to `threads - 1` pool tasks.
struct Job {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  std::atomic<int> joined{0};  // warm helpers that asked to join (the first `helpers` may)
  int helpers = 0;
  int chunks = 0;
  int rows_per_chunk = 0;
  int n = 0;
  std::function<void(int, int)> body;

  void RunChunks() {
    for (;;) {
      const int c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      const int j0 = c * rows_per_chunk;
      body(j0, std::min(n, j0 + rows_per_chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Warm helpers: pool tasks that, after a one-token-row product, spin for the next job for
// `SpinNs` before giving their thread back. A batch-1 decode step's products come tens of
// microseconds apart and last about as long, and a pool thread woken from sleep starts ~20 us late,
// after the caller has claimed most chunks (BENCHMARKS.md, "Warm helpers for one-row products").
// One job is offered at a time; a caller that finds the slot taken schedules plain pool tasks.
// Only products under `WarmWork` multiply-adds start helpers; a larger one-row product takes a
// helper that is spinning already. A model whose products are all large never keeps a helper
// spinning, which would hold a core that XLA's pool tasks then wait for (BENCHMARKS.md, "Warm
// helpers only where products are small").
struct Warm {
  std::atomic<Job*> slot{nullptr};
  std::atomic<int> inside{0};    // helpers between reading the slot and leaving the job they read
  std::atomic<int> spinners{0};  // helpers scheduled and not yet returned
};

inline Warm& GlobalWarm() {
  static Warm w;
  return w;
}

inline int64_t NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<int64_t>(t.tv_sec) * 1000000000 + t.tv_nsec;
}

// $name as a non-negative integer, or `fallback` where it is unset or empty.
inline int64_t EnvCount(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::max<int64_t>(0, std::atoll(v)) : fallback;
}

// How long a warm helper waits for the next job: $NX_KERNELS_SPIN_US microseconds (default 200;
// 0: no warm helpers).
inline int64_t SpinNs() {
  static const int64_t ns = EnvCount("NX_KERNELS_SPIN_US", 200) * 1000;
  return ns;
}

// The multiply-adds under which a one-row product starts warm helpers: $NX_KERNELS_WARM_WORK
// (default 2^20).
inline int64_t WarmWork() {
  static const int64_t work = EnvCount("NX_KERNELS_WARM_WORK", int64_t{1} << 20);
  return work;
}

inline void Pause() {
#ifdef NX_X86
  _mm_pause();
#endif
}

inline void Help(Warm& w) {
  int64_t last = NowNs();
  for (int i = 0;; ++i) {
    w.inside.fetch_add(1, std::memory_order_seq_cst);
    Job* j = w.slot.load(std::memory_order_seq_cst);
    const bool helped = j && j->joined.fetch_add(1, std::memory_order_relaxed) < j->helpers;
    if (helped) j->RunChunks();
    w.inside.fetch_sub(1, std::memory_order_release);
    if (helped || (i & 63) == 0) {
      const int64_t now = NowNs();
      if (helped) last = now;
      else if (now - last > SpinNs()) break;
    }
    Pause();
  }
  w.spinners.fetch_sub(1, std::memory_order_seq_cst);
}

// `align`: chunks start at multiples of it (the kernels' register tiles); `fewest`: rows a part
// gets at least (matmuls: 16); `warm`: the job is a one-token-row product, run by warm helpers.
inline void ParallelRows(ffi::ThreadPool& pool, int n, int threads, int64_t work_per_row,
                         std::function<void(int, int)> body, int align = 4, int fewest = 16,
                         bool warm = false) {
  // Below ~64k multiply-adds a second thread costs more than it saves.
  const int64_t min_rows = std::max<int64_t>(fewest, 65536 / std::max<int64_t>(1, work_per_row));
  int parts = threads;
  if (parts > 1) parts = static_cast<int>(std::min<int64_t>(parts, n / min_rows));
  if (parts <= 1) {
    body(0, n);
    return;
  }
  auto job = std::make_shared<Job>();
  job->n = n;
  // two chunks a part: one each leaves the caller idle when a pool task starts late, more cost
  // hand-offs (BENCHMARKS.md, "Chunks a part")
  job->chunks = 2 * parts;
  job->rows_per_chunk = ((n + job->chunks - 1) / job->chunks + align - 1) / align * align;
  job->chunks = (n + job->rows_per_chunk - 1) / job->rows_per_chunk;
  job->body = std::move(body);
  job->helpers = parts - 1;
  Warm& w = GlobalWarm();
  Job* expected = nullptr;
  const bool start = static_cast<int64_t>(n) * work_per_row < WarmWork();
  if (warm && SpinNs() > 0 && (start || w.spinners.load(std::memory_order_seq_cst) > 0) &&
      w.slot.compare_exchange_strong(expected, job.get(), std::memory_order_seq_cst)) {
    for (int have = w.spinners.load(std::memory_order_seq_cst); have < parts - 1; ++have) {
      if (start) {
        w.spinners.fetch_add(1, std::memory_order_seq_cst);
        pool.Schedule([&w] { Help(w); });
      } else {
        pool.Schedule([job] { job->RunChunks(); });
      }
    }
    job->RunChunks();
    w.slot.store(nullptr, std::memory_order_seq_cst);
    while (w.inside.load(std::memory_order_seq_cst) != 0) Pause();  // a helper may still hold the job
  } else {
    for (int i = 1; i < parts; ++i) pool.Schedule([job] { job->RunChunks(); });
    job->RunChunks();
  }
  while (job->done.load(std::memory_order_acquire) < job->chunks) Pause();
}

// Loops over a register tile's accumulators, unrolled before GCC decides where arrays live: left to
// its later unrolling, the accumulator arrays stay in memory and every k-step stores them to the
// stack (the bf16, f32 and s8 kernels' tiles).
#define NX_UNROLL _Pragma("GCC unroll 8")

#ifdef NX_X86
// Horizontal sums shared by the f32-accumulating kernels (bf16_linear.cc, f32_linear.cc).
#define NX_AVX512F "avx512f,avx512bw,avx512vl"

__attribute__((target("avx2,fma"))) inline float HsumAvx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// [sum(a), sum(b), sum(c), sum(d)].
__attribute__((target("avx2,fma"))) inline __m128 Reduce4Avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 v = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

// [sum(a), sum(b), sum(c), sum(d)].
__attribute__((target(NX_AVX512F))) inline __m128 Reduce4Avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 v = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)), _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// r[i] lane t -> r[t] lane i, for 16 rows of 16 lanes (the grouped kernel's panels, the bf16
// kernel's prompt panels).
__attribute__((target(NX_AVX512F))) inline void Transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0x88);
      t[h + 4 + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

// exp(x) for x <= 89 (Cephes' expf polynomial on x - n ln 2, scaled by 2^n): 0 below -87.3, where
// exp leaves the normal floats, inf above ~88.7 (the attention kernel's softmax, the bf16 kernel's
// silu).
__attribute__((target(NX_AVX512F))) inline __m512 Exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(live, p, n);
}

// [sum(v0), ..., sum(v{RM - 1})] into out[0, RM), RM <= 4: added to it (`add`) or stored; the
// register tiles' epilogue (tiles.h). The accumulators go by value: an array's address would keep
// GCC storing them to the stack at every k-step.
template <int RM>
__attribute__((target(NX_AVX512F))) inline void StoreSums(__m512 v0, __m512 v1, __m512 v2, __m512 v3, float* out,
                                                          bool add) {
  const __m128 s = Reduce4Avx512(v0, v1, v2, v3);
  const __mmask8 mask = (1u << RM) - 1;
  _mm_mask_storeu_ps(out, mask, add ? _mm_add_ps(s, _mm_maskz_loadu_ps(mask, out)) : s);
}

#endif  // NX_X86

inline int Threads(ffi::ThreadPool& pool, int32_t requested) {
  if (requested > 0) return requested;
  const int64_t n = pool.num_threads();
  return static_cast<int>(std::max<int64_t>(1, n));
}

inline int ClampLevel(int32_t level) {
  static const int isa = DetectIsa();
  return std::max(0, std::min<int>(level, isa));
}

}  // namespace nxk
