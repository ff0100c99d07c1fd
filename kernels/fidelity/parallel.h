// A minimal parallel loop for the fidelity and evaluation code (not the attention kernels).
#ifndef DHSA_KERNELS_FIDELITY_PARALLEL_H_
#define DHSA_KERNELS_FIDELITY_PARALLEL_H_

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace dhsa {

// Calls fn(begin, end) on `num_threads` contiguous parts of [0, n), one thread each (the calling
// thread takes the first part), and waits for all of them.
template <typename Fn>
void ParallelFor(int64_t n, int num_threads, const Fn& fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(num_threads, n));
  if (parts == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < parts; ++t) {
    pool.emplace_back([&fn, n, t, parts] { fn(n * t / parts, n * (t + 1) / parts); });
  }
  fn(int64_t{0}, n / parts);
  for (std::thread& t : pool) t.join();
}

// q . k in double, q already in double; eight partial sums let the compiler vectorise.
inline double DotDouble(const double* q, const float* k, int64_t d) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    for (int j = 0; j < 8; ++j) part[j] += q[c + j] * k[c + j];
  }
  for (; c < d; ++c) part[0] += q[c] * k[c];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace dhsa

#endif  // DHSA_KERNELS_FIDELITY_PARALLEL_H_
