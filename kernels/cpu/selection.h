// Steps 3 and 4 of spec/DHSA.md on the fast CPU path: the functions of
// kernels/selection/selection.h with the same arguments and results, plus a thread count.
//
// Scores are dot products summed in double and rounded to fp32, as in the reference (the summation
// order differs, by about 1e-16 relative, so the fp32 scores agree except at ties that close).
// Chunks are ranked by partial selection: nth_element over a batch of candidates sized from the
// budget, then a sort of that batch only, widening the batch in the rare case it does not fill the
// budget; that visits chunks in exactly the order of a full sort.
#ifndef DHSA_KERNELS_CPU_SELECTION_H_
#define DHSA_KERNELS_CPU_SELECTION_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// As ChunkScoresReference.
std::vector<float> ChunkScoresCpu(const SelectionInputs& in, const DhsaConfig& config,
                                  int64_t kv_head, int64_t block);

// As SelectSpansReference (dhsa, block_topk, streaming, dense), blocks spread over threads.
absl::StatusOr<Selection> SelectSpansCpu(const SelectionInputs& in, const DhsaConfig& config,
                                         int num_threads = 1);

// As CountComputedPairs, counting the spans that end before a block's first row whole instead of
// row by row.
int64_t CountComputedPairsCpu(const Selection& selection, const AttentionShape& shape);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CPU_SELECTION_H_
