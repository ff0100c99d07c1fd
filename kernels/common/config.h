// The parameters of one DHSA attention call (spec/DHSA.md), shared by every backend.
#ifndef DHSA_KERNELS_COMMON_CONFIG_H_
#define DHSA_KERNELS_COMMON_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dhsa {

// Which keys each query block attends to (spec: "Baselines, as selection policies").
enum class Policy {
  kDhsa,       // Sink + local + top chunks by rho . kappa under the token budget.
  kBlockTopk,  // Fixed blocks of `block` keys scored by plain means, diagonal blocks always kept.
  kStreaming,  // Sink + the last `budget - sink` keys.
  kDense,      // Every causal key (ground truth).
  kOracleTopk  // Per query row and head, the `budget` keys of highest dense weight (evaluation
               // only).
};

// How keys are cut into chunks for `dhsa`.
enum class BoundaryMode {
  kDynamic,  // Greedy NMS over the left/right key-window dissimilarity.
  kFixed     // Chunks of exactly `chunk_mean` keys (the last one shorter).
};

// How chunk and query-block summaries are normalised.
enum class SummaryNorm {
  kSqrt,  // Sum / sqrt(count): the paper's rule (the default; used by the paper score only).
  kMean   // Sum / count: plain mean (used by block_topk, and as an ablation of dhsa).
};

// How `dhsa` scores the chunks a query block may select (Step 3).
enum class ChunkScore {
  kPaper,  // The spec's rho . kappa: the block's mean query over the group against each chunk's
           // summary (sum / sqrt(len) by default). Bit-for-bit the paper's method.
  kMass    // Estimated attention mass (docs/fidelity.md): for every query head of the group and
           // every `score_rows`-row piece of the block, the piece's mean query q against each
           // chunk's mean key k gives the logit scale * q.k + log(len); a softmax over the chunks
           // that start before the block's end turns the logits into shares of attention, and a
           // chunk's score is its share summed over heads and pieces. A block with fewer rows than
           // a piece (decode) scores with one mean query per KV head over its group, by logit.
};

absl::string_view PolicyName(Policy p);
absl::StatusOr<Policy> ParsePolicy(absl::string_view name);
absl::string_view BoundaryModeName(BoundaryMode m);
absl::StatusOr<BoundaryMode> ParseBoundaryMode(absl::string_view name);
// "paper", "mass".
absl::string_view ChunkScoreName(ChunkScore s);
absl::StatusOr<ChunkScore> ParseChunkScore(absl::string_view name);

// Every knob of the algorithm. The defaults are the spec's structure (sink, local window, dynamic
// boundaries, budget) with the estimated-attention-mass chunk score, 16-row query blocks and
// chunks of 4-16 keys (mean 32 asked of the boundary rule): docs/fidelity.md "What changed and
// why" has the evidence. The spec's method exactly is PaperConfig() (preset `paper`).
struct DhsaConfig {
  Policy policy = Policy::kDhsa;
  int64_t budget = 2048;  // Nb: keys per query row (sink + local + selected chunks).
  int64_t sink = 128;     // S: keys [0, S) are always kept.
  int64_t local =
      256;  // W: the W keys ending at the query block's end are always kept; W >= q_block.
  int64_t q_block = 16;  // Bq: query blocks are [i*Bq, (i+1)*Bq), aligned to absolute positions
                         // (spec: 128).

  BoundaryMode boundary_mode = BoundaryMode::kDynamic;
  int64_t boundary_window = 4;  // w: keys averaged on each side of a gap.
  int64_t chunk_mean = 32;      // Target mean chunk length (also the length of `fixed` chunks).
  int64_t chunk_min = 4;   // No boundary closer than this to another one or to the ends (spec: 8).
  int64_t chunk_max = 16;  // Longer chunks are split into equal parts (spec: 128).

  int64_t block = 64;         // Bk: key block length of `block_topk`.
  bool shared_heads = false;  // One selection for all KV heads (scores averaged).
  SummaryNorm summary_norm = SummaryNorm::kSqrt;  // `dhsa` kPaper only; block_topk and kMass
                                                  // always use kMean.
  ChunkScore chunk_score = ChunkScore::kMass;     // `dhsa` only (spec: kPaper).
  int64_t score_rows = 8;  // kMass: query rows per mean query; must divide q_block.
  float scale = 0.0f;      // Softmax scale; 0 means 1/sqrt(d).
};

// Named sets of the knobs that differ between the spec's method and the defaults: q_block,
// chunk_mean, chunk_min, chunk_max, chunk_score, score_rows (every other knob is the same in both).
enum class Preset {
  kDefault,  // DhsaConfig{}: mass score, q_block 16, chunks 4-16 (mean 32), score_rows 8.
  kPaper     // The spec's method: paper score, q_block 128, chunks 8-128 (mean 32), score_rows 16.
};

// "default", "paper".
absl::string_view PresetName(Preset p);
absl::StatusOr<Preset> ParsePreset(absl::string_view name);

// `base` with the preset's knobs (above); policy, budget, sink, local, block, boundary rule,
// summaries, shared_heads and scale are kept. The result may need a larger `local` (>= q_block):
// ValidateConfig says so.
DhsaConfig ApplyPreset(Preset preset, DhsaConfig base);

// The spec's method (spec/DHSA.md) with every other knob at its default: ApplyPreset(kPaper, {}).
DhsaConfig PaperConfig();

// Checks the config on its own (sizes positive, W >= Bq, budget >= sink + local, ...).
absl::Status ValidateConfig(const DhsaConfig& config);

// The norm of the chunk summaries kappa under `config`: kMean for block_topk and the kMass score,
// else summary_norm.
SummaryNorm ChunkSummaryNorm(const DhsaConfig& config);

// Softmax scale for head dim `d` under `config`.
float EffectiveScale(const DhsaConfig& config, int64_t head_dim);

}  // namespace dhsa

#endif  // DHSA_KERNELS_COMMON_CONFIG_H_
