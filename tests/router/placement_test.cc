#include "services/router/placement.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dhsa::router {
namespace {

using ::testing::ElementsAre;

std::vector<WorkerLoad> Loads(int n, int64_t capacity) {
  return std::vector<WorkerLoad>(static_cast<size_t>(n), WorkerLoad{capacity, 0, true});
}

TEST(PlacementTest, ZigzagOrder) {
  std::vector<int> order;
  for (int64_t s = 0; s < 9; ++s) order.push_back(ZigzagPlacement::ZigzagWorker(s, 0, 3));
  EXPECT_THAT(order, ElementsAre(0, 1, 2, 2, 1, 0, 0, 1, 2));
  order.clear();
  for (int64_t s = 0; s < 4; ++s) order.push_back(ZigzagPlacement::ZigzagWorker(s, 1, 2));
  EXPECT_THAT(order, ElementsAre(1, 0, 0, 1));
  EXPECT_EQ(ZigzagPlacement::ZigzagWorker(5, 0, 1), 0);
}

TEST(PlacementTest, StripesOpenAtCutsAndFollowTheZigzag) {
  ZigzagPlacement policy;
  std::vector<WorkerLoad> loads = Loads(3, 1 << 20);
  PlaceRequest req;
  req.new_end = 1000;
  req.stripe_tokens = 100;
  req.bytes_per_token = 10;
  for (int64_t c = 0; c < 1000; c += 37) req.cuts.push_back(c);
  auto pieces = PlaceAppend({}, req, policy, loads);
  ASSERT_TRUE(pieces.ok()) << pieces.status();
  std::vector<Stripe> stripes;
  ApplyStorePieces(*pieces, stripes);
  ASSERT_FALSE(stripes.empty());
  EXPECT_EQ(stripes.front().begin, 0);
  EXPECT_EQ(stripes.back().end, 1000);
  int64_t held = 0;
  for (size_t s = 0; s < stripes.size(); ++s) {
    SCOPED_TRACE(s);
    EXPECT_EQ(stripes[s].worker, ZigzagPlacement::ZigzagWorker(static_cast<int64_t>(s), 0, 3));
    EXPECT_EQ(stripes[s].begin % 37, 0);  // Opened at a cut.
    if (s + 1 < stripes.size()) {
      EXPECT_EQ(stripes[s].end, stripes[s + 1].begin);
      EXPECT_GE(stripes[s].end - stripes[s].begin, 100);
      EXPECT_LT(stripes[s].end - stripes[s].begin, 137);
    }
    held += stripes[s].end - stripes[s].begin;
  }
  int64_t used = 0;
  for (const WorkerLoad& l : loads) used += l.used_bytes;
  EXPECT_EQ(used, held * 10);
}

TEST(PlacementTest, AppendsExtendTheOpenStripeUntilItIsFull) {
  ZigzagPlacement policy;
  std::vector<WorkerLoad> loads = Loads(2, 1 << 20);
  std::vector<Stripe> stripes = {{0, 100, 0}, {100, 150, 1}};
  PlaceRequest req;
  req.new_end = 260;
  req.stripe_tokens = 100;
  req.cuts = {150, 190, 200, 230};
  auto pieces = PlaceAppend(stripes, req, policy, loads);
  ASSERT_TRUE(pieces.ok()) << pieces.status();
  ApplyStorePieces(*pieces, stripes);
  // The open stripe [100, 150) grows to the first cut >= 200; then stripe 2 goes to worker 1.
  EXPECT_THAT(stripes, ElementsAre(Stripe{0, 100, 0}, Stripe{100, 200, 1}, Stripe{200, 260, 1}));
  ASSERT_EQ(pieces->size(), 2u);
  EXPECT_TRUE((*pieces)[0].append);
  EXPECT_FALSE((*pieces)[1].append);

  // Decode: any position is a cut; the full stripe [200, 300) closes at the next token.
  req = PlaceRequest{};
  req.stripe_tokens = 100;
  req.any_cut = true;
  for (int64_t end = 261; end <= 301; ++end) {
    req.new_end = end;
    pieces = PlaceAppend(stripes, req, policy, loads);
    ASSERT_TRUE(pieces.ok());
    ApplyStorePieces(*pieces, stripes);
  }
  EXPECT_THAT(stripes, ElementsAre(Stripe{0, 100, 0}, Stripe{100, 200, 1}, Stripe{200, 300, 1},
                                   Stripe{300, 301, 0}));
}

TEST(PlacementTest, SkipsFullWorkersAndRefusesWhenTheClusterIsFull) {
  ZigzagPlacement policy;
  std::vector<WorkerLoad> loads = Loads(3, 1000);
  loads[1].used_bytes = 950;
  loads[2].available = false;
  PlaceRequest req;
  req.new_end = 20;
  req.stripe_tokens = 10;
  req.any_cut = true;
  req.bytes_per_token = 10;
  auto pieces = PlaceAppend({}, req, policy, loads);
  ASSERT_TRUE(pieces.ok()) << pieces.status();
  ASSERT_EQ(pieces->size(), 2u);
  EXPECT_EQ((*pieces)[0].worker, 0);
  EXPECT_EQ((*pieces)[1].worker, 0);  // Worker 1 lacks room, worker 2 is down.
  EXPECT_EQ(loads[0].used_bytes, 200);

  const std::vector<WorkerLoad> before = loads;
  req.new_end = 200;
  auto full = PlaceAppend({}, req, policy, loads);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  for (size_t w = 0; w < loads.size(); ++w) EXPECT_EQ(loads[w].used_bytes, before[w].used_bytes);
}

}  // namespace
}  // namespace dhsa::router
