// One NCCL communicator of this process, with every wait bounded.
//
// The communicator is created non-blocking (ncclConfig_t.blocking = 0): set-up and every transfer
// are polled (ncclCommGetAsyncError, cudaEventQuery) against a deadline, and a deadline passed or
// an NCCL error aborts it (ncclCommAbort); from then on every call on it fails with UNAVAILABLE at
// once. Abort() does the same from outside (the router lost the worker).
//
// Transfers are numbered: both sides issue them in increasing transfer_id order (1, 2, ...), which
// is the order NCCL pairs sends with receives. A call whose id is not next waits for its turn (up
// to its deadline); one transfer runs at a time on the communicator's stream, so a host buffer is
// staged through one device buffer of the communicator's device.
//
// In a build without NCCL (DHSA_WITH_NCCL off) Create and NewNcclUniqueId are FailedPrecondition.
#ifndef DHSA_SERVICES_TRANSPORT_NCCL_COMMUNICATOR_H_
#define DHSA_SERVICES_TRANSPORT_NCCL_COMMUNICATOR_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dhsa/v1/worker.pb.h"

namespace dhsa::transport {

// A fresh ncclUniqueId (ncclGetUniqueId), as its NCCL_UNIQUE_ID_BYTES bytes.
absl::StatusOr<std::string> NewNcclUniqueId();

// CUDA devices this process sees (0 without CUDA or without NCCL in the build).
int VisibleCudaDevices();

// PCI bus id of a CUDA device ("0000:19:00.0"), or an error.
absl::StatusOr<std::string> CudaDevicePciBusId(int device);

class NcclCommunicator {
 public:
  struct Params {
    std::string id;         // communicator_id.
    std::string unique_id;  // From NewNcclUniqueId on one rank, the same on all.
    int num_ranks = 2;
    int rank = 0;
    int device = 0;  // CUDA device of this rank.
    absl::Duration setup_timeout = absl::Seconds(30);
  };

  // Joins the communicator: returns once every rank has joined, or fails by the set-up timeout
  // (UNAVAILABLE, the half-made communicator aborted). InvalidArgument for bad params.
  static absl::StatusOr<std::shared_ptr<NcclCommunicator>> Create(const Params& params);

  // Finalizes and destroys (bounded by 10 s, then aborts) a ready communicator; aborts others.
  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  // `bytes` bytes of device memory (this communicator's device) to / from `peer`.
  absl::Status SendDevice(uint64_t transfer_id, const void* data, int64_t bytes, int peer,
                          absl::Time deadline, absl::string_view what);
  absl::Status RecvDevice(uint64_t transfer_id, void* data, int64_t bytes, int peer,
                          absl::Time deadline, absl::string_view what);
  // The same for host memory, staged through a device buffer.
  absl::Status SendHost(uint64_t transfer_id, const void* data, int64_t bytes, int peer,
                        absl::Time deadline, absl::string_view what);
  absl::Status RecvHost(uint64_t transfer_id, void* data, int64_t bytes, int peer,
                        absl::Time deadline, absl::string_view what);

  // The next transfer id to hand out (the side that numbers the transfers: the router).
  uint64_t AllocateTransferId() { return next_allocated_.fetch_add(1); }

  // Aborts the communicator (ncclCommAbort) now, or when the transfer in flight next polls; the
  // calls waiting for their turn fail with UNAVAILABLE naming `why`. Idempotent.
  void Abort(const std::string& why);
  // Ends a ready communicator in order (ncclCommFinalize, bounded by `timeout`, then
  // ncclCommDestroy; abort if the finalize does not finish). State "left".
  absl::Status Leave(absl::Duration timeout);

  bool ready() const;
  // The error that failed it (OK while usable).
  absl::Status error() const;
  const std::string& id() const { return params_.id; }
  int rank() const { return params_.rank; }
  int num_ranks() const { return params_.num_ranks; }
  int device() const { return params_.device; }
  v1::CommunicatorInfo Info() const;

 private:
  struct Impl;
  enum class State { kInitializing, kReady, kFailed, kLeft };
  explicit NcclCommunicator(const Params& params);

  // Waits for `transfer_id`'s turn (or failure); then runs `op` with the communicator, then passes
  // the turn on. `op` returns the op's status; on error the communicator is aborted.
  absl::Status Turn(uint64_t transfer_id, absl::Time deadline, absl::string_view what,
                    const std::function<absl::Status()>& op);
  // Under mu_: ncclCommAbort if the handle is live; state failed with `why`.
  void AbortLocked(const absl::Status& why);
  static const char* StateName(State s);

  const Params params_;
  std::unique_ptr<Impl> impl_;
  std::atomic<uint64_t> next_allocated_{1};
  std::atomic<bool> abort_requested_{false};
  int64_t created_unix_micros_ = 0;
  std::string pci_bus_id_;

  mutable std::mutex mu_;
  std::condition_variable turn_cv_;
  State state_ = State::kInitializing;  // Guarded by mu_.
  absl::Status error_;                  // Guarded by mu_.
  uint64_t next_turn_ = 1;              // Guarded by mu_.
  bool busy_ = false;                   // Guarded by mu_: a turn holder is inside NCCL.
  std::string abort_why_;               // Guarded by mu_.
  int64_t bytes_sent_ = 0;              // Guarded by mu_.
  int64_t bytes_received_ = 0;          // Guarded by mu_.
  int64_t transfers_ = 0;               // Guarded by mu_.
};

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_NCCL_COMMUNICATOR_H_
