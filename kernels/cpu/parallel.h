// Parallel loops of the CPU backend, on OpenMP: the runtime oneDNN is built on, so one pool of
// threads serves our loops and the library.
#ifndef DHSA_KERNELS_CPU_PARALLEL_H_
#define DHSA_KERNELS_CPU_PARALLEL_H_

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace dhsa::cpu {

// Calls fn(index, thread) for every index in [0, n) on up to `threads` threads (thread in
// [0, threads)), handing out one index at a time to whichever thread is free: callers order the
// indices largest work first.
template <typename Fn>
void ParallelFor(int64_t n, int threads, const Fn& fn) {
  if (n <= 0) return;
  const int team = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (int64_t i = 0; i < n; ++i) fn(i, omp_get_thread_num());
}

// Calls fn(begin, end) over about 4 * threads contiguous ranges covering [0, n): for loops whose
// items are cheap and alike.
template <typename Fn>
void ParallelForRanges(int64_t n, int threads, const Fn& fn) {
  if (n <= 0) return;
  const int64_t parts = threads <= 1 ? 1 : std::min<int64_t>(n, 4 * static_cast<int64_t>(threads));
  ParallelFor(parts, threads, [&](int64_t p, int) { fn(n * p / parts, n * (p + 1) / parts); });
}

}  // namespace dhsa::cpu

#endif  // DHSA_KERNELS_CPU_PARALLEL_H_
