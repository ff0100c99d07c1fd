#include "bench/gpu/event_timer.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"

namespace dhsa {

absl::StatusOr<DeviceTiming> TimeOnDevice(const std::function<absl::Status()>& launch,
                                          cudaStream_t stream, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) DHSA_RETURN_IF_ERROR(launch());
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "warm-up"));
  cudaEvent_t start, stop;
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&start), "cudaEventCreate"));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&stop), "cudaEventCreate"));
  std::vector<double> ms;
  absl::Status status;
  for (int i = 0; i < std::max(1, reps) && status.ok(); ++i) {
    status = CudaStatus(cudaEventRecord(start, stream), "cudaEventRecord");
    if (status.ok()) status = launch();
    if (status.ok()) status = CudaStatus(cudaEventRecord(stop, stream), "cudaEventRecord");
    if (status.ok()) status = CudaStatus(cudaEventSynchronize(stop), "timed run");
    float elapsed = 0;
    if (status.ok()) status = CudaStatus(cudaEventElapsedTime(&elapsed, start, stop), "elapsed");
    ms.push_back(elapsed);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  DHSA_RETURN_IF_ERROR(status);
  std::sort(ms.begin(), ms.end());
  DeviceTiming t;
  t.reps = static_cast<int>(ms.size());
  t.min_ms = ms.front();
  t.max_ms = ms.back();
  t.median_ms =
      ms.size() % 2 == 1 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
  return t;
}

int RepsFor(double one_ms, double seconds, int lo, int hi) {
  if (!(one_ms > 0)) return hi;
  return static_cast<int>(std::clamp(std::ceil(seconds * 1e3 / one_ms), double(lo), double(hi)));
}

}  // namespace dhsa
