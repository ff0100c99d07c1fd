#include "kernels/common/config.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace dhsa {

absl::string_view PolicyName(Policy p) {
  switch (p) {
    case Policy::kDhsa:
      return "dhsa";
    case Policy::kBlockTopk:
      return "block_topk";
    case Policy::kStreaming:
      return "streaming";
    case Policy::kDense:
      return "dense";
    case Policy::kOracleTopk:
      return "oracle_topk";
  }
  return "unknown";
}

absl::StatusOr<Policy> ParsePolicy(absl::string_view name) {
  for (Policy p : {Policy::kDhsa, Policy::kBlockTopk, Policy::kStreaming, Policy::kDense,
                   Policy::kOracleTopk}) {
    if (name == PolicyName(p)) return p;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown policy '", name, "'; expected dhsa, block_topk, streaming, dense or oracle_topk"));
}

absl::string_view BoundaryModeName(BoundaryMode m) {
  return m == BoundaryMode::kDynamic ? "dynamic" : "fixed";
}

absl::StatusOr<BoundaryMode> ParseBoundaryMode(absl::string_view name) {
  if (name == "dynamic") return BoundaryMode::kDynamic;
  if (name == "fixed") return BoundaryMode::kFixed;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown boundary mode '", name, "'; expected dynamic or fixed"));
}

absl::string_view ChunkScoreName(ChunkScore s) {
  return s == ChunkScore::kPaper ? "paper" : "mass";
}

absl::StatusOr<ChunkScore> ParseChunkScore(absl::string_view name) {
  if (name == "paper") return ChunkScore::kPaper;
  if (name == "mass") return ChunkScore::kMass;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown chunk score '", name, "'; expected paper or mass"));
}

absl::string_view PresetName(Preset p) { return p == Preset::kPaper ? "paper" : "default"; }

absl::StatusOr<Preset> ParsePreset(absl::string_view name) {
  if (name == "default") return Preset::kDefault;
  if (name == "paper") return Preset::kPaper;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown preset '", name, "'; expected default or paper"));
}

DhsaConfig ApplyPreset(Preset preset, DhsaConfig base) {
  DhsaConfig knobs;  // kDefault: the struct's defaults.
  if (preset == Preset::kPaper) {
    knobs.chunk_score = ChunkScore::kPaper;
    knobs.q_block = 128;
    knobs.chunk_mean = 32;
    knobs.chunk_min = 8;
    knobs.chunk_max = 128;
    knobs.score_rows = 16;
  }
  base.chunk_score = knobs.chunk_score;
  base.q_block = knobs.q_block;
  base.chunk_mean = knobs.chunk_mean;
  base.chunk_min = knobs.chunk_min;
  base.chunk_max = knobs.chunk_max;
  base.score_rows = knobs.score_rows;
  return base;
}

DhsaConfig PaperConfig() { return ApplyPreset(Preset::kPaper, DhsaConfig{}); }

SummaryNorm ChunkSummaryNorm(const DhsaConfig& config) {
  if (config.policy == Policy::kBlockTopk) return SummaryNorm::kMean;
  if (config.policy == Policy::kDhsa && config.chunk_score == ChunkScore::kMass) {
    return SummaryNorm::kMean;
  }
  return config.summary_norm;
}

absl::Status ValidateConfig(const DhsaConfig& c) {
  auto positive = [](int64_t v, absl::string_view what) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat(what, " must be positive; got ", v));
    return absl::OkStatus();
  };
  for (auto [v, what] : {std::pair<int64_t, absl::string_view>{c.budget, "budget"},
                         {c.q_block, "q_block"},
                         {c.local, "local"},
                         {c.boundary_window, "boundary window"},
                         {c.chunk_mean, "chunk_mean"},
                         {c.chunk_min, "chunk_min"},
                         {c.chunk_max, "chunk_max"},
                         {c.block, "block"}}) {
    absl::Status s = positive(v, what);
    if (!s.ok()) return s;
  }
  if (c.sink < 0)
    return absl::InvalidArgumentError(absl::StrCat("sink must be >= 0; got ", c.sink));
  if (!(c.scale >= 0.0f) || !std::isfinite(c.scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("scale must be a finite positive number (0 = 1/sqrt(d)); got ", c.scale));
  }
  if (c.chunk_min > c.chunk_max) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk_min (", c.chunk_min, ") must not exceed chunk_max (", c.chunk_max, ")"));
  }
  switch (c.policy) {
    case Policy::kDhsa:
      if (c.local < c.q_block) {
        return absl::InvalidArgumentError(absl::StrCat("local window (", c.local,
                                                       ") must be >= q_block (", c.q_block,
                                                       "): the window must cover the query block"));
      }
      if (c.chunk_score == ChunkScore::kMass &&
          (c.score_rows <= 0 || c.q_block % c.score_rows != 0)) {
        return absl::InvalidArgumentError(absl::StrCat("score_rows (", c.score_rows,
                                                       ") must be positive and divide q_block (",
                                                       c.q_block, ") for the mass chunk score"));
      }
      if (c.budget < c.sink + c.local) {
        return absl::InvalidArgumentError(
            absl::StrCat("budget (", c.budget, ") must be >= sink + local (", c.sink, " + ",
                         c.local, "); raise --budget or lower --sink/--local"));
      }
      break;
    case Policy::kStreaming:
      if (c.budget < c.sink + c.q_block) {
        return absl::InvalidArgumentError(
            absl::StrCat("budget (", c.budget, ") must be >= sink + q_block (", c.sink, " + ",
                         c.q_block, ") for streaming, so that the window covers the query block"));
      }
      break;
    case Policy::kBlockTopk: {
      // The key blocks overlapping a query block hold at most Bq keys when Bq is a multiple of Bk,
      // else up to Bq + Bk: they must fit the budget.
      const int64_t diagonal = c.q_block + (c.q_block % c.block == 0 ? 0 : c.block);
      if (c.budget < diagonal) {
        return absl::InvalidArgumentError(
            absl::StrCat("budget (", c.budget, ") must be >= ", diagonal,
                         " for block_topk: the key blocks overlapping a query block of ", c.q_block,
                         " rows (block ", c.block, ") are always kept"));
      }
      break;
    }
    case Policy::kDense:
    case Policy::kOracleTopk:
      break;
  }
  return absl::OkStatus();
}

float EffectiveScale(const DhsaConfig& config, int64_t head_dim) {
  if (config.scale > 0.0f) return config.scale;
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

}  // namespace dhsa
