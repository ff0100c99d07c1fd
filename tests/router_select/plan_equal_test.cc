// PlanAttention (pieces joined as they come, no worker map) against PlanAttentionReference, and
// the router's pair count (CountComputedPairsCpu) against CountComputedPairs: equal results on
// random and structured selections and stripes.
#include <random>
#include <vector>

#include "dhsa/v1/worker.pb.h"
#include "gtest/gtest.h"
#include "kernels/cpu/selection.h"
#include "services/common/config.h"
#include "services/router/plan.h"
#include "tests/kernels/test_util.h"
#include "tests/router_select/router_like.h"

namespace dhsa::router {
namespace {

using ::dhsa::testing::FreshSeed;

bool SameWork(const std::vector<WorkerWork>& a, const std::vector<WorkerWork>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const Selection& x = a[i].local;
    const Selection& y = b[i].local;
    if (a[i].worker != b[i].worker || a[i].row_begin != b[i].row_begin ||
        a[i].row_end != b[i].row_end || x.unit != y.unit || x.block_size != y.block_size ||
        x.first_block != y.first_block || x.num_blocks != y.num_blocks ||
        x.num_heads != y.num_heads || x.group != y.group || x.spans != y.spans) {
      return false;
    }
  }
  return true;
}

void ExpectSamePlan(const Selection& sel, int64_t t0, int64_t lk,
                    const std::vector<Stripe>& stripes) {
  const auto fast = PlanAttention(sel, t0, lk, stripes);
  const auto ref = PlanAttentionReference(sel, t0, lk, stripes);
  ASSERT_EQ(fast.ok(), ref.ok()) << fast.status() << " vs " << ref.status();
  if (!ref.ok()) {
    EXPECT_EQ(fast.status(), ref.status());
    Selection moved = sel;
    EXPECT_EQ(PlanAttention(std::move(moved), t0, lk, stripes).status(), ref.status());
    return;
  }
  EXPECT_TRUE(SameWork(*fast, *ref));
  Selection moved = sel;  // The version that may take the spans (one worker, no gap).
  const auto taken = PlanAttention(std::move(moved), t0, lk, stripes);
  ASSERT_TRUE(taken.ok()) << taken.status();
  EXPECT_TRUE(SameWork(*taken, *ref));
}

// Stripes over [0, lk) of random lengths (some empty with `empty`) on `workers` workers.
std::vector<Stripe> RandomStripes(std::mt19937_64& rng, int64_t lk, int workers, int64_t longest,
                                  bool empty) {
  std::vector<Stripe> stripes;
  for (int64_t b = 0; b < lk;) {
    const int64_t e = std::min(
        lk, b + (empty ? 0 : 1) + static_cast<int64_t>(rng() % static_cast<uint64_t>(longest)));
    stripes.push_back({b, e, static_cast<int>(rng() % workers)});
    b = e;
  }
  return stripes;
}

TEST(PlanEqualTest, RandomSelectionsAndStripes) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t lk = 1 + static_cast<int64_t>(rng() % 3000);
    const int64_t t0 = trial % 3 == 0 ? 0 : static_cast<int64_t>(rng() % lk);
    const int64_t q_block = 1 + static_cast<int64_t>(rng() % 40);
    const int64_t hkv = 1 + static_cast<int64_t>(rng() % 3);
    const int64_t group = 1 + static_cast<int64_t>(rng() % 4);
    const int64_t budget = 16 + static_cast<int64_t>(rng() % 600);
    Selection sel = RouterLikeSelection(rng, hkv, group, t0, lk, q_block, budget,
                                        std::min<int64_t>(8, budget / 4), budget / 4);
    // Some entries empty.
    for (auto& spans : sel.spans) {
      if (rng() % 5 == 0) spans.clear();
    }
    const int workers = 1 + static_cast<int>(rng() % 5);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << " lk " << lk << " t0 " << t0);
    ExpectSamePlan(
        sel, t0, lk,
        RandomStripes(rng, lk, workers, 2 + static_cast<int64_t>(rng() % 700), trial % 4 == 1));
  }
}

TEST(PlanEqualTest, StructuredCases) {
  std::mt19937_64 rng(7);
  const int64_t lk = 4099, q_block = 16;
  const Selection sel = RouterLikeSelection(rng, 2, 4, 0, lk, q_block, 1024, 64, 128);
  // One worker, one stripe; one worker, many stripes; a stripe per key; round robin over 4.
  ExpectSamePlan(sel, 0, lk, {{0, lk, 3}});
  std::vector<Stripe> many, per_key, robin;
  for (int64_t b = 0; b < lk; b += 100) many.push_back({b, std::min(lk, b + 100), 0});
  for (int64_t b = 0; b < lk; ++b) per_key.push_back({b, b + 1, static_cast<int>(b % 2)});
  for (int64_t b = 0, i = 0; b < lk; b += 256, ++i) {
    robin.push_back({b, std::min(lk, b + 256), static_cast<int>(i % 4)});
  }
  ExpectSamePlan(sel, 0, lk, many);
  ExpectSamePlan(sel, 0, lk, per_key);
  ExpectSamePlan(sel, 0, lk, robin);
  // One worker over several stripes (the spans taken as they are), with an empty stripe, with
  // leading and trailing blocks empty, with a gap, with a span past the last stripe, with
  // adjacent spans in an entry (joined by the plan).
  std::vector<Stripe> one = many;
  for (Stripe& s : one) s.worker = 2;
  ExpectSamePlan(sel, 0, lk, one);
  std::vector<Stripe> one_empty = one;
  one_empty.insert(one_empty.begin() + 3, {300, 300, 2});
  ExpectSamePlan(sel, 0, lk, one_empty);
  Selection trimmed = sel;
  for (int64_t h = 0; h < trimmed.num_heads; ++h) {
    for (int64_t b = 0; b < trimmed.num_blocks; ++b) {
      if (b < 7 || b > trimmed.num_blocks - 5) trimmed.At(h, b).clear();
    }
  }
  ExpectSamePlan(trimmed, 0, lk, one);
  std::vector<Stripe> one_gap = one;
  one_gap.erase(one_gap.begin() + 2);
  ExpectSamePlan(sel, 0, lk, one_gap);
  std::vector<Stripe> one_short = one;
  one_short.back().end -= 1;
  ExpectSamePlan(sel, 0, lk, one_short);
  Selection adjacent = sel;
  for (auto& spans : adjacent.spans) {
    if (spans.size() > 1 && spans[0].end + 1 < spans[1].begin)
      spans.insert(spans.begin() + 1, {spans[0].end, spans[0].end + 1});
  }
  ExpectSamePlan(adjacent, 0, lk, one);
  // Workers whose only stripes hold no selected key, an empty stripe, a gap (an error), no
  // stripes at all (an error), an empty selection.
  std::vector<Stripe> idle = robin;
  idle.insert(idle.begin() + 5, {1280, 1280, 9});
  ExpectSamePlan(sel, 0, lk, idle);
  std::vector<Stripe> gap = robin;
  gap.erase(gap.begin() + 3);
  ExpectSamePlan(sel, 0, lk, gap);
  ExpectSamePlan(sel, 0, lk, {});
  Selection none = sel;
  for (auto& spans : none.spans) spans.clear();
  ExpectSamePlan(none, 0, lk, robin);
  // Spans not sorted and overlapping (not what selection makes; the plan normalises them).
  Selection messy = sel;
  for (auto& spans : messy.spans) {
    std::reverse(spans.begin(), spans.end());
    if (spans.size() > 1) spans.push_back({spans[1].begin, spans[0].end});
  }
  ExpectSamePlan(messy, 0, lk, robin);
  ExpectSamePlan(messy, 0, lk, per_key);
  // Per-query-head selections are refused by both.
  Selection rows = sel;
  rows.unit = SelectionUnit::kQueryHeadRow;
  ExpectSamePlan(rows, 0, lk, robin);
}

TEST(PlanEqualTest, PairCountOfTheRouterEqualsTheReference) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t lk = 1 + static_cast<int64_t>(rng() % 2500);
    const int64_t t0 = trial % 2 == 0 ? 0 : static_cast<int64_t>(rng() % lk);
    const int64_t q_block = 1 + static_cast<int64_t>(rng() % 40);
    const int64_t hkv = 1 + static_cast<int64_t>(rng() % 3);
    const int64_t group = 1 + static_cast<int64_t>(rng() % 4);
    const Selection sel = RouterLikeSelection(rng, hkv, group, t0, lk, q_block, 400, 8, 64);
    const AttentionShape shape{hkv * group, hkv, 8, lk - t0, lk};
    EXPECT_EQ(CountComputedPairsCpu(sel, shape), CountComputedPairs(sel, shape))
        << "trial " << trial;
  }
}

// SelectionToAttendHeader (spans written through Resize) against the header built span by span
// with add_begin/add_end: the same message, byte for byte.
TEST(PlanEqualTest, AttendHeaderEqualsTheSpanBySpanOne) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 10; ++trial) {
    const int64_t lk = 1 + static_cast<int64_t>(rng() % 3000);
    Selection sel = RouterLikeSelection(rng, 1 + trial % 3, 1 + trial % 4, 0, lk,
                                        1 + static_cast<int64_t>(rng() % 40), 500, 8, 64);
    for (auto& spans : sel.spans) {
      if (rng() % 4 == 0) spans.clear();
    }
    v1::AttendHeader fast;
    SelectionToAttendHeader(sel, &fast);
    v1::AttendHeader ref = fast;
    ref.clear_entries();
    for (const std::vector<Span>& spans : sel.spans) {
      v1::SpanList* list = ref.add_entries();
      for (const Span& s : spans) {
        list->add_begin(s.begin);
        list->add_end(s.end);
      }
    }
    EXPECT_EQ(fast.SerializeAsString(), ref.SerializeAsString()) << "trial " << trial;
  }
}

}  // namespace
}  // namespace dhsa::router
