#include "bench/eval/boundary_quality.h"

#include <algorithm>

namespace dhsa {
namespace {

// True when ascending `sorted` holds a value within `tolerance` of `x`.
bool HasNear(const std::vector<int64_t>& sorted, int64_t x, int64_t tolerance) {
  auto it = std::lower_bound(sorted.begin(), sorted.end(), x - tolerance);
  return it != sorted.end() && *it <= x + tolerance;
}

}  // namespace

BoundaryMatch MatchBoundaries(const std::vector<int64_t>& predicted,
                              const std::vector<int64_t>& truth, int64_t tolerance) {
  BoundaryMatch m;
  if (predicted.size() < 2) return m;
  const int64_t first = predicted.front(), last = predicted.back();
  std::vector<int64_t> pred(predicted.begin() + 1, predicted.end() - 1);
  std::vector<int64_t> real;
  for (int64_t t : truth) {
    if (t > first && t < last) real.push_back(t);
  }
  m.predicted = static_cast<int64_t>(pred.size());
  m.truth = static_cast<int64_t>(real.size());
  for (int64_t p : pred) m.predicted_matched += HasNear(real, p, tolerance) ? 1 : 0;
  for (int64_t t : real) m.truth_matched += HasNear(pred, t, tolerance) ? 1 : 0;
  if (m.predicted > 0) m.precision = static_cast<double>(m.predicted_matched) / m.predicted;
  if (m.truth > 0) m.recall = static_cast<double>(m.truth_matched) / m.truth;
  return m;
}

}  // namespace dhsa
