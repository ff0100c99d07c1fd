#include "bench/gpu/reference_selection.h"

#include <vector>

#include "kernels/boundaries/boundaries.h"
#include "kernels/common/inputs.h"
#include "kernels/common/status_macros.h"
#include "kernels/summaries/summaries.h"

namespace dhsa {

absl::StatusOr<Selection> ReferenceSelection(const Tensor& q_tensor, const Tensor& k_tensor,
                                             const DhsaConfig& config, bool decode) {
  DHSA_RETURN_IF_ERROR(ValidateConfig(config));
  if (config.policy == Policy::kOracleTopk) {
    return absl::InvalidArgumentError("oracle_topk selects per row: not a block selection");
  }
  DHSA_ASSIGN_OR_RETURN(HeadsView q, HeadsView::Of(q_tensor, "Q"));
  DHSA_ASSIGN_OR_RETURN(HeadsView k, HeadsView::Of(k_tensor, "K"));
  DHSA_ASSIGN_OR_RETURN(AttentionShape shape, CheckShapes(q, k, k));
  q.offset = shape.t0();

  std::vector<int64_t> boundaries = {0, shape.lk};
  Summaries kappa, rho;
  if (config.policy == Policy::kDhsa) {
    std::vector<int64_t> prior = {0};
    if (shape.t0() > 0) {
      DHSA_ASSIGN_OR_RETURN(prior, SegmentKeysReference(k, 0, shape.t0(), config));
    }
    if (decode) {
      DHSA_ASSIGN_OR_RETURN(boundaries,
                            AppendDecodeBoundariesReference(k, prior, shape.lk, config));
    } else {
      DHSA_ASSIGN_OR_RETURN(boundaries,
                            AppendPrefillBoundariesReference(k, prior, shape.lk, config));
    }
    // The summaries the config's chunk score uses (paper: sqrt-normalised block means; mass: mean
    // keys and one mean query per query head and score_rows piece).
    kappa = ChunkSummariesReference(k, boundaries, ChunkSummaryNorm(config));
    rho = ScoreQuerySummariesReference(q, shape.hkv, config);
  } else if (config.policy == Policy::kBlockTopk) {
    DhsaConfig blocks = config;
    blocks.boundary_mode = BoundaryMode::kFixed;
    blocks.chunk_mean = config.block;
    DHSA_ASSIGN_OR_RETURN(boundaries, SegmentKeysReference(k, 0, shape.lk, blocks));
    kappa = ChunkSummariesReference(k, boundaries, SummaryNorm::kMean);
    rho = QueryBlockSummariesReference(q, shape.hkv, config.q_block, SummaryNorm::kMean);
  }
  SelectionInputs in;
  in.shape = shape;
  in.boundaries = &boundaries;
  in.kappa = &kappa;
  in.rho = &rho;
  return SelectSpansReference(in, config);
}

}  // namespace dhsa
