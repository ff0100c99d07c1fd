#include "services/router/workers.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "services/common/server.h"
#include "services/common/status.h"

namespace dhsa::router {
namespace {

// Reconnect quickly to a worker that comes back (gRPC's default backoff grows to two minutes).
constexpr int kMaxReconnectBackoffMs = 2000;

}  // namespace

absl::StatusOr<std::vector<std::string>> ResolveDnsTarget(const std::string& target) {
  std::string rest;
  if (absl::StartsWith(target, "dns:///")) {
    rest = target.substr(7);
  } else if (absl::StartsWith(target, "dns://")) {  // dns://authority/name:port: authority ignored.
    const size_t slash = target.find('/', 6);
    if (slash == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker DNS target '", target, "' is not dns:///name:port"));
    }
    rest = target.substr(slash + 1);
  } else if (absl::StartsWith(target, "dns:")) {
    rest = target.substr(4);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("worker DNS target '", target, "' must start with dns:///"));
  }
  const size_t colon = rest.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == rest.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker DNS target '", target, "' needs a name and a port: dns:///name:port"));
  }
  std::string host = rest.substr(0, colon);
  const std::string port = rest.substr(colon + 1);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve worker DNS target '", target, "': ", gai_strerror(rc)));
  }
  std::set<std::string> out;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    char text[NI_MAXHOST];
    if (getnameinfo(a->ai_addr, a->ai_addrlen, text, sizeof(text), nullptr, 0, NI_NUMERICHOST) !=
        0) {
      continue;
    }
    out.insert(a->ai_family == AF_INET6 ? absl::StrCat("[", text, "]:", port)
                                        : absl::StrCat(text, ":", port));
  }
  freeaddrinfo(found);
  return std::vector<std::string>(out.begin(), out.end());
}

WorkerPool::WorkerPool(const WorkerPoolOptions& options)
    : options_(options), name_(absl::StrCat("router-", getpid())) {
  const transport::Mode mode = options_.data_plane.mode;
  if (transport::NcclBuilt() &&
      (mode == transport::Mode::kAuto || mode == transport::Mode::kNccl) &&
      transport::VisibleCudaDevices() > 0) {
    char host[256] = {0};
    (void)gethostname(host, sizeof(host) - 1);
    nccl_ = std::make_unique<transport::RouterDataPlane>(
        options_.data_plane, absl::StrCat("router-", host, "-", getpid()));
  }
}

absl::StatusOr<std::unique_ptr<WorkerPool>> WorkerPool::Create(const WorkerPoolOptions& options) {
  if (options.addresses.empty() && options.dns_target.empty()) {
    return absl::InvalidArgumentError(
        "the router needs workers: a list of host:port addresses or a dns:///name:port target");
  }
  std::unique_ptr<WorkerPool> pool(new WorkerPool(options));
  {
    std::lock_guard<std::mutex> lock(pool->mu_);
    for (const std::string& a : options.addresses) pool->AddWorkerLocked(a);
  }
  if (options.addresses.empty()) {
    // A malformed target is a configuration error; a name that does not resolve yet is not (the
    // workers may start after the router).
    absl::StatusOr<std::vector<std::string>> resolved = ResolveDnsTarget(options.dns_target);
    if (!resolved.ok() && resolved.status().code() == absl::StatusCode::kInvalidArgument) {
      return resolved.status();
    }
  }
  pool->ProbeNow();
  pool->prober_ = std::thread([p = pool.get()] { p->ProbeLoop(); });
  return pool;
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (prober_.joinable()) prober_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < workers_.size(); ++i) {
      if (workers_[i]->nccl != nullptr) {
        DropNcclLocked(static_cast<int>(i), "the router is closing");
      }
    }
  }
  AbortDroppedLinks();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& w : workers_) {
      if (w->shm != nullptr) {
        DetachShmLocked(*w, *w->shm);
        w->shm.reset();
      }
    }
  }
  // No call may outlive the channels: the detaches just sent (and any Drop or Truncate still
  // pending) get a probe timeout to reach their workers, then the rest are cancelled.
  background_.Close(options_.probe_timeout);
}

void BackgroundCalls::Close(std::chrono::milliseconds grace) {
  std::vector<std::shared_ptr<grpc::ClientContext>> cancel;
  {
    std::unique_lock<std::mutex> lock(mu_);
    closed_ = true;
    ended_.wait_for(lock, grace, [&] { return pending_ == 0; });
    for (auto& [raw, context] : contexts_) cancel.push_back(context);
  }
  // Outside mu_: a cancelled call may report on this thread. The copies keep each context alive
  // until it has been cancelled, even when its call ends meanwhile.
  for (auto& context : cancel) context->TryCancel();
  cancel.clear();
  std::unique_lock<std::mutex> lock(mu_);
  ended_.wait(lock, [&] { return pending_ == 0; });
}

int BackgroundCalls::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_;
}

bool BackgroundCalls::Add(std::shared_ptr<grpc::ClientContext> context) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return false;
  const grpc::ClientContext* raw = context.get();
  contexts_.emplace(raw, std::move(context));
  ++pending_;
  return true;
}

void BackgroundCalls::Remove(const grpc::ClientContext* context) {
  std::shared_ptr<grpc::ClientContext> last;  // Freed outside mu_.
  std::lock_guard<std::mutex> lock(mu_);
  auto it = contexts_.find(context);
  if (it == contexts_.end()) return;
  last = std::move(it->second);
  contexts_.erase(it);
}

void BackgroundCalls::End() {
  // Notified under mu_: Close may return, and the pool go, as soon as mu_ is released.
  std::lock_guard<std::mutex> lock(mu_);
  if (--pending_ == 0) ended_.notify_all();
}

void WorkerPool::AddWorkerLocked(const std::string& address) {
  auto w = std::make_unique<Worker>();
  w->address = address;
  grpc::ChannelArguments args = ChannelArgumentsForMessageLimit(options_.max_message_bytes);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, kMaxReconnectBackoffMs);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
  if (!options_.ssl_target_name.empty()) args.SetSslTargetNameOverride(options_.ssl_target_name);
  w->channel = grpc::CreateCustomChannel(
      address,
      options_.credentials != nullptr ? options_.credentials : grpc::InsecureChannelCredentials(),
      args);
  w->stub = v1::Worker::NewStub(w->channel);
  workers_.push_back(std::move(w));
  WorkerLoad load;
  load.available = false;  // Until a probe answers.
  loads_.push_back(load);
}

void WorkerPool::RefreshDnsLocked() {
  absl::StatusOr<std::vector<std::string>> resolved = ResolveDnsTarget(options_.dns_target);
  if (!resolved.ok()) return;  // Keep the last answer: DNS hiccups must not drop workers.
  const std::set<std::string> now(resolved->begin(), resolved->end());
  for (auto& w : workers_) w->listed = now.count(w->address) > 0;
  for (const std::string& a : now) {
    const bool known = std::any_of(workers_.begin(), workers_.end(),
                                   [&](const auto& w) { return w->address == a; });
    if (!known) AddWorkerLocked(a);
  }
}

int WorkerPool::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(workers_.size());
}

v1::Worker::Stub* WorkerPool::stub(int worker) const {
  std::lock_guard<std::mutex> lock(mu_);
  return workers_[static_cast<size_t>(worker)]->stub.get();
}

std::string WorkerPool::address(int worker) const {
  std::lock_guard<std::mutex> lock(mu_);
  return workers_[static_cast<size_t>(worker)]->address;
}

absl::StatusOr<std::vector<StorePiece>> WorkerPool::Place(const std::vector<Stripe>& stripes,
                                                          const PlaceRequest& request,
                                                          const PlacementPolicy& policy) {
  std::lock_guard<std::mutex> lock(mu_);
  return PlaceAppend(stripes, request, policy, loads_);
}

void WorkerPool::Unreserve(int worker, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  loads_[static_cast<size_t>(worker)].used_bytes -= bytes;
}

std::vector<WorkerLoad> WorkerPool::Loads() const {
  std::lock_guard<std::mutex> lock(mu_);
  return loads_;
}

void WorkerPool::ReportCallStatus(int worker, const absl::Status& status) {
  if (status.code() != absl::StatusCode::kUnavailable) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    loads_[static_cast<size_t>(worker)].available = false;
    DropShmLocked(worker, std::string(status.message()));
    DropNcclLocked(worker, std::string(status.message()));
  }
  AbortDroppedLinks();
  NotifyIfChanged();
}

void WorkerPool::DropShmLocked(int worker, const std::string& why) {
  Worker& w = *workers_[static_cast<size_t>(worker)];
  w.shm_unsupported = false;  // Whoever answers at this address next gets asked again.
  if (w.shm == nullptr) return;
  // Regions of calls in flight keep the router's mappings until those calls end; the worker's
  // mappings went with it (or go with the detach).
  DetachShmLocked(w, *w.shm);
  w.shm.reset();
  std::cerr << "dhsa-router: worker " << w.address
            << ": shared-memory data plane dropped (gRPC bytes until it is back): " << why
            << std::endl;
}

void WorkerPool::DropNcclLocked(int worker, const std::string& why) {
  Worker& w = *workers_[static_cast<size_t>(worker)];
  w.nccl_unsupported = false;
  if (w.nccl == nullptr) return;
  std::shared_ptr<transport::NcclLink> link = std::move(w.nccl);
  w.nccl.reset();
  if (nccl_ != nullptr) nccl_->WorkerLost(worker, why);
  // The link's queued transfers fail outside mu_ (their reports may call back into the pool).
  dropped_.emplace_back(link, why);
  // Best effort: the worker aborts its rank too (its transfers waiting for us fail now).
  v1::LeaveCommunicatorRequest leave;
  leave.set_communicator_id(link->id());
  leave.set_abort(true);
  v1::Worker::Stub* stub = w.stub.get();
  background_.Start<v1::LeaveCommunicatorResponse>(
      std::move(leave), std::chrono::system_clock::now() + options_.probe_timeout,
      [stub](grpc::ClientContext* context, const v1::LeaveCommunicatorRequest* request,
             v1::LeaveCommunicatorResponse* response, std::function<void(grpc::Status)> callback) {
        stub->async()->LeaveCommunicator(context, request, response, std::move(callback));
      },
      [](absl::Status, const v1::LeaveCommunicatorResponse&) {});
  std::cerr << "dhsa-router: worker " << w.address
            << ": NCCL data plane dropped (shared memory or gRPC bytes until a probe reconnects): "
            << why << std::endl;
}

void WorkerPool::DetachShmLocked(Worker& w, const transport::ShmLink& link) {
  v1::Worker::Stub* stub = w.stub.get();
  for (const std::shared_ptr<transport::ShmArena>* arena : {&link.r2w_ptr(), &link.w2r_ptr()}) {
    if (*arena == nullptr) continue;
    v1::DetachArenaRequest request;
    request.set_arena_id((*arena)->id());
    background_.Start<v1::DetachArenaResponse>(
        std::move(request), std::chrono::system_clock::now() + options_.probe_timeout,
        [stub](grpc::ClientContext* context, const v1::DetachArenaRequest* request,
               v1::DetachArenaResponse* response, std::function<void(grpc::Status)> callback) {
          stub->async()->DetachArena(context, request, response, std::move(callback));
        },
        [](absl::Status, const v1::DetachArenaResponse&) {});
  }
}

std::shared_ptr<transport::NcclLink> WorkerPool::NcclLinkOf(int worker) const {
  std::lock_guard<std::mutex> lock(mu_);
  return workers_[static_cast<size_t>(worker)]->nccl;
}

void WorkerPool::ReportNcclFailure(int worker, const transport::NcclLink* link,
                                   const absl::Status& status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Only the link the call used: a failure reported late must not drop a newer one.
    if (workers_[static_cast<size_t>(worker)]->nccl.get() == link) {
      DropNcclLocked(worker, absl::StrCat("a call over NCCL failed: ", status.message()));
    }
  }
  AbortDroppedLinks();
}

void WorkerPool::AbortDroppedLinks() {
  std::vector<std::pair<std::shared_ptr<transport::NcclLink>, std::string>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dropped.swap(dropped_);
  }
  for (auto& [link, why] : dropped) link->Abort(why);
}

std::shared_ptr<transport::ShmLink> WorkerPool::ShmLinkOf(int worker) const {
  std::lock_guard<std::mutex> lock(mu_);
  return workers_[static_cast<size_t>(worker)]->shm;
}

absl::StatusOr<transport::TransportChoice> WorkerPool::ChooseTransport(
    const std::vector<int>& workers) const {
  std::vector<transport::PeerState> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int w : workers) {
      transport::PeerState p;
      p.address = workers_[static_cast<size_t>(w)]->address;
      p.shm_ready = workers_[static_cast<size_t>(w)]->shm != nullptr;
      const auto& nccl = workers_[static_cast<size_t>(w)]->nccl;
      p.communicator_ready = nccl != nullptr && nccl->ok();
      peers.push_back(std::move(p));
    }
  }
  return transport::ChooseTransport(options_.data_plane.mode, transport::NcclBuilt(), peers);
}

bool WorkerPool::AnyAvailable() const {
  std::lock_guard<std::mutex> lock(mu_);
  return std::any_of(loads_.begin(), loads_.end(), [](const WorkerLoad& l) { return l.available; });
}

void WorkerPool::SetAvailabilityListener(std::function<void(bool)> listener) {
  bool any;
  {
    std::lock_guard<std::mutex> lock(mu_);
    listener_ = std::move(listener);
    any = last_any_available_ =
        std::any_of(loads_.begin(), loads_.end(), [](const WorkerLoad& l) { return l.available; });
  }
  if (listener_) listener_(any);
}

void WorkerPool::NotifyIfChanged() {
  std::function<void(bool)> listener;
  bool any;
  {
    std::lock_guard<std::mutex> lock(mu_);
    any =
        std::any_of(loads_.begin(), loads_.end(), [](const WorkerLoad& l) { return l.available; });
    if (any == last_any_available_) return;
    last_any_available_ = any;
    listener = listener_;
  }
  if (listener) listener(any);
}

void WorkerPool::ProbeNow() {
  struct Probe {
    grpc::ClientContext context;
    v1::StatsRequest request;
    v1::StatsResponse response;
    grpc::Status status;
  };
  std::vector<std::unique_ptr<Probe>> probes;
  std::vector<v1::Worker::Stub*> stubs;
  std::vector<bool> listed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (options_.addresses.empty()) RefreshDnsLocked();
    for (const auto& w : workers_) {
      stubs.push_back(w->stub.get());
      listed.push_back(w->listed);
    }
  }
  std::mutex done_mu;
  std::condition_variable done_cv;
  size_t remaining = stubs.size();
  for (v1::Worker::Stub* stub : stubs) {
    probes.push_back(std::make_unique<Probe>());
    Probe* p = probes.back().get();
    p->context.set_deadline(std::chrono::system_clock::now() + options_.probe_timeout);
    DHSA_HAPPENS_BEFORE(p);
    stub->async()->Stats(&p->context, &p->request, &p->response, [&, p](grpc::Status s) {
      DHSA_HAPPENS_AFTER(p);
      std::lock_guard<std::mutex> lock(done_mu);
      p->status = std::move(s);
      if (--remaining == 0) done_cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(done_mu);
    done_cv.wait(lock, [&] { return remaining == 0; });
  }
  std::vector<size_t> connect;       // Workers that answered and need a shared-memory link.
  std::vector<size_t> connect_nccl;  // Workers that answered and need a communicator.
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < probes.size(); ++i) {
      WorkerLoad& load = loads_[i];
      load.available = probes[i]->status.ok() && listed[i];
      if (probes[i]->status.ok()) load.capacity_bytes = probes[i]->response.capacity_bytes();
      if (options_.data_plane.mode == transport::Mode::kGrpc) continue;
      Worker& w = *workers_[i];
      if (nccl_ != nullptr) {
        if (!probes[i]->status.ok()) {
          DropNcclLocked(static_cast<int>(i), probes[i]->status.error_message());
        } else {
          if (w.nccl != nullptr) {
            // A worker that restarted (or failed the communicator) no longer holds it ready.
            const auto& comms = probes[i]->response.communicators();
            const bool held =
                std::any_of(comms.begin(), comms.end(), [&](const v1::CommunicatorInfo& c) {
                  return c.communicator_id() == w.nccl->id() && c.state() == "ready";
                });
            if (!held) {
              DropNcclLocked(static_cast<int>(i), "the worker no longer holds the communicator");
            } else if (!w.nccl->ok()) {
              DropNcclLocked(static_cast<int>(i), "a transfer failed");
            }
          }
          if (!probes[i]->response.data_plane_device_pci_bus_id().empty() && w.nccl == nullptr &&
              !w.nccl_unsupported && listed[i]) {
            connect_nccl.push_back(i);
          }
        }
      }
      if (!probes[i]->status.ok()) {
        DropShmLocked(static_cast<int>(i), probes[i]->status.error_message());
        continue;
      }
      if (w.shm != nullptr) {
        // A worker that restarted at the same address no longer holds our arenas.
        const auto& arenas = probes[i]->response.arenas();
        const bool held = std::any_of(arenas.begin(), arenas.end(), [&](const v1::ArenaInfo& a) {
          return a.arena_id() == w.shm->r2w().id();
        });
        if (!held) DropShmLocked(static_cast<int>(i), "the worker no longer holds its arenas");
      }
      if (w.shm == nullptr && !w.shm_unsupported && listed[i]) connect.push_back(i);
    }
  }
  AbortDroppedLinks();
  NotifyIfChanged();
  if (connect.empty() && connect_nccl.empty()) return;
  std::lock_guard<std::mutex> connecting(connect_mu_);
  ConnectNccl(connect_nccl);
  for (size_t i : connect) {
    v1::Worker::Stub* stub;
    int generation;
    std::string address;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (workers_[i]->shm != nullptr) continue;  // Another ProbeNow got there first.
      stub = workers_[i]->stub.get();
      generation = ++workers_[i]->shm_generation;
      address = workers_[i]->address;
    }
    absl::StatusOr<std::shared_ptr<transport::ShmLink>> link =
        transport::ShmLink::Connect(stub, name_, static_cast<int>(i), generation,
                                    options_.data_plane.shm_arena_bytes, options_.probe_timeout);
    std::lock_guard<std::mutex> lock(mu_);
    Worker& w = *workers_[i];
    if (link.ok()) {
      w.shm = *std::move(link);
      std::cerr << "dhsa-router: worker " << address
                << ": shared-memory data plane up (2 arenas of "
                << options_.data_plane.shm_arena_bytes << " bytes)" << std::endl;
    } else {
      // Another host (or an older worker without AttachArena): gRPC bytes from now on.
      w.shm_unsupported = link.status().code() == absl::StatusCode::kFailedPrecondition ||
                          link.status().code() == absl::StatusCode::kUnimplemented;
      std::cerr << "dhsa-router: worker " << address
                << ": no shared-memory data plane, gRPC bytes: " << link.status().message()
                << std::endl;
    }
  }
}

void WorkerPool::ConnectNccl(const std::vector<size_t>& connect) {
  for (size_t i : connect) {
    v1::Worker::Stub* stub;
    std::string address;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (workers_[i]->nccl != nullptr) continue;
      stub = workers_[i]->stub.get();
      address = workers_[i]->address;
    }
    const absl::Status s = nccl_->Connect(static_cast<int>(i), address, stub);
    std::shared_ptr<transport::NcclCommunicator> comm =
        s.ok() ? nccl_->Communicator(static_cast<int>(i)) : nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    if (comm != nullptr) {
      workers_[i]->nccl =
          std::make_shared<transport::NcclLink>(comm, options_.data_plane.transfer_timeout);
      std::cerr << "dhsa-router: worker " << address << ": NCCL data plane up (communicator '"
                << comm->id() << "', router device " << comm->device() << ")" << std::endl;
    } else {
      // No device for a router rank: not retried until the worker is lost and back.
      workers_[i]->nccl_unsupported = s.code() == absl::StatusCode::kFailedPrecondition ||
                                      s.code() == absl::StatusCode::kNotFound ||
                                      s.code() == absl::StatusCode::kUnimplemented;
      std::cerr << "dhsa-router: worker " << address
                << ": no NCCL data plane: " << (s.ok() ? "no communicator" : s.message())
                << std::endl;
    }
  }
}

void WorkerPool::ProbeLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, options_.probe_interval, [&] { return stopping_; });
    if (stopping_) break;
    lock.unlock();
    ProbeNow();
    lock.lock();
  }
}

}  // namespace dhsa::router
