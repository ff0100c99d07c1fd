#include "kernels/summaries/summaries.h"

#include <cmath>

#include "gtest/gtest.h"

namespace dhsa {
namespace {

TEST(SummariesTest, ChunkSummariesAreSumsOverSqrtLength) {
  // K [1, 5, 2]: chunks [0, 2) and [2, 5).
  const Tensor k = Tensor::FromFloats({1, 5, 2}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  const Summaries s =
      ChunkSummariesReference(*HeadsView::Of(k, "K"), {0, 2, 5}, SummaryNorm::kSqrt);
  ASSERT_EQ(s.count, 2);
  EXPECT_FLOAT_EQ(s.Row(0, 0)[0], 4.0f / std::sqrt(2.0f));
  EXPECT_FLOAT_EQ(s.Row(0, 0)[1], 6.0f / std::sqrt(2.0f));
  EXPECT_FLOAT_EQ(s.Row(0, 1)[0], 21.0f / std::sqrt(3.0f));
  EXPECT_FLOAT_EQ(s.Row(0, 1)[1], 24.0f / std::sqrt(3.0f));
  const Summaries mean =
      ChunkSummariesReference(*HeadsView::Of(k, "K"), {0, 2, 5}, SummaryNorm::kMean);
  EXPECT_FLOAT_EQ(mean.Row(0, 1)[0], 7.0f);
}

TEST(SummariesTest, QueryBlocksAverageTheGroupAndAlignToAbsolutePositions) {
  // Q [4, 3, 1] (Hq = 4, Hkv = 2, G = 2), queries at positions 5, 6, 7 with q_block 4: blocks 1
  // ([5, 8) -> 3 rows)... block index 1 covers [4, 8) intersected with [5, 8).
  std::vector<float> values;
  for (int g = 0; g < 4; ++g) {
    for (int t = 0; t < 3; ++t) values.push_back(static_cast<float>(10 * g + t));
  }
  const Tensor q = Tensor::FromFloats({4, 3, 1}, values);
  HeadsView view = *HeadsView::Of(q, "Q");
  view.offset = 5;
  const Summaries rho = QueryBlockSummariesReference(view, 2, 4, SummaryNorm::kSqrt);
  ASSERT_EQ(rho.count, 1);
  // KV head 0: heads 0 and 1 -> (0+1+2) + (10+11+12) = 36, over 2 * sqrt(3).
  EXPECT_FLOAT_EQ(rho.Row(0, 0)[0], 36.0f / (2.0f * std::sqrt(3.0f)));
  // KV head 1: heads 2 and 3 -> 63 + 93 = 156.
  EXPECT_FLOAT_EQ(rho.Row(1, 0)[0], 156.0f / (2.0f * std::sqrt(3.0f)));

  view.offset = 3;  // Positions 3, 4, 5: block 0 has row 3, block 1 has rows 4 and 5.
  const Summaries two = QueryBlockSummariesReference(view, 2, 4, SummaryNorm::kMean);
  ASSERT_EQ(two.count, 2);
  EXPECT_FLOAT_EQ(two.Row(0, 0)[0], (0.0f + 10.0f) / 2.0f);
  EXPECT_FLOAT_EQ(two.Row(0, 1)[0], (1.0f + 2.0f + 11.0f + 12.0f) / 4.0f);
}

}  // namespace
}  // namespace dhsa
