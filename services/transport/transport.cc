#include "services/transport/transport.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "services/common/wire.h"

namespace dhsa::transport {
namespace {

absl::Status CheckMatches(const TensorDescriptor& desc, const Tensor& tensor) {
  if (tensor.dtype != desc.dtype || tensor.shape != desc.shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", desc.name, "' is ", DTypeName(tensor.dtype), " ", ShapeString(tensor.shape),
        "; its descriptor says ", DTypeName(desc.dtype), " ", ShapeString(desc.shape)));
  }
  if (static_cast<int64_t>(tensor.bytes.size()) != desc.ByteSize()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", desc.name, "' holds ",
                                                   tensor.bytes.size(), " bytes; its shape needs ",
                                                   desc.ByteSize()));
  }
  return absl::OkStatus();
}

}  // namespace

GrpcBytesTransport::GrpcBytesTransport(int64_t piece_bytes, int64_t max_bytes, PieceSink sink,
                                       PieceSource source)
    : piece_bytes_(piece_bytes),
      max_bytes_(max_bytes),
      sink_(std::move(sink)),
      source_(std::move(source)) {}

absl::Status GrpcBytesTransport::Send(const TensorDescriptor& desc, const Tensor& tensor,
                                      absl::Time /*deadline*/) {
  absl::Status s = CheckMatches(desc, tensor);
  if (!s.ok()) return s;
  return SendTensorPieces(tensor, desc.name, piece_bytes_, sink_);
}

absl::StatusOr<Tensor> GrpcBytesTransport::Recv(const TensorDescriptor& desc,
                                                absl::Time /*deadline*/) {
  TensorAssembler assembler(desc.name, max_bytes_);
  while (!assembler.complete()) {
    std::optional<v1::TensorPiece> piece = source_();
    if (!piece.has_value()) break;  // Take() names the missing bytes.
    absl::Status s = assembler.Add(*piece);
    if (!s.ok()) return s;
  }
  absl::StatusOr<Tensor> t = assembler.Take();
  if (!t.ok()) return t.status();
  if (t->dtype != desc.dtype || t->shape != desc.shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", desc.name, "' arrived as ", DTypeName(t->dtype), " ", ShapeString(t->shape),
        "; expected ", DTypeName(desc.dtype), " ", ShapeString(desc.shape)));
  }
  return t;
}

NcclTransport::NcclTransport(std::shared_ptr<NcclCommunicator> comm, int64_t max_bytes)
    : comm_(std::move(comm)), max_bytes_(max_bytes) {}

absl::Status NcclTransport::Check(const TensorDescriptor& desc, bool send) const {
  absl::Status s = ValidateDescriptor(desc, max_bytes_);
  if (!s.ok()) return s;
  if (desc.communicator_id != comm_->id()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", desc.name, "' is described on communicator '",
                     desc.communicator_id, "'; this transport is '", comm_->id(), "'"));
  }
  const int me = send ? desc.src_rank : desc.dst_rank;
  const int peer = send ? desc.dst_rank : desc.src_rank;
  if (me != comm_->rank() || peer >= comm_->num_ranks()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", desc.name, "' goes from rank ", desc.src_rank, " to rank ",
                     desc.dst_rank, "; this process is rank ", comm_->rank(), " of ",
                     comm_->num_ranks(), " and ", send ? "sends" : "receives"));
  }
  return absl::OkStatus();
}

absl::Status NcclTransport::Send(const TensorDescriptor& desc, const Tensor& tensor,
                                 absl::Time deadline) {
  absl::Status s = Check(desc, true);
  if (s.ok()) s = CheckMatches(desc, tensor);
  if (!s.ok()) return s;
  return comm_->SendHost(desc.transfer_id, tensor.data(), desc.ByteSize(), desc.dst_rank, deadline,
                         absl::StrCat("ncclSend of '", desc.name, "' to rank ", desc.dst_rank));
}

absl::StatusOr<Tensor> NcclTransport::Recv(const TensorDescriptor& desc, absl::Time deadline) {
  absl::Status s = Check(desc, false);
  if (!s.ok()) return s;
  Tensor t = Tensor::Uninitialized(desc.dtype, desc.shape);
  s = comm_->RecvHost(desc.transfer_id, t.data(), desc.ByteSize(), desc.src_rank, deadline,
                      absl::StrCat("ncclRecv of '", desc.name, "' from rank ", desc.src_rank));
  if (!s.ok()) return s;
  return t;
}

absl::Status NcclTransport::SendDevice(const TensorDescriptor& desc, const void* data,
                                       absl::Time deadline) {
  absl::Status s = Check(desc, true);
  if (!s.ok()) return s;
  return comm_->SendDevice(desc.transfer_id, data, desc.ByteSize(), desc.dst_rank, deadline,
                           absl::StrCat("ncclSend of '", desc.name, "' to rank ", desc.dst_rank));
}

absl::Status NcclTransport::RecvDevice(const TensorDescriptor& desc, void* data,
                                       absl::Time deadline) {
  absl::Status s = Check(desc, false);
  if (!s.ok()) return s;
  return comm_->RecvDevice(desc.transfer_id, data, desc.ByteSize(), desc.src_rank, deadline,
                           absl::StrCat("ncclRecv of '", desc.name, "' from rank ", desc.src_rank));
}

TensorDescriptor DescribeForSend(NcclCommunicator& comm, const std::string& name,
                                 const Tensor& tensor, int dst) {
  TensorDescriptor d;
  d.name = name;
  d.dtype = tensor.dtype;
  d.shape = tensor.shape;
  d.communicator_id = comm.id();
  d.src_rank = comm.rank();
  d.dst_rank = dst;
  d.transfer_id = comm.AllocateTransferId();
  return d;
}

}  // namespace dhsa::transport
