// Where the keys of a layer live: contiguous stripes of ~stripe_tokens positions, each on one
// worker. New stripes are opened at chunk boundaries (so a selected chunk rarely straddles two
// workers) and given to workers by a PlacementPolicy that also respects each worker's capacity.
#ifndef DHSA_SERVICES_ROUTER_PLACEMENT_H_
#define DHSA_SERVICES_ROUTER_PLACEMENT_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"

namespace dhsa::router {

// Keys [begin, end) of one layer held by `worker` (an index into the router's worker list).
struct Stripe {
  int64_t begin = 0;
  int64_t end = 0;
  int worker = 0;
  bool operator==(const Stripe& o) const {
    return begin == o.begin && end == o.end && worker == o.worker;
  }
};

// KV bytes a worker accepts and holds, as the router accounts them.
struct WorkerLoad {
  int64_t capacity_bytes = 0;
  int64_t used_bytes = 0;  // Committed plus reserved by calls in flight.
  bool available = true;   // Reachable: only available workers get new stripes.
  int64_t free_bytes() const { return available ? capacity_bytes - used_bytes : 0; }
};

// Chooses the worker of a new stripe.
class PlacementPolicy {
 public:
  virtual ~PlacementPolicy() = default;
  // Worker for stripe number `stripe_index` of a layer of a sequence with placement offset
  // `rotation`, needing `bytes` now; RESOURCE_EXHAUSTED if no worker can take them.
  virtual absl::StatusOr<int> ChooseWorker(int64_t stripe_index, int rotation, int64_t bytes,
                                           const std::vector<WorkerLoad>& loads) const = 0;
};

// Zigzag: stripes 0, 1, ..., n-1, n-1, ..., 0, 0, 1, ... go to workers rotation + (0, 1, ...,
// n-1, n-1, ..., 0, ...) mod n, so that the busiest stripes (the last ones: every later query sees
// them) spread evenly. A worker without room is skipped for the next one in that order.
class ZigzagPlacement : public PlacementPolicy {
 public:
  // Worker the order gives stripe `stripe_index` with `num_workers` workers, before capacity.
  static int ZigzagWorker(int64_t stripe_index, int rotation, int num_workers);
  absl::StatusOr<int> ChooseWorker(int64_t stripe_index, int rotation, int64_t bytes,
                                   const std::vector<WorkerLoad>& loads) const override;
};

// Keys [begin, end) to send to `worker`: they extend the layer's last stripe (`append`) or open
// stripe number `stripe_index`.
struct StorePiece {
  int64_t begin = 0;
  int64_t end = 0;
  int worker = 0;
  bool append = false;
  int64_t stripe_index = 0;
};

struct PlaceRequest {
  int64_t new_end = 0;           // Keys [stripes.back().end (or 0), new_end) are appended.
  int64_t stripe_tokens = 4096;  // A stripe is closed at the first cut point this long or more.
  // Positions where a new stripe may open, ascending, inside (old end, new_end): the chunk
  // boundaries that will never move. Ignored when `any_cut` is set.
  std::vector<int64_t> cuts;
  // Every position is a cut point (policies without chunks, and decode).
  bool any_cut = false;
  int64_t bytes_per_token = 0;  // KV bytes of one token of one layer.
  int rotation = 0;
};

// Plans where the new keys go and reserves their bytes in `loads` (the caller gives them back if
// the call fails). `stripes` are the layer's current stripes; the result, applied with
// ApplyStorePieces, extends them. RESOURCE_EXHAUSTED when the cluster is full.
absl::StatusOr<std::vector<StorePiece>> PlaceAppend(const std::vector<Stripe>& stripes,
                                                    const PlaceRequest& request,
                                                    const PlacementPolicy& policy,
                                                    std::vector<WorkerLoad>& loads);

// The stripes after the pieces are stored.
void ApplyStorePieces(const std::vector<StorePiece>& pieces, std::vector<Stripe>& stripes);

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_PLACEMENT_H_
