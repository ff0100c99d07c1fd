#include "services/router/worker_calls.h"

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
  if (ok) WriteNext();  // Otherwise the stream is broken; OnDone brings the status.
}

void StoreKvCall::OnDone(const grpc::Status& grpc_status) {
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

void DropOnWorker(v1::Worker::Stub* stub, const std::string& worker_sequence_id,
                  std::chrono::milliseconds timeout, std::function<void(absl::Status)> done) {
  struct State {
    grpc::ClientContext context;
    v1::DropRequest request;
    v1::DropResponse response;
  };
  auto* state = new State;
  state->request.set_sequence_id(worker_sequence_id);
  state->context.set_deadline(std::chrono::system_clock::now() + timeout);
  stub->async()->Drop(&state->context, &state->request, &state->response,
                      [state, done = std::move(done)](grpc::Status s) {
                        done(FromGrpcStatus(s));
                        delete state;
                      });
}

void TruncateOnWorker(v1::Worker::Stub* stub, const std::string& worker_sequence_id, int layer,
                      int64_t end, std::chrono::milliseconds timeout,
                      std::function<void(absl::Status)> done) {
  struct State {
    grpc::ClientContext context;
    v1::TruncateRequest request;
    v1::TruncateResponse response;
  };
  auto* state = new State;
  state->request.set_sequence_id(worker_sequence_id);
  state->request.set_layer(layer);
  state->request.set_end(end);
  state->context.set_deadline(std::chrono::system_clock::now() + timeout);
  stub->async()->Truncate(&state->context, &state->request, &state->response,
                          [state, done = std::move(done)](grpc::Status s) {
                            done(FromGrpcStatus(s));
                            delete state;
                          });
}

}  // namespace dhsa::router
