// Tensors on the wire (proto/dhsa/v1/tensor.proto): whole-tensor messages, and tensors streamed as
// TensorPieces below the message size limit, with the checks every receiver needs.
#ifndef DHSA_SERVICES_COMMON_WIRE_H_
#define DHSA_SERVICES_COMMON_WIRE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "dhsa/v1/tensor.pb.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"

namespace dhsa {

// DTYPE_UNSPECIFIED and unknown values are InvalidArgument.
absl::StatusOr<DType> FromProtoDType(v1::DType dtype);
v1::DType ToProtoDType(DType dtype);

// Bytes of a tensor of `shape` and `dtype`; InvalidArgument (naming `name`) for a negative size or
// a size over 2^62 bytes.
absl::StatusOr<int64_t> TensorByteSize(const std::vector<int64_t>& shape, DType dtype,
                                       absl::string_view name);

// A whole tensor from one message; InvalidArgument naming the tensor if the dtype is unknown, a
// size is negative or the byte count does not match the shape.
absl::StatusOr<Tensor> TensorFromProto(const v1::Tensor& proto, absl::string_view name);
void TensorToProto(const Tensor& tensor, v1::Tensor* proto);

// Sends `tensor` as pieces named `name` with at most `max_piece_bytes` (> 0) data bytes each, in
// order; the first piece carries dtype and shape. A tensor of zero bytes is one piece with no data.
// `send` returns false when the stream is gone: then Unavailable and nothing more is sent.
absl::Status SendTensorPieces(const Tensor& tensor, const std::string& name,
                              int64_t max_piece_bytes,
                              const std::function<bool(v1::TensorPiece&&)>& send);
// The same for `bytes` bytes at `data` (not copied) holding a tensor of `dtype` and `shape`.
absl::Status SendTensorPieces(DType dtype, const std::vector<int64_t>& shape, const uint8_t* data,
                              int64_t bytes, const std::string& name, int64_t max_piece_bytes,
                              const std::function<bool(v1::TensorPiece&&)>& send);

// Data bytes per piece for a stream whose messages may not exceed `max_message_bytes`: the limit
// less room for the piece's other fields and the enclosing message (at least 1).
int64_t PieceBytesForMessageLimit(int64_t max_message_bytes);

// Rebuilds one streamed tensor from its pieces, checking each as it arrives: the name, dtype and
// shape on the first piece (offset 0), contiguous offsets, no data past the declared size, and the
// declared size against `max_bytes` before anything is allocated (ResourceExhausted). Other
// violations are InvalidArgument; every message names the tensor.
class TensorAssembler {
 public:
  // Bytes reserved before the data arrives, at most (larger tensors grow as their bytes come; the
  // declared size is the sender's word).
  static constexpr int64_t kDefaultMaxReserveBytes = int64_t{256} << 20;

  TensorAssembler(std::string expected_name, int64_t max_bytes,
                  int64_t max_reserve_bytes = kDefaultMaxReserveBytes);

  absl::Status Add(const v1::TensorPiece& piece);
  // True once every declared byte has arrived (after the first piece for a zero-byte tensor).
  bool complete() const;
  // The tensor; InvalidArgument "stream ended after X of Y bytes of tensor 'k'" if incomplete.
  // The assembler is empty afterwards.
  absl::StatusOr<Tensor> Take();

  const std::string& name() const { return name_; }

 private:
  std::string name_;
  int64_t max_bytes_;
  int64_t max_reserve_bytes_;
  bool started_ = false;     // The first piece (dtype, shape) has arrived.
  int64_t total_bytes_ = 0;  // Declared size, valid once started_.
  Tensor tensor_;            // bytes.size() is the count received so far.
};

}  // namespace dhsa

#endif  // DHSA_SERVICES_COMMON_WIRE_H_
