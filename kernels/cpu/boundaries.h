// Step 1 of spec/DHSA.md on the fast CPU path: the functions of kernels/boundaries/boundaries.h
// with the same arguments and results, plus a thread count.
//
// The gap dissimilarity is computed in double like the reference (only the order of the final dot
// products differs, by about 1e-16 relative), so both rank the gaps alike and the boundaries agree
// except at dissimilarities tied to that precision. The greedy NMS ranks gaps by partial selection
// (nth_element over batches of candidates) instead of sorting every gap.
#ifndef DHSA_KERNELS_CPU_BOUNDARIES_H_
#define DHSA_KERNELS_CPU_BOUNDARIES_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/tensor.h"

namespace dhsa {

// As GapDissimilarityReference: delta[t - begin - 1] for gaps t = begin+1 .. end-1.
std::vector<double> GapDissimilarityCpu(const HeadsView& k, int64_t begin, int64_t end,
                                        int64_t window, int num_threads = 1);

// As SegmentKeysReference: [begin, ..., end].
absl::StatusOr<std::vector<int64_t>> SegmentKeysCpu(const HeadsView& k, int64_t begin, int64_t end,
                                                    const DhsaConfig& config, int num_threads = 1);

// As AppendPrefillBoundariesReference.
absl::StatusOr<std::vector<int64_t>> AppendPrefillBoundariesCpu(const HeadsView& k,
                                                                const std::vector<int64_t>& old,
                                                                int64_t new_end,
                                                                const DhsaConfig& config,
                                                                int num_threads = 1);

// As AppendDecodeBoundariesReference.
absl::StatusOr<std::vector<int64_t>> AppendDecodeBoundariesCpu(const HeadsView& k,
                                                               const std::vector<int64_t>& old,
                                                               int64_t new_end,
                                                               const DhsaConfig& config,
                                                               int num_threads = 1);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CPU_BOUNDARIES_H_
