#include "bench/eval/needles.h"

#include <algorithm>

namespace dhsa {
namespace {

bool Covers(const std::vector<Span>& spans, int64_t t) {
  auto it = std::upper_bound(spans.begin(), spans.end(), t,
                             [](int64_t x, const Span& s) { return x < s.end; });
  return it != spans.end() && it->begin <= t;
}

}  // namespace

NeedleHits CountNeedleHits(const Selection& selection, const AttentionShape& shape,
                           const std::vector<Needle>& needles) {
  NeedleHits hits;
  for (const Needle& n : needles) {
    for (int64_t p = std::max(n.query_begin, shape.t0()); p < std::min(n.query_end, shape.lk);
         ++p) {
      for (int64_t g = 0; g < shape.hq; ++g) {
        const std::vector<Span>& spans = selection.ForQuery(g, p);
        for (int64_t t = n.key_begin; t < n.key_end && t <= p; ++t) {
          ++hits.pairs;
          hits.hits += Covers(spans, t) ? 1 : 0;
        }
      }
    }
  }
  return hits;
}

std::vector<int64_t> NeedleQueryRows(const AttentionShape& shape,
                                     const std::vector<Needle>& needles) {
  std::vector<int64_t> rows;
  for (const Needle& n : needles) {
    for (int64_t p = std::max(n.query_begin, shape.t0()); p < std::min(n.query_end, shape.lk);
         ++p) {
      rows.push_back(p - shape.t0());
    }
  }
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

}  // namespace dhsa
