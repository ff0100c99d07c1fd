// Conversion between absl::Status (library code) and grpc::Status (the wire): the one place it
// happens. Codes map one to one (both follow google.rpc.Code); messages are kept.
#ifndef DHSA_SERVICES_COMMON_STATUS_H_
#define DHSA_SERVICES_COMMON_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace dhsa {

grpc::Status ToGrpcStatus(const absl::Status& status);

absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace dhsa

#endif  // DHSA_SERVICES_COMMON_STATUS_H_
