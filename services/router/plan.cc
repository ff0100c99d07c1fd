#include "services/router/plan.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"

namespace dhsa::router {

namespace {

// The work of `worker` from its entries (laid out as `selection`'s, already normalised), cut to
// the query blocks with at least one span; nothing when there is none.
void AddWork(const Selection& selection, int worker, int64_t t0, int64_t lk,
             std::vector<std::vector<Span>>& worker_entries, std::vector<WorkerWork>* out) {
  int64_t lo = selection.num_blocks, hi = -1;
  for (int64_t h = 0; h < selection.num_heads; ++h) {
    for (int64_t b = 0; b < selection.num_blocks; ++b) {
      if (!worker_entries[static_cast<size_t>(h * selection.num_blocks + b)].empty()) {
        lo = std::min(lo, b);
        hi = std::max(hi, b);
      }
    }
  }
  if (hi < 0) return;
  WorkerWork work;
  work.worker = worker;
  Selection& local = work.local;
  local.unit = selection.unit;
  local.block_size = selection.block_size;
  local.first_block = selection.first_block + lo;
  local.num_blocks = hi - lo + 1;
  local.num_heads = selection.num_heads;
  local.group = selection.group;
  if (lo == 0 && hi == selection.num_blocks - 1) {
    local.spans = std::move(worker_entries);  // Every block: the entries as they are.
  } else {
    local.spans.resize(static_cast<size_t>(local.num_heads * local.num_blocks));
    for (int64_t h = 0; h < local.num_heads; ++h) {
      for (int64_t b = 0; b < local.num_blocks; ++b) {
        local.At(h, b) =
            std::move(worker_entries[static_cast<size_t>(h * selection.num_blocks + lo + b)]);
      }
    }
  }
  work.row_begin = std::max(t0, local.first_block * local.block_size);
  work.row_end = std::min(lk, (local.first_block + local.num_blocks) * local.block_size);
  out->push_back(std::move(work));
}

// True when one worker holds every stripe, the stripes follow each other without a gap and
// every entry's spans are non-empty, sorted, non-adjacent and on the stripes: then each entry is
// that worker's as it is (the pieces of a span join back into the span).
bool OneWorkerHoldsAll(const Selection& selection, const std::vector<Stripe>& stripes) {
  if (stripes.empty()) return false;
  for (size_t i = 0; i < stripes.size(); ++i) {
    if (stripes[i].worker != stripes[0].worker || stripes[i].end < stripes[i].begin ||
        (i > 0 && stripes[i].begin != stripes[i - 1].end)) {
      return false;
    }
  }
  const int64_t first = stripes.front().begin, last = stripes.back().end;
  for (const std::vector<Span>& spans : selection.spans) {
    int64_t prev_end = first - 1;
    for (const Span& s : spans) {
      if (s.begin <= prev_end || s.end <= s.begin) return false;
      prev_end = s.end;
    }
    if (prev_end > last) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::vector<WorkerWork>> PlanAttentionReference(const Selection& selection,
                                                               int64_t t0, int64_t lk,
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

absl::StatusOr<std::vector<WorkerWork>> PlanAttention(const Selection& selection, int64_t t0,
                                                      int64_t lk,
                                                      const std::vector<Stripe>& stripes) {
  if (selection.unit != SelectionUnit::kKvHeadBlock) {
    return absl::InvalidArgumentError("only per-(KV head, query block) selections are served");
  }
  const int64_t entries = selection.num_heads * selection.num_blocks;
  // Workers by id (the order of the result), and each stripe's index among them.
  std::vector<int> ids;
  ids.reserve(stripes.size());
  for (const Stripe& s : stripes) ids.push_back(s.worker);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  std::vector<int> slot(stripes.size());
  for (size_t i = 0; i < stripes.size(); ++i) {
    slot[i] =
        static_cast<int>(std::lower_bound(ids.begin(), ids.end(), stripes[i].worker) - ids.begin());
  }
  struct Pieces {
    std::vector<std::vector<Span>> entries;  // Sized on the worker's first piece.
    bool sorted = true;  // Every piece came after its entry's last one (the usual case).
  };
  std::vector<Pieces> per_worker(ids.size());
  for (int64_t n = 0; n < entries; ++n) {
    for (const Span& span : selection.spans[static_cast<size_t>(n)]) {
      // First stripe ending after span.begin.
      auto it = std::upper_bound(stripes.begin(), stripes.end(), span.begin,
                                 [](int64_t pos, const Stripe& s) { return pos < s.end; });
      int64_t pos = span.begin;
      for (; pos < span.end && it != stripes.end(); ++it) {
        if (it->begin > pos) break;  // A gap: the stripes do not cover the span.
        const int64_t end = std::min(span.end, it->end);
        if (end <= pos) continue;  // An empty stripe: no piece (the reference drops it).
        Pieces& w =
            per_worker[static_cast<size_t>(slot[static_cast<size_t>(it - stripes.begin())])];
        if (w.entries.empty()) w.entries.resize(static_cast<size_t>(entries));
        std::vector<Span>& list = w.entries[static_cast<size_t>(n)];
        // One worker gets every span: its list as long as the entry's (fewer with joins).
        if (list.empty() && ids.size() == 1)
          list.reserve(selection.spans[static_cast<size_t>(n)].size());
        // Pieces of adjacent stripes join again (as NormaliseSpans would join them).
        if (!list.empty() && list.back().end == pos) {
          list.back().end = end;
        } else {
          if (!list.empty() && list.back().end > pos) w.sorted = false;
          list.push_back({pos, end});
        }
        pos = end;
      }
      if (pos < span.end) {
        return absl::InternalError(
            absl::StrCat("selected keys [", pos, ", ", span.end, ") are on no stripe"));
      }
    }
  }

  std::vector<WorkerWork> out;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::vector<std::vector<Span>>& worker_entries = per_worker[i].entries;
    if (worker_entries.empty()) continue;
    // An input whose spans were not sorted and disjoint: the reference's normalisation.
    if (!per_worker[i].sorted) {
      for (auto& spans : worker_entries) spans = NormaliseSpans(std::move(spans));
    }
    AddWork(selection, ids[i], t0, lk, worker_entries, &out);
  }
  return out;
}

absl::StatusOr<std::vector<WorkerWork>> PlanAttention(Selection&& selection, int64_t t0, int64_t lk,
                                                      const std::vector<Stripe>& stripes) {
  if (selection.unit != SelectionUnit::kKvHeadBlock || !OneWorkerHoldsAll(selection, stripes)) {
    return PlanAttention(static_cast<const Selection&>(selection), t0, lk, stripes);
  }
  std::vector<WorkerWork> out;
  std::vector<std::vector<Span>> entries = std::move(selection.spans);
  selection.spans.clear();
  AddWork(selection, stripes.front().worker, t0, lk, entries, &out);
  return out;
}

}  // namespace dhsa::router
