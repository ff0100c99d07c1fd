// oracle_topk (spec/DHSA.md "Baselines") restricted to a set of query rows: per query head and
// listed row, the `budget` causal keys of highest q.k. Evaluation only; the full-sequence version
// is SelectOracleTopkReference, whose cost (Lq x Lk dot products) is out of reach at long context.
#ifndef DHSA_KERNELS_FIDELITY_ORACLE_ROWS_H_
#define DHSA_KERNELS_FIDELITY_ORACLE_ROWS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// A kQueryHeadRow selection over every row of q (first_block = q.offset, num_blocks = q.len) whose
// entries for `rows` (indices into q) equal SelectOracleTopkReference's and are empty elsewhere.
// Ties go to the lower position, as there. Work is split over `num_threads` threads by row.
absl::StatusOr<Selection> SelectOracleTopkRowsReference(const HeadsView& q, const HeadsView& k,
                                                        const DhsaConfig& config,
                                                        const std::vector<int64_t>& rows,
                                                        int num_threads = 1);

// (query, key) pairs oracle_topk computes over all rows of q: per query head, sum over positions p
// of min(p + 1, budget). Exact without a selection.
int64_t OracleComputedPairs(int64_t hq, int64_t t0, int64_t lk, int64_t budget);

}  // namespace dhsa

#endif  // DHSA_KERNELS_FIDELITY_ORACLE_ROWS_H_
