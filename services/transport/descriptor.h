// Descriptors of tensors that move outside the gRPC message that names them (the NCCL data plane):
// what a TensorDescriptor (proto/dhsa/v1/worker.proto) says, checked on the way in.
#ifndef DHSA_SERVICES_TRANSPORT_DESCRIPTOR_H_
#define DHSA_SERVICES_TRANSPORT_DESCRIPTOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "dhsa/v1/worker.pb.h"
#include "kernels/common/dtype.h"

namespace dhsa::transport {

struct TensorDescriptor {
  std::string name;  // "q", "k", "v", "o", "lse".
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::string communicator_id;
  int32_t src_rank = 0;
  int32_t dst_rank = 0;
  uint64_t transfer_id = 0;  // >= 1.

  // Bytes the shape and dtype imply (valid after Validate).
  int64_t ByteSize() const;
};

// InvalidArgument naming the tensor for: an empty name or communicator id, a negative dimension or
// a size over 2^62 bytes, a negative rank, src_rank == dst_rank, transfer_id 0; ResourceExhausted
// when the tensor is larger than `max_bytes`.
absl::Status ValidateDescriptor(const TensorDescriptor& d, int64_t max_bytes);

void DescriptorToProto(const TensorDescriptor& d, v1::TensorDescriptor* proto);
// The descriptor of `proto`, validated as ValidateDescriptor (an unknown dtype is
// InvalidArgument).
absl::StatusOr<TensorDescriptor> DescriptorFromProto(const v1::TensorDescriptor& proto,
                                                     int64_t max_bytes);

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_DESCRIPTOR_H_
