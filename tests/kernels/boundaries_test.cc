#include "kernels/boundaries/boundaries.h"

#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

using ::testing::ElementsAre;

// [1, len, 2] keys with direction (1, 0) or (0, 1) per position.
Tensor TwoDirectionKeys(const std::vector<int>& direction) {
  std::vector<float> values;
  for (int d : direction) {
    values.push_back(d == 0 ? 1.0f : 0.0f);
    values.push_back(d == 0 ? 0.0f : 1.0f);
  }
  return Tensor::FromFloats({1, static_cast<int64_t>(direction.size()), 2}, values);
}

DhsaConfig Chunks(int64_t mean, int64_t min, int64_t max) {
  DhsaConfig c;
  c.chunk_mean = mean;
  c.chunk_min = min;
  c.chunk_max = max;
  return c;
}

TEST(BoundariesTest, FindsTheEdgesOfThreeSegments) {
  std::vector<int> dir(24, 0);
  for (int t = 8; t < 16; ++t) dir[t] = 1;
  const Tensor k = TwoDirectionKeys(dir);
  const HeadsView view = *HeadsView::Of(k, "K");
  // Gap 8: left mean (1,0), right mean (0,1): delta = 1. Gap 7: left (1,0), right (1,3): 0.68.
  const std::vector<double> delta = GapDissimilarityReference(view, 0, 24, 4);
  ASSERT_EQ(delta.size(), 23u);
  EXPECT_DOUBLE_EQ(delta[7], 1.0);  // Gap t = 8 is delta[t - 1].
  EXPECT_DOUBLE_EQ(delta[15], 1.0);
  EXPECT_NEAR(delta[6], 1.0 - 1.0 / std::sqrt(10.0), 1e-12);
  EXPECT_DOUBLE_EQ(delta[3], 0.0);
  auto b = SegmentKeysReference(view, 0, 24, Chunks(8, 4, 128));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_THAT(*b, ElementsAre(0, 8, 16, 24));
}

TEST(BoundariesTest, TiesBreakToTheLowerGapAndRespectMinChunk) {
  // Identical keys: every delta is exactly 0, so gaps are taken left to right, min_chunk apart.
  const Tensor k = TwoDirectionKeys(std::vector<int>(40, 0));
  auto b = SegmentKeysReference(*HeadsView::Of(k, "K"), 0, 40, Chunks(8, 8, 128));
  ASSERT_TRUE(b.ok());
  EXPECT_THAT(*b, ElementsAre(0, 8, 16, 24, 32, 40));
  // Only ceil(40 / 16) - 1 = 2 gaps may be taken.
  b = SegmentKeysReference(*HeadsView::Of(k, "K"), 0, 40, Chunks(16, 8, 128));
  EXPECT_THAT(*b, ElementsAre(0, 8, 16, 40));
}

TEST(BoundariesTest, SplitsLongChunksIntoEqualParts) {
  const Tensor k = TwoDirectionKeys(std::vector<int>(300, 1));
  auto b = SegmentKeysReference(*HeadsView::Of(k, "K"), 0, 300, Chunks(1000, 8, 128));
  ASSERT_TRUE(b.ok());
  EXPECT_THAT(*b, ElementsAre(0, 100, 200, 300));
}

TEST(BoundariesTest, FixedChunksAreAlignedToAbsolutePositions) {
  DhsaConfig c;
  c.boundary_mode = BoundaryMode::kFixed;
  c.chunk_mean = 32;
  const Tensor k = TwoDirectionKeys(std::vector<int>(100, 0));
  EXPECT_THAT(*SegmentKeysReference(*HeadsView::Of(k, "K"), 0, 100, c),
              ElementsAre(0, 32, 64, 96, 100));
  EXPECT_THAT(*SegmentKeysReference(*HeadsView::Of(k, "K"), 40, 100, c),
              ElementsAre(40, 64, 96, 100));
}

TEST(BoundariesTest, RandomStructuredKeysGiveValidChunksAndFindTrueEdges) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (int64_t len : {97, 1025, 4099}) {
    std::vector<int64_t> starts;
    const Tensor k = testing::SegmentedTensor(rng, 2, len, 16, &starts);
    const DhsaConfig c;
    auto b = SegmentKeysReference(*HeadsView::Of(k, "K"), 0, len, c);
    ASSERT_TRUE(b.ok());
    ASSERT_EQ(b->front(), 0);
    ASSERT_EQ(b->back(), len);
    for (size_t j = 0; j + 1 < b->size(); ++j) {
      const int64_t size = (*b)[j + 1] - (*b)[j];
      EXPECT_GE(size, c.chunk_min);
      EXPECT_LE(size, c.chunk_max);
    }
    // True segment edges are sharp: nearly all must be found exactly.
    int64_t found = 0;
    for (int64_t s : starts) found += std::binary_search(b->begin(), b->end(), s) ? 1 : 0;
    EXPECT_GE(found, static_cast<int64_t>(0.9 * static_cast<double>(starts.size())))
        << "len " << len;
  }
}

TEST(BoundariesTest, PrefillAppendNeverMovesOldBoundaries) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const Tensor k = testing::SegmentedTensor(rng, 1, 600, 16);
  const HeadsView view = *HeadsView::Of(k, "K");
  const DhsaConfig c;
  auto first = AppendPrefillBoundariesReference(view, {}, 250, c);
  ASSERT_TRUE(first.ok());
  auto second = AppendPrefillBoundariesReference(view, *first, 600, c);
  ASSERT_TRUE(second.ok());
  ASSERT_GT(second->size(), first->size());
  for (size_t j = 0; j < first->size(); ++j) EXPECT_EQ((*second)[j], (*first)[j]);
  auto alone = SegmentKeysReference(view, 250, 600, c);
  EXPECT_EQ(
      std::vector<int64_t>(second->begin() + static_cast<long>(first->size()) - 1, second->end()),
      *alone);
}

TEST(BoundariesTest, DecodeGrowsTheTailThenSegmentsIt) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const Tensor k = testing::SegmentedTensor(rng, 1, 700, 16);
  const HeadsView view = *HeadsView::Of(k, "K");
  const DhsaConfig c;
  std::vector<int64_t> b = *AppendPrefillBoundariesReference(view, {}, 500, c);
  const std::vector<int64_t> prefill = b;
  for (int64_t end = 501; end <= 700; ++end) {
    const std::vector<int64_t> old = b;
    b = *AppendDecodeBoundariesReference(view, b, end, c);
    ASSERT_EQ(b.back(), end);
    // Everything before the old tail chunk stays.
    for (size_t j = 0; j + 2 < old.size(); ++j) ASSERT_EQ(b[j], old[j]);
    // The tail chunk is never longer than chunk_max.
    ASSERT_LE(b.back() - b[b.size() - 2], c.chunk_max);
  }
  for (size_t j = 0; j + 1 < prefill.size(); ++j) EXPECT_EQ(b[j], prefill[j]);
  EXPECT_GT(b.size(), prefill.size());
}

TEST(BoundariesTest, RejectsRangesOutsideTheKeys) {
  const Tensor k = TwoDirectionKeys(std::vector<int>(10, 0));
  const DhsaConfig c;
  EXPECT_FALSE(SegmentKeysReference(*HeadsView::Of(k, "K"), 0, 11, c).ok());
  EXPECT_FALSE(SegmentKeysReference(*HeadsView::Of(k, "K"), 5, 5, c).ok());
  EXPECT_FALSE(AppendDecodeBoundariesReference(*HeadsView::Of(k, "K"), {0, 10}, 10, c).ok());
}

}  // namespace
}  // namespace dhsa
