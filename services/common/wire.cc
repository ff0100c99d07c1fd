#include "services/common/wire.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"

namespace dhsa {
namespace {

// Largest tensor the wire code handles; far above any memory, low enough that sizes never overflow.
constexpr int64_t kMaxTensorBytes = int64_t{1} << 62;

// Room for a piece's name, dtype, shape and offset and the oneof wrapper around it.
constexpr int64_t kPieceOverheadBytes = 1024;

std::vector<int64_t> ShapeOf(const google::protobuf::RepeatedField<int64_t>& shape) {
  return std::vector<int64_t>(shape.begin(), shape.end());
}

}  // namespace

absl::StatusOr<DType> FromProtoDType(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return DType::kF32;
    case v1::DTYPE_FLOAT16:
      return DType::kF16;
    case v1::DTYPE_BFLOAT16:
      return DType::kBF16;
    case v1::DTYPE_UNSPECIFIED:
      return absl::InvalidArgumentError("dtype is not set (DTYPE_UNSPECIFIED)");
    default:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype value ", static_cast<int>(dtype)));
}

v1::DType ToProtoDType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return v1::DTYPE_FLOAT32;
    case DType::kF16:
      return v1::DTYPE_FLOAT16;
    case DType::kBF16:
      return v1::DTYPE_BFLOAT16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<int64_t> TensorByteSize(const std::vector<int64_t>& shape, DType dtype,
                                       absl::string_view name) {
  int64_t bytes = static_cast<int64_t>(DTypeSize(dtype));
  for (int64_t s : shape) {
    if (s < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' has a negative size in shape ", ShapeString(shape)));
    }
  }
  for (int64_t s : shape) {
    if (s == 0) return 0;
    if (bytes > kMaxTensorBytes / s) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' of shape ", ShapeString(shape), " is too large"));
    }
    bytes *= s;
  }
  return bytes;
}

absl::StatusOr<Tensor> TensorFromProto(const v1::Tensor& proto, absl::string_view name) {
  absl::StatusOr<DType> dtype = FromProtoDType(proto.dtype());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': ", dtype.status().message()));
  }
  Tensor t;
  t.dtype = *dtype;
  t.shape = ShapeOf(proto.shape());
  DHSA_ASSIGN_OR_RETURN(const int64_t bytes, TensorByteSize(t.shape, t.dtype, name));
  if (static_cast<int64_t>(proto.data().size()) != bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' holds ", proto.data().size(), " bytes but its shape ",
                     ShapeString(t.shape), " and dtype ", DTypeName(t.dtype), " need ", bytes));
  }
  t.bytes.assign(proto.data().begin(), proto.data().end());
  return t;
}

void TensorToProto(const Tensor& tensor, v1::Tensor* proto) {
  proto->set_dtype(ToProtoDType(tensor.dtype));
  proto->mutable_shape()->Assign(tensor.shape.begin(), tensor.shape.end());
  proto->set_data(tensor.bytes.data(), tensor.bytes.size());
}

absl::Status SendTensorPieces(const Tensor& tensor, const std::string& name,
                              int64_t max_piece_bytes,
                              const std::function<bool(v1::TensorPiece&&)>& send) {
  return SendTensorPieces(tensor.dtype, tensor.shape, tensor.bytes.data(),
                          static_cast<int64_t>(tensor.bytes.size()), name, max_piece_bytes, send);
}

absl::Status SendTensorPieces(DType dtype, const std::vector<int64_t>& shape, const uint8_t* data,
                              int64_t bytes, const std::string& name, int64_t max_piece_bytes,
                              const std::function<bool(v1::TensorPiece&&)>& send) {
  if (max_piece_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("piece size for tensor '", name, "' must be positive; got ", max_piece_bytes));
  }
  const int64_t total = bytes;
  int64_t offset = 0;
  do {
    const int64_t n = std::min(max_piece_bytes, total - offset);
    v1::TensorPiece piece;
    piece.set_name(name);
    if (offset == 0) {
      piece.set_dtype(ToProtoDType(dtype));
      piece.mutable_shape()->Assign(shape.begin(), shape.end());
    }
    piece.set_offset(offset);
    piece.set_data(data + offset, static_cast<size_t>(n));
    if (!send(std::move(piece))) {
      return absl::UnavailableError(absl::StrCat("stream closed while sending tensor '", name,
                                                 "' (", offset, " of ", total, " bytes sent)"));
    }
    offset += n;
  } while (offset < total);
  return absl::OkStatus();
}

int64_t PieceBytesForMessageLimit(int64_t max_message_bytes) {
  return std::max<int64_t>(1, max_message_bytes - kPieceOverheadBytes);
}

TensorAssembler::TensorAssembler(std::string expected_name, int64_t max_bytes,
                                 int64_t max_reserve_bytes)
    : name_(std::move(expected_name)),
      max_bytes_(max_bytes),
      max_reserve_bytes_(std::max<int64_t>(0, max_reserve_bytes)) {}

absl::Status TensorAssembler::Add(const v1::TensorPiece& piece) {
  if (piece.name() != name_) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected a piece of tensor '", name_, "', got one of '", piece.name(), "'"));
  }
  if (complete()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name_, "' is already complete (", total_bytes_,
                     " bytes); got another piece at offset ", piece.offset()));
  }
  if (!started_) {
    if (piece.offset() != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "first piece of tensor '", name_, "' has offset ", piece.offset(), "; expected 0"));
    }
    absl::StatusOr<DType> dtype = FromProtoDType(piece.dtype());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("first piece of tensor '", name_, "': ", dtype.status().message()));
    }
    std::vector<int64_t> shape = ShapeOf(piece.shape());
    DHSA_ASSIGN_OR_RETURN(const int64_t total, TensorByteSize(shape, *dtype, name_));
    if (total > max_bytes_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tensor '", name_, "' of shape ", ShapeString(shape), " ", DTypeName(*dtype), " is ",
          total, " bytes, over the limit of ", max_bytes_, " bytes for this call"));
    }
    tensor_.dtype = *dtype;
    tensor_.shape = std::move(shape);
    tensor_.bytes.clear();
    // At most max_reserve_bytes_ up front (a 32K-token layer's q in float32 is 128 MiB): the
    // declared size is the sender's word (a hostile one may
    // declare terabytes within the shapes a sequence allows); beyond it the buffer grows with the
    // bytes that arrive.
    tensor_.bytes.reserve(static_cast<size_t>(std::min(total, max_reserve_bytes_)));
    total_bytes_ = total;
    started_ = true;
  }
  const int64_t received = static_cast<int64_t>(tensor_.bytes.size());
  if (piece.offset() != received) {
    return absl::InvalidArgumentError(absl::StrCat("piece of tensor '", name_, "' at offset ",
                                                   piece.offset(), " does not continue at byte ",
                                                   received, " (pieces must arrive in order)"));
  }
  const int64_t n = static_cast<int64_t>(piece.data().size());
  if (n > total_bytes_ - received) {
    return absl::InvalidArgumentError(
        absl::StrCat("piece of tensor '", name_, "' at offset ", received, " with ", n,
                     " bytes runs past its declared size of ", total_bytes_, " bytes"));
  }
  if (received + n > static_cast<int64_t>(tensor_.bytes.capacity())) {
    // Grow by doubling (capped at the declared size) into a fresh buffer with one memcpy: the
    // vector's own reallocation moves the bytes one at a time through the allocator.
    const int64_t want = std::min(
        total_bytes_, std::max(received + n, 2 * static_cast<int64_t>(tensor_.bytes.capacity())));
    ByteBuffer grown;
    grown.reserve(static_cast<size_t>(want));
    grown.resize(static_cast<size_t>(received));
    if (received > 0)
      std::memcpy(grown.data(), tensor_.bytes.data(), static_cast<size_t>(received));
    tensor_.bytes.swap(grown);
  }
  // resize + memcpy: an insert from char iterators into uint8_t storage is a byte loop.
  tensor_.bytes.resize(static_cast<size_t>(received + n));
  if (n > 0) {
    std::memcpy(tensor_.bytes.data() + received, piece.data().data(), static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

bool TensorAssembler::complete() const {
  return started_ && static_cast<int64_t>(tensor_.bytes.size()) == total_bytes_;
}

absl::StatusOr<Tensor> TensorAssembler::Take() {
  if (!started_) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream ended before any piece of tensor '", name_, "'"));
  }
  if (!complete()) {
    return absl::InvalidArgumentError(absl::StrCat("stream ended after ", tensor_.bytes.size(),
                                                   " of ", total_bytes_, " bytes of tensor '",
                                                   name_, "'"));
  }
  started_ = false;
  total_bytes_ = 0;
  return std::exchange(tensor_, Tensor{});
}

}  // namespace dhsa
