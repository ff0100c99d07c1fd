// libFuzzer target: .safetensors decoding. Any bytes either parse into tensors whose byte counts
// match their shapes (and which serialize and parse back to themselves), or give InvalidArgument.
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "kernels/io/safetensors.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<dhsa::SafetensorsFile> f = dhsa::ParseSafetensors(bytes, "fuzz.safetensors");
  if (!f.ok()) {
    DHSA_FUZZ_CHECK(f.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  for (const auto& [name, t] : f->tensors) {
    DHSA_FUZZ_CHECK(static_cast<int64_t>(t.bytes.size()) ==
                    t.NumElements() * static_cast<int64_t>(dhsa::DTypeSize(t.dtype)));
  }
  absl::StatusOr<std::string> again = dhsa::SerializeSafetensors(*f);
  if (!again.ok()) {  // Names or metadata that are not UTF-8 cannot be written back.
    DHSA_FUZZ_CHECK(again.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  absl::StatusOr<dhsa::SafetensorsFile> back = dhsa::ParseSafetensors(*again, "again");
  DHSA_FUZZ_CHECK(back.ok());
  DHSA_FUZZ_CHECK(back->tensors.size() == f->tensors.size() && back->metadata == f->metadata);
  for (const auto& [name, t] : f->tensors) {
    const dhsa::Tensor& u = back->tensors.at(name);
    DHSA_FUZZ_CHECK(u.dtype == t.dtype && u.shape == t.shape && u.bytes == t.bytes);
  }
  return 0;
}
