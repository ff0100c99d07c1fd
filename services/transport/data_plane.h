// The NCCL data plane's control side: a worker's communicators (JoinCommunicator,
// LeaveCommunicator, Stats), and the router's communicator with each worker, set up with the
// NCCL unique id carried over the Worker gRPC service, and the choice of transport per sequence.
#ifndef DHSA_SERVICES_TRANSPORT_DATA_PLANE_H_
#define DHSA_SERVICES_TRANSPORT_DATA_PLANE_H_

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "dhsa/v1/worker.grpc.pb.h"
#include "services/transport/nccl_communicator.h"
#include "services/transport/nccl_link.h"
#include "services/transport/options.h"

namespace dhsa::transport {

// A worker's side. Joins and leaves run on threads of their own (they wait on the other ranks for
// up to the set-up timeout), never on a gRPC thread.
class WorkerDataPlane {
 public:
  explicit WorkerDataPlane(DataPlaneOptions options);
  // Waits for joins and leaves in flight (each bounded), then ends every communicator.
  ~WorkerDataPlane();
  WorkerDataPlane(const WorkerDataPlane&) = delete;
  WorkerDataPlane& operator=(const WorkerDataPlane&) = delete;

  using JoinDone = std::function<void(absl::StatusOr<v1::CommunicatorInfo>)>;
  // JoinCommunicator: `done` is called once, from the join's thread.
  void JoinAsync(const v1::JoinCommunicatorRequest& request, JoinDone done);
  // LeaveCommunicator: `done(found)` from the leave's thread.
  void LeaveAsync(const v1::LeaveCommunicatorRequest& request, std::function<void(bool)> done);
  // Stats: every communicator (failed and left ones too) and the data plane's device.
  void FillStats(v1::StatsResponse* response) const;
  // A ready or failed communicator by id (null if unknown).
  std::shared_ptr<NcclCommunicator> Find(const std::string& id) const;
  // The transfer link of communicator `id` (made at its first use; null if unknown). A link whose
  // communicator failed is returned too: its transfers fail at once with UNAVAILABLE.
  std::shared_ptr<NcclLink> Link(const std::string& id);

 private:
  absl::StatusOr<v1::CommunicatorInfo> Join(const v1::JoinCommunicatorRequest& request);
  void Spawn(std::function<void()> work);

  const DataPlaneOptions options_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<NcclCommunicator>> comms_;  // Guarded by mu_.
  std::map<std::string, std::shared_ptr<NcclLink>> links_;          // Guarded by mu_.
  std::vector<std::string> joining_;                                // Guarded by mu_.
  std::vector<std::thread> threads_;                                // Guarded by mu_.
};

// The first of `candidates` (device ordinals with their PCI bus ids) that is not on
// `worker_bus_id`; NotFound if every candidate is (a communicator cannot hold two ranks of one
// device), InvalidArgument for no candidates.
absl::StatusOr<int> PickRouterDevice(const std::vector<std::pair<int, std::string>>& candidates,
                                     const std::string& worker_bus_id);

// The router's side: one 2-rank communicator per worker (router rank 0, worker rank 1).
class RouterDataPlane {
 public:
  // `name` makes communicator ids unique ("router-<host>-<pid>").
  RouterDataPlane(DataPlaneOptions options, std::string name);

  // Sets up the communicator with worker `worker` (index in the router's pool) at `address`:
  // Stats for the worker's device, a router device on another bus, ncclGetUniqueId, then
  // JoinCommunicator on the worker and ncclCommInitRank here at the same time. Bounded by the
  // set-up timeout; on failure nothing is kept (the worker is told to abort) and that worker's
  // sequences use gRPC (Mode kAuto). A communicator the worker already had is replaced.
  absl::Status Connect(int worker, const std::string& address, v1::Worker::Stub* stub);
  // The worker failed or left: its communicator is aborted now (transfers in flight and waiting
  // fail with UNAVAILABLE) and forgotten; a later Connect makes a new one.
  void WorkerLost(int worker, const std::string& why);
  // The transport of a sequence stored on `workers` (see ChooseTransport).
  absl::StatusOr<TransportChoice> Choose(const std::vector<int>& workers) const;
  std::shared_ptr<NcclCommunicator> Communicator(int worker) const;
  std::vector<v1::CommunicatorInfo> Infos() const;
  const DataPlaneOptions& options() const { return options_; }

 private:
  const DataPlaneOptions options_;
  const std::string name_;
  mutable std::mutex mu_;
  std::map<int, std::shared_ptr<NcclCommunicator>> comms_;  // Guarded by mu_.
  std::map<int, std::string> addresses_;                    // Guarded by mu_.
  int generation_ = 0;                                      // Guarded by mu_.
};

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_DATA_PLANE_H_
