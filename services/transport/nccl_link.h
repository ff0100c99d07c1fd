// The NCCL data plane of one communicator as the service's calls use it: transfers posted by any
// thread and run one at a time, in transfer-id order, on a thread of the link's own (so no gRPC or
// executor thread ever waits for another call's turn), from and into page-locked host buffers.
//
// Failure model: the first failed transfer, a transfer id that does not arrive in time while later
// ones wait, or Abort() aborts the communicator (ncclCommAbort) and fails every queued and later
// transfer with UNAVAILABLE; the owner drops the link and makes a new communicator.
#ifndef DHSA_SERVICES_TRANSPORT_NCCL_LINK_H_
#define DHSA_SERVICES_TRANSPORT_NCCL_LINK_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "dhsa/v1/worker.pb.h"
#include "services/transport/descriptor.h"
#include "services/transport/nccl_communicator.h"

namespace dhsa::transport {

// Host memory for transfers: page-locked (cudaHostAlloc) in NCCL builds when a device is visible,
// ordinary memory otherwise (copies from it are then as from any pageable buffer).
class PinnedBuffer {
 public:
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  int64_t bytes() const { return bytes_; }  // As asked for; capacity() may be larger.
  int64_t capacity() const { return capacity_; }
  bool pinned() const { return pinned_; }

 private:
  friend class PinnedPool;
  PinnedBuffer() = default;
  uint8_t* data_ = nullptr;
  int64_t bytes_ = 0;
  int64_t capacity_ = 0;
  bool pinned_ = false;
};

// Buffers kept for reuse (cudaHostAlloc of hundreds of MB costs tens of ms): a buffer taken from
// the pool goes back to it when its last holder lets go, and the pool keeps at most `max_bytes`
// of spare buffers (the oldest go first). Thread-safe; buffers may outlive the pool.
class PinnedPool : public std::enable_shared_from_this<PinnedPool> {
 public:
  static std::shared_ptr<PinnedPool> Create(int64_t max_bytes);
  // A buffer of at least `bytes` (the smallest spare one that fits, else a new one); null when
  // the allocation fails.
  std::shared_ptr<PinnedBuffer> Take(int64_t bytes);
  int64_t spare_bytes() const;

 private:
  explicit PinnedPool(int64_t max_bytes) : max_bytes_(max_bytes) {}
  void Give(std::unique_ptr<PinnedBuffer> buffer);

  const int64_t max_bytes_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<PinnedBuffer>> spare_;  // Guarded by mu_; oldest first.
  int64_t held_ = 0;                                  // Guarded by mu_.
};

// Runs posted operations one at a time in id order (ids first_id, first_id + 1, ...) on a thread
// of its own. An operation whose id has not been posted `gap_timeout` after the queue started
// waiting for it, while later ones are queued, fails the queue (on_fail is called once with the
// reason, then every queued and later operation's done gets it). Ids already run fail with
// INTERNAL. `done` is called on the queue's thread (or on the poster's, when the queue has
// failed); it must not block for long.
class OrderedTransfers {
 public:
  using Op = std::function<absl::Status()>;
  using Done = std::function<void(absl::Status)>;
  OrderedTransfers(uint64_t first_id, absl::Duration gap_timeout,
                   std::function<void(const absl::Status&)> on_fail);
  // Fails what is still queued (CANCELLED unless failed before) and joins the thread (after the
  // operation in flight, which its own deadline bounds).
  ~OrderedTransfers();
  OrderedTransfers(const OrderedTransfers&) = delete;
  OrderedTransfers& operator=(const OrderedTransfers&) = delete;

  void Post(uint64_t id, Op op, Done done);
  // Fails the queue with `why` (calls on_fail unless it has failed already).
  void Fail(const absl::Status& why);
  // OK while the queue works.
  absl::Status error() const;
  uint64_t next_id() const;

 private:
  struct Entry {
    Op op;
    Done done;
  };
  void Loop();
  // Under mu_: marks the queue failed, takes the queued entries (returned, to fail outside mu_).
  std::vector<Entry> FailLocked(const absl::Status& why, bool* first);

  const absl::Duration gap_timeout_;
  const std::function<void(const absl::Status&)> on_fail_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Entry> queued_;  // Guarded by mu_.
  uint64_t next_;                     // Guarded by mu_.
  absl::Status error_;                // Guarded by mu_.
  bool stopping_ = false;             // Guarded by mu_.
  std::thread thread_;
};

// One communicator with its transfer queue and pinned buffers.
class NcclLink {
 public:
  using Done = OrderedTransfers::Done;
  // `transfer_timeout` bounds each transfer and each wait for a missing transfer id. Spare pinned
  // buffers are kept up to `pinned_pool_bytes` (a 128K-token prefill moves buffers of 2 GB).
  NcclLink(std::shared_ptr<NcclCommunicator> comm, absl::Duration transfer_timeout,
           int64_t pinned_pool_bytes = int64_t{8} << 30);
  ~NcclLink();

  NcclCommunicator& communicator() { return *comm_; }
  const std::string& id() const { return comm_->id(); }
  // Usable: the communicator is ready and no transfer failed.
  bool ok() const;

  // A descriptor for tensor `name` (`dtype`, `shape`) moving from `src_rank` to `dst_rank` with the
  // communicator's next transfer id (the router numbers transfers).
  TensorDescriptor Describe(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            int src_rank, int dst_rank);
  // Checks `desc` against this link: its communicator, this rank as the sender (send) or the
  // receiver, the peer a rank of the communicator, `bytes` its size. InvalidArgument otherwise.
  absl::Status Check(const TensorDescriptor& desc, bool send, int64_t bytes) const;

  // Posts the send (receive) of `desc` from (into) `buffer`; `done` reports it. The buffer is held
  // until then.
  void Send(const TensorDescriptor& desc, std::shared_ptr<PinnedBuffer> buffer, Done done);
  void Recv(const TensorDescriptor& desc, std::shared_ptr<PinnedBuffer> buffer, Done done);

  // The same straight from (into) `bytes` of device memory at `data` on the communicator's device;
  // `hold` (the memory's owner) is kept until `done`.
  void SendDevice(const TensorDescriptor& desc, const void* data, int64_t bytes,
                  std::shared_ptr<const void> hold, Done done);
  void RecvDevice(const TensorDescriptor& desc, void* data, int64_t bytes,
                  std::shared_ptr<const void> hold, Done done);

  std::shared_ptr<PinnedBuffer> Pinned(int64_t bytes) { return pool_->Take(bytes); }
  // Aborts the communicator and fails every transfer queued or to come (UNAVAILABLE, `why`).
  void Abort(const std::string& why);

 private:
  std::shared_ptr<NcclCommunicator> comm_;
  const absl::Duration transfer_timeout_;
  std::shared_ptr<PinnedPool> pool_;
  std::unique_ptr<OrderedTransfers> queue_;  // Last: its thread uses the members above.
};

// Whether a header's out-of-band descriptor is for NCCL (not shared memory).
inline bool IsNcclDescriptor(const v1::TensorDescriptor& d) {
  return !d.has_shm() && !d.communicator_id().empty();
}

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_NCCL_LINK_H_
