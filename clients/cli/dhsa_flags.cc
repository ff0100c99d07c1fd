#include "clients/cli/dhsa_flags.h"

#include "kernels/common/status_macros.h"

namespace dhsa::cli {

void AddDhsaFlags(FlagSet& f, DhsaFlags* v) {
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
  DhsaConfig c;
  DHSA_ASSIGN_OR_RETURN(c.policy, ParsePolicy(v.policy));
  DHSA_ASSIGN_OR_RETURN(c.boundary_mode, ParseBoundaryMode(v.boundaries));
  c.budget = v.budget;
  c.sink = v.sink;
  c.local = v.local;
  c.q_block = v.q_block;
  c.chunk_mean = v.chunk_mean;
  c.chunk_min = v.chunk_min;
  c.chunk_max = v.chunk_max;
  c.block = v.block;
  c.shared_heads = v.shared_heads;
  c.summary_norm = v.mean_summaries ? SummaryNorm::kMean : SummaryNorm::kSqrt;
  c.scale = static_cast<float>(v.scale);
  DHSA_ASSIGN_OR_RETURN(c.chunk_score, ParseChunkScore(v.chunk_score));
  c.score_rows = v.score_rows;
  DHSA_RETURN_IF_ERROR(ValidateConfig(c));
  return c;
}

}  // namespace dhsa::cli
