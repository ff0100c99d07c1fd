#include "services/router/plan.h"

#include <random>
#include <set>

#include "gtest/gtest.h"
#include "tests/kernels/test_util.h"

namespace dhsa::router {
namespace {

using ::dhsa::testing::FreshSeed;

// Random spans per (KV head, block) over queries [t0, lk), each inside [0, e).
Selection RandomSelection(std::mt19937_64& rng, int64_t heads, int64_t t0, int64_t lk,
                          int64_t block) {
  Selection s;
  s.block_size = block;
  s.first_block = t0 / block;
  s.num_blocks = (lk - 1) / block - s.first_block + 1;
  s.num_heads = heads;
  s.group = 2;
  s.spans.resize(static_cast<size_t>(heads * s.num_blocks));
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t b = 0; b < s.num_blocks; ++b) {
      const int64_t e = std::min(lk, (s.first_block + b + 1) * block);
      std::uniform_int_distribution<int64_t> pos(0, e - 1);
      std::vector<Span> spans = {{std::max<int64_t>(0, e - block), e}};
      for (int i = 0; i < 4; ++i) {
        const int64_t a = pos(rng);
        spans.push_back({a, std::min(e, a + 1 + pos(rng) % 50)});
      }
      s.At(h, b) = NormaliseSpans(std::move(spans));
    }
  }
  return s;
}

// Set of keys of a span list.
std::set<int64_t> Keys(const std::vector<Span>& spans) {
  std::set<int64_t> out;
  for (const Span& s : spans) {
    for (int64_t t = s.begin; t < s.end; ++t) out.insert(t);
  }
  return out;
}

TEST(PlanTest, SpansAreCutAtStripeEdgesWithNothingLost) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t lk = 300 + static_cast<int64_t>(rng() % 700);
    const int64_t t0 = static_cast<int64_t>(rng() % lk);
    const Selection sel = RandomSelection(rng, 2, t0, lk, 32);
    // Random stripes over [0, lk) on 3 workers.
    std::vector<Stripe> stripes;
    for (int64_t b = 0; b < lk;) {
      const int64_t e = std::min(lk, b + 1 + static_cast<int64_t>(rng() % 200));
      stripes.push_back({b, e, static_cast<int>(rng() % 3)});
      b = e;
    }
    auto plan = PlanAttention(sel, t0, lk, stripes);
    ASSERT_TRUE(plan.ok()) << plan.status();
    std::vector<std::set<int64_t>> got(sel.spans.size());
    int last_worker = -1;
    for (const WorkerWork& w : *plan) {
      EXPECT_GT(w.worker, last_worker);  // One work item per worker, in order.
      last_worker = w.worker;
      const Selection& local = w.local;
      EXPECT_EQ(w.row_begin, std::max(t0, local.first_block * 32));
      EXPECT_EQ(w.row_end, std::min(lk, (local.first_block + local.num_blocks) * 32));
      bool any = false;
      for (int64_t h = 0; h < local.num_heads; ++h) {
        for (int64_t b = 0; b < local.num_blocks; ++b) {
          const std::vector<Span>& spans = local.At(h, b);
          any = any || !spans.empty();
          for (size_t i = 0; i < spans.size(); ++i) {
            if (i > 0) {
              EXPECT_GT(spans[i].begin, spans[i - 1].end);  // Disjoint, non-adjacent.
            }
            for (int64_t t = spans[i].begin; t < spans[i].end; ++t) {
              // Every key sent to a worker is on one of its stripes.
              auto it = std::upper_bound(stripes.begin(), stripes.end(), t,
                                         [](int64_t p, const Stripe& s) { return p < s.end; });
              ASSERT_NE(it, stripes.end());
              EXPECT_EQ(it->worker, w.worker);
              EXPECT_TRUE(got[static_cast<size_t>(h * sel.num_blocks + local.first_block -
                                                  sel.first_block + b)]
                              .insert(t)
                              .second);
            }
          }
        }
      }
      EXPECT_TRUE(any);  // Workers without keys get no work.
    }
    for (size_t n = 0; n < sel.spans.size(); ++n) EXPECT_EQ(got[n], Keys(sel.spans[n]));
  }
}

TEST(PlanTest, OnlyWorkersHoldingSelectedKeysGetWork) {
  Selection sel;
  sel.block_size = 16;
  sel.first_block = 6;  // Queries [100, 112).
  sel.num_blocks = 1;
  sel.num_heads = 1;
  sel.spans = {{{0, 10}, {96, 112}}};
  const std::vector<Stripe> stripes = {{0, 40, 0}, {40, 80, 1}, {80, 112, 2}};
  auto plan = PlanAttention(sel, 100, 112, stripes);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->size(), 2u);
  EXPECT_EQ((*plan)[0].worker, 0);
  EXPECT_EQ((*plan)[1].worker, 2);
  EXPECT_EQ((*plan)[0].row_begin, 100);
  EXPECT_EQ((*plan)[0].row_end, 112);
}

TEST(PlanTest, KeysOnNoStripeAreAnError) {
  Selection sel;
  sel.block_size = 16;
  sel.num_blocks = 1;
  sel.num_heads = 1;
  sel.spans = {{{0, 16}}};
  EXPECT_FALSE(PlanAttention(sel, 0, 16, {{0, 8, 0}}).ok());
}

}  // namespace
}  // namespace dhsa::router
