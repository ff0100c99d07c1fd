#include "services/router/sequence.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace dhsa::router {

absl::Status ValidateSequenceId(const std::string& id) {
  if (id.empty() || id.size() > 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence id must have 1 to 128 characters; got ", id.size()));
  }
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence id '", id, "' may hold only letters, digits, '-', '_' and '.'"));
    }
  }
  return absl::OkStatus();
}

std::string WorkerSequenceId(const std::string& id, int layer) {
  return absl::StrCat(id, ".L", layer);
}

absl::Status BeginLayerCall(SequenceState& seq, int layer, bool decode) {
  std::lock_guard<std::mutex> lock(seq.mu);
  if (seq.released) {
    return absl::NotFoundError(absl::StrCat("sequence '", seq.id, "' was released"));
  }
  LayerState& state = seq.layers[static_cast<size_t>(layer)];
  if (state.busy) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " of sequence '", seq.id,
                                                      "' already has a call in flight; calls on "
                                                      "one layer must follow each other"));
  }
  if (decode && state.layout.length() == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "decode on layer ", layer, " of sequence '", seq.id, "' before any prefill of that layer"));
  }
  state.busy = true;
  ++seq.calls_in_flight;
  return absl::OkStatus();
}

void EndLayerCall(SequenceState& seq, int layer) {
  std::lock_guard<std::mutex> lock(seq.mu);
  seq.layers[static_cast<size_t>(layer)].busy = false;
  --seq.calls_in_flight;
}

}  // namespace dhsa::router
