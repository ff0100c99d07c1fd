#include "bench/eval/pair_match.h"

#include <algorithm>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/common/inputs.h"
#include "kernels/common/status_macros.h"
#include "kernels/common/tensor.h"
#include "kernels/fidelity/oracle_rows.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"

namespace dhsa {
namespace {

constexpr int64_t kDim = 4;

Tensor FixedTensor(int64_t len, uint64_t seed) {
  Tensor t = Tensor::Zeros(DType::kF32, {1, len, kDim});
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  float* p = static_cast<float*>(t.data());
  for (int64_t i = 0; i < len * kDim; ++i) p[i] = normal(rng);
  return t;
}

}  // namespace

absl::StatusOr<int64_t> StructuralPairs(const DhsaConfig& config, int64_t lq, int64_t lk) {
  if (lq < 1 || lk < lq) {
    return absl::InvalidArgumentError(absl::StrCat("need 1 <= lq <= lk; got lq ", lq, ", lk ", lk));
  }
  DHSA_RETURN_IF_ERROR(ValidateConfig(config));
  const int64_t t0 = lk - lq;
  if (config.policy == Policy::kDense) return lk * (lk + 1) / 2 - t0 * (t0 + 1) / 2;
  if (config.policy == Policy::kOracleTopk) return OracleComputedPairs(1, t0, lk, config.budget);
  const Tensor q = FixedTensor(lq, 1), k = FixedTensor(lk, 2);
  DHSA_ASSIGN_OR_RETURN(HeadsView qv, HeadsView::Of(q, "Q"));
  DHSA_ASSIGN_OR_RETURN(HeadsView kv, HeadsView::Of(k, "K"));
  qv.offset = t0;
  const AttentionShape shape{1, 1, kDim, lq, lk};
  // The count does not depend on the chunks or their scores: the cheapest ones are taken.
  DhsaConfig c = config;
  c.chunk_score = ChunkScore::kPaper;
  DhsaConfig chunking = c;
  chunking.boundary_mode = BoundaryMode::kFixed;
  if (c.policy == Policy::kBlockTopk) chunking.chunk_mean = c.block;
  DHSA_ASSIGN_OR_RETURN(std::vector<int64_t> boundaries, SegmentKeysReference(kv, 0, lk, chunking));
  const Summaries kappa = ChunkSummariesReference(kv, boundaries, ChunkSummaryNorm(c));
  const Summaries rho = ScoreQuerySummariesReference(qv, 1, c);
  SelectionInputs in;
  in.shape = shape;
  in.boundaries = &boundaries;
  in.kappa = &kappa;
  in.rho = &rho;
  DHSA_ASSIGN_OR_RETURN(Selection sel, SelectSpansReference(in, c));
  return CountComputedPairs(sel, shape);
}

absl::StatusOr<int64_t> PairMatchedBudget(const DhsaConfig& config, int64_t target, int64_t lq,
                                          int64_t lk) {
  auto pairs_at = [&](int64_t budget) -> absl::StatusOr<int64_t> {
    DhsaConfig c = config;
    c.budget = budget;
    return StructuralPairs(c, lq, lk);
  };
  // The smallest budget the policy accepts: found by ValidateConfig, from 1 upwards in steps that
  // double.
  int64_t lo = 1;
  while (true) {
    DhsaConfig c = config;
    c.budget = lo;
    if (ValidateConfig(c).ok()) break;
    if (lo > config.budget) return ValidateConfig(config);
    lo *= 2;
  }
  // Shrink back to the exact smallest valid budget (validity is monotone in the budget).
  for (int64_t step = lo / 2; step >= 1; step /= 2) {
    DhsaConfig c = config;
    c.budget = lo - step;
    if (lo - step >= 1 && ValidateConfig(c).ok()) lo -= step;
  }
  int64_t hi = 4 * config.budget + 4096;
  DHSA_ASSIGN_OR_RETURN(const int64_t at_hi, pairs_at(hi));
  if (at_hi < target) {
    return absl::InvalidArgumentError(absl::StrCat(PolicyName(config.policy), " computes ", at_hi,
                                                   " pairs at budget ", hi, ", fewer than the ",
                                                   target, " to match"));
  }
  // Most policies match at the nominal budget (those with dhsa's query blocks): two counts.
  if (config.budget - 1 >= lo) {
    DHSA_ASSIGN_OR_RETURN(const int64_t at_budget, pairs_at(config.budget));
    DHSA_ASSIGN_OR_RETURN(const int64_t below, pairs_at(config.budget - 1));
    if (at_budget >= target && below < target) return config.budget;
  }
  DHSA_ASSIGN_OR_RETURN(const int64_t at_lo, pairs_at(lo));
  if (at_lo >= target) return lo;
  // Pairs never fall as the budget grows: at_lo < target <= pairs(hi).
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    DHSA_ASSIGN_OR_RETURN(const int64_t at_mid, pairs_at(mid));
    if (at_mid >= target) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return hi;
}

}  // namespace dhsa
