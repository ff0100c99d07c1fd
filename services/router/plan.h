// Splitting a layer call's selection by worker: every span is cut at stripe edges and each piece
// goes to the worker holding that stripe, as a Selection of its own over only the query blocks
// that need the worker. Workers with no selected key get no work.
#ifndef DHSA_SERVICES_ROUTER_PLAN_H_
#define DHSA_SERVICES_ROUTER_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/selection/selection.h"
#include "services/router/placement.h"

namespace dhsa::router {

// The attention work of one worker.
struct WorkerWork {
  int worker = 0;
  // Query rows [row_begin, row_end) (absolute positions) the worker computes: the blocks
  // `local.first_block .. + local.num_blocks` intersected with the call's queries.
  int64_t row_begin = 0;
  int64_t row_end = 0;
  // Same unit, heads and block size as the call's selection; entries hold only keys on this
  // worker (sorted, disjoint, non-adjacent).
  Selection local;
};

// Per-worker work for `selection` (kKvHeadBlock; queries [t0, lk)) over `stripes` (contiguous
// from 0, covering every selected key), ordered by worker index.
absl::StatusOr<std::vector<WorkerWork>> PlanAttention(const Selection& selection, int64_t t0,
                                                      int64_t lk,
                                                      const std::vector<Stripe>& stripes);

// The same, taking the selection's spans when one worker holds every stripe (no gap) and the
// entries are as selection makes them (sorted, non-adjacent, on the stripes): no copy. Otherwise
// as the const version. `selection` is left with no spans either way only in the first case.
absl::StatusOr<std::vector<WorkerWork>> PlanAttention(Selection&& selection, int64_t t0, int64_t lk,
                                                      const std::vector<Stripe>& stripes);

// The first, obviously-right PlanAttention (a map of workers, every piece normalised per worker
// afterwards): the same result, kept for the tests that compare the two. PlanAttention joins the
// pieces of adjacent stripes as they come, without a worker map or a second pass over the spans.
absl::StatusOr<std::vector<WorkerWork>> PlanAttentionReference(const Selection& selection,
                                                               int64_t t0, int64_t lk,
                                                               const std::vector<Stripe>& stripes);

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_PLAN_H_
