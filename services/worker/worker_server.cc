#include "services/worker/worker_server.h"

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/support/channel_arguments.h>

#include <chrono>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "services/common/server.h"

namespace dhsa {
namespace {

constexpr char kDefaultListenAddress[] = "0.0.0.0:50061";
constexpr int64_t kDefaultMaxMessageBytes = int64_t{4} << 20;
constexpr char kServiceName[] = "dhsa.v1.Worker";

absl::StatusOr<WorkerOptions> WithDefaults(WorkerOptions o) {
  if (o.listen_address.empty()) o.listen_address = kDefaultListenAddress;
  if (o.threads == 0)
    o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (o.max_message_bytes == 0) o.max_message_bytes = kDefaultMaxMessageBytes;
  if (o.backend.empty()) o.backend = "cpu";
  if (o.capacity_bytes < 0 || o.threads < 0 || o.max_message_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capacity_bytes, threads and max_message_bytes must not be negative; got ",
                     o.capacity_bytes, ", ", o.threads, " and ", o.max_message_bytes));
  }
  return o;
}

}  // namespace

WorkerOptions WorkerOptionsFromServiceConfig(const v1::ServiceConfig& config) {
  WorkerOptions o;
  o.listen_address = config.listen_address();
  o.capacity_bytes = config.capacity_bytes();
  o.threads = config.threads();
  o.max_message_bytes = config.max_message_bytes();
  o.backend = config.backend();
  o.security.cert_file = config.tls().cert_file();
  o.security.key_file = config.tls().key_file();
  o.security.client_ca_file = config.tls().client_ca_file();
  o.security.token_file = config.auth_token_file();
  o.data_plane = config.data_plane();
  return o;
}

absl::StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Start(const WorkerOptions& options) {
  std::unique_ptr<WorkerServer> server(new WorkerServer());
  DHSA_ASSIGN_OR_RETURN(server->options_, WithDefaults(options));
  // The backend first: its name is checked (InvalidArgument for "cuda" without CUDA) and the
  // default capacity depends on it.
  DHSA_ASSIGN_OR_RETURN(std::unique_ptr<WorkerBackend> backend,
                        CreateWorkerBackend(server->options_.backend));
  if (server->options_.capacity_bytes == 0) {
    DHSA_ASSIGN_OR_RETURN(server->options_.capacity_bytes,
                          DefaultCapacityBytes(server->options_.backend, 1));
  }
  const WorkerOptions& o = server->options_;
  WorkerService::Options service_options;
  service_options.capacity_bytes = o.capacity_bytes;
  service_options.threads = o.threads;
  service_options.max_message_bytes = o.max_message_bytes;
  service_options.backend = o.backend;
  service_options.test_attend_stall = o.test_attend_stall;
  DHSA_ASSIGN_OR_RETURN(service_options.data_plane,
                        transport::DataPlaneOptionsFromProto(o.data_plane));
  server->service_ = std::make_unique<WorkerService>(service_options, std::move(backend));
  DHSA_ASSIGN_OR_RETURN(server->server_,
                        StartGrpcServer(o.listen_address, o.max_message_bytes,
                                        {server->service_.get()}, &server->port_, o.security));
  server->server_->GetHealthCheckService()->SetServingStatus(kServiceName, true);
  return server;
}

WorkerServer::~WorkerServer() { Shutdown(absl::ZeroDuration()); }

std::shared_ptr<grpc::Channel> WorkerServer::InProcessChannel() {
  grpc::ChannelArguments args = ChannelArgumentsForMessageLimit(options_.max_message_bytes);
  return server_->InProcessChannel(args);
}

void WorkerServer::Shutdown(absl::Duration drain) {
  if (shut_down_ || server_ == nullptr) return;
  shut_down_ = true;
  server_->GetHealthCheckService()->SetServingStatus(false);
  server_->Shutdown(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(drain));
  server_->Wait();
}

}  // namespace dhsa
