// Device time of a launch: CUDA events around each repetition, after warm-up runs; the median.
#ifndef DHSA_BENCH_GPU_EVENT_TIMER_H_
#define DHSA_BENCH_GPU_EVENT_TIMER_H_

#include <cuda_runtime_api.h>

#include <functional>

#include "absl/status/statusor.h"

namespace dhsa {

struct DeviceTiming {
  double median_ms = 0;
  double min_ms = 0;
  double max_ms = 0;
  int reps = 0;
};

// Runs `launch` (which enqueues work on `stream`) `warmup` times untimed, then `reps` times timed.
absl::StatusOr<DeviceTiming> TimeOnDevice(const std::function<absl::Status()>& launch,
                                          cudaStream_t stream, int warmup, int reps);

// `reps` so that the timed runs take about `seconds` given one run of `one_ms`, in [lo, hi].
int RepsFor(double one_ms, double seconds, int lo, int hi);

}  // namespace dhsa

#endif  // DHSA_BENCH_GPU_EVENT_TIMER_H_
