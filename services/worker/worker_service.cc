#include "services/worker/worker_service.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kernels/common/status_macros.h"
#include "services/common/config.h"
#include "services/common/metrics.h"
#include "services/common/status.h"
#include "services/common/tsan_annotations.h"
#include "services/common/wire.h"
#include "services/transport/nccl_link.h"
#include "services/transport/shm_copy.h"
#include "services/worker/partial_attention.h"

namespace dhsa {
namespace {

// Checks an out-of-band tensor descriptor of a header: named `name`, `dtype` `shape`, in shared
// memory or on an NCCL communicator (checked further by NcclOf).
absl::Status CheckOutOfBand(const v1::TensorDescriptor& d, const char* name, DType dtype,
                            const std::vector<int64_t>& shape) {
  if (d.name() != name) {
    return absl::InvalidArgumentError(
        absl::StrCat("out-of-band tensor '", d.name(), "' where '", name, "' was expected"));
  }
  if (!d.has_shm() && !transport::IsNcclDescriptor(d)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "out-of-band tensor '", name, "' names neither a shared-memory region nor a communicator"));
  }
  DHSA_ASSIGN_OR_RETURN(const DType got, FromProtoDType(d.dtype()));
  const std::vector<int64_t> got_shape(d.shape().begin(), d.shape().end());
  if (got != dtype || got_shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "out-of-band tensor '", name, "' is ", DTypeName(got), " ", ShapeString(got_shape),
        "; the header announces ", DTypeName(dtype), " ", ShapeString(shape)));
  }
  DHSA_ASSIGN_OR_RETURN(const int64_t bytes, TensorByteSize(shape, dtype, name));
  if (d.has_shm() && d.shm().bytes() != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory region of tensor '", name,
                                                   "' holds ", d.shm().bytes(),
                                                   " bytes; its shape needs ", bytes));
  }
  return absl::OkStatus();
}

// The link and descriptor of an NCCL tensor this worker sends (`send`) or receives: the
// communicator must be one this worker joined (else UNAVAILABLE: the router's view is stale), the
// ranks this worker's and the router's.
struct NcclTensor {
  std::shared_ptr<transport::NcclLink> link;
  transport::TensorDescriptor desc;
};
absl::StatusOr<NcclTensor> NcclOf(transport::WorkerDataPlane* data_plane,
                                  const v1::TensorDescriptor& d, bool send, int64_t max_bytes) {
  NcclTensor t;
  DHSA_ASSIGN_OR_RETURN(t.desc, transport::DescriptorFromProto(d, max_bytes));
  t.link = data_plane->Link(t.desc.communicator_id);
  if (t.link == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("tensor '", t.desc.name, "' is described on NCCL communicator '",
                     t.desc.communicator_id, "', which this worker does not hold (restarted?)"));
  }
  DHSA_RETURN_IF_ERROR(t.link->Check(t.desc, send, t.desc.ByteSize()));
  return t;
}

// Whether Attend over NCCL may keep "q", "o" and "lse" on a CUDA backend's device (default yes;
// DHSA_WORKER_NCCL_DEVICE=0 stages them through host memory, for comparison).
bool NcclDeviceIo() {
  const char* v = std::getenv("DHSA_WORKER_NCCL_DEVICE");
  return v == nullptr || std::string(v) != "0";
}

// Whether a device backend's shared-memory transfers use page-locked arena regions in place
// (default yes; DHSA_WORKER_SHM_LOCKED=0 copies through pageable memory as before, for comparison):
// q uploaded from the router's arena, o and lse downloaded into it, k and v stored from it.
bool LockedShmIo() {
  const char* v = std::getenv("DHSA_WORKER_SHM_LOCKED");
  return v == nullptr || std::string(v) != "0";
}

}  // namespace

// Host buffers for "q" tensors read from shared memory, kept between calls (at most kMaxBytes in
// all): a fresh buffer of hundreds of MB page-faults on every call, a reused one does not.
class WorkerService::BufferPool {
 public:
  static constexpr int64_t kMaxBytes = int64_t{512} << 20;

  ByteBuffer Take(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = spare_.size();
    for (size_t i = 0; i < spare_.size(); ++i) {
      if (static_cast<int64_t>(spare_[i].capacity()) >= bytes &&
          (best == spare_.size() || spare_[i].capacity() < spare_[best].capacity())) {
        best = i;
      }
    }
    ByteBuffer out;
    if (best < spare_.size()) {
      out = std::move(spare_[best]);
      held_ -= static_cast<int64_t>(out.capacity());
      spare_.erase(spare_.begin() + static_cast<std::ptrdiff_t>(best));
    }
    out.resize(static_cast<size_t>(bytes));
    return out;
  }

  void Give(ByteBuffer buffer) {
    const int64_t cap = static_cast<int64_t>(buffer.capacity());
    if (cap == 0 || cap > kMaxBytes) return;
    std::lock_guard<std::mutex> lock(mu_);
    while (!spare_.empty() && held_ + cap > kMaxBytes) {  // Drop the oldest.
      held_ -= static_cast<int64_t>(spare_.front().capacity());
      spare_.erase(spare_.begin());
    }
    held_ += cap;
    spare_.push_back(std::move(buffer));
  }

 private:
  std::mutex mu_;
  std::vector<ByteBuffer> spare_;  // Guarded by mu_.
  int64_t held_ = 0;               // Guarded by mu_.
};

// StoreKv: header (checked and capacity reserved at once), then "k" and "v" pieces; the tokens are
// committed when the client half-closes, so an aborted stream stores nothing.
class WorkerService::StoreKvReactor final
    : public GrpcHandover<grpc::ServerReadReactor<v1::StoreKvRequest>> {
 public:
  StoreKvReactor(grpc::CallbackServerContext* context, v1::StoreKvResponse* response,
                 KvStore* store, const WorkerBackend* backend, transport::ShmPeerArenas* arenas,
                 transport::WorkerDataPlane* data_plane)
      : context_(context),
        response_(response),
        store_(store),
        backend_(backend),
        arenas_(arenas),
        data_plane_(data_plane) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    DHSA_GRPC_READ_DONE(this);
    if (!ok) {
      {
        // Over NCCL the commit waits for both receives (the last one commits).
        std::lock_guard<std::mutex> lock(nccl_mu_);
        half_closed_ = true;
        if (nccl_pending_ > 0) return;
      }
      FinishOnce(Commit());
      return;
    }
    const absl::Status status = Handle();
    if (!status.ok()) {
      FinishOnce(status);
      return;
    }
    request_.Clear();
    StartRead(&request_);
  }

  void OnDone() override {
    DHSA_GRPC_DONE(this);
    {
      std::lock_guard<std::mutex> lock(nccl_mu_);
      done_ = true;
      if (nccl_pending_ > 0) return;  // The last receive's report deletes the reactor.
    }
    delete this;
  }

 private:
  enum class Stage { kHeader, kK, kV, kDone };

  absl::Status Handle() {
    if (stage_ == Stage::kHeader) {
      if (!request_.has_header()) {
        return absl::InvalidArgumentError("StoreKv must start with a StoreKvHeader");
      }
      const v1::StoreKvHeader& h = request_.header();
      KvWrite w;
      w.sequence_id = h.sequence_id();
      w.layer = h.layer();
      w.begin = h.begin();
      w.num_tokens = h.num_tokens();
      w.kv_heads = h.kv_heads();
      w.head_dim = h.head_dim();
      DHSA_ASSIGN_OR_RETURN(w.dtype, FromProtoDType(h.dtype()));
      w.append = h.append();
      DHSA_RETURN_IF_ERROR(backend_->CheckLayout(w.head_dim, w.dtype));
      if (h.tensors_size() != 0) {
        // Out of band: "k" and "v" lie in shared memory; read at the commit.
        if (h.tensors_size() != 2) {
          return absl::InvalidArgumentError(absl::StrCat(
              "StoreKvHeader.tensors must describe 'k' and 'v'; got ", h.tensors_size()));
        }
        const std::vector<int64_t> shape = {w.kv_heads, w.num_tokens, w.head_dim};
        DHSA_RETURN_IF_ERROR(CheckOutOfBand(h.tensors(0), "k", w.dtype, shape));
        DHSA_RETURN_IF_ERROR(CheckOutOfBand(h.tensors(1), "v", w.dtype, shape));
        if (transport::IsNcclDescriptor(h.tensors(0)) ||
            transport::IsNcclDescriptor(h.tensors(1))) {
          DHSA_ASSIGN_OR_RETURN(k_nccl_, NcclOf(data_plane_, h.tensors(0), false, INT64_MAX));
          DHSA_ASSIGN_OR_RETURN(v_nccl_, NcclOf(data_plane_, h.tensors(1), false, INT64_MAX));
        } else {
          k_region_ = h.tensors(0).shm();
          v_region_ = h.tensors(1).shm();
        }
      }
      DHSA_ASSIGN_OR_RETURN(reservation_, store_->Reserve(w));
      if (k_nccl_.link != nullptr) {
        // Received into pinned buffers now; committed at the half-close once both arrived.
        k_buf_ = k_nccl_.link->Pinned(reservation_.bytes() / 2);
        v_buf_ = v_nccl_.link->Pinned(reservation_.bytes() / 2);
        if (k_buf_ == nullptr || v_buf_ == nullptr) {
          return absl::ResourceExhaustedError("no host memory to receive 'k' and 'v' over NCCL");
        }
        {
          std::lock_guard<std::mutex> lock(nccl_mu_);
          nccl_pending_ = 2;
        }
        k_nccl_.link->Recv(k_nccl_.desc, k_buf_, [this](absl::Status st) { Received(st); });
        v_nccl_.link->Recv(v_nccl_.desc, v_buf_, [this](absl::Status st) { Received(st); });
        stage_ = Stage::kDone;
        return absl::OkStatus();
      }
      if (k_region_.has_value()) {
        stage_ = Stage::kDone;
        return absl::OkStatus();
      }
      k_.emplace("k", reservation_.bytes() / 2);
      v_.emplace("v", reservation_.bytes() / 2);
      stage_ = Stage::kK;
      return absl::OkStatus();
    }
    if (!request_.has_piece() || stage_ == Stage::kDone) {
      return absl::InvalidArgumentError(
          stage_ == Stage::kDone ? "StoreKv got a message after tensor 'v' was complete"
                                 : "StoreKv got a second header; expected 'k' and 'v' pieces");
    }
    TensorAssembler& current = stage_ == Stage::kK ? *k_ : *v_;
    DHSA_RETURN_IF_ERROR(current.Add(request_.piece()));
    if (current.complete()) stage_ = stage_ == Stage::kK ? Stage::kV : Stage::kDone;
    return absl::OkStatus();
  }

  // A receive of "k" or "v" over NCCL reported (on the link's thread).
  void Received(const absl::Status& status) {
    bool commit, remove;
    {
      std::lock_guard<std::mutex> lock(nccl_mu_);
      if (nccl_status_.ok() && !status.ok()) nccl_status_ = status;
      --nccl_pending_;
      commit = nccl_pending_ == 0 && half_closed_ && !done_ && !finished_;
      remove = nccl_pending_ == 0 && done_;
    }
    if (commit) FinishOnce(Commit());
    if (remove) delete this;
  }

  void FinishOnce(const absl::Status& status) {
    {
      std::lock_guard<std::mutex> lock(nccl_mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(ToGrpcStatus(status));
  }

  // End of the request stream: store everything, or nothing.
  absl::Status Commit() {
    if (context_->IsCancelled()) return absl::CancelledError("StoreKv cancelled by the client");
    if (stage_ == Stage::kHeader) {
      return absl::InvalidArgumentError("StoreKv stream ended without a header");
    }
    const int64_t bytes = reservation_.bytes();
    KvCommit commit;
    if (k_nccl_.link != nullptr) {
      absl::Status received;
      {
        std::lock_guard<std::mutex> lock(nccl_mu_);
        received = nccl_status_;
      }
      if (!received.ok()) {
        return absl::UnavailableError(
            absl::StrCat("receiving 'k' and 'v' over NCCL: ", received.message()));
      }
      DHSA_ASSIGN_OR_RETURN(
          commit, store_->CommitRaw(std::move(reservation_), k_buf_->data(), v_buf_->data()));
    } else if (k_region_.has_value()) {
      // Straight from the router's arena into the stripe (one copy); the pins keep the router
      // from reusing the regions meanwhile.
      // Page-locked for a device backend's upload (a no-op without a locker).
      const bool lock = LockedShmIo();
      DHSA_ASSIGN_OR_RETURN(transport::ShmPin k, arenas_->Pin(*k_region_, bytes / 2, false, lock));
      DHSA_ASSIGN_OR_RETURN(transport::ShmPin v, arenas_->Pin(*v_region_, bytes / 2, false, lock));
      DHSA_ASSIGN_OR_RETURN(commit, store_->CommitRaw(std::move(reservation_), k.data(), v.data()));
    } else {
      DHSA_ASSIGN_OR_RETURN(Tensor k, k_->Take());
      DHSA_ASSIGN_OR_RETURN(Tensor v, v_->Take());
      DHSA_ASSIGN_OR_RETURN(commit, store_->Commit(std::move(reservation_), k, v));
    }
    metrics::CountKvStored(bytes);
    response_->set_held_bytes(commit.held_bytes);
    response_->set_stripe_begin(commit.stripe_begin);
    response_->set_stripe_length(commit.stripe_length);
    return absl::OkStatus();
  }

  grpc::CallbackServerContext* const context_;
  v1::StoreKvResponse* const response_;
  KvStore* const store_;
  const WorkerBackend* const backend_;
  transport::ShmPeerArenas* const arenas_;
  transport::WorkerDataPlane* const data_plane_;
  v1::StoreKvRequest request_;
  Stage stage_ = Stage::kHeader;
  KvReservation reservation_;
  std::optional<TensorAssembler> k_, v_;
  std::optional<v1::ShmRegion> k_region_, v_region_;  // Out-of-band "k" and "v".
  NcclTensor k_nccl_, v_nccl_;                        // "k" and "v" over NCCL.
  std::shared_ptr<transport::PinnedBuffer> k_buf_, v_buf_;
  std::mutex nccl_mu_;
  int nccl_pending_ = 0;      // Guarded by nccl_mu_: NCCL receives not yet reported.
  absl::Status nccl_status_;  // Guarded by nccl_mu_: their first failure.
  bool half_closed_ = false;  // Guarded by nccl_mu_.
  bool finished_ = false;     // Guarded by nccl_mu_: Finish was called.
  bool done_ = false;         // Guarded by nccl_mu_: OnDone ran.
};

// Attend: header (checked against a snapshot of the stored stripes at once), then "q" pieces; once
// "q" is complete the attention runs on the executor and the reactor writes "o" and "lse" pieces
// and the AttendResult, one message at a time.
class WorkerService::AttendReactor final
    : public GrpcHandover<grpc::ServerBidiReactor<v1::AttendRequest, v1::AttendResponse>> {
 public:
  AttendReactor(grpc::CallbackServerContext* context, const WorkerService::Options& options,
                KvStore* store, WorkerBackend* backend, Executor* executor,
                transport::ShmPeerArenas* arenas, BufferPool* buffers,
                transport::WorkerDataPlane* data_plane)
      : context_(context),
        options_(options),
        store_(store),
        backend_(backend),
        executor_(executor),
        arenas_(arenas),
        buffers_(buffers),
        data_plane_(data_plane) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    DHSA_GRPC_READ_DONE(this);
    if (!ok) {
      Finish(ToGrpcStatus(EndedEarly()));
      return;
    }
    const absl::Status status = Handle();
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
      return;
    }
    if (q_device_ != nullptr) {
      // Straight into the device buffer; the receive's report starts the attention.
      q_nccl_.link->RecvDevice(q_nccl_.desc, q_device_->data(), q_nccl_.desc.ByteSize(), q_device_,
                               [this](absl::Status st) { ReceivedQ(st); });
      return;
    }
    if (q_nccl_.link != nullptr) {
      // "q" arrives over NCCL: the receive's report starts the attention (no further reads).
      q_nccl_.link->Recv(q_nccl_.desc, q_buf_, [this](absl::Status st) { ReceivedQ(st); });
      return;
    }
    if (q_direct_.has_value() || (q_ && q_->complete())) {
      // No further reads: anything the client still sends is ignored.
      executor_->Submit([this] { Run(); });
      return;
    }
    request_.Clear();
    StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    DHSA_GRPC_WRITE_DONE(this);
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "Attend client went away during the reply"));
      return;
    }
    responses_.pop_front();
    if (responses_.empty()) {
      Finish(grpc::Status::OK);
      return;
    }
    StartWrite(&responses_.front());
  }

  void OnDone() override {
    DHSA_GRPC_DONE(this);
    delete this;
  }

 private:
  absl::Status Handle() {
    if (!snapshot_) {
      if (!request_.has_header()) {
        return absl::InvalidArgumentError("Attend must start with an AttendHeader");
      }
      return Start(request_.header());
    }
    if (!request_.has_piece()) {
      return absl::InvalidArgumentError("Attend got a second header; expected 'q' pieces");
    }
    return q_->Add(request_.piece());
  }

  // Why the request stream ended before "q" was complete.
  absl::Status EndedEarly() {
    if (context_->IsCancelled()) return absl::CancelledError("Attend cancelled by the client");
    if (!snapshot_) return absl::InvalidArgumentError("Attend stream ended without a header");
    return q_->Take().status();
  }

  absl::Status Start(const v1::AttendHeader& h) {
    if (h.sequence_id().empty()) return absl::InvalidArgumentError("sequence_id is empty");
    if (h.head_dim() <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("head_dim must be positive; got ", h.head_dim()));
    }
    if (!(h.scale() >= 0.0f) || !std::isfinite(h.scale())) {
      return absl::InvalidArgumentError(
          absl::StrCat("scale must be finite and >= 0 (0 = 1/sqrt(head_dim)); got ", h.scale()));
    }
    DHSA_ASSIGN_OR_RETURN(selection_, SelectionFromAttendHeader(h));
    DHSA_ASSIGN_OR_RETURN(LayerSnapshot snapshot, store_->Snapshot(h.sequence_id(), h.layer()));
    if (snapshot.kv_heads != h.kv_heads() || snapshot.head_dim != h.head_dim()) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence '", h.sequence_id(), "' is stored with kv_heads ",
                       snapshot.kv_heads, " and head_dim ", snapshot.head_dim, "; the header says ",
                       h.kv_heads(), " and ", h.head_dim()));
    }
    DHSA_RETURN_IF_ERROR(CheckSpansHeld(selection_, snapshot, h.sequence_id(), h.layer()));
    q_shape_ = {h.q_heads(), h.num_rows(), h.head_dim()};
    DHSA_ASSIGN_OR_RETURN(const int64_t max_q_bytes, TensorByteSize(q_shape_, DType::kF32, "q"));
    // "q" and "o" are held in memory whole; a header cannot make the worker allocate past its
    // budget.
    if (max_q_bytes > options_.capacity_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "Attend of ", h.num_rows(), " rows x ", h.q_heads(), " heads x ", h.head_dim(),
          " needs up to ", max_q_bytes, " bytes for 'q' and as much for 'o', over this worker's ",
          options_.capacity_bytes, "-byte capacity; send fewer rows per call"));
    }
    q_begin_ = h.q_begin();
    scale_ = h.scale() > 0.0f ? h.scale() : 1.0f / std::sqrt(static_cast<float>(h.head_dim()));
    if (h.has_o_tensor() != h.has_lse_tensor()) {
      return absl::InvalidArgumentError("AttendHeader sets one of o_tensor and lse_tensor alone");
    }
    if (h.has_o_tensor()) {
      DHSA_RETURN_IF_ERROR(CheckOutOfBand(h.o_tensor(), "o", DType::kF32, q_shape_));
      DHSA_RETURN_IF_ERROR(
          CheckOutOfBand(h.lse_tensor(), "lse", DType::kF32, {h.q_heads(), h.num_rows()}));
      if (transport::IsNcclDescriptor(h.o_tensor()) ||
          transport::IsNcclDescriptor(h.lse_tensor())) {
        DHSA_ASSIGN_OR_RETURN(o_nccl_, NcclOf(data_plane_, h.o_tensor(), true, INT64_MAX));
        DHSA_ASSIGN_OR_RETURN(lse_nccl_, NcclOf(data_plane_, h.lse_tensor(), true, INT64_MAX));
      } else {
        o_region_ = h.o_tensor().shm();
        lse_region_ = h.lse_tensor().shm();
      }
    }
    if (h.has_q_tensor() && transport::IsNcclDescriptor(h.q_tensor())) {
      // Over NCCL into a pinned buffer; the receive is posted once the header is accepted.
      DHSA_ASSIGN_OR_RETURN(const DType q_dtype, FromProtoDType(h.q_tensor().dtype()));
      DHSA_RETURN_IF_ERROR(CheckOutOfBand(h.q_tensor(), "q", q_dtype, q_shape_));
      DHSA_ASSIGN_OR_RETURN(q_nccl_,
                            NcclOf(data_plane_, h.q_tensor(), false, options_.capacity_bytes));
      if (o_nccl_.link != nullptr && q_dtype == snapshot.dtype && NcclDeviceIo()) {
        // Onto the backend's device (CUDA workers): q, o and lse never touch host memory here.
        absl::StatusOr<std::shared_ptr<WorkerDeviceBuffer>> buf =
            backend_->AllocateDevice(q_nccl_.desc.ByteSize());
        if (buf.ok() && *buf != nullptr &&
            (*buf)->device() == q_nccl_.link->communicator().device() &&
            (*buf)->device() == o_nccl_.link->communicator().device()) {
          q_device_ = *std::move(buf);
          snapshot_ = std::move(snapshot);
          return absl::OkStatus();
        }
      }
      q_buf_ = q_nccl_.link->Pinned(q_nccl_.desc.ByteSize());
      if (q_buf_ == nullptr) {
        return absl::ResourceExhaustedError("no host memory to receive 'q' over NCCL");
      }
      snapshot_ = std::move(snapshot);
      return absl::OkStatus();
    }
    snapshot_ = std::move(snapshot);
    if (h.has_q_tensor()) {
      // Out of band: "q" lies in the router's arena; copied once into a reused buffer.
      DHSA_ASSIGN_OR_RETURN(const DType q_dtype, FromProtoDType(h.q_tensor().dtype()));
      DHSA_RETURN_IF_ERROR(CheckOutOfBand(h.q_tensor(), "q", q_dtype, q_shape_));
      const int64_t bytes = h.q_tensor().shm().bytes();
      // A device backend uploads it in place when the region can be page-locked (in its dtype).
      const bool lock = !backend_->HostInPlace() && LockedShmIo() && q_dtype == snapshot_->dtype;
      DHSA_ASSIGN_OR_RETURN(transport::ShmPin pin,
                            arenas_->Pin(h.q_tensor().shm(), bytes, /*write=*/false, lock));
      Tensor q;
      q.dtype = q_dtype;
      q.shape = q_shape_;
      if (backend_->HostInPlace() || pin.locked()) {
        // The kernel (or the device's copy) reads it in place; the pin holds the region until the
        // attention is done.
        q_pin_ = std::move(pin);
        q_direct_ = std::move(q);
        return absl::OkStatus();
      }
      q.bytes = buffers_->Take(bytes);
      std::memcpy(q.bytes.data(), pin.data(), static_cast<size_t>(bytes));
      q_direct_ = std::move(q);
      return absl::OkStatus();
    }
    q_.emplace("q", max_q_bytes);
    return absl::OkStatus();
  }

  // "q" arrived over NCCL (on the link's thread): into a host tensor, then the attention.
  void ReceivedQ(const absl::Status& status) {
    if (!status.ok()) {
      Finish(ToGrpcStatus(
          absl::UnavailableError(absl::StrCat("receiving 'q' over NCCL: ", status.message()))));
      return;
    }
    if (q_device_ != nullptr) {
      executor_->Submit([this] { Run(); });
      return;
    }
    Tensor q;
    q.dtype = q_nccl_.desc.dtype;
    q.shape = q_nccl_.desc.shape;
    q.bytes = buffers_->Take(q_buf_->bytes());
    std::memcpy(q.bytes.data(), q_buf_->data(), static_cast<size_t>(q_buf_->bytes()));
    q_buf_.reset();
    q_direct_ = std::move(q);
    executor_->Submit([this] { Run(); });
  }

  // On the executor: attention, then the reply (writes continue on gRPC threads).
  void Run() {
    Stall();
    const absl::Status status = Compute();
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
      return;
    }
    if (o_nccl_.link != nullptr) return;  // The sends' report writes the result.
    StartWrite(&responses_.front());
  }

  // "o" or "lse" went out over NCCL (on the link's thread); the second report answers.
  void Sent(const absl::Status& status) {
    bool last;
    absl::Status failed;
    {
      std::lock_guard<std::mutex> lock(sent_mu_);
      if (sent_status_.ok() && !status.ok()) sent_status_ = status;
      last = --sends_pending_ == 0;
      failed = sent_status_;
    }
    if (!last) return;
    if (!failed.ok()) {
      Finish(ToGrpcStatus(absl::UnavailableError(
          absl::StrCat("sending 'o' and 'lse' over NCCL: ", failed.message()))));
      return;
    }
    StartWrite(&responses_.front());
  }

  // Test only: holds this executor thread for options_.test_attend_stall, or until the call is
  // cancelled (then Compute reports CANCELLED).
  void Stall() {
    if (options_.test_attend_stall <= absl::ZeroDuration()) return;
    const absl::Time until = absl::Now() + options_.test_attend_stall;
    while (absl::Now() < until && !context_->IsCancelled()) absl::SleepFor(absl::Milliseconds(5));
  }

  absl::Status Compute() {
    Tensor q;
    if (q_device_ != nullptr) {  // Only dtype and shape on the host.
      q.dtype = q_nccl_.desc.dtype;
      q.shape = q_nccl_.desc.shape;
      absl::Status status = ComputeWith(q);
      q_device_.reset();
      return status;
    }
    if (q_direct_.has_value()) {
      q = std::move(*q_direct_);
      q_direct_.reset();
    } else {
      DHSA_ASSIGN_OR_RETURN(q, q_->Take());
    }
    absl::Status status = ComputeWith(q);
    q_pin_ = transport::ShmPin();  // Read in place: the router may reuse the region now.
    buffers_->Give(std::move(q.bytes));
    return status;
  }

  absl::Status ComputeWith(const Tensor& q) {
    if (q.shape != q_shape_) {
      return absl::InvalidArgumentError(absl::StrCat("tensor 'q' has shape ", ShapeString(q.shape),
                                                     "; the header announces ",
                                                     ShapeString(q_shape_)));
    }
    PartialAttentionInputs in;
    in.q = &q;
    in.q_begin = q_begin_;
    in.selection = &selection_;
    in.keys = &*snapshot_;
    in.scale = scale_;
    // Share the pool's threads among the jobs in flight (this one included).
    in.num_threads = std::max(1, executor_->num_threads() / std::max(1, executor_->pending()));
    in.cancelled = [this] { return context_->IsCancelled(); };
    in.q_device = q_device_.get();
    in.outputs_on_device = q_device_ != nullptr;  // Set only when o and lse go over NCCL.
    if (q_pin_.data() != nullptr) in.q_host = q_pin_.data();
    in.host_locked = q_pin_.locked();
    // "o" and "lse" straight into the router's regions when a device backend can page-lock them.
    transport::ShmPin o_pin, lse_pin;
    if (o_region_.has_value() && !backend_->HostInPlace() && LockedShmIo() &&
        arenas_->has_locker()) {
      const int64_t rows = q_shape_[0] * q_shape_[1];
      DHSA_ASSIGN_OR_RETURN(o_pin,
                            arenas_->Pin(*o_region_, rows * q_shape_[2] * int64_t{4}, true, true));
      DHSA_ASSIGN_OR_RETURN(lse_pin, arenas_->Pin(*lse_region_, rows * int64_t{4}, true, true));
      if (o_pin.locked() && lse_pin.locked()) {
        in.o_host = reinterpret_cast<float*>(o_pin.data());
        in.lse_host = reinterpret_cast<float*>(lse_pin.data());
        in.host_locked = true;
      }
    }
    DHSA_ASSIGN_OR_RETURN(const PartialAttention result, backend_->Compute(in));
    metrics::ObserveWorkerAttention(options_.backend, result.seconds);
    snapshot_.reset();  // Let a concurrent Drop free the stripes while the reply is sent.

    if (o_nccl_.link != nullptr && result.o_device != nullptr) {
      // Straight from the device over NCCL; the answer is the result alone, once both went out.
      v1::AttendResult* done = responses_.emplace_back().mutable_result();
      done->set_attention_seconds(result.seconds);
      done->set_computed_pairs(result.computed_pairs);
      sends_pending_ = 2;
      o_nccl_.link->SendDevice(o_nccl_.desc, result.o_device->data(), o_nccl_.desc.ByteSize(),
                               result.o_device, [this](absl::Status st) { Sent(st); });
      lse_nccl_.link->SendDevice(lse_nccl_.desc, result.lse_device->data(),
                                 lse_nccl_.desc.ByteSize(), result.lse_device,
                                 [this](absl::Status st) { Sent(st); });
      return absl::OkStatus();
    }
    if (o_nccl_.link != nullptr) {
      // From pinned buffers over NCCL; the answer is the result alone, once both went out.
      const int64_t o_bytes = static_cast<int64_t>(result.o.bytes.size());
      const int64_t lse_bytes = static_cast<int64_t>(result.lse.bytes.size());
      std::shared_ptr<transport::PinnedBuffer> o = o_nccl_.link->Pinned(o_bytes);
      std::shared_ptr<transport::PinnedBuffer> lse = lse_nccl_.link->Pinned(lse_bytes);
      if (o == nullptr || lse == nullptr) {
        return absl::ResourceExhaustedError("no host memory to send 'o' and 'lse' over NCCL");
      }
      std::memcpy(o->data(), result.o.bytes.data(), static_cast<size_t>(o_bytes));
      std::memcpy(lse->data(), result.lse.bytes.data(), static_cast<size_t>(lse_bytes));
      v1::AttendResult* done = responses_.emplace_back().mutable_result();
      done->set_attention_seconds(result.seconds);
      done->set_computed_pairs(result.computed_pairs);
      sends_pending_ = 2;
      o_nccl_.link->Send(o_nccl_.desc, std::move(o), [this](absl::Status st) { Sent(st); });
      lse_nccl_.link->Send(lse_nccl_.desc, std::move(lse), [this](absl::Status st) { Sent(st); });
      return absl::OkStatus();
    }

    if (o_region_.has_value()) {
      // Into the regions the router set aside; the answer is the result alone. The kernel wrote o
      // and lse into this worker's own tensors (huge pages, reused from call to call); they go
      // into the shared memory through the kernel (shm_copy.h). Rows written straight into the
      // region's 4 KiB pages cost the workers about 6% more CPU per warm 32K layer.
      // (A device backend given page-locked regions wrote them in place: nothing to copy.)
      if (in.o_host == nullptr) {
        const int64_t o_bytes = static_cast<int64_t>(result.o.bytes.size());
        const int64_t lse_bytes = static_cast<int64_t>(result.lse.bytes.size());
        if (o_pin.data() == nullptr) {
          DHSA_ASSIGN_OR_RETURN(o_pin, arenas_->Pin(*o_region_, o_bytes, true));
          DHSA_ASSIGN_OR_RETURN(lse_pin, arenas_->Pin(*lse_region_, lse_bytes, true));
        }
        transport::CopyIntoShared(o_pin.data(), result.o.bytes.data(),
                                  static_cast<size_t>(o_bytes));
        transport::CopyIntoShared(lse_pin.data(), result.lse.bytes.data(),
                                  static_cast<size_t>(lse_bytes));
      }
      v1::AttendResult* done = responses_.emplace_back().mutable_result();
      done->set_attention_seconds(result.seconds);
      done->set_computed_pairs(result.computed_pairs);
      return absl::OkStatus();
    }

    const int64_t piece_bytes = PieceBytesForMessageLimit(options_.max_message_bytes);
    const auto queue = [this](v1::TensorPiece&& piece) {
      *responses_.emplace_back().mutable_piece() = std::move(piece);
      return true;
    };
    DHSA_RETURN_IF_ERROR(SendTensorPieces(result.o, "o", piece_bytes, queue));
    DHSA_RETURN_IF_ERROR(SendTensorPieces(result.lse, "lse", piece_bytes, queue));
    v1::AttendResult* done = responses_.emplace_back().mutable_result();
    done->set_attention_seconds(result.seconds);
    done->set_computed_pairs(result.computed_pairs);
    return absl::OkStatus();
  }

  grpc::CallbackServerContext* const context_;
  const WorkerService::Options& options_;
  KvStore* const store_;
  WorkerBackend* const backend_;
  Executor* const executor_;
  transport::ShmPeerArenas* const arenas_;
  BufferPool* const buffers_;
  transport::WorkerDataPlane* const data_plane_;
  v1::AttendRequest request_;
  // Set by the header.
  std::optional<LayerSnapshot> snapshot_;
  Selection selection_;
  std::vector<int64_t> q_shape_;
  int64_t q_begin_ = 0;
  float scale_ = 0.0f;
  std::optional<TensorAssembler> q_;
  std::optional<Tensor> q_direct_;  // "q" read from shared memory.
  transport::ShmPin q_pin_;         // "q" in place (HostInPlace backends): q_direct_ has no bytes.
  std::optional<v1::ShmRegion> o_region_, lse_region_;  // Where "o" and "lse" go.
  NcclTensor q_nccl_, o_nccl_, lse_nccl_;               // Tensors over NCCL.
  std::shared_ptr<transport::PinnedBuffer> q_buf_;
  std::shared_ptr<WorkerDeviceBuffer> q_device_;  // "q" over NCCL onto the backend's device.
  std::mutex sent_mu_;
  int sends_pending_ = 0;     // Guarded by sent_mu_ (once the sends are posted).
  absl::Status sent_status_;  // Guarded by sent_mu_.
  // The reply; the front message is being written.
  std::deque<v1::AttendResponse> responses_;
};

namespace {

std::unique_ptr<WorkerBackend> OrCpuBackend(std::unique_ptr<WorkerBackend> backend) {
  if (backend != nullptr) return backend;
  absl::StatusOr<std::unique_ptr<WorkerBackend>> cpu = CreateWorkerBackend("cpu");
  return *std::move(cpu);  // The CPU backend always exists.
}

}  // namespace

WorkerService::WorkerService(const Options& options, std::unique_ptr<WorkerBackend> backend)
    : options_(options),
      backend_(OrCpuBackend(std::move(backend))),
      store_(options.capacity_bytes, backend_->memory()),
      buffers_(std::make_unique<BufferPool>()),
      executor_(options.threads),
      data_plane_(options.data_plane) {
  // A device backend's locker: arena regions pinned for its copies are page-locked (shm_arena.h).
  arenas_.SetLocker(backend_->HostLocker());
  metrics::AddWorkerSource(this, options_.backend, [this] {
    const KvStats s = store_.Stats();
    return metrics::KvGauges{s.capacity_bytes, s.held_bytes, s.allocated_bytes, s.sequences,
                             s.stripes};
  });
}

WorkerService::~WorkerService() { metrics::RemoveSource(this); }

grpc::ServerReadReactor<v1::StoreKvRequest>* WorkerService::StoreKv(
    grpc::CallbackServerContext* context, v1::StoreKvResponse* response) {
  return new StoreKvReactor(context, response, &store_, backend_.get(), &arenas_, &data_plane_);
}

grpc::ServerBidiReactor<v1::AttendRequest, v1::AttendResponse>* WorkerService::Attend(
    grpc::CallbackServerContext* context) {
  return new AttendReactor(context, options_, &store_, backend_.get(), &executor_, &arenas_,
                           buffers_.get(), &data_plane_);
}

grpc::ServerUnaryReactor* WorkerService::Drop(grpc::CallbackServerContext* context,
                                              const v1::DropRequest* request,
                                              v1::DropResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (request->sequence_id().empty()) {
    reactor->Finish(ToGrpcStatus(absl::InvalidArgumentError("sequence_id is empty")));
    return reactor;
  }
  response->set_freed_bytes(store_.Drop(request->sequence_id()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::Truncate(grpc::CallbackServerContext* context,
                                                  const v1::TruncateRequest* request,
                                                  v1::TruncateResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Only bookkeeping under the store's lock (no copy of key data): fine on a gRPC thread.
  const absl::StatusOr<KvTruncation> truncated =
      store_.Truncate(request->sequence_id(), request->layer(), request->end());
  if (truncated.ok()) {
    response->set_freed_bytes(truncated->freed_bytes);
    response->set_held_bytes(truncated->held_bytes);
  }
  reactor->Finish(ToGrpcStatus(truncated.status()));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::Stats(grpc::CallbackServerContext* context,
                                               const v1::StatsRequest* /*request*/,
                                               v1::StatsResponse* response) {
  const KvStats stats = store_.Stats();
  response->set_capacity_bytes(stats.capacity_bytes);
  response->set_held_bytes(stats.held_bytes);
  response->set_allocated_bytes(stats.allocated_bytes);
  response->set_sequences(stats.sequences);
  response->set_stripes(stats.stripes);
  response->set_backend(backend_->name());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::StatusOr<DeviceMemoryInfo> device = backend_->DeviceMemory();
  if (!device.ok()) {
    reactor->Finish(ToGrpcStatus(device.status()));
    return reactor;
  }
  response->set_device_memory_total_bytes(device->total_bytes);
  response->set_device_memory_free_bytes(device->free_bytes);
  data_plane_.FillStats(response);
  arenas_.FillStats(response);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::JoinCommunicator(
    grpc::CallbackServerContext* context, const v1::JoinCommunicatorRequest* request,
    v1::JoinCommunicatorResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  data_plane_.JoinAsync(*request, [reactor, response](absl::StatusOr<v1::CommunicatorInfo> info) {
    if (info.ok()) *response->mutable_communicator() = *std::move(info);
    reactor->Finish(ToGrpcStatus(info.status()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::LeaveCommunicator(
    grpc::CallbackServerContext* context, const v1::LeaveCommunicatorRequest* request,
    v1::LeaveCommunicatorResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  data_plane_.LeaveAsync(*request, [reactor, response](bool found) {
    response->set_found(found);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::AttachArena(grpc::CallbackServerContext* context,
                                                     const v1::AttachArenaRequest* request,
                                                     v1::AttachArenaResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // shm_open and mmap of an object the router already sized: quick, fine on a gRPC thread.
  absl::StatusOr<v1::ArenaInfo> info = arenas_.Attach(*request);
  if (info.ok()) *response->mutable_arena() = *std::move(info);
  reactor->Finish(ToGrpcStatus(info.status()));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::DetachArena(grpc::CallbackServerContext* context,
                                                     const v1::DetachArenaRequest* request,
                                                     v1::DetachArenaResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  response->set_found(arenas_.Detach(request->arena_id()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace dhsa
