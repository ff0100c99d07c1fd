// Step 2 of spec/DHSA.md on the fast CPU path: the functions of kernels/summaries/summaries.h with
// the same arguments and results, plus a thread count, and an update that reuses the summaries of
// chunks that did not change (decode keeps its chunk summaries instead of recomputing them).
//
// Sums run in double in the reference's order (over keys, then heads, element by element), so the
// summaries are the reference's to the last bit.
#ifndef DHSA_KERNELS_CPU_SUMMARIES_H_
#define DHSA_KERNELS_CPU_SUMMARIES_H_

#include <cstdint>
#include <vector>

#include "kernels/common/config.h"
#include "kernels/common/tensor.h"
#include "kernels/summaries/summaries.h"

namespace dhsa {

// As ChunkSummariesReference.
Summaries ChunkSummariesCpu(const HeadsView& k, const std::vector<int64_t>& boundaries,
                            SummaryNorm norm, int num_threads = 1);

// ChunkSummariesCpu(k, boundaries, norm), taking the rows of `prior` (the summaries of
// `prior_boundaries`' chunks under the same norm) for every leading chunk that both boundary lists
// have, and computing only the rest. `prior` must have as many rows as prior_boundaries has chunks.
Summaries UpdateChunkSummariesCpu(const HeadsView& k, const std::vector<int64_t>& boundaries,
                                  SummaryNorm norm, const std::vector<int64_t>& prior_boundaries,
                                  const Summaries& prior, int num_threads = 1);

// As QueryBlockSummariesReference.
Summaries QueryBlockSummariesCpu(const HeadsView& q, int64_t kv_heads, int64_t q_block,
                                 SummaryNorm norm, int num_threads = 1);

// As ScoreQuerySummariesReference.
Summaries ScoreQuerySummariesCpu(const HeadsView& q, int64_t kv_heads, const DhsaConfig& config,
                                 int num_threads = 1);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CPU_SUMMARIES_H_
