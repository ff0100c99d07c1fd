#include "services/transport/nccl_status.h"

#include "absl/strings/str_cat.h"

namespace dhsa::transport {

absl::Status StatusFromNcclCode(int code, absl::string_view what, absl::string_view detail) {
  const std::string tail = detail.empty() ? "" : absl::StrCat(": ", detail);
  switch (static_cast<NcclCode>(code)) {
    case NcclCode::kSuccess:
      return absl::OkStatus();
    case NcclCode::kInProgress:
      return absl::FailedPreconditionError(
          absl::StrCat(what, " is still in progress (poll ncclCommGetAsyncError)", tail));
    case NcclCode::kRemoteError:
      return absl::UnavailableError(absl::StrCat(
          what, " failed: a peer of the communicator failed or left (ncclRemoteError)", tail));
    case NcclCode::kSystemError:
      return absl::UnavailableError(absl::StrCat(
          what, " failed: a system call or the network failed (ncclSystemError)", tail));
    case NcclCode::kUnhandledCudaError:
      return absl::UnavailableError(
          absl::StrCat(what, " failed: a CUDA call failed (ncclUnhandledCudaError)", tail));
    case NcclCode::kInternalError:
      return absl::InternalError(absl::StrCat(what, " failed: NCCL internal error", tail));
    case NcclCode::kInvalidArgument:
      return absl::InternalError(
          absl::StrCat(what, " failed: invalid argument (a dhsa bug; ncclInvalidArgument)", tail));
    case NcclCode::kInvalidUsage:
      return absl::InternalError(
          absl::StrCat(what, " failed: invalid usage (a dhsa bug; ncclInvalidUsage)", tail));
  }
  return absl::UnknownError(absl::StrCat(what, " failed with unknown NCCL code ", code, tail));
}

absl::Status NcclTimeoutStatus(absl::string_view what, double timeout_seconds) {
  return absl::UnavailableError(
      absl::StrCat(what, " did not complete within ", timeout_seconds,
                   " s (a peer is gone or stalled); the communicator was aborted (ncclCommAbort)"));
}

}  // namespace dhsa::transport
