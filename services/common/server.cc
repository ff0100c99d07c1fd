#include "services/common/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "services/common/metrics.h"

namespace dhsa {
namespace {

int ClampToInt(int64_t bytes) {
  return static_cast<int>(std::min<int64_t>(bytes, std::numeric_limits<int>::max()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(const std::string& address,
                                                              int64_t max_message_bytes,
                                                              std::vector<grpc::Service*> services,
                                                              int* bound_port) {
  if (address.empty()) return absl::InvalidArgumentError("listen address is empty");
  if (max_message_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be positive; got ", max_message_bytes));
  }
  // Both are process-wide switches read when a builder is created; setting them again is harmless.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(ClampToInt(max_message_bytes));
  builder.SetMaxSendMessageSize(ClampToInt(max_message_bytes));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES,
                             StreamWindowBytes(max_message_bytes));
  for (grpc::Service* service : services) builder.RegisterService(service);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(metrics::NewRpcInterceptorFactory());  // Request counts and latency.
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    if (server != nullptr) server->Shutdown();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on '", address, "' (address in use, or not a host:port?)"));
  }
  if (bound_port != nullptr) *bound_port = port;
  return server;
}

int StreamWindowBytes(int64_t max_message_bytes) {
  return ClampToInt(std::max<int64_t>(kMinStreamWindowBytes, 2 * max_message_bytes));
}

grpc::ChannelArguments ChannelArgumentsForMessageLimit(int64_t max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(ClampToInt(max_message_bytes));
  args.SetMaxSendMessageSize(ClampToInt(max_message_bytes));
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, StreamWindowBytes(max_message_bytes));
  return args;
}

}  // namespace dhsa
