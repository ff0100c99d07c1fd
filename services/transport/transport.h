// Moving one tensor between the router and a worker: send / receive by descriptor, over gRPC bytes
// (TensorPieces on the call's stream, the default) or over NCCL (the descriptor travels on the
// call's stream, the bytes as one ncclSend/ncclRecv on a communicator both share).
#ifndef DHSA_SERVICES_TRANSPORT_TRANSPORT_H_
#define DHSA_SERVICES_TRANSPORT_TRANSPORT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dhsa/v1/tensor.pb.h"
#include "kernels/common/tensor.h"
#include "services/transport/descriptor.h"
#include "services/transport/nccl_communicator.h"
#include "services/transport/options.h"

namespace dhsa::transport {

class TensorTransport {
 public:
  virtual ~TensorTransport() = default;
  virtual Kind kind() const = 0;
  // Sends `tensor` (host memory), which must match `desc` (dtype, shape). Bounded by `deadline`.
  virtual absl::Status Send(const TensorDescriptor& desc, const Tensor& tensor,
                            absl::Time deadline) = 0;
  // Receives the tensor `desc` describes.
  virtual absl::StatusOr<Tensor> Recv(const TensorDescriptor& desc, absl::Time deadline) = 0;
};

// gRPC bytes: a send writes TensorPieces of at most `piece_bytes` data bytes through `sink`
// (false: the stream is gone), a receive reads pieces from `source` (nullopt: the stream ended)
// and checks them as TensorAssembler does, against `max_bytes`. The deadline is the gRPC call's
// (its context bounds the stream); the descriptor's communicator and ranks are not used.
class GrpcBytesTransport final : public TensorTransport {
 public:
  using PieceSink = std::function<bool(v1::TensorPiece&&)>;
  using PieceSource = std::function<std::optional<v1::TensorPiece>()>;
  GrpcBytesTransport(int64_t piece_bytes, int64_t max_bytes, PieceSink sink, PieceSource source);

  Kind kind() const override { return Kind::kGrpc; }
  absl::Status Send(const TensorDescriptor& desc, const Tensor& tensor,
                    absl::Time deadline) override;
  absl::StatusOr<Tensor> Recv(const TensorDescriptor& desc, absl::Time deadline) override;

 private:
  int64_t piece_bytes_;
  int64_t max_bytes_;
  PieceSink sink_;
  PieceSource source_;
};

// NCCL: this process is rank comm->rank(); a send needs desc.src_rank == that rank, a receive
// desc.dst_rank == it (InvalidArgument otherwise), and the descriptor must name the communicator.
// Failures are UNAVAILABLE (the communicator is aborted; nccl_communicator.h).
class NcclTransport final : public TensorTransport {
 public:
  NcclTransport(std::shared_ptr<NcclCommunicator> comm, int64_t max_bytes);

  Kind kind() const override { return Kind::kNccl; }
  absl::Status Send(const TensorDescriptor& desc, const Tensor& tensor,
                    absl::Time deadline) override;
  absl::StatusOr<Tensor> Recv(const TensorDescriptor& desc, absl::Time deadline) override;
  // The same with the bytes in device memory of the communicator's device.
  absl::Status SendDevice(const TensorDescriptor& desc, const void* data, absl::Time deadline);
  absl::Status RecvDevice(const TensorDescriptor& desc, void* data, absl::Time deadline);

  NcclCommunicator& communicator() { return *comm_; }

 private:
  absl::Status Check(const TensorDescriptor& desc, bool send) const;

  std::shared_ptr<NcclCommunicator> comm_;
  int64_t max_bytes_;
};

// A descriptor for sending `tensor` named `name` from `src` to `dst` over `comm`, with the next
// transfer id of `comm` (the side that numbers transfers calls this).
TensorDescriptor DescribeForSend(NcclCommunicator& comm, const std::string& name,
                                 const Tensor& tensor, int dst);

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_TRANSPORT_H_
