#include "services/router/placement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace dhsa::router {

int ZigzagPlacement::ZigzagWorker(int64_t stripe_index, int rotation, int num_workers) {
  const int64_t n = num_workers;
  const int64_t r = stripe_index % (2 * n);
  const int64_t pos = r < n ? r : 2 * n - 1 - r;
  return static_cast<int>((pos + rotation) % n);
}

absl::StatusOr<int> ZigzagPlacement::ChooseWorker(int64_t stripe_index, int rotation, int64_t bytes,
                                                  const std::vector<WorkerLoad>& loads) const {
  const int n = static_cast<int>(loads.size());
  if (n == 0) return absl::UnavailableError("no workers are known to the router");
  std::vector<bool> tried(static_cast<size_t>(n), false);
  for (int64_t k = 0; k < 2 * n; ++k) {
    const int w = ZigzagWorker(stripe_index + k, rotation, n);
    if (tried[static_cast<size_t>(w)]) continue;
    tried[static_cast<size_t>(w)] = true;
    if (loads[static_cast<size_t>(w)].free_bytes() >= bytes) return w;
  }
  int64_t most_free = 0;
  for (const WorkerLoad& l : loads) most_free = std::max(most_free, l.free_bytes());
  return absl::ResourceExhaustedError(absl::StrCat("KV capacity is full: a stripe needs ", bytes,
                                                   " bytes and the roomiest available worker has ",
                                                   most_free,
                                                   " free; release sequences or add workers"));
}

absl::StatusOr<std::vector<StorePiece>> PlaceAppend(const std::vector<Stripe>& stripes,
                                                    const PlaceRequest& req,
                                                    const PlacementPolicy& policy,
                                                    std::vector<WorkerLoad>& loads) {
  std::vector<WorkerLoad> trial = loads;
  std::vector<StorePiece> pieces;
  int64_t pos = stripes.empty() ? 0 : stripes.back().end;
  const int64_t stripe_tokens = std::max<int64_t>(1, req.stripe_tokens);
  // The open stripe: the last one, extended or replaced as pieces are planned.
  bool have_open = !stripes.empty();
  bool open_is_old = have_open;
  int64_t open_begin = have_open ? stripes.back().begin : 0;
  int open_worker = have_open ? stripes.back().worker : 0;
  int64_t next_index = static_cast<int64_t>(stripes.size());

  auto is_cut = [&](int64_t p) {
    return req.any_cut || std::binary_search(req.cuts.begin(), req.cuts.end(), p);
  };
  // First cut point c > pos with c >= lo, or new_end.
  auto next_cut = [&](int64_t lo) {
    lo = std::max(lo, pos + 1);
    if (req.any_cut) return std::min(lo, req.new_end);
    auto it = std::lower_bound(req.cuts.begin(), req.cuts.end(), lo);
    return it == req.cuts.end() ? req.new_end : std::min(*it, req.new_end);
  };

  while (pos < req.new_end) {
    const bool extend =
        have_open && open_is_old && !(pos >= open_begin + stripe_tokens && is_cut(pos));
    if (extend) {
      const int64_t end = next_cut(open_begin + stripe_tokens);
      const int64_t bytes = (end - pos) * req.bytes_per_token;
      WorkerLoad& load = trial[static_cast<size_t>(open_worker)];
      if (load.free_bytes() >= bytes) {
        load.used_bytes += bytes;
        pieces.push_back({pos, end, open_worker, /*append=*/true, next_index - 1});
        pos = end;
        continue;
      }
      // The open stripe's worker is full: a new stripe continues on another worker.
    }
    const int64_t end = next_cut(pos + stripe_tokens);
    const int64_t bytes = (end - pos) * req.bytes_per_token;
    absl::StatusOr<int> worker = policy.ChooseWorker(next_index, req.rotation, bytes, trial);
    if (!worker.ok()) return worker.status();
    trial[static_cast<size_t>(*worker)].used_bytes += bytes;
    pieces.push_back({pos, end, *worker, /*append=*/false, next_index});
    have_open = true;
    open_is_old = false;
    open_begin = pos;
    open_worker = *worker;
    ++next_index;
    pos = end;
  }
  loads = std::move(trial);
  return pieces;
}

void ApplyStorePieces(const std::vector<StorePiece>& pieces, std::vector<Stripe>& stripes) {
  for (const StorePiece& p : pieces) {
    if (p.append && !stripes.empty()) {
      stripes.back().end = p.end;
    } else {
      stripes.push_back({p.begin, p.end, p.worker});
    }
  }
}

}  // namespace dhsa::router
