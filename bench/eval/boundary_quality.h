// How well chunk boundaries find the true segment starts of a generated workload.
#ifndef DHSA_BENCH_EVAL_BOUNDARY_QUALITY_H_
#define DHSA_BENCH_EVAL_BOUNDARY_QUALITY_H_

#include <cstdint>
#include <vector>

namespace dhsa {

struct BoundaryMatch {
  int64_t predicted = 0;          // Interior predicted boundaries (not the first or last).
  int64_t truth = 0;              // Interior true segment starts.
  int64_t predicted_matched = 0;  // Predicted boundaries with a true start within the tolerance.
  int64_t truth_matched = 0;      // True starts with a predicted boundary within the tolerance.
  double precision = 0;           // predicted_matched / predicted (0 when none predicted).
  double recall = 0;              // truth_matched / truth (0 when there is no true start).
};

// Both lists are ascending positions; values <= first or >= last of `predicted` (the sequence
// ends) are not interior and are ignored in both. A match is any pair within `tolerance` tokens
// (not one-to-one).
BoundaryMatch MatchBoundaries(const std::vector<int64_t>& predicted,
                              const std::vector<int64_t>& truth, int64_t tolerance);

}  // namespace dhsa

#endif  // DHSA_BENCH_EVAL_BOUNDARY_QUALITY_H_
