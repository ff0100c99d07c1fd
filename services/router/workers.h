// The router's view of its workers: one channel and stub each, whether each is reachable, its
// capacity (from the worker's Stats) and the KV bytes the router has placed there.
//
// Workers come from a fixed list of addresses or from a "dns:///name:port" target resolved with
// getaddrinfo at start and on every probe (a Kubernetes headless Service lists one address per
// ready pod). A worker once known keeps its index for the router's life (stripes refer to it); an
// address that leaves DNS gets no new stripes. A background thread probes every worker with Stats.
#ifndef DHSA_SERVICES_ROUTER_WORKERS_H_
#define DHSA_SERVICES_ROUTER_WORKERS_H_

#include <grpcpp/client_context.h>
#include <grpcpp/security/credentials.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "dhsa/v1/worker.grpc.pb.h"
#include "services/common/status.h"
#include "services/common/tsan_annotations.h"
#include "services/router/placement.h"
#include "services/transport/data_plane.h"
#include "services/transport/nccl_link.h"
#include "services/transport/options.h"
#include "services/transport/shm_link.h"

namespace dhsa::router {

struct WorkerPoolOptions {
  std::vector<std::string> addresses;  // "host:port" targets; or empty and:
  std::string dns_target;              // "dns:///name:port", resolved to every address.
  int64_t max_message_bytes = 4 << 20;
  std::chrono::milliseconds probe_interval{2000};  // Stats probe and DNS refresh period.
  std::chrono::milliseconds probe_timeout{1000};   // Deadline of one probe.
  // Credentials of the channels to the workers (TLS, mutual TLS, token); null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string ssl_target_name;  // Name the workers' certificates carry (empty: their host).
  // The data plane (ServiceConfig.data_plane): unless its mode is kGrpc, a worker that answers a
  // probe gets a shared-memory link (transport/shm_link.h) when it runs on this host.
  transport::DataPlaneOptions data_plane;
};

// Resolves "dns:///name:port" (or "dns:name:port") to "ip:port" strings ("[ip6]:port"), sorted.
absl::StatusOr<std::vector<std::string>> ResolveDnsTarget(const std::string& target);

// Unary calls on a pool's channels that no caller waits for: Drop, Truncate, DetachArena,
// LeaveCommunicator. The pool keeps its channels until each of them has ended, because gRPC (1.51)
// aborts the process ("ref_counted.h:183 assertion failed: prior > 0", in grpc_cq_internal_unref)
// when a channel is destroyed while a callback call started on it is still pending: ~WorkerPool
// Closes them first.
class BackgroundCalls {
 public:
  BackgroundCalls() = default;
  BackgroundCalls(const BackgroundCalls&) = delete;
  BackgroundCalls& operator=(const BackgroundCalls&) = delete;

  // Starts one call: `start(context, request, response, callback)` must start it on a stub, e.g.
  // stub->async()->Drop(context, request, response, std::move(callback)). `done` runs once, on a
  // gRPC thread (or on this one, with CANCELLED and nothing sent, once Close has begun).
  template <typename Response, typename Request, typename StartFn>
  void Start(Request request, std::chrono::system_clock::time_point deadline, StartFn start,
             std::function<void(absl::Status, const Response&)> done);

  // Refuses new calls, gives those pending up to `grace` to end, cancels the rest, and returns once
  // every one has ended (its `done` has returned and its context is freed).
  void Close(std::chrono::milliseconds grace);
  // Calls started and not yet ended.
  int pending() const;

 private:
  bool Add(std::shared_ptr<grpc::ClientContext> context);
  void Remove(const grpc::ClientContext* context);
  void End();

  mutable std::mutex mu_;
  std::condition_variable ended_;
  // The contexts of the pending calls (Close cancels them); guarded by mu_.
  std::map<const grpc::ClientContext*, std::shared_ptr<grpc::ClientContext>> contexts_;
  int pending_ = 0;      // Guarded by mu_.
  bool closed_ = false;  // Guarded by mu_.
};

template <typename Response, typename Request, typename StartFn>
void BackgroundCalls::Start(Request request, std::chrono::system_clock::time_point deadline,
                            StartFn start,
                            std::function<void(absl::Status, const Response&)> done) {
  struct State {
    grpc::ClientContext context;
    Request request;
    Response response;
  };
  auto state = std::make_shared<State>();
  state->request = std::move(request);
  state->context.set_deadline(deadline);
  if (!Add(std::shared_ptr<grpc::ClientContext>(state, &state->context))) {
    done(absl::CancelledError("the router is closing: the call to the worker was not made"),
         state->response);
    return;
  }
  DHSA_HAPPENS_BEFORE(state.get());
  start(&state->context, &state->request, &state->response,
        [this, state, done = std::move(done)](grpc::Status s) mutable {
          DHSA_HAPPENS_AFTER(state.get());
          Remove(&state->context);
          done(FromGrpcStatus(s), state->response);
          done = nullptr;
          state.reset();  // The context goes while the channel is still there.
          End();
        });
}

class WorkerPool {
 public:
  // Connects to the workers and probes them once (unreachable workers are not an error: readiness
  // reports them). InvalidArgument for no workers or a malformed DNS target.
  static absl::StatusOr<std::unique_ptr<WorkerPool>> Create(const WorkerPoolOptions& options);
  ~WorkerPool();

  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  int size() const;
  v1::Worker::Stub* stub(int worker) const;
  std::string address(int worker) const;

  // Plans and reserves room for new keys (placement.h); Unreserve gives bytes back.
  absl::StatusOr<std::vector<StorePiece>> Place(const std::vector<Stripe>& stripes,
                                                const PlaceRequest& request,
                                                const PlacementPolicy& policy);
  void Unreserve(int worker, int64_t bytes);
  std::vector<WorkerLoad> Loads() const;

  // The pool's background calls (worker_calls.h starts Drop and Truncate there).
  BackgroundCalls& background_calls() { return background_; }

  // A call to `worker` failed with `status`: UNAVAILABLE marks it unreachable until a probe
  // succeeds again.
  void ReportCallStatus(int worker, const absl::Status& status);

  // Whether at least one worker is reachable.
  bool AnyAvailable() const;
  // Called (from the probe thread or a reporting thread) whenever AnyAvailable() changes.
  void SetAvailabilityListener(std::function<void(bool)> listener);

  // Re-resolves DNS and probes every worker now, waiting for the answers; connects the
  // shared-memory data plane of workers that answer and lack it (or lost it: restarted).
  void ProbeNow();

  // The shared-memory link with `worker`, or null (other host, mode grpc, worker down).
  std::shared_ptr<transport::ShmLink> ShmLinkOf(int worker) const;
  // The NCCL link with `worker` (a communicator the router shares with it), or null (no GPU here or
  // there, build without NCCL, mode grpc or shm, worker down, link dropped after a failure).
  std::shared_ptr<transport::NcclLink> NcclLinkOf(int worker) const;
  // A transfer or a call that moved tensors over NCCL failed: the link is aborted and dropped (the
  // worker is told to abort its rank), so the next calls use shared memory or gRPC bytes until a
  // probe connects a new communicator.
  // `link` is the one the call used (a newer link is kept).
  void ReportNcclFailure(int worker, const transport::NcclLink* link, const absl::Status& status);
  // The transport of a call on `workers` (transport::ChooseTransport; logs nothing).
  absl::StatusOr<transport::TransportChoice> ChooseTransport(const std::vector<int>& workers) const;
  const transport::DataPlaneOptions& data_plane() const { return options_.data_plane; }

 private:
  struct Worker {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::Worker::Stub> stub;
    bool listed = true;  // Still in the DNS answer (always true for a fixed list).
    std::shared_ptr<transport::ShmLink> shm;  // Shared-memory data plane, when connected.
    // The worker could not map our arenas (another host): not retried until it is lost and back.
    bool shm_unsupported = false;
    int shm_generation = 0;
    std::shared_ptr<transport::NcclLink> nccl;  // NCCL data plane, when connected.
    bool nccl_unsupported = false;  // The worker has no NCCL device: not retried until lost.
  };

  explicit WorkerPool(const WorkerPoolOptions& options);
  void AddWorkerLocked(const std::string& address);
  void RefreshDnsLocked();
  void ProbeLoop();
  void NotifyIfChanged();
  // Drops the shared-memory link of `worker` (logs why); mu_ held.
  void DropShmLocked(int worker, const std::string& why);
  // Tells the worker to unmap the arenas of `link` (best effort: a worker that is gone has unmapped
  // them already); the router's own mappings go when the last region is freed. mu_ held.
  void DetachShmLocked(Worker& w, const transport::ShmLink& link);
  // Drops the NCCL link of `worker` (logs why; the worker is told to abort its rank); mu_ held.
  // AbortDroppedLinks, called without mu_, then aborts it.
  void DropNcclLocked(int worker, const std::string& why);
  void AbortDroppedLinks();
  // Sets up communicators with the workers in `connect` (ProbeNow; connect_mu_ held).
  void ConnectNccl(const std::vector<size_t>& connect);

  const WorkerPoolOptions options_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Worker>> workers_;  // Guarded by mu_; never shrinks.
  std::vector<WorkerLoad> loads_;                 // Guarded by mu_.
  std::function<void(bool)> listener_;            // Guarded by mu_.
  // Links dropped under mu_, aborted by AbortDroppedLinks. Guarded by mu_.
  std::vector<std::pair<std::shared_ptr<transport::NcclLink>, std::string>> dropped_;
  bool last_any_available_ = false;  // Guarded by mu_.
  bool stopping_ = false;            // Guarded by mu_.
  std::condition_variable cv_;
  std::mutex connect_mu_;   // One ProbeNow connects at a time.
  const std::string name_;  // "router-<pid>": prefix of arena ids.
  // Communicators with GPU workers (NCCL builds, mode auto or nccl); null otherwise.
  std::unique_ptr<transport::RouterDataPlane> nccl_;
  std::thread prober_;
  BackgroundCalls background_;  // Closed by ~WorkerPool before workers_ (the channels) go.
};

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_WORKERS_H_
