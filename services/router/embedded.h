// The whole service in one process: N workers and a router on 127.0.0.1 ports, for `dhsa serve`
// (no cluster needed) and for end-to-end tests.
#ifndef DHSA_SERVICES_ROUTER_EMBEDDED_H_
#define DHSA_SERVICES_ROUTER_EMBEDDED_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "services/router/router.h"
#include "services/worker/worker_server.h"

namespace dhsa {

struct EmbeddedOptions {
  // Where the router listens ("127.0.0.1:0": a free local port; "0.0.0.0:50051" to serve others).
  std::string listen_address = "127.0.0.1:0";
  int num_workers = 2;
  int64_t stripe_tokens = 4096;  // Tokens per KV stripe.
  // Threads of the router's executor and of each worker's attention (0: hardware concurrency).
  int threads = 0;
  // KV bytes each worker accepts (0: DefaultCapacityBytes(backend, num_workers), half of physical
  // memory, or of the device's free memory for "cuda", shared by the workers).
  int64_t capacity_bytes_per_worker = 0;
  std::string backend = "cpu";  // The workers' backend: "cpu" or "cuda" (builds with CUDA).
  int64_t max_message_bytes = 4 << 20;
  int max_inflight = 64;
  DhsaConfig default_config;                       // For sequences created without parameters.
  std::chrono::milliseconds probe_interval{1000};  // How fast the router notices a worker down.
  // Router <-> worker tensors (default "auto": shared memory, since all run in this process).
  v1::DataPlaneConfig data_plane;
  // Shared memory for clients on this host, bytes per client (0: off; RouterOptions).
  int64_t client_shm_bytes = int64_t{4} << 30;
  // Where the router's first prefills select: "auto", "cpu" or a CUDA ordinal (RouterOptions).
  std::string selection_device = "auto";
};

class EmbeddedService {
 public:
  // Starts the workers, then the router pointed at them.
  static absl::StatusOr<std::unique_ptr<EmbeddedService>> Start(const EmbeddedOptions& options);
  ~EmbeddedService();

  // "127.0.0.1:PORT" (or the listen host) for dhsa::Client::Connect.
  std::string router_address() const { return router_address_; }
  int num_workers() const { return static_cast<int>(workers_.size()); }
  // For tests: the running processes' parts (a worker may be shut down to simulate a failure).
  WorkerServer& worker(int i) { return *workers_[static_cast<size_t>(i)]; }
  router::RouterServer& router() { return *router_; }

  // Stops the router (draining up to `drain`), then the workers. Idempotent.
  void Shutdown(std::chrono::milliseconds drain = std::chrono::seconds(5));

 private:
  EmbeddedService() = default;

  std::vector<std::unique_ptr<WorkerServer>> workers_;
  std::unique_ptr<router::RouterServer> router_;
  std::string router_address_;
  bool shut_down_ = false;
};

}  // namespace dhsa

#endif  // DHSA_SERVICES_ROUTER_EMBEDDED_H_
