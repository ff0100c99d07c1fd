#include "services/transport/data_plane.h"

#include <grpcpp/client_context.h>

#include <algorithm>
#include <condition_variable>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "services/common/status.h"

namespace dhsa::transport {

WorkerDataPlane::WorkerDataPlane(DataPlaneOptions options) : options_(std::move(options)) {}

WorkerDataPlane::~WorkerDataPlane() {
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    threads.swap(threads_);
  }
  for (std::thread& t : threads) t.join();
  std::lock_guard<std::mutex> lock(mu_);
  links_.clear();  // Their queues end first (each holds its communicator).
  comms_.clear();  // Each ends itself (bounded finalize, else abort).
}

void WorkerDataPlane::Spawn(std::function<void()> work) {
  std::lock_guard<std::mutex> lock(mu_);
  threads_.emplace_back(std::move(work));
}

void WorkerDataPlane::JoinAsync(const v1::JoinCommunicatorRequest& request, JoinDone done) {
  Spawn([this, request, done = std::move(done)] { done(Join(request)); });
}

absl::StatusOr<v1::CommunicatorInfo> WorkerDataPlane::Join(
    const v1::JoinCommunicatorRequest& request) {
  const std::string& id = request.communicator_id();
  if (id.empty()) return absl::InvalidArgumentError("communicator_id is empty");
  if (!(request.timeout_seconds() >= 0) || request.timeout_seconds() > 3600) {
    return absl::InvalidArgumentError(
        absl::StrCat("timeout_seconds must be in [0, 3600] (0: the worker's default); got ",
                     request.timeout_seconds()));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (comms_.count(id) > 0 || std::count(joining_.begin(), joining_.end(), id) > 0) {
      return absl::AlreadyExistsError(
          absl::StrCat("this worker already holds NCCL communicator '", id, "'"));
    }
    joining_.push_back(id);
  }
  NcclCommunicator::Params p;
  p.id = id;
  p.unique_id = request.nccl_unique_id();
  p.num_ranks = request.num_ranks();
  p.rank = request.rank();
  p.device = options_.device;
  p.setup_timeout = request.timeout_seconds() > 0 ? absl::Seconds(request.timeout_seconds())
                                                  : options_.setup_timeout;
  absl::StatusOr<std::shared_ptr<NcclCommunicator>> comm = NcclCommunicator::Create(p);
  std::lock_guard<std::mutex> lock(mu_);
  joining_.erase(std::find(joining_.begin(), joining_.end(), id));
  if (!comm.ok()) return comm.status();
  comms_[id] = *comm;
  return (*comm)->Info();
}

void WorkerDataPlane::LeaveAsync(const v1::LeaveCommunicatorRequest& request,
                                 std::function<void(bool)> done) {
  std::shared_ptr<NcclCommunicator> comm = Find(request.communicator_id());
  if (comm == nullptr) {
    done(false);
    return;
  }
  std::shared_ptr<NcclLink> link;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto l = links_.find(request.communicator_id());
    if (l != links_.end()) link = l->second;
  }
  // Transfers queued on it fail now (UNAVAILABLE) instead of waiting for their peer.
  if (link != nullptr && request.abort()) link->Abort("the router aborted the communicator");
  Spawn([comm, abort = request.abort(), done = std::move(done)] {
    if (abort) {
      comm->Abort("the router aborted the communicator (LeaveCommunicator)");
    } else {
      (void)comm->Leave(absl::Seconds(10));
    }
    done(true);
  });
}

void WorkerDataPlane::FillStats(v1::StatsResponse* response) const {
  std::vector<std::shared_ptr<NcclCommunicator>> comms;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, c] : comms_) comms.push_back(c);
  }
  for (const auto& c : comms) *response->add_communicators() = c->Info();
  std::sort(response->mutable_communicators()->begin(), response->mutable_communicators()->end(),
            [](const v1::CommunicatorInfo& a, const v1::CommunicatorInfo& b) {
              return a.created_unix_micros() < b.created_unix_micros();
            });
  if (NcclBuilt()) {
    absl::StatusOr<std::string> bus = CudaDevicePciBusId(options_.device);
    if (bus.ok()) response->set_data_plane_device_pci_bus_id(*bus);
  }
}

std::shared_ptr<NcclCommunicator> WorkerDataPlane::Find(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = comms_.find(id);
  return it == comms_.end() ? nullptr : it->second;
}

std::shared_ptr<NcclLink> WorkerDataPlane::Link(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto l = links_.find(id);
  if (l != links_.end()) return l->second;
  auto c = comms_.find(id);
  if (c == comms_.end()) return nullptr;
  auto link = std::make_shared<NcclLink>(c->second, options_.transfer_timeout);
  links_[id] = link;
  return link;
}

absl::StatusOr<int> PickRouterDevice(const std::vector<std::pair<int, std::string>>& candidates,
                                     const std::string& worker_bus_id) {
  if (candidates.empty()) {
    return absl::InvalidArgumentError("the router has no CUDA device for an NCCL rank");
  }
  for (const auto& [device, bus] : candidates) {
    if (bus != worker_bus_id) return device;
  }
  return absl::NotFoundError(
      absl::StrCat("every CUDA device the router may use is the worker's own (", worker_bus_id,
                   "); NCCL cannot hold two ranks of one device in one communicator"));
}

RouterDataPlane::RouterDataPlane(DataPlaneOptions options, std::string name)
    : options_(std::move(options)), name_(std::move(name)) {}

namespace {

// A unary call's result, waited for with a bound.
template <typename Response>
struct Pending {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  Response response;
  grpc::ClientContext context;
};

template <typename Response>
absl::Status Await(Pending<Response>& p) {
  std::unique_lock<std::mutex> lock(p.mu);
  p.cv.wait(lock, [&] { return p.done; });  // The context's deadline bounds the call.
  return FromGrpcStatus(p.status);
}

}  // namespace

absl::Status RouterDataPlane::Connect(int worker, const std::string& address,
                                      v1::Worker::Stub* stub) {
  const std::chrono::system_clock::time_point deadline =
      std::chrono::system_clock::now() + absl::ToChronoSeconds(options_.setup_timeout) +
      std::chrono::seconds(5);
  // The worker's device.
  auto stats = std::make_shared<Pending<v1::StatsResponse>>();
  stats->context.set_deadline(deadline);
  v1::StatsRequest stats_request;
  stub->async()->Stats(&stats->context, &stats_request, &stats->response, [stats](grpc::Status s) {
    std::lock_guard<std::mutex> lock(stats->mu);
    stats->status = std::move(s);
    stats->done = true;
    stats->cv.notify_all();
  });
  absl::Status s = Await(*stats);
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrCat("Stats of worker ", address, ": ", s.message()));
  }
  const std::string& worker_bus = stats->response.data_plane_device_pci_bus_id();
  if (worker_bus.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", address,
                     " has no NCCL data plane (built without NCCL, or no "
                     "CUDA device)"));
  }
  std::vector<std::pair<int, std::string>> candidates;
  std::vector<int> devices = options_.router_devices;
  if (devices.empty()) {
    for (int d = 0; d < VisibleCudaDevices(); ++d) devices.push_back(d);
  }
  for (int d : devices) {
    absl::StatusOr<std::string> bus = CudaDevicePciBusId(d);
    if (bus.ok()) candidates.emplace_back(d, *bus);
  }
  absl::StatusOr<int> device = PickRouterDevice(candidates, worker_bus);
  if (!device.ok()) return device.status();
  absl::StatusOr<std::string> uid = NewNcclUniqueId();
  if (!uid.ok()) return uid.status();

  std::string id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    id = absl::StrCat(name_, "/w", worker, "/", ++generation_);
  }
  auto join = std::make_shared<Pending<v1::JoinCommunicatorResponse>>();
  join->context.set_deadline(deadline);
  v1::JoinCommunicatorRequest request;
  request.set_communicator_id(id);
  request.set_nccl_unique_id(*uid);
  request.set_num_ranks(2);
  request.set_rank(1);
  request.set_timeout_seconds(absl::ToDoubleSeconds(options_.setup_timeout));
  stub->async()->JoinCommunicator(&join->context, &request, &join->response,
                                  [join](grpc::Status st) {
                                    std::lock_guard<std::mutex> lock(join->mu);
                                    join->status = std::move(st);
                                    join->done = true;
                                    join->cv.notify_all();
                                  });
  NcclCommunicator::Params p;
  p.id = id;
  p.unique_id = *uid;
  p.num_ranks = 2;
  p.rank = 0;
  p.device = *device;
  p.setup_timeout = options_.setup_timeout;
  absl::StatusOr<std::shared_ptr<NcclCommunicator>> comm = NcclCommunicator::Create(p);
  s = Await(*join);
  if (!s.ok() || !comm.ok()) {
    if (comm.ok()) (*comm)->Abort("the worker did not join");
    // Best effort: the worker aborts its rank if it made one.
    grpc::ClientContext leave_context;
    leave_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::LeaveCommunicatorRequest leave;
    leave.set_communicator_id(id);
    leave.set_abort(true);
    v1::LeaveCommunicatorResponse left;
    (void)stub->LeaveCommunicator(&leave_context, leave, &left);
    const absl::Status& why = !s.ok() ? s : comm.status();
    return absl::UnavailableError(absl::StrCat("NCCL communicator '", id, "' with worker ", address,
                                               " (router device ", *device, ", worker ", worker_bus,
                                               "): ", why.message()));
  }
  std::shared_ptr<NcclCommunicator> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    old = std::move(comms_[worker]);
    comms_[worker] = *comm;
    addresses_[worker] = address;
  }
  if (old != nullptr) old->Abort("replaced by a new communicator");
  return absl::OkStatus();
}

void RouterDataPlane::WorkerLost(int worker, const std::string& why) {
  std::shared_ptr<NcclCommunicator> comm;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = comms_.find(worker);
    if (it == comms_.end()) return;
    comm = std::move(it->second);
    comms_.erase(it);
  }
  comm->Abort(why);
}

absl::StatusOr<TransportChoice> RouterDataPlane::Choose(const std::vector<int>& workers) const {
  std::vector<PeerState> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int w : workers) {
      PeerState p;
      auto a = addresses_.find(w);
      p.address = a != addresses_.end() ? a->second : absl::StrCat("#", w);
      auto c = comms_.find(w);
      p.communicator_ready = c != comms_.end() && c->second->ready();
      peers.push_back(std::move(p));
    }
  }
  return ChooseTransport(options_.mode, NcclBuilt(), peers);
}

std::shared_ptr<NcclCommunicator> RouterDataPlane::Communicator(int worker) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = comms_.find(worker);
  return it == comms_.end() ? nullptr : it->second;
}

std::vector<v1::CommunicatorInfo> RouterDataPlane::Infos() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<v1::CommunicatorInfo> out;
  for (const auto& [w, c] : comms_) out.push_back(c->Info());
  return out;
}

}  // namespace dhsa::transport
