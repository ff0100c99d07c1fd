#include "bench/eval/variants.h"

#include <algorithm>
#include <vector>

#include "absl/strings/numbers.h"
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
                     "variant such as dhsa_paper, dhsa_fixed, dhsa_paper_mean, dhsa_shared"));
  }
  c.policy = Policy::kDhsa;
  for (size_t i = 1; i < parts.size(); ++i) {
    int64_t number = 0;
    if (parts[i] == "mean") {
      c.summary_norm = SummaryNorm::kMean;
    } else if (parts[i] == "shared") {
      c.shared_heads = true;
    } else if (parts[i] == "paper") {
      // The spec's method: the paper preset's score, query blocks and chunk lengths.
      c = ApplyPreset(Preset::kPaper, c);
      c.local = std::max(c.local, c.q_block);
    } else if (parts[i] == "mass") {
      c.chunk_score = ChunkScore::kMass;
    } else if (parts[i].size() > 1 &&
               absl::string_view("qcrnx").find(parts[i][0]) != absl::string_view::npos &&
               absl::SimpleAtoi(parts[i].substr(1), &number) && number > 0) {
      // q<N>: query blocks of N rows (the local window grows to N if smaller); c<N>: chunks of N
      // keys (mean length for dynamic chunks, min and max scaled alike); r<N>: score_rows; n<N>,
      // x<N>: chunk_min, chunk_max.
      if (parts[i][0] == 'q') {
        c.q_block = number;
        c.local = std::max(c.local, number);
      } else if (parts[i][0] == 'c') {
        c.chunk_min = std::max<int64_t>(1, c.chunk_min * number / c.chunk_mean);
        c.chunk_max = std::max<int64_t>(c.chunk_min, c.chunk_max * number / c.chunk_mean);
        c.chunk_mean = number;
      } else if (parts[i][0] == 'n') {
        c.chunk_min = number;
      } else if (parts[i][0] == 'x') {
        c.chunk_max = number;
      } else {
        c.score_rows = number;
      }
    } else if (parts[i] == "truth") {
      variant.true_boundaries = true;
    } else {
      absl::StatusOr<BoundaryMode> mode = ParseBoundaryMode(parts[i]);
      if (!mode.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown modifier '", parts[i], "' in policy '", name,
                         "'; expected mean, shared, truth, mass, paper, q<rows>, c<keys>, r<rows>, "
                         "n<min>, x<max> or a boundary mode (",
                         mode.status().message(), ")"));
      }
      c.boundary_mode = *mode;
    }
  }
  if (c.summary_norm == SummaryNorm::kMean && c.chunk_score == ChunkScore::kMass) {
    // The mass score always uses plain means (the log(len) term does the length's work): `mean`
    // would be a no-op posing as an ablation.
    return absl::InvalidArgumentError(
        absl::StrCat("policy '", name,
                     "': mean changes the paper score's summaries only, and this variant uses the "
                     "mass score; use it with paper (dhsa_paper_mean)"));
  }
  return variant;
}

}  // namespace dhsa
