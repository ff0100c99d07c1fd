// Steps 3 and 4 of spec/DHSA.md on the fast CPU path: the functions of
// kernels/selection/selection.h with the same arguments and results, plus a thread count.
//
// The paper's score and block_topk's are dot products summed in double and rounded to fp32, as in
// the reference (the summation order differs, by about 1e-16 relative, so the fp32 scores agree
// except at ties that close). The mass score runs in fp32: per KV head and 128 query rows' worth of
// blocks, one GEMM of the blocks' mean queries against the visible chunks' mean keys
// (kernels/cpu/gemm.h; the chunk summaries are read once for all those blocks), the attention's
// vectorised softmax step for the exponentials, and the shares summed in fp32. It
// agrees with the reference's double arithmetic to kMassScoreTolerance of the block's largest
// score (tests/cpu/selection_test.cc measures this on random and structured inputs).
// Chunks are ranked by partial selection: the score ending a batch of candidates sized from the
// budget (nth_element over the plain scores), then a sort of the chunks scoring at least that only,
// widening the batch in the rare case it does not fill the budget; that visits chunks in exactly
// the order of a full sort.
#ifndef DHSA_KERNELS_CPU_SELECTION_H_
#define DHSA_KERNELS_CPU_SELECTION_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// |mass score (CPU) - mass score (reference)| <= kMassScoreTolerance * the largest |score| of the
// same (KV head, block).
inline constexpr float kMassScoreTolerance = 1e-5f;

// As ChunkScoresReference (Internal error only if the GEMM library refuses).
absl::StatusOr<std::vector<float>> ChunkScoresCpu(const SelectionInputs& in,
                                                  const DhsaConfig& config, int64_t kv_head,
                                                  int64_t block);

// As SelectSpansReference (dhsa, block_topk, streaming, dense), blocks spread over threads.
absl::StatusOr<Selection> SelectSpansCpu(const SelectionInputs& in, const DhsaConfig& config,
                                         int num_threads = 1);

// As CountComputedPairs, counting the spans that end before a block's first row whole instead of
// row by row.
int64_t CountComputedPairsCpu(const Selection& selection, const AttentionShape& shape);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CPU_SELECTION_H_
