// The router's selection stage on the host, on a selection shaped like the real one at q_block 16
// (default config: budget 2048, sink 128, local 256, chunks of 4-16 keys), measured on this
// machine: the old and new unpacking of a device download, the pair count (reference vs the
// router's), PlanAttentionReference vs PlanAttention, and the workers' AttendHeaders (span by span
// as before, and SelectionToAttendHeader's Resize now).
//   router_select_host_bench [lk=131072] [hkv=8] [group=4] [q_block=16] [workers=1] [reps=3]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "dhsa/v1/worker.pb.h"
#include "kernels/cpu/selection.h"
#include "services/common/config.h"
#include "services/router/plan.h"
#include "tests/router_select/router_like.h"

namespace dhsa::router {
namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

template <typename F>
double Best(int reps, F&& f) {
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    const auto a = Clock::now();
    f();
    best = std::min(best, Ms(a, Clock::now()));
  }
  return best;
}

struct Packed {
  int32_t begin, end;
};

int Main(int argc, char** argv) {
  const int64_t lk = argc > 1 ? std::atoll(argv[1]) : 131072;
  const int64_t hkv = argc > 2 ? std::atoll(argv[2]) : 8;
  const int64_t group = argc > 3 ? std::atoll(argv[3]) : 4;
  const int64_t q_block = argc > 4 ? std::atoll(argv[4]) : 16;
  const int workers = argc > 5 ? std::atoi(argv[5]) : 1;
  const int reps = argc > 6 ? std::atoi(argv[6]) : 3;
  std::mt19937_64 rng(1);
  const Selection sel = RouterLikeSelection(rng, hkv, group, 0, lk, q_block);
  int64_t spans = 0, widest = 0;
  for (const auto& e : sel.spans) {
    spans += static_cast<int64_t>(e.size());
    widest = std::max<int64_t>(widest, static_cast<int64_t>(e.size()));
  }
  const AttentionShape shape{hkv * group, hkv, 128, lk, lk};
  std::printf(
      "lk %lld hkv %lld group %lld q_block %lld: %zu entries, %lld spans (widest %lld), "
      "%d worker(s), best of %d\n",
      static_cast<long long>(lk), static_cast<long long>(hkv), static_cast<long long>(group),
      static_cast<long long>(q_block), sel.spans.size(), static_cast<long long>(spans),
      static_cast<long long>(widest), workers, reps);

  // The device's layout: span_cap (as SpanCapacity at these sizes: budget / chunk_min + a few)
  // per entry; the old unpack read every entry at that stride and pushed span by span.
  const int64_t span_cap = 2048 / 4 + 8;
  const int64_t entries = static_cast<int64_t>(sel.spans.size());
  std::vector<int32_t> counts(sel.spans.size());
  std::vector<Packed> strided(static_cast<size_t>(entries * span_cap));
  for (int64_t e = 0; e < entries; ++e) {
    counts[static_cast<size_t>(e)] = static_cast<int32_t>(sel.spans[static_cast<size_t>(e)].size());
    for (size_t i = 0; i < sel.spans[static_cast<size_t>(e)].size(); ++i) {
      const Span& s = sel.spans[static_cast<size_t>(e)][i];
      strided[static_cast<size_t>(e * span_cap) + i] = {static_cast<int32_t>(s.begin),
                                                        static_cast<int32_t>(s.end)};
    }
  }
  const double old_unpack = Best(reps, [&] {
    std::vector<Packed> host(static_cast<size_t>(entries * span_cap));  // The old host buffer.
    std::copy(strided.begin(), strided.end(), host.begin());            // (the download's write)
    std::vector<std::vector<Span>> out(static_cast<size_t>(entries));
    for (int64_t e = 0; e < entries; ++e) {
      for (int32_t i = 0; i < counts[static_cast<size_t>(e)]; ++i) {
        const Packed& s = host[static_cast<size_t>(e * span_cap + i)];
        out[static_cast<size_t>(e)].push_back({s.begin, s.end});
      }
    }
  });
  std::vector<Packed> packed(static_cast<size_t>(entries * widest));
  for (int64_t e = 0; e < entries; ++e) {
    std::copy_n(strided.begin() + e * span_cap, widest, packed.begin() + e * widest);
  }
  const double new_unpack = Best(reps, [&] {
    std::vector<std::vector<Span>> out(static_cast<size_t>(entries));
    for (int64_t e = 0; e < entries; ++e) {
      const int32_t n = counts[static_cast<size_t>(e)];
      out[static_cast<size_t>(e)].reserve(static_cast<size_t>(n));
      const Packed* in = packed.data() + e * widest;
      for (int32_t i = 0; i < n; ++i)
        out[static_cast<size_t>(e)].push_back({in[i].begin, in[i].end});
    }
  });
  int64_t pairs_ref = 0, pairs_cpu = 0;
  const double count_ref = Best(1, [&] { pairs_ref = CountComputedPairs(sel, shape); });
  const double count_cpu = Best(reps, [&] { pairs_cpu = CountComputedPairsCpu(sel, shape); });

  // Stripes of 4096 keys round robin over the workers (the service's default stripe size).
  std::vector<Stripe> stripes;
  for (int64_t b = 0, i = 0; b < lk; b += 4096, ++i) {
    stripes.push_back({b, std::min(lk, b + 4096), static_cast<int>(i % workers)});
  }
  std::vector<WorkerWork> works;
  const double plan_ref = Best(reps, [&] { works = *PlanAttentionReference(sel, 0, lk, stripes); });
  const double plan_new = Best(reps, [&] { works = *PlanAttention(sel, 0, lk, stripes); });
  double plan_moved = 1e300;  // The router's call: the selection moved in (its copy not timed).
  for (int r = 0; r < reps; ++r) {
    Selection copy = sel;
    const auto a = Clock::now();
    works = *PlanAttention(std::move(copy), 0, lk, stripes);
    plan_moved = std::min(plan_moved, Ms(a, Clock::now()));
  }
  size_t header_bytes = 0;
  const double header = Best(reps, [&] {
    header_bytes = 0;
    for (const WorkerWork& w : works) {
      v1::AttendHeader h;
      SelectionToAttendHeader(w.local, &h);
      header_bytes += h.ByteSizeLong();
    }
  });
  const double header_old = Best(reps, [&] {  // As SelectionToAttendHeader was: add by add.
    for (const WorkerWork& w : works) {
      v1::AttendHeader h;
      for (const std::vector<Span>& spans : w.local.spans) {
        v1::SpanList* list = h.add_entries();
        list->mutable_begin()->Reserve(static_cast<int>(spans.size()));
        list->mutable_end()->Reserve(static_cast<int>(spans.size()));
        for (const Span& s : spans) {
          list->add_begin(s.begin);
          list->add_end(s.end);
        }
      }
    }
  });
  std::printf("unpack (old: span_cap %lld stride, push_back)  %9.1f ms\n",
              static_cast<long long>(span_cap), old_unpack);
  std::printf("unpack (new: packed, reserved)                 %9.1f ms\n", new_unpack);
  std::printf("pair count CountComputedPairs (reference)      %9.1f ms  (%lld pairs)\n", count_ref,
              static_cast<long long>(pairs_ref));
  std::printf("pair count CountComputedPairsCpu (router now)  %9.1f ms  (%lld pairs)\n", count_cpu,
              static_cast<long long>(pairs_cpu));
  std::printf("PlanAttentionReference (before)                %9.1f ms\n", plan_ref);
  std::printf("PlanAttention (now, const selection)            %9.1f ms\n", plan_new);
  std::printf("PlanAttention (now, selection moved in)        %9.1f ms\n", plan_moved);
  std::printf("AttendHeaders span by span (before)            %9.1f ms\n", header_old);
  std::printf("AttendHeaders (SelectionToAttendHeader, now)   %9.1f ms  (%.1f MB serialised)\n",
              header, static_cast<double>(header_bytes) / 1e6);
  return pairs_ref == pairs_cpu ? 0 : 1;
}

}  // namespace
}  // namespace dhsa::router

int main(int argc, char** argv) { return dhsa::router::Main(argc, argv); }
