// The LSE merge of partial attention results on the fast CPU path: MergePartialsReference
// (kernels/merge/merge.h) with the same arguments and results, plus a thread count. The weights
// exp(lse_s - lse) come from double; the weighted sum of the partial outputs is vectorised in fp32.
#ifndef DHSA_KERNELS_CPU_MERGE_H_
#define DHSA_KERNELS_CPU_MERGE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/merge/merge.h"

namespace dhsa {

// As MergePartialsReference. `o` and `lse` may not alias any partial.
absl::Status MergePartialsCpu(const std::vector<PartialView>& parts, int64_t rows, int64_t dim,
                              float* o, float* lse, int num_threads = 1);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CPU_MERGE_H_
