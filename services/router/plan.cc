#include "services/router/plan.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"

namespace dhsa::router {

absl::StatusOr<std::vector<WorkerWork>> PlanAttention(const Selection& selection, int64_t t0,
                                                      int64_t lk,
                                                      const std::vector<Stripe>& stripes) {
  if (selection.unit != SelectionUnit::kKvHeadBlock) {
    return absl::InvalidArgumentError("only per-(KV head, query block) selections are served");
  }
  const int64_t entries = selection.num_heads * selection.num_blocks;
  // worker -> its pieces of every entry.
  std::map<int, std::vector<std::vector<Span>>> per_worker;
  for (int64_t n = 0; n < entries; ++n) {
    for (const Span& span : selection.spans[static_cast<size_t>(n)]) {
      // First stripe ending after span.begin.
      auto it = std::upper_bound(stripes.begin(), stripes.end(), span.begin,
                                 [](int64_t pos, const Stripe& s) { return pos < s.end; });
      int64_t pos = span.begin;
      for (; pos < span.end && it != stripes.end(); ++it) {
        if (it->begin > pos) break;  // A gap: the stripes do not cover the span.
        const int64_t end = std::min(span.end, it->end);
        auto& worker_entries = per_worker[it->worker];
        worker_entries.resize(static_cast<size_t>(entries));
        worker_entries[static_cast<size_t>(n)].push_back({pos, end});
        pos = end;
      }
      if (pos < span.end) {
        return absl::InternalError(
            absl::StrCat("selected keys [", pos, ", ", span.end, ") are on no stripe"));
      }
    }
  }

  std::vector<WorkerWork> out;
  for (auto& [worker, worker_entries] : per_worker) {
    // Query blocks with at least one span on this worker.
    int64_t lo = selection.num_blocks, hi = -1;
    for (int64_t h = 0; h < selection.num_heads; ++h) {
      for (int64_t b = 0; b < selection.num_blocks; ++b) {
        auto& spans = worker_entries[static_cast<size_t>(h * selection.num_blocks + b)];
        spans = NormaliseSpans(std::move(spans));  // Pieces of adjacent stripes join again.
        if (!spans.empty()) {
          lo = std::min(lo, b);
          hi = std::max(hi, b);
        }
      }
    }
    if (hi < 0) continue;
    WorkerWork work;
    work.worker = worker;
    Selection& local = work.local;
    local.unit = selection.unit;
    local.block_size = selection.block_size;
    local.first_block = selection.first_block + lo;
    local.num_blocks = hi - lo + 1;
    local.num_heads = selection.num_heads;
    local.group = selection.group;
    local.spans.resize(static_cast<size_t>(local.num_heads * local.num_blocks));
    for (int64_t h = 0; h < local.num_heads; ++h) {
      for (int64_t b = 0; b < local.num_blocks; ++b) {
        local.At(h, b) =
            std::move(worker_entries[static_cast<size_t>(h * selection.num_blocks + lo + b)]);
      }
    }
    work.row_begin = std::max(t0, local.first_block * local.block_size);
    work.row_end = std::min(lk, (local.first_block + local.num_blocks) * local.block_size);
    out.push_back(std::move(work));
  }
  return out;
}

}  // namespace dhsa::router
