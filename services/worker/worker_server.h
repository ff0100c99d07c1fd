// A running worker: the Worker service on its own gRPC server, with health and reflection.
#ifndef DHSA_SERVICES_WORKER_WORKER_SERVER_H_
#define DHSA_SERVICES_WORKER_WORKER_SERVER_H_

#include <grpcpp/channel.h>
#include <grpcpp/server.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dhsa/v1/service_config.pb.h"
#include "services/common/server.h"
#include "services/worker/worker_service.h"

namespace dhsa {

// How to run a worker. Zero / empty fields take the defaults given.
struct WorkerOptions {
  std::string listen_address;  // "host:port"; port 0 picks a free one (default 0.0.0.0:50061).
  // KV bytes accepted in all (default: DefaultCapacityBytes(backend, 1) of backend.h, half of
  // physical memory for "cpu", half of the device's free memory for "cuda").
  int64_t capacity_bytes = 0;
  int threads = 0;                // Attention threads (default: hardware concurrency).
  int64_t max_message_bytes = 0;  // gRPC message limit both ways (default 4 MiB).
  std::string backend;            // "cpu" (default); "cuda" needs a build with DHSA_WITH_CUDA.
  // TEST ONLY (never set in production; no flag or config field sets it): every Attend waits this
  // long before computing, or until the caller cancels it or its deadline passes. Lets tests stall
  // a worker to exercise deadlines and the router's rollback.
  absl::Duration test_attend_stall = absl::ZeroDuration();
  ServerSecurity security;  // TLS, mutual TLS (only the router's certificate) and tokens.
  // Data plane (ServiceConfig.data_plane): the worker's NCCL device and timeouts. Shared-memory
  // arenas need no worker configuration (the router creates and sizes them).
  v1::DataPlaneConfig data_plane;
};

// The worker's fields of a ServiceConfig (listen_address, capacity_bytes, threads,
// max_message_bytes, backend, tls, auth_token_file and data_plane), zeros kept as zeros (defaults
// are applied by Start).
WorkerOptions WorkerOptionsFromServiceConfig(const v1::ServiceConfig& config);

class WorkerServer {
 public:
  // Starts serving; health reports "" and "dhsa.v1.Worker" SERVING. InvalidArgument for bad
  // options (including backend "cuda" in a build without CUDA), FailedPrecondition for "cuda"
  // without a usable device, Unavailable if it cannot listen.
  static absl::StatusOr<std::unique_ptr<WorkerServer>> Start(const WorkerOptions& options);

  // Shuts down with no drain time if Shutdown was not called.
  ~WorkerServer();

  WorkerServer(const WorkerServer&) = delete;
  WorkerServer& operator=(const WorkerServer&) = delete;

  int port() const { return port_; }
  // The options with defaults filled in.
  const WorkerOptions& options() const { return options_; }

  // A channel to this server that bypasses the network (for a router in the same process).
  std::shared_ptr<grpc::Channel> InProcessChannel();

  // Health goes NOT_SERVING, new calls are refused, calls in flight get up to `drain` to finish
  // and are cancelled after it; returns when every call has ended. Idempotent.
  void Shutdown(absl::Duration drain);

 private:
  WorkerServer() = default;

  WorkerOptions options_;
  int port_ = 0;
  std::unique_ptr<WorkerService> service_;
  std::unique_ptr<grpc::Server> server_;
  bool shut_down_ = false;
};

}  // namespace dhsa

#endif  // DHSA_SERVICES_WORKER_WORKER_SERVER_H_
