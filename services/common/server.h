// Building a gRPC server the way every dhsa process does: one listening address (port 0 picks a
// free port), the standard grpc.health.v1 service and server reflection, and one message size limit
// for both directions.
#ifndef DHSA_SERVICES_COMMON_SERVER_H_
#define DHSA_SERVICES_COMMON_SERVER_H_

#include <grpcpp/server.h>
#include <grpcpp/support/channel_arguments.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dhsa {

// Starts a server on `address` ("host:port", port 0 = any free port) serving `services` (not owned;
// they must outlive the server), with health (liveness "" SERVING; callers set readiness per
// service name with GetHealthCheckService()->SetServingStatus) and reflection enabled, and
// `max_message_bytes` (> 0) as the receive and send limit. Writes the bound port to `*bound_port`
// when not null. Unavailable when the address cannot be bound, InvalidArgument for bad arguments.
absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(const std::string& address,
                                                              int64_t max_message_bytes,
                                                              std::vector<grpc::Service*> services,
                                                              int* bound_port);

// HTTP/2 flow-control window per stream, bytes: two messages of the limit, at least 8 MiB. Tensors
// stream as back-to-back messages near the limit; gRPC's default window (64 KiB, grown by BDP
// probes) makes the sender wait for a window update every few frames, which costs a wake-up of
// each side per 64 KiB on a loaded host.
inline constexpr int64_t kMinStreamWindowBytes = int64_t{8} << 20;
int StreamWindowBytes(int64_t max_message_bytes);

// Channel arguments a client of a dhsa server uses so that messages up to `max_message_bytes`
// pass in both directions, with the stream window above.
grpc::ChannelArguments ChannelArgumentsForMessageLimit(int64_t max_message_bytes);

}  // namespace dhsa

#endif  // DHSA_SERVICES_COMMON_SERVER_H_
