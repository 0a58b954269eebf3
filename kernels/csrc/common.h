// nx-kernels-cpu: what every kernel of the library shares: the dispatch levels (cpuid) and the
// split of a call's output rows over XLA's intra-op thread pool.
//
// Levels, in one order (a level implies the ones below it; the Python side never asks for one above
// nx_kernels_cpu_isa(), and ClampLevel lowers it anyway):
//   0 scalar; 1 AVX2 (+FMA for the float kernels); 2 AVX-512 F/BW/VL/VNNI; 3 the same + AVX512_BF16.
// Each kernel maps a level to the best implementation it has at or below it.
// Threads: output rows are cut into chunks claimed from an atomic counter by the calling thread and
// by tasks scheduled on XLA's intra-op thread pool; the caller waits only for chunks another thread
// has claimed, so a pool that is busy (or absent) never blocks it.

#ifndef NX_KERNELS_CPU_COMMON_H_
#define NX_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NX_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace nx_kernels {

namespace ffi = xla::ffi;

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

inline bool HasFma() {
#ifdef NX_X86
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2"));
  return has;
#else
  return false;
#endif
}

inline int ClampLevel(int32_t level) {
  static const int isa = DetectIsa();
  return std::max(0, std::min<int>(level, isa));
}

// Output rows [0, n) in chunks, run by the caller and by up to `threads - 1` pool tasks.
struct Job {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
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

// body(j0, j1) over chunks of [0, n) (multiples of 4 rows but the last); work_per_row: multiply-adds
// per output row, so that small calls stay on the calling thread.
inline void ParallelRows(ffi::ThreadPool& pool, int n, int threads, int64_t work_per_row,
                         std::function<void(int, int)> body) {
  // Below ~64k multiply-adds a second thread costs more than it saves.
  const int64_t min_rows = std::max<int64_t>(16, 65536 / std::max<int64_t>(1, work_per_row));
  int parts = threads;
  if (parts > 1) parts = static_cast<int>(std::min<int64_t>(parts, n / min_rows));
  if (parts <= 1) {
    body(0, n);
    return;
  }
  auto job = std::make_shared<Job>();
  job->n = n;
  job->chunks = 4 * parts;
  job->rows_per_chunk = ((n + job->chunks - 1) / job->chunks + 3) / 4 * 4;
  job->chunks = (n + job->rows_per_chunk - 1) / job->rows_per_chunk;
  job->body = std::move(body);
  for (int i = 1; i < parts; ++i) pool.Schedule([job] { job->RunChunks(); });
  job->RunChunks();
  while (job->done.load(std::memory_order_acquire) < job->chunks) {
#ifdef NX_X86
    _mm_pause();
#endif
  }
}

// Threads a call may use: `requested` (> 0) or every thread of XLA's pool.
inline int Threads(ffi::ThreadPool& pool, int32_t requested) {
  if (requested > 0) return requested;
  const int64_t n = pool.num_threads();
  return static_cast<int>(std::max<int64_t>(1, n));
}

}  // namespace nx_kernels

#endif  // NX_KERNELS_CPU_COMMON_H_
