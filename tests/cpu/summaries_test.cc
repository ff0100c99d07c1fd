#include "kernels/cpu/summaries.h"

#include <random>

#include "gtest/gtest.h"
#include "kernels/boundaries/boundaries.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

struct Case {
  int64_t hq, hkv, lq, lk, d;
  DType dtype;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << "Hq " << c.hq << " Hkv " << c.hkv << " Lq " << c.lq << " Lk " << c.lk << " d " << c.d
      << " " << DTypeName(c.dtype);
}

class SummariesCpuTest : public ::testing::TestWithParam<Case> {};

// The CPU path sums in double in the reference's order, so the summaries are bit-identical: a
// stronger check than the tolerance rule.
TEST_P(SummariesCpuTest, EqualTheReferenceBitForBit) {
  const Case c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor k = testing::SegmentedTensor(rng, c.hkv, c.lk, c.d).ConvertTo(c.dtype);
  const Tensor q = testing::RandomTensor(rng, c.hq, c.lq, c.d).ConvertTo(c.dtype);
  const HeadsView kv = *HeadsView::Of(k, "k");
  HeadsView qv = *HeadsView::Of(q, "q");
  qv.offset = c.lk - c.lq;
  DhsaConfig config;
  const std::vector<int64_t> b = *SegmentKeysReference(kv, 0, c.lk, config);
  for (SummaryNorm norm : {SummaryNorm::kSqrt, SummaryNorm::kMean}) {
    EXPECT_EQ(ChunkSummariesCpu(kv, b, norm, 2).data, ChunkSummariesReference(kv, b, norm).data);
    for (int64_t q_block : {1, 32, 128}) {
      const Summaries want = QueryBlockSummariesReference(qv, c.hkv, q_block, norm);
      const Summaries got = QueryBlockSummariesCpu(qv, c.hkv, q_block, norm, 2);
      EXPECT_EQ(got.count, want.count);
      EXPECT_EQ(got.data, want.data) << "q_block " << q_block;
    }
  }
  // The query summaries of both chunk scores.
  for (ChunkScore score : {ChunkScore::kPaper, ChunkScore::kMass}) {
    DhsaConfig sc;
    sc.chunk_score = score;
    sc.score_rows = 8;
    const Summaries want = ScoreQuerySummariesReference(qv, c.hkv, sc);
    const Summaries got = ScoreQuerySummariesCpu(qv, c.hkv, sc, 2);
    EXPECT_EQ(got.heads, want.heads);
    EXPECT_EQ(got.count, want.count);
    EXPECT_EQ(got.data, want.data) << ChunkScoreName(score);
  }
}

INSTANTIATE_TEST_SUITE_P(OddSizes, SummariesCpuTest,
                         ::testing::Values(Case{8, 2, 97, 97, 128, DType::kF32},
                                           Case{4, 4, 1, 1025, 72, DType::kF16},
                                           Case{6, 2, 1000, 4099, 64, DType::kBF16}));

// Decode and chunked prefill keep the summaries of unchanged chunks: the update equals computing
// every chunk again.
TEST(SummariesCpuTest, UpdateReusesUnchangedChunksAndEqualsARecomputation) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor k = testing::SegmentedTensor(rng, 2, 1500, 64);
  const HeadsView kv = *HeadsView::Of(k, "k");
  DhsaConfig config;
  std::vector<int64_t> b = *SegmentKeysReference(kv, 0, 1000, config);
  Summaries kappa = ChunkSummariesCpu(kv, b, SummaryNorm::kSqrt);
  // Decode steps past chunk_max (the tail is then segmented), then a chunked prefill.
  for (int64_t end = 1001; end <= 1200; ++end) {
    const std::vector<int64_t> next = *AppendDecodeBoundariesReference(kv, b, end, config);
    Summaries updated = UpdateChunkSummariesCpu(kv, next, SummaryNorm::kSqrt, b, kappa);
    ASSERT_EQ(updated.data, ChunkSummariesReference(kv, next, SummaryNorm::kSqrt).data)
        << "end " << end;
    b = next;
    kappa = std::move(updated);
  }
  const std::vector<int64_t> next = *AppendPrefillBoundariesReference(kv, b, 1500, config);
  EXPECT_EQ(UpdateChunkSummariesCpu(kv, next, SummaryNorm::kSqrt, b, kappa, 2).data,
            ChunkSummariesReference(kv, next, SummaryNorm::kSqrt).data);
}

}  // namespace
}  // namespace dhsa
