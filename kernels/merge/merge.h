// The LSE merge of partial attention results (spec/DHSA.md "Partial results and the merge").
#ifndef DHSA_KERNELS_MERGE_MERGE_H_
#define DHSA_KERNELS_MERGE_MERGE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace dhsa {

// One partial result over `rows` rows (a row = one query head at one position): o [rows, dim] and
// lse [rows], as returned by sparse attention restricted to some keys.
struct PartialView {
  const float* o = nullptr;
  const float* lse = nullptr;
};

// Merges the partials row by row into o [rows, dim] and lse [rows]: m = max lse_s; an empty row
// (m = -inf) gives o = 0, lse = -inf; else lse = m + log(sum exp(lse_s - m)) and
// o = sum exp(lse_s - lse) * o_s. InvalidArgument if a partial lse is +inf or NaN.
absl::Status MergePartialsReference(const std::vector<PartialView>& parts, int64_t rows,
                                    int64_t dim, float* o, float* lse);

}  // namespace dhsa

#endif  // DHSA_KERNELS_MERGE_MERGE_H_
