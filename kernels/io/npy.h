// NumPy .npy files (format versions 1.0, 2.0, 3.0) <-> Tensor.
//
// Read: little-endian float32 ('<f4'), float16 ('<f2') and float64 ('<f8', converted to float32);
// '=' (native) is taken as '<' on little-endian hosts. Big-endian data, fortran_order True and any
// other dtype are rejected with a message naming what was found and what is accepted.
// Write: version 1.0 (2.0 only if the header would not fit), '<f4' or '<f2'.
#ifndef DHSA_KERNELS_IO_NPY_H_
#define DHSA_KERNELS_IO_NPY_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/tensor.h"

namespace dhsa {

// Parses the bytes of a .npy file; `name` (usually the path) is used in error messages. Every
// malformed input gives InvalidArgument; reads stay within `bytes` and allocations are bounded by
// its size.
absl::StatusOr<Tensor> ParseNpy(absl::string_view bytes, absl::string_view name);

// The bytes of a .npy file holding `t`. bfloat16 -> InvalidArgument (npy has no bfloat16); a
// tensor whose byte count does not match its shape -> InvalidArgument.
absl::StatusOr<std::string> SerializeNpy(const Tensor& t);

// ReadFileToString + ParseNpy.
absl::StatusOr<Tensor> ReadNpy(const std::string& path);

// SerializeNpy + WriteFileAtomically.
absl::Status WriteNpy(const std::string& path, const Tensor& t);

}  // namespace dhsa

#endif  // DHSA_KERNELS_IO_NPY_H_
