// Needle hit rate: the share of planted (query, needle key) pairs whose key a selection keeps.
#ifndef DHSA_BENCH_EVAL_NEEDLES_H_
#define DHSA_BENCH_EVAL_NEEDLES_H_

#include <cstdint>
#include <vector>

#include "bench/workload/workload.h"
#include "kernels/common/inputs.h"
#include "kernels/selection/selection.h"

namespace dhsa {

struct NeedleHits {
  int64_t pairs = 0;  // (query head, query position, needle key) triples checked.
  int64_t hits = 0;   // Of those, the key is in the query's selected spans.
  double rate() const { return pairs > 0 ? static_cast<double>(hits) / pairs : 0.0; }
};

// Every query head at every needle query position inside the queries [t0, lk), against each of
// the needle's keys. The selection must have entries for those positions.
NeedleHits CountNeedleHits(const Selection& selection, const AttentionShape& shape,
                           const std::vector<Needle>& needles);

// Row indices (position - t0) of every needle query inside the queries, ascending.
std::vector<int64_t> NeedleQueryRows(const AttentionShape& shape,
                                     const std::vector<Needle>& needles);

}  // namespace dhsa

#endif  // DHSA_BENCH_EVAL_NEEDLES_H_
