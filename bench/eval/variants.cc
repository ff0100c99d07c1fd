#include "bench/eval/variants.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace dhsa {

absl::StatusOr<Variant> ParseVariant(absl::string_view name, const DhsaConfig& base) {
  Variant variant;
  DhsaConfig& c = variant.config;
  c = base;
  absl::StatusOr<Policy> policy = ParsePolicy(name);
  if (policy.ok()) {
    c.policy = *policy;
    return variant;
  }
  const std::vector<absl::string_view> parts = absl::StrSplit(name, '_');
  if (parts.size() < 2 || parts[0] != "dhsa") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown policy '", name,
                     "'; expected dhsa, block_topk, streaming, dense, oracle_topk or a dhsa "
                     "variant such as dhsa_fixed, dhsa_mean, dhsa_shared"));
  }
  c.policy = Policy::kDhsa;
  for (size_t i = 1; i < parts.size(); ++i) {
    if (parts[i] == "mean") {
      c.summary_norm = SummaryNorm::kMean;
    } else if (parts[i] == "shared") {
      c.shared_heads = true;
    } else if (parts[i] == "mass" || parts[i] == "paper") {
      c.chunk_score = parts[i] == "mass" ? ChunkScore::kMass : ChunkScore::kPaper;
    } else if (parts[i] == "truth") {
      variant.true_boundaries = true;
    } else {
      absl::StatusOr<BoundaryMode> mode = ParseBoundaryMode(parts[i]);
      if (!mode.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown modifier '", parts[i], "' in policy '", name,
                         "'; expected mean, shared, truth, mass, paper or a boundary "
                         "mode (",
                         mode.status().message(), ")"));
      }
      c.boundary_mode = *mode;
    }
  }
  return variant;
}

}  // namespace dhsa
