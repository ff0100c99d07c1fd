// Hugging Face .safetensors files <-> named Tensors, and a loader for either tensor format.
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON header, then the data section.
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end)} (offsets
// relative to the data section) plus an optional "__metadata__" string -> string map. Read: dtypes
// F32, F16, BF16, and F64 (converted to float32). Write: F32/F16/BF16, header padded with spaces to
// a multiple of 8 bytes, tensors laid out in name order.
#ifndef DHSA_KERNELS_IO_SAFETENSORS_H_
#define DHSA_KERNELS_IO_SAFETENSORS_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/tensor.h"

namespace dhsa {

struct SafetensorsFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

// Parses the bytes of a .safetensors file; `name` (usually the path) is used in error messages.
// Every malformed input (bad header length, invalid JSON, bad dtype/shape/offsets, offsets out of
// range, overlapping tensors, size mismatches) gives InvalidArgument; reads stay within `bytes` and
// allocations are bounded by its size.
absl::StatusOr<SafetensorsFile> ParseSafetensors(absl::string_view bytes, absl::string_view name);

// The bytes of a .safetensors file holding `f`. A tensor whose byte count does not match its shape,
// a tensor named "__metadata__" or a name/metadata string that is not valid UTF-8 ->
// InvalidArgument.
absl::StatusOr<std::string> SerializeSafetensors(const SafetensorsFile& f);

// ReadFileToString + ParseSafetensors.
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

// SerializeSafetensors + WriteFileAtomically.
absl::Status WriteSafetensors(const std::string& path, const SafetensorsFile& f);

// Loads a tensor file by extension: ".npy" -> its one tensor (`tensor_name` is ignored);
// ".safetensors" -> the tensor named `tensor_name` (NotFound, listing the names, if absent; an
// empty `tensor_name` selects the only tensor of a one-tensor file). Other extensions ->
// InvalidArgument.
absl::StatusOr<Tensor> ReadTensorFile(const std::string& path, absl::string_view tensor_name);

}  // namespace dhsa

#endif  // DHSA_KERNELS_IO_SAFETENSORS_H_
