#include "services/transport/nccl_link.h"

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kernels/common/tensor.h"
#include "services/common/wire.h"

#ifdef DHSA_TRANSPORT_WITH_NCCL
#include <cuda_runtime.h>
#endif

namespace dhsa::transport {

PinnedBuffer::~PinnedBuffer() {
  if (data_ == nullptr) return;
#ifdef DHSA_TRANSPORT_WITH_NCCL
  if (pinned_) {
    (void)cudaFreeHost(data_);
    return;
  }
#endif
  std::free(data_);
}

std::shared_ptr<PinnedPool> PinnedPool::Create(int64_t max_bytes) {
  return std::shared_ptr<PinnedPool>(new PinnedPool(max_bytes));
}

std::shared_ptr<PinnedBuffer> PinnedPool::Take(int64_t bytes) {
  std::unique_ptr<PinnedBuffer> buffer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = spare_.size();
    for (size_t i = 0; i < spare_.size(); ++i) {
      if (spare_[i]->capacity_ >= bytes &&
          (best == spare_.size() || spare_[i]->capacity_ < spare_[best]->capacity_)) {
        best = i;
      }
    }
    if (best < spare_.size()) {
      buffer = std::move(spare_[best]);
      held_ -= buffer->capacity_;
      spare_.erase(spare_.begin() + static_cast<std::ptrdiff_t>(best));
    }
  }
  if (buffer == nullptr) {
    buffer.reset(new PinnedBuffer);
    const int64_t capacity = std::max<int64_t>(bytes, 64);
#ifdef DHSA_TRANSPORT_WITH_NCCL
    int devices = 0;
    if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
      void* p = nullptr;
      if (cudaHostAlloc(&p, static_cast<size_t>(capacity), cudaHostAllocPortable) == cudaSuccess) {
        buffer->data_ = static_cast<uint8_t*>(p);
        buffer->pinned_ = true;
      }
    }
    (void)cudaGetLastError();
#endif
    if (buffer->data_ == nullptr) {
      buffer->data_ = static_cast<uint8_t*>(std::malloc(static_cast<size_t>(capacity)));
      if (buffer->data_ == nullptr) return nullptr;
    }
    buffer->capacity_ = capacity;
  }
  buffer->bytes_ = bytes;
  std::weak_ptr<PinnedPool> pool = weak_from_this();
  PinnedBuffer* raw = buffer.release();
  return std::shared_ptr<PinnedBuffer>(raw, [pool](PinnedBuffer* b) {
    std::unique_ptr<PinnedBuffer> owned(b);
    if (std::shared_ptr<PinnedPool> p = pool.lock()) p->Give(std::move(owned));
  });
}

void PinnedPool::Give(std::unique_ptr<PinnedBuffer> buffer) {
  const int64_t cap = buffer->capacity_;
  if (cap > max_bytes_) return;
  std::lock_guard<std::mutex> lock(mu_);
  while (!spare_.empty() && held_ + cap > max_bytes_) {
    held_ -= spare_.front()->capacity_;
    spare_.erase(spare_.begin());
  }
  held_ += cap;
  spare_.push_back(std::move(buffer));
}

int64_t PinnedPool::spare_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_;
}

OrderedTransfers::OrderedTransfers(uint64_t first_id, absl::Duration gap_timeout,
                                   std::function<void(const absl::Status&)> on_fail)
    : gap_timeout_(gap_timeout), on_fail_(std::move(on_fail)), next_(first_id) {
  thread_ = std::thread([this] { Loop(); });
}

OrderedTransfers::~OrderedTransfers() {
  std::vector<Entry> failed;
  bool first = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    failed = FailLocked(
        error_.ok() ? absl::CancelledError("the NCCL transfer queue is closing") : error_, &first);
  }
  cv_.notify_all();
  for (Entry& e : failed) e.done(error());
  thread_.join();
}

std::vector<OrderedTransfers::Entry> OrderedTransfers::FailLocked(const absl::Status& why,
                                                                  bool* first) {
  *first = error_.ok();
  if (error_.ok()) error_ = why;
  std::vector<Entry> out;
  for (auto& [id, e] : queued_) out.push_back(std::move(e));
  queued_.clear();
  return out;
}

void OrderedTransfers::Post(uint64_t id, Op op, Done done) {
  absl::Status refused;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_.ok()) {
      refused = error_;
    } else if (id < next_ || queued_.count(id) > 0) {
      refused = absl::InternalError(
          absl::StrCat("NCCL transfer ", id, " was posted twice (the queue is at ", next_, ")"));
    } else {
      queued_[id] = Entry{std::move(op), std::move(done)};
    }
  }
  if (!refused.ok()) {
    done(refused);
    return;
  }
  cv_.notify_all();
}

void OrderedTransfers::Fail(const absl::Status& why) {
  std::vector<Entry> failed;
  bool first = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed = FailLocked(why, &first);
  }
  cv_.notify_all();
  if (first && on_fail_) on_fail_(why);
  const absl::Status status = error();
  for (Entry& e : failed) e.done(status);
}

absl::Status OrderedTransfers::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

uint64_t OrderedTransfers::next_id() const {
  std::lock_guard<std::mutex> lock(mu_);
  return next_;
}

void OrderedTransfers::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    // Wait for the next id; while later ones wait too, at most gap_timeout_.
    absl::Time gap_deadline = absl::InfiniteFuture();
    while (!stopping_ && (queued_.empty() || queued_.begin()->first != next_)) {
      if (!error_.ok()) {
        cv_.wait(lock);
        continue;
      }
      if (queued_.empty()) {
        gap_deadline = absl::InfiniteFuture();
        cv_.wait(lock);
        continue;
      }
      if (gap_deadline == absl::InfiniteFuture()) gap_deadline = absl::Now() + gap_timeout_;
      if (absl::Now() >= gap_deadline) {
        const absl::Status why = absl::UnavailableError(absl::StrCat(
            "NCCL transfer ", next_, " never came (", absl::FormatDuration(gap_timeout_),
            ") while transfer ", queued_.begin()->first, " waited behind it"));
        bool first = false;
        std::vector<Entry> failed = FailLocked(why, &first);
        lock.unlock();
        if (first && on_fail_) on_fail_(why);
        for (Entry& e : failed) e.done(why);
        lock.lock();
        continue;
      }
      cv_.wait_until(lock, absl::ToChronoTime(gap_deadline));
    }
    if (stopping_) return;
    Entry e = std::move(queued_.begin()->second);
    queued_.erase(queued_.begin());
    ++next_;
    lock.unlock();
    absl::Status s = e.op();
    if (!s.ok()) {
      Fail(s);
      s = error();
    }
    e.done(std::move(s));
    lock.lock();
  }
}

NcclLink::NcclLink(std::shared_ptr<NcclCommunicator> comm, absl::Duration transfer_timeout,
                   int64_t pinned_pool_bytes)
    : comm_(std::move(comm)),
      transfer_timeout_(transfer_timeout),
      pool_(PinnedPool::Create(pinned_pool_bytes)) {
  queue_ = std::make_unique<OrderedTransfers>(
      1, transfer_timeout_, [comm = comm_](const absl::Status& why) {
        comm->Abort(absl::StrCat("NCCL transfer failed: ", why.message()));
      });
}

NcclLink::~NcclLink() = default;

bool NcclLink::ok() const { return comm_->ready() && queue_->error().ok(); }

TensorDescriptor NcclLink::Describe(const std::string& name, DType dtype,
                                    std::vector<int64_t> shape, int src_rank, int dst_rank) {
  TensorDescriptor d;
  d.name = name;
  d.dtype = dtype;
  d.shape = std::move(shape);
  d.communicator_id = comm_->id();
  d.src_rank = src_rank;
  d.dst_rank = dst_rank;
  d.transfer_id = comm_->AllocateTransferId();
  return d;
}

absl::Status NcclLink::Check(const TensorDescriptor& desc, bool send, int64_t bytes) const {
  if (desc.communicator_id != comm_->id()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", desc.name, "' is described on NCCL communicator '",
                     desc.communicator_id, "'; this link is '", comm_->id(), "'"));
  }
  const int me = send ? desc.src_rank : desc.dst_rank;
  const int peer = send ? desc.dst_rank : desc.src_rank;
  if (me != comm_->rank() || peer < 0 || peer >= comm_->num_ranks() || peer == me) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", desc.name, "' goes from rank ", desc.src_rank, " to rank ",
                     desc.dst_rank, "; this process is rank ", comm_->rank(), " of ",
                     comm_->num_ranks(), " and ", send ? "sends" : "receives"));
  }
  if (desc.ByteSize() != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", desc.name, "' is ", desc.ByteSize(),
                                                   " bytes; its buffer holds ", bytes));
  }
  return absl::OkStatus();
}

void NcclLink::Send(const TensorDescriptor& desc, std::shared_ptr<PinnedBuffer> buffer, Done done) {
  absl::Status s = buffer == nullptr ? absl::ResourceExhaustedError("no host buffer")
                                     : Check(desc, true, buffer->bytes());
  if (!s.ok()) {
    done(s);
    return;
  }
  queue_->Post(
      desc.transfer_id,
      [this, desc, buffer] {
        return comm_->SendHost(desc.transfer_id, buffer->data(), buffer->bytes(), desc.dst_rank,
                               absl::Now() + transfer_timeout_,
                               absl::StrCat("ncclSend of '", desc.name, "' (transfer ",
                                            desc.transfer_id, ") to rank ", desc.dst_rank));
      },
      std::move(done));
}

void NcclLink::Recv(const TensorDescriptor& desc, std::shared_ptr<PinnedBuffer> buffer, Done done) {
  absl::Status s = buffer == nullptr ? absl::ResourceExhaustedError("no host buffer")
                                     : Check(desc, false, buffer->bytes());
  if (!s.ok()) {
    done(s);
    return;
  }
  queue_->Post(
      desc.transfer_id,
      [this, desc, buffer] {
        return comm_->RecvHost(desc.transfer_id, buffer->data(), buffer->bytes(), desc.src_rank,
                               absl::Now() + transfer_timeout_,
                               absl::StrCat("ncclRecv of '", desc.name, "' (transfer ",
                                            desc.transfer_id, ") from rank ", desc.src_rank));
      },
      std::move(done));
}

void NcclLink::SendDevice(const TensorDescriptor& desc, const void* data, int64_t bytes,
                          std::shared_ptr<const void> hold, Done done) {
  absl::Status s =
      data == nullptr ? absl::InvalidArgumentError("no device buffer") : Check(desc, true, bytes);
  if (!s.ok()) {
    done(s);
    return;
  }
  queue_->Post(
      desc.transfer_id,
      [this, desc, data, bytes, hold] {
        return comm_->SendDevice(
            desc.transfer_id, data, bytes, desc.dst_rank, absl::Now() + transfer_timeout_,
            absl::StrCat("ncclSend of '", desc.name, "' (transfer ", desc.transfer_id,
                         ", device) to rank ", desc.dst_rank));
      },
      std::move(done));
}

void NcclLink::RecvDevice(const TensorDescriptor& desc, void* data, int64_t bytes,
                          std::shared_ptr<const void> hold, Done done) {
  absl::Status s =
      data == nullptr ? absl::InvalidArgumentError("no device buffer") : Check(desc, false, bytes);
  if (!s.ok()) {
    done(s);
    return;
  }
  queue_->Post(
      desc.transfer_id,
      [this, desc, data, bytes, hold] {
        return comm_->RecvDevice(
            desc.transfer_id, data, bytes, desc.src_rank, absl::Now() + transfer_timeout_,
            absl::StrCat("ncclRecv of '", desc.name, "' (transfer ", desc.transfer_id,
                         ", device) from rank ", desc.src_rank));
      },
      std::move(done));
}

void NcclLink::Abort(const std::string& why) {
  queue_->Fail(absl::UnavailableError(why));  // on_fail aborts the communicator.
  comm_->Abort(why);
}

}  // namespace dhsa::transport
