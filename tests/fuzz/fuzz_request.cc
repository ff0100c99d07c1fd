// libFuzzer target: request validation. The first byte picks a message, the rest is its
// serialized form:
//   0: dhsa.v1.CreateSequenceRequest -> the DHSA parameters (DhsaConfigFromProto, which runs the
//      kernel's ValidateConfig) and the shapes must be accepted or rejected with INVALID_ARGUMENT;
//   1: dhsa.v1.AttendHeader (a worker's attention request) -> SelectionFromAttendHeader accepts
//      only selections whose spans are non-empty, sorted, disjoint and inside non-negative keys,
//      with one entry per (head, block), and rejects the rest with INVALID_ARGUMENT.
#include <cstdint>

#include "dhsa/v1/attention.pb.h"
#include "dhsa/v1/worker.pb.h"
#include "services/common/config.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int kind = data[0] % 2;
  const void* bytes = data + 1;
  const int n = static_cast<int>(size - 1);
  if (kind == 0) {
    dhsa::v1::CreateSequenceRequest request;
    if (!request.ParseFromArray(bytes, n)) return 0;
    absl::StatusOr<dhsa::DhsaConfig> config =
        dhsa::DhsaConfigFromProto(request.config().params(), dhsa::DhsaConfig{});
    if (!config.ok()) {
      DHSA_FUZZ_CHECK(config.status().code() == absl::StatusCode::kInvalidArgument);
      return 0;
    }
    // What was accepted round-trips through the proto unchanged.
    dhsa::v1::DhsaParams params;
    dhsa::DhsaConfigToProto(*config, &params);
    absl::StatusOr<dhsa::DhsaConfig> back = dhsa::DhsaConfigFromProto(params, dhsa::DhsaConfig{});
    DHSA_FUZZ_CHECK(back.ok());
    dhsa::v1::DhsaParams again;
    dhsa::DhsaConfigToProto(*back, &again);
    DHSA_FUZZ_CHECK(again.SerializeAsString() == params.SerializeAsString());
    return 0;
  }
  dhsa::v1::AttendHeader header;
  if (!header.ParseFromArray(bytes, n)) return 0;
  absl::StatusOr<dhsa::Selection> selection = dhsa::SelectionFromAttendHeader(header);
  if (!selection.ok()) {
    DHSA_FUZZ_CHECK(selection.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  DHSA_FUZZ_CHECK(selection->block_size > 0);
  DHSA_FUZZ_CHECK(static_cast<int64_t>(selection->spans.size()) ==
                  selection->num_heads * selection->num_blocks);
  for (const auto& entry : selection->spans) {
    int64_t prev_end = 0;
    for (const auto& span : entry) {
      DHSA_FUZZ_CHECK(span.begin >= prev_end && span.end > span.begin);
      prev_end = span.end;
    }
  }
  return 0;
}
