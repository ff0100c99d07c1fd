#include "kernels/dhsa.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/common/status_macros.h"
#include "kernels/summaries/summaries.h"

namespace dhsa {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

absl::StatusOr<std::vector<int64_t>> DhsaBoundaries(const HeadsView& k, int64_t t0,
                                                    const DhsaConfig& config,
                                                    const AttendOptions& options) {
  std::vector<int64_t> prior = {0};
  if (options.prior_boundaries != nullptr) {
    prior = *options.prior_boundaries;
    if (prior.empty() || prior.front() != 0 || prior.back() != t0 ||
        !std::is_sorted(prior.begin(), prior.end()) ||
        std::adjacent_find(prior.begin(), prior.end()) != prior.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prior boundaries must rise strictly from 0 to t0 = ", t0, " (the keys stored before)"));
    }
  } else if (t0 > 0) {
    DHSA_ASSIGN_OR_RETURN(prior, SegmentKeysReference(k, 0, t0, config));
  }
  if (options.decode) return AppendDecodeBoundariesReference(k, prior, k.len, config);
  return AppendPrefillBoundariesReference(k, prior, k.len, config);
}

}  // namespace

absl::StatusOr<AttendResult> AttendReference(const Tensor& q_tensor, const Tensor& k_tensor,
                                             const Tensor& v_tensor, const DhsaConfig& config,
                                             const AttendOptions& options) {
  DHSA_RETURN_IF_ERROR(ValidateConfig(config));
  DHSA_ASSIGN_OR_RETURN(HeadsView q, HeadsView::Of(q_tensor, "Q"));
  DHSA_ASSIGN_OR_RETURN(HeadsView k, HeadsView::Of(k_tensor, "K"));
  DHSA_ASSIGN_OR_RETURN(HeadsView v, HeadsView::Of(v_tensor, "V"));
  DHSA_ASSIGN_OR_RETURN(AttentionShape shape, CheckShapes(q, k, v));
  if (options.check_finite) {
    DHSA_RETURN_IF_ERROR(CheckFinite(q, "Q"));
    DHSA_RETURN_IF_ERROR(CheckFinite(k, "K"));
    DHSA_RETURN_IF_ERROR(CheckFinite(v, "V"));
  }
  q.offset = shape.t0();

  AttendResult result;
  auto start = std::chrono::steady_clock::now();
  Summaries kappa, rho;
  SelectionInputs in;
  in.shape = shape;
  in.boundaries = &result.boundaries;
  in.kappa = &kappa;
  in.rho = &rho;
  switch (config.policy) {
    case Policy::kDhsa: {
      DHSA_ASSIGN_OR_RETURN(result.boundaries, DhsaBoundaries(k, shape.t0(), config, options));
      result.times.boundaries = SecondsSince(start);
      start = std::chrono::steady_clock::now();
      kappa = ChunkSummariesReference(k, result.boundaries, config.summary_norm);
      rho = QueryBlockSummariesReference(q, shape.hkv, config.q_block, config.summary_norm);
      result.times.summaries = SecondsSince(start);
      break;
    }
    case Policy::kBlockTopk: {
      DhsaConfig blocks = config;
      blocks.boundary_mode = BoundaryMode::kFixed;
      blocks.chunk_mean = config.block;
      DHSA_ASSIGN_OR_RETURN(result.boundaries, SegmentKeysReference(k, 0, shape.lk, blocks));
      result.times.boundaries = SecondsSince(start);
      start = std::chrono::steady_clock::now();
      kappa = ChunkSummariesReference(k, result.boundaries, SummaryNorm::kMean);
      rho = QueryBlockSummariesReference(q, shape.hkv, config.q_block, SummaryNorm::kMean);
      result.times.summaries = SecondsSince(start);
      break;
    }
    default:
      result.boundaries = {0, shape.lk};
      break;
  }

  start = std::chrono::steady_clock::now();
  if (config.policy == Policy::kOracleTopk) {
    DHSA_ASSIGN_OR_RETURN(result.selection, SelectOracleTopkReference(q, k, config));
  } else {
    DHSA_ASSIGN_OR_RETURN(result.selection, SelectSpansReference(in, config));
  }
  result.times.selection = SecondsSince(start);

  start = std::chrono::steady_clock::now();
  result.o = Tensor::Zeros(DType::kF32, {shape.hq, shape.lq, shape.dim});
  result.lse = Tensor::Zeros(DType::kF32, {shape.hq, shape.lq});
  SparseAttentionParams params;
  params.q = q;
  params.k = k;
  params.v = v;
  params.selection = &result.selection;
  params.scale = EffectiveScale(config, shape.dim);
  params.o = {static_cast<float*>(result.o.data()), shape.hq, shape.lq, shape.dim};
  params.lse = {static_cast<float*>(result.lse.data()), shape.hq, shape.lq, 1};
  params.num_threads = options.num_threads;
  DHSA_RETURN_IF_ERROR(SparseAttentionReference(params));
  result.times.attention = SecondsSince(start);

  result.computed_pairs = CountComputedPairs(result.selection, shape);
  // Dense: sum over rows p in [t0, lk) of (p + 1), for each query head.
  result.causal_pairs =
      shape.hq * (shape.lk * (shape.lk + 1) / 2 - shape.t0() * (shape.t0() + 1) / 2);
  return result;
}

}  // namespace dhsa
