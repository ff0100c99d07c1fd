// libFuzzer target: .npy decoding. Any bytes either parse into a tensor whose byte count matches
// its shape and dtype (and which serializes and parses back to itself), or give InvalidArgument.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/string_view.h"
#include "kernels/io/npy.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<dhsa::Tensor> t = dhsa::ParseNpy(bytes, "fuzz.npy");
  if (!t.ok()) {
    DHSA_FUZZ_CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  DHSA_FUZZ_CHECK(static_cast<int64_t>(t->bytes.size()) ==
                  t->NumElements() * static_cast<int64_t>(dhsa::DTypeSize(t->dtype)));
  absl::StatusOr<std::string> again = dhsa::SerializeNpy(*t);
  DHSA_FUZZ_CHECK(again.ok());
  absl::StatusOr<dhsa::Tensor> back = dhsa::ParseNpy(*again, "again.npy");
  DHSA_FUZZ_CHECK(back.ok());
  DHSA_FUZZ_CHECK(back->dtype == t->dtype && back->shape == t->shape && back->bytes == t->bytes);
  return 0;
}
