// Test helpers: the router's side of the Worker protocol over a synchronous stub.
#ifndef DHSA_TESTS_SERVICES_WORKER_CLIENT_H_
#define DHSA_TESTS_SERVICES_WORKER_CLIENT_H_

#include <grpcpp/client_context.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>

#include "absl/status/statusor.h"
#include "dhsa/v1/worker.grpc.pb.h"
#include "kernels/common/status_macros.h"
#include "kernels/common/tensor.h"
#include "services/common/status.h"
#include "services/common/wire.h"

namespace dhsa {

// StoreKv: header, then "k" and "v" in pieces of `piece_bytes`.
inline absl::StatusOr<v1::StoreKvResponse> StoreKvCall(v1::Worker::Stub* stub,
                                                       const v1::StoreKvHeader& header,
                                                       const Tensor& k, const Tensor& v,
                                                       int64_t piece_bytes) {
  grpc::ClientContext context;
  v1::StoreKvResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::StoreKvRequest>> writer =
      stub->StoreKv(&context, &response);
  v1::StoreKvRequest request;
  *request.mutable_header() = header;
  bool open = writer->Write(request);
  const auto send = [&](v1::TensorPiece&& piece) {
    *request.mutable_piece() = std::move(piece);
    return writer->Write(request);
  };
  if (open) open = SendTensorPieces(k, "k", piece_bytes, send).ok();
  if (open) open = SendTensorPieces(v, "v", piece_bytes, send).ok();
  if (open) writer->WritesDone();
  DHSA_RETURN_IF_ERROR(FromGrpcStatus(writer->Finish()));
  return response;
}

struct AttendReply {
  Tensor o;
  Tensor lse;
  v1::AttendResult result;
};

// Attend: header, then "q" in pieces; collects "o", "lse" and the result.
inline absl::StatusOr<AttendReply> AttendCall(
    v1::Worker::Stub* stub, const v1::AttendHeader& header, const Tensor& q, int64_t piece_bytes,
    std::optional<std::chrono::milliseconds> timeout = std::nullopt) {
  grpc::ClientContext context;
  if (timeout) context.set_deadline(std::chrono::system_clock::now() + *timeout);
  auto stream = stub->Attend(&context);
  v1::AttendRequest request;
  *request.mutable_header() = header;
  bool open = stream->Write(request);
  if (open) {
    open = SendTensorPieces(q, "q", piece_bytes, [&](v1::TensorPiece&& piece) {
             *request.mutable_piece() = std::move(piece);
             return stream->Write(request);
           }).ok();
  }
  if (open) stream->WritesDone();
  AttendReply reply;
  TensorAssembler o("o", int64_t{1} << 32), lse("lse", int64_t{1} << 32);
  v1::AttendResponse response;
  absl::Status protocol = absl::OkStatus();
  bool got_result = false;
  while (stream->Read(&response)) {
    if (response.has_result()) {
      reply.result = response.result();
      got_result = true;
    } else if (protocol.ok()) {
      protocol = o.complete() ? lse.Add(response.piece()) : o.Add(response.piece());
    }
  }
  DHSA_RETURN_IF_ERROR(FromGrpcStatus(stream->Finish()));
  DHSA_RETURN_IF_ERROR(protocol);
  if (!got_result) return absl::InternalError("Attend reply has no AttendResult");
  DHSA_ASSIGN_OR_RETURN(reply.o, o.Take());
  DHSA_ASSIGN_OR_RETURN(reply.lse, lse.Take());
  return reply;
}

}  // namespace dhsa

#endif  // DHSA_TESTS_SERVICES_WORKER_CLIENT_H_
