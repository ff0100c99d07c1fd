#include "services/router/layout.h"

#include <random>

#include "gtest/gtest.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/summaries/summaries.h"
#include "tests/kernels/test_util.h"

namespace dhsa::router {
namespace {

using ::dhsa::testing::FreshSeed;
using ::dhsa::testing::SegmentedTensor;

// Rows [begin, end) of a [heads, len, dim] float tensor.
Tensor Rows(const Tensor& t, int64_t begin, int64_t end) {
  const int64_t heads = t.shape[0], len = t.shape[1], dim = t.shape[2];
  std::vector<float> values;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < dim; ++c) values.push_back(t.Get((h * len + r) * dim + c));
    }
  }
  return Tensor::FromFloats({heads, end - begin, dim}, values);
}

// The layout after committing `delta` must show the reference's boundaries and summaries over all
// keys [0, end).
void ExpectMatchesReference(const LayerLayout& layout, const LayoutDelta& delta,
                            const Tensor& all_keys, const std::vector<int64_t>& want_boundaries,
                            SummaryNorm norm) {
  const LayoutView view = layout.SelectionView(delta);
  ASSERT_EQ(view.boundaries, want_boundaries);
  const Tensor keys = Rows(all_keys, 0, want_boundaries.back());
  const Summaries want = ChunkSummariesReference(*HeadsView::Of(keys, "K"), want_boundaries, norm);
  EXPECT_EQ(view.kappa.count, want.count);
  EXPECT_EQ(view.kappa.heads, want.heads);
  EXPECT_EQ(view.kappa.data, want.data);  // Same arithmetic on the same keys: bit-exact.
}

// The spec's method (its sqrt chunk summaries, which the layout keeps as sums) with smaller chunks.
DhsaConfig SmallChunks() {
  DhsaConfig c = PaperConfig();
  c.chunk_mean = 16;
  c.chunk_min = 4;
  c.chunk_max = 24;
  return c;
}

TEST(LayoutTest, PrefillInTwoCallsMatchesTheReference) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const DhsaConfig config = SmallChunks();
  const Tensor keys = SegmentedTensor(rng, 2, 301, 8);
  const HeadsView all = *HeadsView::Of(keys, "K");
  LayerLayout layout(config, 2, 8, DType::kF32);

  auto first = layout.Propose(Rows(keys, 0, 173), /*decode=*/false);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::vector<int64_t> b1 = *SegmentKeysReference(all, 0, 173, config);
  ExpectMatchesReference(layout, *first, keys, b1, ChunkSummaryNorm(config));
  EXPECT_EQ(layout.length(), 0);  // Nothing changes before Commit.
  layout.Commit(*std::move(first));
  EXPECT_EQ(layout.length(), 173);
  EXPECT_EQ(layout.boundaries(), b1);
  EXPECT_EQ(layout.tail_begin(), b1[b1.size() - 2]);

  auto second = layout.Propose(Rows(keys, 173, 301), false);
  ASSERT_TRUE(second.ok()) << second.status();
  const std::vector<int64_t> b2 = *AppendPrefillBoundariesReference(all, b1, 301, config);
  ExpectMatchesReference(layout, *second, keys, b2, ChunkSummaryNorm(config));
  layout.Commit(*std::move(second));
  EXPECT_EQ(layout.boundaries(), b2);
}

TEST(LayoutTest, DecodeGrowsAndResegmentsTheTailLikeTheReference) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (BoundaryMode mode : {BoundaryMode::kDynamic, BoundaryMode::kFixed}) {
    DhsaConfig config = SmallChunks();
    config.boundary_mode = mode;
    const Tensor keys = SegmentedTensor(rng, 3, 200, 4);
    const HeadsView all = *HeadsView::Of(keys, "K");
    LayerLayout layout(config, 3, 4, DType::kF32);
    std::vector<int64_t> want = *SegmentKeysReference(all, 0, 120, config);
    auto delta = layout.Propose(Rows(keys, 0, 120), false);
    ASSERT_TRUE(delta.ok()) << delta.status();
    layout.Commit(*std::move(delta));
    for (int64_t end = 121; end <= 200; ++end) {
      SCOPED_TRACE(::testing::Message() << "mode " << BoundaryModeName(mode) << " end " << end);
      want = *AppendDecodeBoundariesReference(all, want, end, config);
      delta = layout.Propose(Rows(keys, end - 1, end), /*decode=*/true);
      ASSERT_TRUE(delta.ok()) << delta.status();
      ExpectMatchesReference(layout, *delta, keys, want, ChunkSummaryNorm(config));
      layout.Commit(*std::move(delta));
      // Only the tail chunk's keys are kept.
      EXPECT_LE(layout.length() - layout.tail_begin(), config.chunk_max + 1);
    }
  }
}

TEST(LayoutTest, BlockTopkKeepsFixedBlocksWithMeanSummaries) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  DhsaConfig config;
  config.policy = Policy::kBlockTopk;
  config.block = 32;
  const Tensor keys = SegmentedTensor(rng, 2, 150, 8);
  LayerLayout layout(config, 2, 8, DType::kF32);
  int64_t end = 0;
  for (int64_t next : {70, 71, 72, 96, 97, 150}) {
    auto delta = layout.Propose(Rows(keys, end, next), /*decode=*/next - end == 1);
    ASSERT_TRUE(delta.ok()) << delta.status();
    std::vector<int64_t> want;
    for (int64_t b = 0; b < next; b += 32) want.push_back(b);
    want.push_back(next);
    ExpectMatchesReference(layout, *delta, keys, want, SummaryNorm::kMean);
    layout.Commit(*std::move(delta));
    end = next;
  }
}

TEST(LayoutTest, PoliciesWithoutChunksKeepOnlyTheLength) {
  DhsaConfig config;
  config.policy = Policy::kDense;
  LayerLayout layout(config, 1, 4, DType::kF16);
  const Tensor k = Tensor::Zeros(DType::kF16, {1, 10, 4});
  auto delta = layout.Propose(k, false);
  ASSERT_TRUE(delta.ok());
  layout.Commit(*std::move(delta));
  EXPECT_EQ(layout.length(), 10);
  EXPECT_EQ(layout.boundaries(), (std::vector<int64_t>{0, 10}));
}

TEST(LayoutTest, RejectsWrongShapesAndDecodeBeforePrefill) {
  LayerLayout layout(DhsaConfig{}, 2, 4, DType::kF32);
  EXPECT_EQ(layout.Propose(Tensor::Zeros(DType::kF32, {1, 3, 4}), false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(layout.Propose(Tensor::Zeros(DType::kF16, {2, 3, 4}), false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(layout.Propose(Tensor::Zeros(DType::kF32, {2, 1, 4}), true).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace dhsa::router
