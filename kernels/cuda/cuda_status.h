// CUDA runtime error codes as absl::Status, for the host side of the CUDA backend.
#ifndef DHSA_KERNELS_CUDA_CUDA_STATUS_H_
#define DHSA_KERNELS_CUDA_CUDA_STATUS_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace dhsa {

// OK for cudaSuccess; otherwise Internal naming `what` and the runtime's error name and text
// (FailedPrecondition when there is no usable device or driver, so callers can tell "no GPU" from
// a failure).
inline absl::Status CudaStatus(cudaError_t error, absl::string_view what) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")");
  if (error == cudaErrorNoDevice || error == cudaErrorInsufficientDriver ||
      error == cudaErrorNoKernelImageForDevice) {
    return absl::FailedPreconditionError(message);
  }
  return absl::InternalError(message);
}

}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_CUDA_STATUS_H_
