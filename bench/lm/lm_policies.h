// The attention policies a language-model evaluation compares (issue 6): every library policy and
// dhsa variant (bench/eval/variants.h) through dhsa::Attend, plus two that exist only for
// evaluation:
//   local         each query block of Bq rows keeps the last `budget` keys up to its end (a plain
//                 sliding window at block granularity);
//   oracle_block  dhsa's structure (query blocks, chunks, sink, local window, the same fill rule)
//                 with chunks ranked by their true dense attention mass for the block's queries,
//                 summed over the block's rows and the KV head's query heads: what a perfect chunk
//                 score would give (an upper bound of the method, not a method); it takes dhsa's
//                 variant modifiers for that structure (oracle_block_fixed_q32).
#ifndef DHSA_BENCH_LM_LM_POLICIES_H_
#define DHSA_BENCH_LM_LM_POLICIES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"

namespace dhsa {

struct LmPolicy {
  enum class Kind { kLibrary, kLocal, kOracleBlock };
  std::string name;
  Kind kind = Kind::kLibrary;
  DhsaConfig config;  // Budget and every knob (for kOracleBlock the dhsa structure it keeps).
};

// `name`: a library policy, a dhsa variant (dhsa_fixed, dhsa_mean, ...), local or oracle_block,
// configured from `base` with `budget`.
absl::StatusOr<LmPolicy> ParseLmPolicy(const std::string& name, const DhsaConfig& base,
                                       int64_t budget);

struct LmAttentionStats {
  int64_t computed_pairs = 0;
  int64_t causal_pairs = 0;
};

// o [Hq, L, d] float32 of q [Hq, L, d], k and v [Hkv, L, d] (all positions, causal) under the
// policy, on the fast CPU backend. Adds its pairs to `stats` when given.
absl::StatusOr<Tensor> LmAttention(const LmPolicy& policy, const Tensor& q, const Tensor& k,
                                   const Tensor& v, int num_threads,
                                   LmAttentionStats* stats = nullptr);

// True dense attention mass, for KV head h and absolute query block i (of config.q_block rows),
// of each chunk j of `boundaries` that ends at or before the block's first row: the sum over the
// group's query heads and the block's rows of their softmax weights on the chunk's keys. Returned
// as Summaries-like rows: mass[(h * blocks + i)] is a vector of that block's eligible chunks.
std::vector<std::vector<float>> ChunkAttentionMass(const Tensor& q, const Tensor& k,
                                                   const std::vector<int64_t>& boundaries,
                                                   int64_t q_block, float scale, int num_threads);

}  // namespace dhsa

#endif  // DHSA_BENCH_LM_LM_POLICIES_H_
