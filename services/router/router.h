// The router: the public dhsa.v1.Attention service over a set of workers (spec/ARCHITECTURE.md).
//
// Per sequence and layer it keeps the layout (layout.h: boundaries, chunk summaries, the tail
// chunk's keys) and the stripes (placement.h); per call it selects with SelectSpansReference,
// stores the new keys on their stripes' workers, sends each worker holding selected keys the query
// rows that need it with their local spans (plan.h), and merges the partials with
// MergePartialsReference (layer_call.h). Handlers only check requests and move bytes; everything
// heavy runs on the router's executor, and worker calls are asynchronous.
//
// Choices beyond the brief, and why:
// - Workers hold each layer under its own worker sequence id "<id>.L<layer>". A failed call is
//   undone with the worker's Truncate(end = the layer's length before the call) on every worker it
//   sent a StoreKv: stripes it opened are freed and stripes it appended to are cut back, so a
//   failed first prefill, chunked prefill or decode leaves the layer exactly as it was, and its
//   reserved bytes return once the truncates are confirmed. A StoreKv whose outcome is unknown
//   (it failed by cancellation, deadline or a transport error after its half-close, when the
//   worker may have committed) counts as stored: its worker must confirm the truncate too, and the
//   truncate also fences that layer's writes still in flight on the worker (they fail ABORTED
//   instead of landing after it). When a worker that may hold such keys cannot be reached, the
//   layer keeps a pending undo rather than risk keys the router does not know about: every later
//   call on the layer first retries the Truncate on those workers, and is UNAVAILABLE until they
//   confirm it (then the layer is exactly as it was and the call runs). A StoreKv the worker
//   refused, or whose stream broke before the half-close, stored nothing.
// - Worker calls carry the client's deadline and cancellation; when the client sets no deadline,
//   each StoreKv and Attend gets worker_call_timeout (default 120 s), so a stalled worker ends a
//   call with DEADLINE_EXCEEDED (and the rollback above) instead of hanging it.
// - Each sequence's zigzag starts at a different worker (round robin over creations), so short
//   sequences (one stripe per layer) spread over the cluster instead of all landing on worker 0.
// - A stripe opens at the first chunk boundary at least stripe_tokens after the previous stripe's
//   start; decode closes a full stripe at the next token (its boundaries are not final yet), and a
//   full worker closes it early. Spans are cut at stripe edges anyway, so this only affects
//   fragmentation, never results.
// - Each worker gets only the query blocks with a key on it (all of them when it holds the sink).
// - Readiness ("dhsa.v1.Attention" in grpc.health.v1) is SERVING while at least one worker is
//   reachable: one worker down makes only the sequences it holds UNAVAILABLE.
// - A second call on a layer that has one in flight is FAILED_PRECONDITION (attention.proto), and
//   ReleaseSequence during a call is FAILED_PRECONDITION too, rather than queueing.
// - Capacity is accounted by the router (bytes it placed, reserved before any store) against each
//   worker's capacity from its Stats, probed every probe_interval together with reachability.
#ifndef DHSA_SERVICES_ROUTER_ROUTER_H_
#define DHSA_SERVICES_ROUTER_ROUTER_H_

#include <grpcpp/server.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "dhsa/v1/attention.grpc.pb.h"
#include "dhsa/v1/service_config.pb.h"
#include "kernels/common/config.h"
#include "services/common/executor.h"
#include "services/common/server.h"
#include "services/router/layer_call.h"
#include "services/router/placement.h"
#include "services/router/sequence.h"
#include "services/router/shared_regions.h"
#include "services/router/workers.h"

namespace dhsa::router {

// The readiness service name.
inline constexpr char kAttentionServiceName[] = "dhsa.v1.Attention";

struct RouterOptions {
  // Where the router listens; port 0 picks a free one (RouterServer::port()).
  std::string listen_address = "0.0.0.0:50051";
  std::vector<std::string> worker_addresses;  // "host:port" of every worker, or empty and:
  std::string worker_dns;                     // "dns:///name:port" resolving to every worker.
  int64_t max_message_bytes = 4 << 20;        // Both directions, client and workers.
  int64_t stripe_tokens = 4096;               // Tokens per KV stripe (cut at chunk boundaries).
  int threads = 0;                            // Executor threads; 0: hardware concurrency.
  int max_inflight = 64;                      // Requests beyond it get RESOURCE_EXHAUSTED.
  DhsaConfig default_config;                  // For sequences created without parameters.
  std::chrono::milliseconds probe_interval{2000};  // Worker probe and DNS refresh period.
  // Deadline of each StoreKv and Attend made for a client call that sets no deadline (a client's
  // deadline propagates as is). Positive.
  std::chrono::milliseconds worker_call_timeout{120000};
  ServerSecurity security;              // TLS and tokens of the public API.
  ChannelSecurity worker_security;      // TLS (and token) of the calls to the workers.
  int max_sequences_per_client = 0;     // 0: no limit.
  int64_t max_kv_bytes_per_client = 0;  // 0: no limit.
  v1::DataPlaneConfig data_plane;       // Router <-> worker tensors (services/transport).
  // Shared memory offered to clients on the same host (OpenSharedMemory), bytes per client;
  // 0 turns it off.
  int64_t client_shm_bytes = int64_t{4} << 30;
  // Where first prefills select: "auto", "cpu" or a CUDA ordinal (ServiceConfig.selection_device,
  // services/router/selection_device.h).
  std::string selection_device = "auto";
};

// Router options from a ServiceConfig (zero fields keep the defaults above).
absl::StatusOr<RouterOptions> RouterOptionsFromServiceConfig(const v1::ServiceConfig& config);

class RouterService final : public v1::Attention::CallbackService {
 public:
  // Connects to the workers (they need not be up yet).
  static absl::StatusOr<std::unique_ptr<RouterService>> Create(const RouterOptions& options);
  ~RouterService() override;

  grpc::ServerUnaryReactor* CreateSequence(grpc::CallbackServerContext* context,
                                           const v1::CreateSequenceRequest* request,
                                           v1::CreateSequenceResponse* response) override;
  grpc::ServerBidiReactor<v1::PrefillRequest, v1::PrefillResponse>* Prefill(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* context,
                                   const v1::DecodeRequest* request,
                                   v1::DecodeResponse* response) override;
  grpc::ServerUnaryReactor* GetSequenceInfo(grpc::CallbackServerContext* context,
                                            const v1::GetSequenceInfoRequest* request,
                                            v1::SequenceInfo* response) override;
  grpc::ServerUnaryReactor* ReleaseSequence(grpc::CallbackServerContext* context,
                                            const v1::ReleaseSequenceRequest* request,
                                            v1::ReleaseSequenceResponse* response) override;
  grpc::ServerUnaryReactor* OpenSharedMemory(grpc::CallbackServerContext* context,
                                             const v1::OpenSharedMemoryRequest* request,
                                             v1::OpenSharedMemoryResponse* response) override;
  grpc::ServerUnaryReactor* CloseSharedMemory(grpc::CallbackServerContext* context,
                                              const v1::CloseSharedMemoryRequest* request,
                                              v1::CloseSharedMemoryResponse* response) override;

  WorkerPool& pool() { return *pool_; }
  const RouterCore& core() const { return core_; }
  int64_t response_piece_bytes() const { return response_piece_bytes_; }
  SharedRegions& shared_regions() { return shared_regions_; }

  // Counts a request in; RESOURCE_EXHAUSTED past max_inflight. EndRequest counts it out.
  absl::Status BeginRequest();
  void EndRequest();
  // The sequence of a call on `layer`: NOT_FOUND, or INVALID_ARGUMENT for a bad id or layer.
  absl::StatusOr<std::shared_ptr<SequenceState>> FindForCall(const std::string& id, int layer);

 private:
  explicit RouterService(const RouterOptions& options);
  absl::Status CreateSequenceImpl(const v1::CreateSequenceRequest& request,
                                  v1::CreateSequenceResponse* response, const std::string& client);
  absl::Status InfoImpl(const std::string& id, v1::SequenceInfo* info);
  int64_t CapacityTokens(const SequenceState& seq) const;

 public:
  // Per-client limits and ownership (RouterOptions::max_*_per_client); `client` is
  // ClientIdentity() of the call. A sequence created by an authenticated client (token or
  // certificate) is NOT_FOUND to every other client.
  absl::Status CheckOwner(const std::string& id, const std::string& client);
  // Reserves `bytes` of KV for a call of `client` on `seq`: RESOURCE_EXHAUSTED when its
  // sequences' stored bytes plus its reservations would pass the limit. EndKvCall gives it back
  // when the call has ended (the bytes stored are then counted from the sequence).
  absl::Status BeginKvCall(const std::string& client, int64_t bytes);
  void EndKvCall(const std::string& client, int64_t bytes);

 private:
  struct ClientUsage {
    std::vector<std::string> sequences;  // Ids it holds.
    int64_t reserved_bytes = 0;          // KV bytes of its calls in flight.
  };
  std::unordered_map<std::string, ClientUsage> clients_;  // Guarded by mu_.
  std::unordered_map<std::string, std::string> owners_;   // Sequence id -> client; by mu_.

  const RouterOptions options_;
  std::unique_ptr<WorkerPool> pool_;
  SharedRegions shared_regions_;
  ZigzagPlacement placement_;
  RouterCore core_;
  int64_t response_piece_bytes_;
  std::atomic<int> inflight_{0};

  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<SequenceState>> sequences_;  // Guarded by mu_.
  uint64_t created_ = 0;                                                       // Guarded by mu_.

  // Declared last: destroyed first, running what is queued while the rest still exists.
  std::unique_ptr<Executor> executor_;
};

// The router as a running server: the service, health and reflection.
class RouterServer {
 public:
  static absl::StatusOr<std::unique_ptr<RouterServer>> Start(const RouterOptions& options);
  ~RouterServer();

  int port() const { return port_; }
  // Readiness goes NOT_SERVING, calls in flight get up to `drain` to finish (then they are
  // cancelled), and the server stops. Idempotent.
  void Shutdown(std::chrono::milliseconds drain = std::chrono::seconds(30));
  // Blocks until Shutdown has ended.
  void Wait();
  // Valid until Shutdown.
  RouterService& service() { return *service_; }

 private:
  RouterServer() = default;

  std::unique_ptr<RouterService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::mutex mu_;
  bool shut_down_ = false;  // Guarded by mu_: Shutdown has begun.
  bool stopped_ = false;    // Guarded by mu_: Shutdown has ended.
  std::condition_variable stopped_cv_;
};

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_ROUTER_H_
