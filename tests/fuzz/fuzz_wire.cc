// libFuzzer target: wire tensors. The input is cut at "\xff\xfe" markers into serialized
// dhsa.v1.TensorPiece messages, fed in order to a TensorAssembler (the router's and worker's
// reassembly of streamed tensors); the first part is also read as a whole dhsa.v1.Tensor
// (TensorFromProto, as Decode does). Every failure must be INVALID_ARGUMENT or RESOURCE_EXHAUSTED
// (over the byte limit), a complete tensor must match its shape, and cutting it into pieces again
// and reassembling must give the same tensor.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "dhsa/v1/tensor.pb.h"
#include "services/common/wire.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

bool Expected(const absl::Status& s) {
  return s.code() == absl::StatusCode::kInvalidArgument ||
         s.code() == absl::StatusCode::kResourceExhausted;
}

void CheckTensor(const dhsa::Tensor& t) {
  int64_t elements = 1;
  for (int64_t s : t.shape) {
    DHSA_FUZZ_CHECK(s >= 0);
    elements *= s;
  }
  DHSA_FUZZ_CHECK(static_cast<int64_t>(t.bytes.size()) ==
                  elements * static_cast<int64_t>(dhsa::DTypeSize(t.dtype)));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  // First byte: the assembler's byte limit, 2^(b % 24) bytes.
  const int64_t max_bytes = int64_t{1} << (data[0] % 24);
  const absl::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  const std::vector<absl::string_view> parts = absl::StrSplit(rest, "\xff\xfe");

  dhsa::v1::Tensor whole;
  if (whole.ParseFromArray(parts[0].data(), static_cast<int>(parts[0].size()))) {
    absl::StatusOr<dhsa::Tensor> t = dhsa::TensorFromProto(whole, "x");
    if (t.ok()) {
      CheckTensor(*t);
    } else {
      DHSA_FUZZ_CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    }
  }

  dhsa::TensorAssembler assembler("q", max_bytes);
  for (absl::string_view part : parts) {
    dhsa::v1::TensorPiece piece;
    if (!piece.ParseFromArray(part.data(), static_cast<int>(part.size()))) continue;
    const absl::Status added = assembler.Add(piece);
    if (!added.ok()) {
      DHSA_FUZZ_CHECK(Expected(added));
      return 0;
    }
    if (assembler.complete()) break;
  }
  absl::StatusOr<dhsa::Tensor> t = assembler.Take();
  if (!t.ok()) {
    DHSA_FUZZ_CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  CheckTensor(*t);
  DHSA_FUZZ_CHECK(static_cast<int64_t>(t->bytes.size()) <= max_bytes);

  // Pieces of the assembled tensor (size from the input) reassemble to it.
  const int64_t piece_bytes = 1 + static_cast<int64_t>(size % 97);
  dhsa::TensorAssembler again("q", max_bytes);
  absl::Status sent = dhsa::SendTensorPieces(*t, "q", piece_bytes, [&](dhsa::v1::TensorPiece&& p) {
    DHSA_FUZZ_CHECK(again.Add(p).ok());
    return true;
  });
  DHSA_FUZZ_CHECK(sent.ok());
  absl::StatusOr<dhsa::Tensor> back = again.Take();
  DHSA_FUZZ_CHECK(back.ok());
  DHSA_FUZZ_CHECK(back->dtype == t->dtype && back->shape == t->shape && back->bytes == t->bytes);
  return 0;
}
