#include "services/transport/descriptor.h"

#include "absl/strings/str_cat.h"
#include "kernels/common/tensor.h"
#include "services/common/wire.h"

namespace dhsa::transport {

int64_t TensorDescriptor::ByteSize() const {
  int64_t n = static_cast<int64_t>(DTypeSize(dtype));
  for (int64_t s : shape) n *= s;
  return n;
}

absl::Status ValidateDescriptor(const TensorDescriptor& d, int64_t max_bytes) {
  if (d.name.empty()) return absl::InvalidArgumentError("tensor descriptor without a name");
  const std::string what = absl::StrCat("descriptor of tensor '", d.name, "'");
  if (d.communicator_id.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " names no communicator"));
  }
  if (d.src_rank < 0 || d.dst_rank < 0 || d.src_rank == d.dst_rank) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has src_rank ", d.src_rank,
                                                   " and dst_rank ", d.dst_rank,
                                                   "; they must be distinct and >= 0"));
  }
  if (d.transfer_id == 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has transfer_id 0; ids start at 1"));
  }
  absl::StatusOr<int64_t> bytes = TensorByteSize(d.shape, d.dtype, d.name);
  if (!bytes.ok()) return bytes.status();
  if (*bytes > max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what, " ", ShapeString(d.shape), " is ", *bytes, " bytes, over the limit of ", max_bytes));
  }
  return absl::OkStatus();
}

void DescriptorToProto(const TensorDescriptor& d, v1::TensorDescriptor* proto) {
  proto->Clear();
  proto->set_name(d.name);
  proto->set_dtype(ToProtoDType(d.dtype));
  for (int64_t s : d.shape) proto->add_shape(s);
  proto->set_communicator_id(d.communicator_id);
  proto->set_src_rank(d.src_rank);
  proto->set_dst_rank(d.dst_rank);
  proto->set_transfer_id(d.transfer_id);
}

absl::StatusOr<TensorDescriptor> DescriptorFromProto(const v1::TensorDescriptor& proto,
                                                     int64_t max_bytes) {
  TensorDescriptor d;
  d.name = proto.name();
  absl::StatusOr<DType> dtype = FromProtoDType(proto.dtype());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("descriptor of tensor '", d.name, "': ", dtype.status().message()));
  }
  d.dtype = *dtype;
  d.shape.assign(proto.shape().begin(), proto.shape().end());
  d.communicator_id = proto.communicator_id();
  d.src_rank = proto.src_rank();
  d.dst_rank = proto.dst_rank();
  d.transfer_id = proto.transfer_id();
  absl::Status valid = ValidateDescriptor(d, max_bytes);
  if (!valid.ok()) return valid;
  return d;
}

}  // namespace dhsa::transport
