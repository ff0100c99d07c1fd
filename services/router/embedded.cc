#include "services/router/embedded.h"

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "services/worker/backend.h"

namespace dhsa {

absl::StatusOr<std::unique_ptr<EmbeddedService>> EmbeddedService::Start(
    const EmbeddedOptions& options) {
  if (options.num_workers < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("the embedded service needs at least one worker; got ", options.num_workers));
  }
  int64_t capacity = options.capacity_bytes_per_worker;
  if (capacity <= 0) {
    DHSA_ASSIGN_OR_RETURN(capacity, DefaultCapacityBytes(options.backend, options.num_workers));
  }
  std::unique_ptr<EmbeddedService> service(new EmbeddedService);
  router::RouterOptions router_options;
  for (int i = 0; i < options.num_workers; ++i) {
    WorkerOptions w;
    w.listen_address = "127.0.0.1:0";
    w.capacity_bytes = capacity;
    w.threads = options.threads;
    w.max_message_bytes = options.max_message_bytes;
    w.backend = options.backend;
    w.data_plane = options.data_plane;
    DHSA_ASSIGN_OR_RETURN(std::unique_ptr<WorkerServer> worker, WorkerServer::Start(w));
    router_options.worker_addresses.push_back(absl::StrCat("127.0.0.1:", worker->port()));
    service->workers_.push_back(std::move(worker));
  }
  router_options.listen_address = options.listen_address;
  router_options.max_message_bytes = options.max_message_bytes;
  router_options.stripe_tokens = options.stripe_tokens;
  router_options.threads = options.threads;
  router_options.max_inflight = options.max_inflight;
  router_options.default_config = options.default_config;
  router_options.probe_interval = options.probe_interval;
  router_options.data_plane = options.data_plane;
  router_options.client_shm_bytes = options.client_shm_bytes;
  router_options.selection_device = options.selection_device;
  DHSA_ASSIGN_OR_RETURN(service->router_, router::RouterServer::Start(router_options));
  std::string host = options.listen_address.substr(0, options.listen_address.rfind(':'));
  if (host.empty() || host == "0.0.0.0" || host == "[::]") host = "127.0.0.1";
  service->router_address_ = absl::StrCat(host, ":", service->router_->port());
  return service;
}

EmbeddedService::~EmbeddedService() { Shutdown(std::chrono::milliseconds(0)); }

void EmbeddedService::Shutdown(std::chrono::milliseconds drain) {
  if (shut_down_) return;
  shut_down_ = true;
  if (router_ != nullptr) router_->Shutdown(drain);
  for (auto& w : workers_) w->Shutdown(absl::Milliseconds(drain.count()));
}

}  // namespace dhsa
