// Step 1 of spec/DHSA.md: chunk boundaries over the keys, shared by every head of a layer.
//
// A boundary list `b` has b.front() = first key, b.back() = one past the last key, strictly
// increasing; chunk j is [b[j], b[j+1]).
#ifndef DHSA_KERNELS_BOUNDARIES_BOUNDARIES_H_
#define DHSA_KERNELS_BOUNDARIES_BOUNDARIES_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/tensor.h"

namespace dhsa {

// Boundary dissimilarity at every gap of keys [begin, end): `delta[t - begin - 1]` for gaps
// t = begin+1 .. end-1 is 1 - cos(l, r), l and r the means of the `window` keys on each side
// (clipped to [begin, end)), each key being all KV heads concatenated, every head L2-normalised.
// A zero-norm side gives delta = 0 (no evidence of a boundary). `k` rows are absolute positions
// k.offset + row.
std::vector<double> GapDissimilarityReference(const HeadsView& k, int64_t begin, int64_t end,
                                              int64_t window);

// Splits every chunk longer than `max_len` into the fewest equal parts (lengths differ by <= 1).
std::vector<int64_t> SplitLongChunks(const std::vector<int64_t>& b, int64_t max_len);

// `fixed` boundaries of [begin, end): multiples of `chunk` (absolute positions) in between.
std::vector<int64_t> FixedBoundaries(int64_t begin, int64_t end, int64_t chunk);

// Segments keys [begin, end) on their own (spec Step 1): `dynamic` greedy NMS over the gap
// dissimilarity then splitting chunks longer than chunk_max, or `fixed` chunks of chunk_mean.
// Returns [begin, ..., end].
absl::StatusOr<std::vector<int64_t>> SegmentKeysReference(const HeadsView& k, int64_t begin,
                                                          int64_t end, const DhsaConfig& config);

// Boundaries after a prefill of keys [old.back(), new_end) onto `old` (empty or {0} for a fresh
// sequence): old boundaries never move, the new keys are segmented on their own.
absl::StatusOr<std::vector<int64_t>> AppendPrefillBoundariesReference(
    const HeadsView& k, const std::vector<int64_t>& old, int64_t new_end, const DhsaConfig& config);

// Boundaries after decode appended keys [old.back(), new_end): the last chunk grows as a tail; once
// the tail is longer than chunk_max it is segmented on its own (old boundaries never move).
absl::StatusOr<std::vector<int64_t>> AppendDecodeBoundariesReference(
    const HeadsView& k, const std::vector<int64_t>& old, int64_t new_end, const DhsaConfig& config);

}  // namespace dhsa

#endif  // DHSA_KERNELS_BOUNDARIES_BOUNDARIES_H_
