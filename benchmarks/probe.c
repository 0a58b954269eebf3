/* Compute probe for benchmarks/roofline.py: the peak multiply-accumulate rate of one core for the
 * dot instructions decode products use, on registers only (no memory traffic).
 *
 * Each function runs `iters` rounds of 12 independent accumulator chains (enough to cover the
 * instructions' latency on current x86 cores) and returns the multiply-accumulates it did; the
 * caller times it. Built by roofline.py with -O2 -march=native; a kind the CPU lacks returns -1.
 */
#include <immintrin.h>
#include <stdint.h>

#define CHAINS 12
/* the chains fully unrolled, so the accumulators stay in registers */
#define UNROLLED _Pragma("GCC unroll 12")

/* f32 fused multiply-add: 16 (AVX-512) or 8 (AVX2) MACs per instruction. */
int64_t nx_probe_f32(int64_t iters) {
#if defined(__AVX512F__)
  __m512 acc[CHAINS];
  const __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
  for (int j = 0; j < CHAINS; ++j) acc[j] = _mm512_set1_ps((float)j);
  for (int64_t i = 0; i < iters; ++i)
    UNROLLED for (int j = 0; j < CHAINS; ++j) acc[j] = _mm512_fmadd_ps(a, acc[j], b);
  float sink = 0;
  for (int j = 0; j < CHAINS; ++j) sink += _mm512_reduce_add_ps(acc[j]);
  __asm__ volatile("" ::"x"(sink));
  return iters * CHAINS * 16;
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[CHAINS];
  const __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.9999999f);
  for (int j = 0; j < CHAINS; ++j) acc[j] = _mm256_set1_ps((float)j);
  for (int64_t i = 0; i < iters; ++i)
    UNROLLED for (int j = 0; j < CHAINS; ++j) acc[j] = _mm256_fmadd_ps(a, acc[j], b);
  __m256 s = acc[0];
  for (int j = 1; j < CHAINS; ++j) s = _mm256_add_ps(s, acc[j]);
  __asm__ volatile("" ::"x"(s));
  return iters * CHAINS * 8;
#else
  (void)iters;
  return -1;
#endif
}

/* bf16 pair dot products into f32 (vdpbf16ps): 32 MACs per instruction. */
int64_t nx_probe_bf16(int64_t iters) {
#if defined(__AVX512BF16__)
  __m512 acc[CHAINS];
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f81);
  for (int j = 0; j < CHAINS; ++j) acc[j] = _mm512_set1_ps((float)j);
  for (int64_t i = 0; i < iters; ++i)
    UNROLLED for (int j = 0; j < CHAINS; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
  float sink = 0;
  for (int j = 0; j < CHAINS; ++j) sink += _mm512_reduce_add_ps(acc[j]);
  __asm__ volatile("" ::"x"(sink));
  return iters * CHAINS * 32;
#else
  (void)iters;
  return -1;
#endif
}

/* u8 x s8 dot products into i32: vpdpbusd (AVX-512 VNNI, 64 MACs per instruction), else AVX2's
 * vpmaddubsw + vpmaddwd + vpaddd (32 MACs per three instructions). */
int64_t nx_probe_int8(int64_t iters) {
#if defined(__AVX512VNNI__)
  __m512i acc[CHAINS];
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  for (int j = 0; j < CHAINS; ++j) acc[j] = _mm512_set1_epi32(j);
  for (int64_t i = 0; i < iters; ++i)
    UNROLLED for (int j = 0; j < CHAINS; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
  int64_t sink = 0;
  for (int j = 0; j < CHAINS; ++j) sink += _mm512_reduce_add_epi32(acc[j]);
  __asm__ volatile("" ::"r"(sink));
  return iters * CHAINS * 64;
#elif defined(__AVX2__)
  __m256i acc[CHAINS], x[CHAINS];  /* x feeds each round's bytes from the last, so nothing is hoisted */
  const __m256i b = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
  for (int j = 0; j < CHAINS; ++j) acc[j] = _mm256_set1_epi32(j), x[j] = _mm256_set1_epi8((char)(j + 1));
  for (int64_t i = 0; i < iters; ++i)
    UNROLLED for (int j = 0; j < CHAINS; ++j) {
      x[j] = _mm256_maddubs_epi16(x[j], b);
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(x[j], ones));
    }
  __m256i s = acc[0];
  for (int j = 1; j < CHAINS; ++j) s = _mm256_add_epi32(s, acc[j]);
  __asm__ volatile("" ::"x"(s));
  return iters * CHAINS * 32;
#else
  (void)iters;
  return -1;
#endif
}
