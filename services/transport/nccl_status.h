// NCCL outcomes as absl::Status, in one place (the codes mirror ncclResult_t of nccl.h; the NCCL
// build checks they match). Kept free of nccl.h so that builds without NCCL test it too.
#ifndef DHSA_SERVICES_TRANSPORT_NCCL_STATUS_H_
#define DHSA_SERVICES_TRANSPORT_NCCL_STATUS_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace dhsa::transport {

// ncclResult_t values (nccl.h 2.x).
enum class NcclCode : int {
  kSuccess = 0,
  kUnhandledCudaError = 1,
  kSystemError = 2,
  kInternalError = 3,
  kInvalidArgument = 4,
  kInvalidUsage = 5,
  kRemoteError = 6,
  kInProgress = 7,
};

// What a failed NCCL call means for the service. The communicator is unusable after any of these
// (it is aborted), so every error the peers or the system cause is UNAVAILABLE: the sequences that
// used it fail with UNAVAILABLE and a retry gets a new communicator or the gRPC path. Errors that
// are this process's own bugs (invalid argument or usage, an internal error) are INTERNAL. A code
// outside the table is UNKNOWN. `what` names the call ("ncclSend of 'q' to rank 1"), `detail` is
// ncclGetLastError's text. kSuccess is OK; kInProgress is not an outcome (FailedPrecondition: the
// caller must poll).
absl::Status StatusFromNcclCode(int code, absl::string_view what, absl::string_view detail);

// The status of a transfer or a set-up that did not finish by its deadline (the communicator was
// aborted): UNAVAILABLE naming `what` and the bound.
absl::Status NcclTimeoutStatus(absl::string_view what, double timeout_seconds);

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_NCCL_STATUS_H_
