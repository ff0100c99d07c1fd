#include "services/router/worker_calls.h"

#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "services/common/status.h"

namespace dhsa::router {

StoreKvCall::StoreKvCall(std::shared_ptr<const Tensor> k, std::shared_ptr<const Tensor> v,
                         int64_t row_begin, int64_t row_end, int64_t piece_bytes, Regions regions,
                         Done done)
    : regions_(std::move(regions)), done_(std::move(done)) {
  if (regions_.empty()) {
    k_.emplace(std::move(k), row_begin, row_end, "k", piece_bytes);
    v_.emplace(std::move(v), row_begin, row_end, "v", piece_bytes);
  }
}

void StoreKvCall::Start(v1::Worker::Stub* stub, grpc::ClientContext* context,
                        const v1::StoreKvHeader& header, std::shared_ptr<const Tensor> k,
                        std::shared_ptr<const Tensor> v, int64_t row_begin, int64_t row_end,
                        int64_t piece_bytes, Regions regions, Done done) {
  auto* call = new StoreKvCall(std::move(k), std::move(v), row_begin, row_end, piece_bytes,
                               std::move(regions), std::move(done));
  if (header.tensors_size() != 0) {  // Out of band (shared memory or NCCL): the header alone.
    call->k_.reset();
    call->v_.reset();
  }
  stub->async()->StoreKv(context, &call->response_, call);
  *call->request_.mutable_header() = header;
  call->StartWrite(&call->request_);
  call->StartCall();
}

void StoreKvCall::WriteNext() {
  v1::TensorPiece* piece = request_.mutable_piece();
  if (k_.has_value() && (k_->Next(piece) || v_->Next(piece))) {
    StartWrite(&request_);
  } else {
    half_closed_ = true;
    StartWritesDone();  // The worker commits the tokens now.
  }
}

void StoreKvCall::OnWriteDone(bool ok) {
  DHSA_GRPC_WRITE_DONE(this);
  if (ok) WriteNext();  // Otherwise the stream is broken; OnDone brings the status.
}

void StoreKvCall::OnDone(const grpc::Status& grpc_status) {
  DHSA_GRPC_DONE(this);
  absl::Status status = FromGrpcStatus(grpc_status);
  bool may_have_stored = status.ok();
  if (!status.ok() && half_closed_) {
    switch (status.code()) {
      // The worker's own refusals: it checked the write and stored nothing.
      case absl::StatusCode::kInvalidArgument:
      case absl::StatusCode::kFailedPrecondition:
      case absl::StatusCode::kResourceExhausted:
      case absl::StatusCode::kNotFound:
      case absl::StatusCode::kOutOfRange:
      case absl::StatusCode::kAlreadyExists:
      case absl::StatusCode::kPermissionDenied:
      case absl::StatusCode::kUnauthenticated:
      case absl::StatusCode::kUnimplemented:
        break;
      // Cancelled, deadline, transport errors: the worker may have committed on the half-close
      // before the failure reached it (or before its answer reached us).
      default:
        may_have_stored = true;
    }
  }
  Done done = std::move(done_);
  delete this;  // Frees the regions first: the next call may reuse them at once.
  done(std::move(status), may_have_stored);
}

AttendCall::AttendCall(grpc::ClientContext* context, std::shared_ptr<const Tensor> q,
                       int64_t row_begin, int64_t row_end, int64_t piece_bytes, int64_t o_bytes,
                       Done done)
    : context_(context),
      o_shape_({q->shape[0], row_end - row_begin, q->shape[2]}),
      done_(std::move(done)),
      o_("o", o_bytes),
      lse_("lse", o_bytes) {
  q_.emplace(std::move(q), row_begin, row_end, "q", piece_bytes);
}

void AttendCall::Start(v1::Worker::Stub* stub, grpc::ClientContext* context,
                       const v1::AttendHeader& header, std::shared_ptr<const Tensor> q,
                       int64_t row_begin, int64_t row_end, int64_t piece_bytes,
                       std::unique_ptr<transport::ShmRegion> q_region,
                       std::shared_ptr<transport::ShmRegion> o_region,
                       std::shared_ptr<transport::ShmRegion> lse_region, Done done) {
  const int64_t o_bytes =
      q->shape[0] * (row_end - row_begin) * q->shape[2] * static_cast<int64_t>(sizeof(float));
  auto* call = new AttendCall(context, std::move(q), row_begin, row_end, piece_bytes, o_bytes,
                              std::move(done));
  if (header.has_q_tensor()) {
    call->q_.reset();
    call->q_region_ = std::move(q_region);
  }
  if (header.has_o_tensor()) {
    call->outputs_out_of_band_ = true;
    call->partial_.o_region = std::move(o_region);
    call->partial_.lse_region = std::move(lse_region);
  }
  stub->async()->Attend(context, call);
  *call->request_.mutable_header() = header;
  call->StartWrite(&call->request_);
  call->StartRead(&call->response_);
  call->StartCall();
}

void AttendCall::WriteNext() {
  if (q_.has_value() && q_->Next(request_.mutable_piece())) {
    StartWrite(&request_);
  } else {
    StartWritesDone();
  }
}

void AttendCall::OnWriteDone(bool ok) {
  DHSA_GRPC_WRITE_DONE(this);
  if (ok) WriteNext();
}

void AttendCall::Fail(absl::Status status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.ok()) error_ = std::move(status);
  }
  context_->TryCancel();
}

void AttendCall::OnReadDone(bool ok) {
  DHSA_GRPC_READ_DONE(this);
  if (!ok) return;  // The worker finished; OnDone follows.
  absl::Status status;
  if (response_.has_piece()) {
    status = outputs_out_of_band_
                 ? absl::InternalError("pieces for tensors the header placed out of band")
             : o_.complete() ? lse_.Add(response_.piece())
                             : o_.Add(response_.piece());
  } else if (response_.has_result()) {
    have_result_ = true;
    partial_.result = response_.result();
  } else {
    status = absl::InternalError("empty Attend response message");
  }
  if (!status.ok()) {
    Fail(absl::InternalError(absl::StrCat("bad Attend answer: ", status.message())));
    return;
  }
  StartRead(&response_);
}

void AttendCall::OnDone(const grpc::Status& grpc_status) {
  DHSA_GRPC_DONE(this);
  absl::Status status;
  {
    std::lock_guard<std::mutex> lock(mu_);
    status = error_;
  }
  if (status.ok()) status = FromGrpcStatus(grpc_status);
  if (status.ok() && outputs_out_of_band_) {
    if (!have_result_) {
      status = absl::InternalError("Attend answer incomplete: no result");
    } else {
      // The data stays in the regions (or comes over NCCL); the tensors say what it is.
      partial_.o.dtype = DType::kF32;
      partial_.o.shape = o_shape_;
      partial_.lse.dtype = DType::kF32;
      partial_.lse.shape = {o_shape_[0], o_shape_[1]};
    }
  } else if (status.ok()) {
    absl::StatusOr<Tensor> o = o_.Take();
    absl::StatusOr<Tensor> lse = lse_.Take();
    if (!o.ok() || !lse.ok() || !have_result_) {
      status = absl::InternalError(
          absl::StrCat("Attend answer incomplete: ", !o.ok() ? o.status().message() : "",
                       !lse.ok() ? lse.status().message() : "", have_result_ ? "" : " no result"));
    } else {
      partial_.o = *std::move(o);
      partial_.lse = *std::move(lse);
    }
  }
  if (!status.ok()) partial_ = PartialResult{};  // Frees the output regions now.
  Done done = std::move(done_);
  PartialResult partial = std::move(partial_);
  delete this;  // Frees the "q" region.
  done(std::move(status), std::move(partial));
}

void DropOnWorker(WorkerPool& pool, int worker, const std::string& worker_sequence_id,
                  std::chrono::milliseconds timeout, std::function<void(absl::Status)> done) {
  v1::DropRequest request;
  request.set_sequence_id(worker_sequence_id);
  v1::Worker::Stub* stub = pool.stub(worker);
  pool.background_calls().Start<v1::DropResponse>(
      std::move(request), std::chrono::system_clock::now() + timeout,
      [stub](grpc::ClientContext* context, const v1::DropRequest* request,
             v1::DropResponse* response, std::function<void(grpc::Status)> callback) {
        stub->async()->Drop(context, request, response, std::move(callback));
      },
      [done = std::move(done)](absl::Status s, const v1::DropResponse&) { done(std::move(s)); });
}

void TruncateOnWorker(WorkerPool& pool, int worker, const std::string& worker_sequence_id,
                      int layer, int64_t end, std::chrono::milliseconds timeout,
                      std::function<void(absl::Status)> done) {
  v1::TruncateRequest request;
  request.set_sequence_id(worker_sequence_id);
  request.set_layer(layer);
  request.set_end(end);
  v1::Worker::Stub* stub = pool.stub(worker);
  pool.background_calls().Start<v1::TruncateResponse>(
      std::move(request), std::chrono::system_clock::now() + timeout,
      [stub](grpc::ClientContext* context, const v1::TruncateRequest* request,
             v1::TruncateResponse* response, std::function<void(grpc::Status)> callback) {
        stub->async()->Truncate(context, request, response, std::move(callback));
      },
      [done = std::move(done)](absl::Status s, const v1::TruncateResponse&) {
        done(std::move(s));
      });
}

void RetryPendingUndo(WorkerPool& pool, std::shared_ptr<SequenceState> seq, int layer,
                      std::chrono::milliseconds timeout, std::function<void(absl::Status)> done) {
  PendingUndo undo;
  {
    std::lock_guard<std::mutex> lock(seq->mu);
    const std::optional<PendingUndo>& pending = seq->layers[static_cast<size_t>(layer)].undo;
    if (!pending.has_value()) {
      done(absl::OkStatus());
      return;
    }
    undo = *pending;
  }
  struct Retry {
    std::mutex mu;
    size_t left = 0;
    std::map<int, absl::Status> failed;  // Guarded by mu.
  };
  auto retry = std::make_shared<Retry>();
  retry->left = undo.bytes.size();
  const std::string worker_id = WorkerSequenceId(seq->id, layer);
  // Every worker of the undo is asked again, whether or not it answered before: Truncate(end) is
  // idempotent, and it fences that layer's writes still in flight there.
  for (const auto& [worker, bytes] : undo.bytes) {
    TruncateOnWorker(
        pool, worker, worker_id, layer, undo.end, timeout,
        [&pool, seq, layer, undo, retry, done, w = worker](absl::Status s) {
          std::map<int, absl::Status> failed;
          {
            std::lock_guard<std::mutex> lock(retry->mu);
            if (!s.ok()) retry->failed.emplace(w, std::move(s));
            if (--retry->left != 0) return;
            failed.swap(retry->failed);
          }
          // Confirmed workers leave the undo; their bytes are no longer held.
          std::map<int, int64_t> freed;
          {
            std::lock_guard<std::mutex> lock(seq->mu);
            std::optional<PendingUndo>& pending = seq->layers[static_cast<size_t>(layer)].undo;
            for (const auto& [worker, bytes] : undo.bytes) {
              if (failed.count(worker) > 0 || !pending.has_value()) continue;
              freed[worker] = bytes;
              pending->bytes.erase(worker);
              int64_t& held = seq->bytes_on_worker[worker];
              held -= bytes;
              if (held == 0) seq->bytes_on_worker.erase(worker);
            }
            if (failed.empty()) pending.reset();
          }
          for (const auto& [worker, bytes] : freed) pool.Unreserve(worker, bytes);
          if (failed.empty()) {
            done(absl::OkStatus());
            return;
          }
          std::string why;
          for (const auto& [worker, status] : failed) {
            pool.ReportCallStatus(worker, status);
            absl::StrAppend(&why, why.empty() ? "" : "; ", pool.address(worker), ": ",
                            status.message());
          }
          done(absl::UnavailableError(absl::StrCat(
              "layer ", layer, " of sequence '", seq->id, "' takes no call until the undo of a ",
              "failed call is confirmed (keys at positions >= ", undo.end,
              " may remain on workers that could not truncate them: ", why,
              "); retry once they are reachable, or release the sequence")));
        });
  }
}

}  // namespace dhsa::router
