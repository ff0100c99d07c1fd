// The worker's CUDA backend (services/worker/backend.h); only in builds with DHSA_WITH_CUDA.
#ifndef DHSA_SERVICES_WORKER_CUDA_BACKEND_H_
#define DHSA_SERVICES_WORKER_CUDA_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "services/worker/backend.h"

namespace dhsa {

// On the calling thread's current device (device 0 unless CUDA_VISIBLE_DEVICES says otherwise).
// FailedPrecondition when no device is usable.
absl::StatusOr<std::unique_ptr<WorkerBackend>> CreateCudaWorkerBackend();

// Total and free memory of the current device.
absl::StatusOr<DeviceMemoryInfo> CudaDeviceMemory();

}  // namespace dhsa

#endif  // DHSA_SERVICES_WORKER_CUDA_BACKEND_H_
