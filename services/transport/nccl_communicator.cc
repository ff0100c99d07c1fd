#include "services/transport/nccl_communicator.h"

#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "services/transport/nccl_status.h"

#ifdef DHSA_TRANSPORT_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

static_assert(ncclSuccess == 0 && ncclUnhandledCudaError == 1 && ncclSystemError == 2 &&
                  ncclInternalError == 3 && ncclInvalidArgument == 4 && ncclInvalidUsage == 5 &&
                  ncclRemoteError == 6 && ncclInProgress == 7,
              "NcclCode (nccl_status.h) no longer mirrors ncclResult_t");
#endif

namespace dhsa::transport {

#ifdef DHSA_TRANSPORT_WITH_NCCL

struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;  // Null once aborted or destroyed.
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;
  void* staging = nullptr;  // Device buffer for host transfers.
  int64_t staging_bytes = 0;
};

namespace {

absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat(what, ": CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

absl::Status NcclStatus(ncclResult_t r, absl::string_view what, ncclComm_t comm) {
  return StatusFromNcclCode(static_cast<int>(r), what,
                            comm != nullptr ? ncclGetLastError(comm) : "");
}

// Spins briefly, then sleeps 50 us a round: transfers of a few MB finish within the spin.
void Pause(int* rounds) {
  if (++*rounds < 2000) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// Polls until the communicator has no operation in progress and `done` says the work finished;
// bounded by `deadline`; `abort` ends it early.
absl::Status Poll(ncclComm_t comm, absl::Time deadline, double timeout_seconds,
                  const std::atomic<bool>& abort, absl::string_view what,
                  const std::function<absl::StatusOr<bool>()>& done) {
  int rounds = 0;
  while (true) {
    ncclResult_t async = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &async);
    if (r != ncclSuccess) return NcclStatus(r, what, comm);
    if (async != ncclSuccess && async != ncclInProgress) return NcclStatus(async, what, comm);
    if (async == ncclSuccess) {
      absl::StatusOr<bool> finished = done();
      if (!finished.ok()) return finished.status();
      if (*finished) return absl::OkStatus();
    }
    if (abort.load()) {
      return absl::UnavailableError(absl::StrCat(what, " ended: the communicator is aborted"));
    }
    if (absl::Now() >= deadline) return NcclTimeoutStatus(what, timeout_seconds);
    Pause(&rounds);
  }
}

absl::StatusOr<bool> Always() { return true; }

}  // namespace

absl::StatusOr<std::string> NewNcclUniqueId() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return NcclStatus(r, "ncclGetUniqueId", nullptr);
  return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

int VisibleCudaDevices() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

absl::StatusOr<std::string> CudaDevicePciBusId(int device) {
  char bus[32] = {0};
  absl::Status s = CudaStatus(cudaDeviceGetPCIBusId(bus, sizeof(bus), device),
                              absl::StrCat("cudaDeviceGetPCIBusId(", device, ")"));
  if (!s.ok()) return s;
  return std::string(bus);
}

NcclCommunicator::NcclCommunicator(const Params& params)
    : params_(params), impl_(std::make_unique<Impl>()) {
  created_unix_micros_ = absl::ToUnixMicros(absl::Now());
}

absl::StatusOr<std::shared_ptr<NcclCommunicator>> NcclCommunicator::Create(const Params& params) {
  if (params.id.empty()) return absl::InvalidArgumentError("communicator_id is empty");
  if (params.num_ranks < 2 || params.rank < 0 || params.rank >= params.num_ranks) {
    return absl::InvalidArgumentError(absl::StrCat("communicator '", params.id, "': rank ",
                                                   params.rank, " of ", params.num_ranks,
                                                   " ranks; need num_ranks >= 2 and 0 <= rank < "
                                                   "num_ranks"));
  }
  if (params.unique_id.size() != NCCL_UNIQUE_ID_BYTES) {
    return absl::InvalidArgumentError(absl::StrCat(
        "communicator '", params.id, "': the NCCL unique id has ", params.unique_id.size(),
        " bytes; ncclGetUniqueId gives ", NCCL_UNIQUE_ID_BYTES));
  }
  const int devices = VisibleCudaDevices();
  if (params.device < 0 || params.device >= devices) {
    return absl::FailedPreconditionError(
        absl::StrCat("communicator '", params.id, "': CUDA device ", params.device,
                     " does not exist here (", devices, " visible)"));
  }
  std::shared_ptr<NcclCommunicator> c(new NcclCommunicator(params));
  Impl& impl = *c->impl_;
  const std::string what =
      absl::StrCat("joining NCCL communicator '", params.id, "' as rank ", params.rank, " of ",
                   params.num_ranks, " on device ", params.device);
  absl::Status s = CudaStatus(cudaSetDevice(params.device), what);
  if (s.ok()) s = CudaStatus(cudaStreamCreateWithFlags(&impl.stream, cudaStreamNonBlocking), what);
  if (s.ok()) s = CudaStatus(cudaEventCreateWithFlags(&impl.done, cudaEventDisableTiming), what);
  if (!s.ok()) return s;
  absl::StatusOr<std::string> bus = CudaDevicePciBusId(params.device);
  if (bus.ok()) c->pci_bus_id_ = *bus;

  ncclUniqueId uid;
  std::memcpy(uid.internal, params.unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // Every wait below is ours, and bounded.
  const double timeout = absl::ToDoubleSeconds(params.setup_timeout);
  const absl::Time deadline = absl::Now() + params.setup_timeout;
  ncclResult_t r = ncclCommInitRankConfig(&impl.comm, params.num_ranks, uid, params.rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    s = NcclStatus(r, what, impl.comm);
  } else if (impl.comm == nullptr) {
    s = absl::InternalError(absl::StrCat(what, ": ncclCommInitRankConfig gave no communicator"));
  } else {
    s = Poll(impl.comm, deadline, timeout, c->abort_requested_, what, Always);
  }
  std::lock_guard<std::mutex> lock(c->mu_);
  if (!s.ok()) {
    c->AbortLocked(s);
    return s;
  }
  c->state_ = State::kReady;
  return c;
}

NcclCommunicator::~NcclCommunicator() {
  bool ready;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ready = state_ == State::kReady && !busy_;
  }
  if (ready) (void)Leave(absl::Seconds(10));
  {
    std::lock_guard<std::mutex> lock(mu_);
    AbortLocked(absl::UnavailableError("communicator destroyed"));
  }
  (void)cudaSetDevice(params_.device);
  if (impl_->staging != nullptr) (void)cudaFree(impl_->staging);
  if (impl_->done != nullptr) (void)cudaEventDestroy(impl_->done);
  if (impl_->stream != nullptr) (void)cudaStreamDestroy(impl_->stream);
}

void NcclCommunicator::AbortLocked(const absl::Status& why) {
  if (impl_->comm != nullptr) {
    (void)cudaSetDevice(params_.device);
    (void)ncclCommAbort(impl_->comm);
    impl_->comm = nullptr;
  }
  if (state_ != State::kLeft && state_ != State::kFailed) {
    state_ = State::kFailed;
    error_ = why;
  }
  turn_cv_.notify_all();
}

void NcclCommunicator::Abort(const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  abort_why_ = why;
  abort_requested_.store(true);
  // A turn holder inside NCCL sees abort_requested_ at its next poll and aborts on its way out.
  if (!busy_) AbortLocked(absl::UnavailableError(why));
}

absl::Status NcclCommunicator::Leave(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  ncclComm_t comm;
  {
    std::unique_lock<std::mutex> lock(mu_);
    turn_cv_.wait_until(lock, absl::ToChronoTime(deadline), [&] { return !busy_; });
    if (state_ != State::kReady) {
      AbortLocked(absl::UnavailableError("left"));
      state_ = State::kLeft;
      return absl::OkStatus();
    }
    if (busy_) {
      const absl::Status s = NcclTimeoutStatus(
          absl::StrCat("leaving communicator '", params_.id, "' (a transfer is in flight)"),
          absl::ToDoubleSeconds(timeout));
      AbortLocked(s);
      return s;
    }
    busy_ = true;
    comm = impl_->comm;
  }
  (void)cudaSetDevice(params_.device);
  const std::string what = absl::StrCat("ncclCommFinalize of '", params_.id, "'");
  ncclResult_t r = ncclCommFinalize(comm);
  absl::Status s;
  if (r != ncclSuccess && r != ncclInProgress) {
    s = NcclStatus(r, what, comm);
  } else {
    s = Poll(comm, deadline, absl::ToDoubleSeconds(timeout), abort_requested_, what, Always);
  }
  std::lock_guard<std::mutex> lock(mu_);
  busy_ = false;
  if (!s.ok()) {
    AbortLocked(s);
  } else {
    (void)ncclCommDestroy(comm);
    impl_->comm = nullptr;
    state_ = State::kLeft;
  }
  turn_cv_.notify_all();
  return s;
}

absl::Status NcclCommunicator::Turn(uint64_t transfer_id, absl::Time deadline,
                                    absl::string_view what,
                                    const std::function<absl::Status()>& op) {
  const absl::Time start = absl::Now();
  {
    std::unique_lock<std::mutex> lock(mu_);
    turn_cv_.wait_until(lock, absl::ToChronoTime(deadline), [&] {
      return state_ != State::kReady || (next_turn_ == transfer_id && !busy_);
    });
    if (state_ != State::kReady) {
      return absl::UnavailableError(absl::StrCat(what, ": NCCL communicator '", params_.id, "' is ",
                                                 StateName(state_), error_.ok() ? "" : ": ",
                                                 error_.message()));
    }
    if (transfer_id < next_turn_) {
      return absl::InternalError(absl::StrCat(what, ": transfer ", transfer_id, " of '", params_.id,
                                              "' was already issued"));
    }
    if (next_turn_ != transfer_id || busy_) {
      const absl::Status s =
          NcclTimeoutStatus(absl::StrCat(what, " (transfer ", transfer_id, ", waiting for ",
                                         next_turn_, " before it)"),
                            absl::ToDoubleSeconds(deadline - start));
      AbortLocked(s);
      return s;
    }
    busy_ = true;
  }
  const absl::Status s = op();
  std::lock_guard<std::mutex> lock(mu_);
  busy_ = false;
  if (!s.ok()) {
    AbortLocked(s);
  } else {
    ++next_turn_;
    ++transfers_;
    if (abort_requested_.load()) AbortLocked(absl::UnavailableError(abort_why_));
  }
  turn_cv_.notify_all();
  return s;
}

namespace {

struct Transfer {
  bool send = true;
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t bytes = 0;
  int peer = 0;
};

}  // namespace

// One send or receive of device memory, on the turn: enqueue, then poll the event.
static absl::Status RunTransfer(ncclComm_t comm, cudaStream_t stream, cudaEvent_t done,
                                const Transfer& t, absl::Time deadline, double timeout,
                                const std::atomic<bool>& abort, absl::string_view what) {
  if (t.bytes == 0) return absl::OkStatus();
  const ncclResult_t r =
      t.send ? ncclSend(t.src, static_cast<size_t>(t.bytes), ncclUint8, t.peer, comm, stream)
             : ncclRecv(t.dst, static_cast<size_t>(t.bytes), ncclUint8, t.peer, comm, stream);
  if (r != ncclSuccess && r != ncclInProgress) return NcclStatus(r, what, comm);
  absl::Status s = Poll(comm, deadline, timeout, abort, what, Always);  // Enqueued.
  if (!s.ok()) return s;
  s = CudaStatus(cudaEventRecord(done, stream), what);
  if (!s.ok()) return s;
  return Poll(comm, deadline, timeout, abort, what, [&]() -> absl::StatusOr<bool> {
    const cudaError_t e = cudaEventQuery(done);
    if (e == cudaErrorNotReady) return false;
    absl::Status cs = CudaStatus(e, what);
    if (!cs.ok()) return cs;
    return true;
  });
}

absl::Status NcclCommunicator::SendDevice(uint64_t transfer_id, const void* data, int64_t bytes,
                                          int peer, absl::Time deadline, absl::string_view what) {
  const double timeout = absl::ToDoubleSeconds(deadline - absl::Now());
  absl::Status s = Turn(transfer_id, deadline, what, [&] {
    (void)cudaSetDevice(params_.device);
    return RunTransfer(impl_->comm, impl_->stream, impl_->done, {true, data, nullptr, bytes, peer},
                       deadline, timeout, abort_requested_, what);
  });
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    bytes_sent_ += bytes;
  }
  return s;
}

absl::Status NcclCommunicator::RecvDevice(uint64_t transfer_id, void* data, int64_t bytes, int peer,
                                          absl::Time deadline, absl::string_view what) {
  const double timeout = absl::ToDoubleSeconds(deadline - absl::Now());
  absl::Status s = Turn(transfer_id, deadline, what, [&] {
    (void)cudaSetDevice(params_.device);
    return RunTransfer(impl_->comm, impl_->stream, impl_->done, {false, nullptr, data, bytes, peer},
                       deadline, timeout, abort_requested_, what);
  });
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    bytes_received_ += bytes;
  }
  return s;
}

// Grows the staging buffer to `bytes` (only the turn holder calls it).
static absl::Status EnsureStaging(void** staging, int64_t* have, int64_t bytes,
                                  absl::string_view what) {
  if (*have >= bytes) return absl::OkStatus();
  if (*staging != nullptr) (void)cudaFree(*staging);
  *staging = nullptr;
  *have = 0;
  absl::Status s = CudaStatus(cudaMalloc(staging, static_cast<size_t>(bytes)), what);
  if (s.ok()) *have = bytes;
  return s;
}

absl::Status NcclCommunicator::SendHost(uint64_t transfer_id, const void* data, int64_t bytes,
                                        int peer, absl::Time deadline, absl::string_view what) {
  const double timeout = absl::ToDoubleSeconds(deadline - absl::Now());
  absl::Status s = Turn(transfer_id, deadline, what, [&] {
    (void)cudaSetDevice(params_.device);
    if (bytes == 0) return absl::OkStatus();
    absl::Status st = EnsureStaging(&impl_->staging, &impl_->staging_bytes, bytes, what);
    // The stream is idle on the turn: the copy is bounded by memory bandwidth.
    if (st.ok()) {
      st = CudaStatus(cudaMemcpyAsync(impl_->staging, data, static_cast<size_t>(bytes),
                                      cudaMemcpyHostToDevice, impl_->stream),
                      what);
    }
    if (!st.ok()) return st;
    return RunTransfer(impl_->comm, impl_->stream, impl_->done,
                       {true, impl_->staging, nullptr, bytes, peer}, deadline, timeout,
                       abort_requested_, what);
  });
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    bytes_sent_ += bytes;
  }
  return s;
}

absl::Status NcclCommunicator::RecvHost(uint64_t transfer_id, void* data, int64_t bytes, int peer,
                                        absl::Time deadline, absl::string_view what) {
  const double timeout = absl::ToDoubleSeconds(deadline - absl::Now());
  absl::Status s = Turn(transfer_id, deadline, what, [&] {
    (void)cudaSetDevice(params_.device);
    if (bytes == 0) return absl::OkStatus();
    absl::Status st = EnsureStaging(&impl_->staging, &impl_->staging_bytes, bytes, what);
    if (!st.ok()) return st;
    st = RunTransfer(impl_->comm, impl_->stream, impl_->done,
                     {false, nullptr, impl_->staging, bytes, peer}, deadline, timeout,
                     abort_requested_, what);
    if (!st.ok()) return st;
    // The receive is complete: the copy waits for nothing else on the stream.
    st = CudaStatus(cudaMemcpyAsync(data, impl_->staging, static_cast<size_t>(bytes),
                                    cudaMemcpyDeviceToHost, impl_->stream),
                    what);
    if (st.ok()) st = CudaStatus(cudaStreamSynchronize(impl_->stream), what);
    return st;
  });
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    bytes_received_ += bytes;
  }
  return s;
}

#else  // !DHSA_TRANSPORT_WITH_NCCL

struct NcclCommunicator::Impl {};

namespace {
absl::Status NotBuilt() {
  return absl::FailedPreconditionError(
      "this build has no NCCL data plane; configure with -DDHSA_WITH_CUDA=ON -DDHSA_WITH_NCCL=ON");
}
}  // namespace

absl::StatusOr<std::string> NewNcclUniqueId() { return NotBuilt(); }
int VisibleCudaDevices() { return 0; }
absl::StatusOr<std::string> CudaDevicePciBusId(int) { return NotBuilt(); }
NcclCommunicator::NcclCommunicator(const Params& params) : params_(params) {}
absl::StatusOr<std::shared_ptr<NcclCommunicator>> NcclCommunicator::Create(const Params&) {
  return NotBuilt();
}
NcclCommunicator::~NcclCommunicator() = default;
void NcclCommunicator::AbortLocked(const absl::Status& why) {
  state_ = State::kFailed;
  error_ = why;
}
void NcclCommunicator::Abort(const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  AbortLocked(absl::UnavailableError(why));
}
absl::Status NcclCommunicator::Leave(absl::Duration) { return NotBuilt(); }
absl::Status NcclCommunicator::Turn(uint64_t, absl::Time, absl::string_view,
                                    const std::function<absl::Status()>&) {
  return NotBuilt();
}
absl::Status NcclCommunicator::SendDevice(uint64_t, const void*, int64_t, int, absl::Time,
                                          absl::string_view) {
  return NotBuilt();
}
absl::Status NcclCommunicator::RecvDevice(uint64_t, void*, int64_t, int, absl::Time,
                                          absl::string_view) {
  return NotBuilt();
}
absl::Status NcclCommunicator::SendHost(uint64_t, const void*, int64_t, int, absl::Time,
                                        absl::string_view) {
  return NotBuilt();
}
absl::Status NcclCommunicator::RecvHost(uint64_t, void*, int64_t, int, absl::Time,
                                        absl::string_view) {
  return NotBuilt();
}

#endif  // DHSA_TRANSPORT_WITH_NCCL

const char* NcclCommunicator::StateName(State s) {
  switch (s) {
    case State::kInitializing:
      return "initializing";
    case State::kReady:
      return "ready";
    case State::kFailed:
      return "failed";
    case State::kLeft:
      return "left";
  }
  return "unknown";
}

bool NcclCommunicator::ready() const {
  std::lock_guard<std::mutex> lock(mu_);
  return state_ == State::kReady;
}

absl::Status NcclCommunicator::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

v1::CommunicatorInfo NcclCommunicator::Info() const {
  v1::CommunicatorInfo info;
  info.set_communicator_id(params_.id);
  info.set_rank(params_.rank);
  info.set_num_ranks(params_.num_ranks);
  info.set_device(params_.device);
  info.set_device_pci_bus_id(pci_bus_id_);
  info.set_created_unix_micros(created_unix_micros_);
  std::lock_guard<std::mutex> lock(mu_);
  info.set_state(StateName(state_));
  info.set_error(std::string(error_.message()));
  info.set_bytes_sent(bytes_sent_);
  info.set_bytes_received(bytes_received_);
  info.set_transfers(transfers_);
  return info;
}

}  // namespace dhsa::transport
