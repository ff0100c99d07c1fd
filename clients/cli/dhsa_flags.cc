#include "clients/cli/dhsa_flags.h"

#include "kernels/common/status_macros.h"

namespace dhsa::cli {

const char kPresetHelp[] =
    "knob set: default (mass chunk score, q-block 16, chunks 4-16 of mean 32, score-rows 8) or "
    "paper (the spec's method: paper score, q-block 128, chunks 8-128 of mean 32); flags given "
    "explicitly override it";

void AddDhsaFlags(FlagSet& f, DhsaFlags* v) {
  v->flags = &f;
  f.String("preset", &v->preset, kPresetHelp);
  f.String("policy", &v->policy, "dhsa, block_topk, streaming, dense or oracle_topk");
  f.Int("budget", &v->budget, "keys attended per query row (Nb)");
  f.Int("sink", &v->sink, "first keys always kept (S)");
  f.Int("local", &v->local, "most recent keys always kept (W, >= q-block)");
  f.Int("q-block", &v->q_block, "query rows per block (Bq)");
  f.String("boundaries", &v->boundaries, "chunking for dhsa: dynamic or fixed");
  f.Int("chunk-mean", &v->chunk_mean, "target mean chunk length (fixed: the chunk length)");
  f.Int("chunk-min", &v->chunk_min, "minimum chunk length");
  f.Int("chunk-max", &v->chunk_max, "longer chunks are split");
  f.Int("block", &v->block, "key block length of block_topk (Bk)");
  f.Bool("shared-heads", &v->shared_heads, "one selection for all KV heads (paper v1)");
  f.Bool("mean-summaries", &v->mean_summaries,
         "plain-mean chunk summaries instead of sqrt (ablation)");
  f.String("chunk-score", &v->chunk_score,
           "dhsa chunk score: paper (the spec's) or mass (estimated attention mass)");
  f.Int("score-rows", &v->score_rows, "mass score: query rows per mean query (divides q-block)");
  f.Double("scale", &v->scale, "softmax scale; 0 = 1/sqrt(d)");
}

absl::StatusOr<DhsaConfig> ToDhsaConfig(const DhsaFlags& v) {
  DHSA_ASSIGN_OR_RETURN(const Preset preset, ParsePreset(v.preset));
  DhsaConfig c;
  DHSA_ASSIGN_OR_RETURN(c.policy, ParsePolicy(v.policy));
  DHSA_ASSIGN_OR_RETURN(c.boundary_mode, ParseBoundaryMode(v.boundaries));
  c.budget = v.budget;
  c.sink = v.sink;
  c.local = v.local;
  c.block = v.block;
  c.shared_heads = v.shared_heads;
  c.summary_norm = v.mean_summaries ? SummaryNorm::kMean : SummaryNorm::kSqrt;
  c.scale = static_cast<float>(v.scale);
  // The preset's knobs, each overridden by its flag when that was given.
  const DhsaConfig defaults;
  c = ApplyPreset(preset, c);
  auto given = [&](const char* name, bool differs) {
    return v.flags != nullptr ? v.flags->Given(name) : differs;
  };
  if (given("q-block", v.q_block != defaults.q_block)) c.q_block = v.q_block;
  if (given("chunk-mean", v.chunk_mean != defaults.chunk_mean)) c.chunk_mean = v.chunk_mean;
  if (given("chunk-min", v.chunk_min != defaults.chunk_min)) c.chunk_min = v.chunk_min;
  if (given("chunk-max", v.chunk_max != defaults.chunk_max)) c.chunk_max = v.chunk_max;
  if (given("score-rows", v.score_rows != defaults.score_rows)) c.score_rows = v.score_rows;
  DHSA_ASSIGN_OR_RETURN(const ChunkScore score, ParseChunkScore(v.chunk_score));
  if (given("chunk-score", score != defaults.chunk_score)) c.chunk_score = score;
  DHSA_RETURN_IF_ERROR(ValidateConfig(c));
  return c;
}

}  // namespace dhsa::cli
