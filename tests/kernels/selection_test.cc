#include "kernels/selection/selection.h"

#include <algorithm>
#include <random>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/boundaries/boundaries.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

using ::testing::ElementsAre;

MATCHER_P2(SpanIs, b, e, "") { return arg.begin == b && arg.end == e; }

// Selection inputs with head dim 1, rho = 1 everywhere and kappa = the given chunk scores, so that
// score(j) = kappa[j].
struct HandInputs {
  AttentionShape shape;
  std::vector<int64_t> boundaries;
  Summaries kappa, rho;
  SelectionInputs in;

  HandInputs(int64_t lk, int64_t q_block, std::vector<int64_t> b, const std::vector<float>& scores)
      : boundaries(std::move(b)) {
    shape = {1, 1, 1, lk, lk};
    kappa = {1, static_cast<int64_t>(scores.size()), 1, scores};
    const int64_t blocks = (lk + q_block - 1) / q_block;
    rho = {1, blocks, 1, std::vector<float>(static_cast<size_t>(blocks), 1.0f)};
    in = {shape, &boundaries, &kappa, &rho};
  }
};

// The spec's method (hand-computed paper scores) on a tiny structure.
DhsaConfig Small() {
  DhsaConfig c = PaperConfig();
  c.q_block = 4;
  c.local = 4;
  c.sink = 2;
  c.budget = 10;
  return c;
}

TEST(SelectionTest, DhsaTakesChunksByScoreAndCutsTheLastOneToTheBudget) {
  // Chunks [0,2) [2,5) [5,8) [8,12) [12,16) with scores 9, 4, 3, 5, 100.
  HandInputs h(16, 4, {0, 2, 5, 8, 12, 16}, {9, 4, 3, 5, 100});
  auto sel = SelectSpansReference(h.in, Small());
  ASSERT_TRUE(sel.ok()) << sel.status();
  ASSERT_EQ(sel->num_blocks, 4);
  // Blocks 0-1 end at e <= budget: dense.
  EXPECT_THAT(sel->At(0, 0), ElementsAre(SpanIs(0, 4)));
  EXPECT_THAT(sel->At(0, 1), ElementsAre(SpanIs(0, 8)));
  // Block 2 (e = 12): sink [0,2) + local [8,12) leave 4 tokens. Eligible chunks end <= 8: chunk 0
  // adds nothing (inside the sink), chunk 1 adds [2,5), chunk 2 is cut to its first token [5,6).
  EXPECT_THAT(sel->At(0, 2), ElementsAre(SpanIs(0, 6), SpanIs(8, 12)));
  // Block 3 (e = 16): local [12,16); chunk 4 is not eligible (ends after 12); chunk 3 (score 5)
  // fills the 4 tokens.
  EXPECT_THAT(sel->At(0, 3), ElementsAre(SpanIs(0, 2), SpanIs(8, 16)));
}

TEST(SelectionTest, DhsaTiesPreferTheLaterChunk) {
  HandInputs h(16, 4, {0, 2, 6, 10, 12, 16}, {0, 1, 1, 0, 0});
  DhsaConfig c = Small();
  c.budget = 10;
  auto sel = SelectSpansReference(h.in, c);
  ASSERT_TRUE(sel.ok());
  // Block 3: eligible chunks end <= 12: chunks 1 [2,6) and 2 [6,10) tie; chunk 2 goes first.
  EXPECT_THAT(sel->At(0, 3), ElementsAre(SpanIs(0, 2), SpanIs(6, 10), SpanIs(12, 16)));
}

TEST(SelectionTest, BlockTopkKeepsTheDiagonalAndTheBestBlocks) {
  // Blocks of 2: [0,2) .. [14,16), scores per block.
  HandInputs h(16, 4, {0, 2, 4, 6, 8, 10, 12, 14, 16}, {1, 7, 2, 9, 3, 8, 50, 50});
  DhsaConfig c = Small();
  c.policy = Policy::kBlockTopk;
  c.block = 2;
  c.budget = 8;
  auto sel = SelectSpansReference(h.in, c);
  ASSERT_TRUE(sel.ok()) << sel.status();
  // Block 3 (rows 12..15): diagonal [12,16) is 2 blocks; 8/2 - 2 = 2 more among blocks ending
  // <= 12: block 3 (score 9) and block 5 (score 8).
  EXPECT_THAT(sel->At(0, 3), ElementsAre(SpanIs(6, 8), SpanIs(10, 16)));
  EXPECT_THAT(sel->At(0, 1), ElementsAre(SpanIs(0, 8)));
}

TEST(SelectionTest, StreamingKeepsSinkAndRecentKeys) {
  HandInputs h(16, 4, {0, 16}, {0});
  DhsaConfig c = Small();
  c.policy = Policy::kStreaming;
  c.budget = 8;
  auto sel = SelectSpansReference(h.in, c);
  ASSERT_TRUE(sel.ok());
  EXPECT_THAT(sel->At(0, 3), ElementsAre(SpanIs(0, 2), SpanIs(10, 16)));
  EXPECT_THAT(sel->At(0, 2), ElementsAre(SpanIs(0, 2), SpanIs(6, 12)));
}

TEST(SelectionTest, ConfigErrorsSayWhatToFix) {
  HandInputs h(16, 4, {0, 16}, {0});
  DhsaConfig c = Small();
  c.local = 2;  // < q_block.
  auto sel = SelectSpansReference(h.in, c);
  EXPECT_EQ(sel.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(sel.status().message()), ::testing::HasSubstr("q_block"));
  c = Small();
  c.budget = 5;  // < sink + local.
  sel = SelectSpansReference(h.in, c);
  EXPECT_THAT(std::string(sel.status().message()), ::testing::HasSubstr("sink + local"));
}

// Properties every selection must have, on random structured inputs, for every policy.
class SelectionPropertyTest : public ::testing::TestWithParam<Policy> {};

TEST_P(SelectionPropertyTest, SpansAreSortedCausalWithinBudgetAndKeepSinkAndLocal) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (int64_t lk : {97, 1025, 4099}) {
    for (int64_t lq : {lk, int64_t{37}, int64_t{1}}) {
      // dhsa with both chunk scores (the spec's and the default mass score).
      for (int variant = 0; variant < (GetParam() == Policy::kDhsa ? 4 : 2); ++variant) {
        DhsaConfig c = PaperConfig();
        c.policy = GetParam();
        c.budget = 512;
        c.sink = 64;
        c.local = 128;
        c.q_block = 64;
        c.shared_heads = variant % 2 == 1;
        if (variant >= 2) c.chunk_score = ChunkScore::kMass;
        const Tensor k = testing::SegmentedTensor(rng, 2, lk, 32);
        const Tensor q = testing::RandomTensor(rng, 4, lq, 32);
        HeadsView kv = *HeadsView::Of(k, "K"), qv = *HeadsView::Of(q, "Q");
        qv.offset = lk - lq;
        const AttentionShape shape = {4, 2, 32, lq, lk};
        std::vector<int64_t> b;
        Summaries kappa, rho;
        if (c.policy == Policy::kBlockTopk) {
          DhsaConfig blocks = c;
          blocks.boundary_mode = BoundaryMode::kFixed;
          blocks.chunk_mean = c.block;
          b = *SegmentKeysReference(kv, 0, lk, blocks);
          kappa = ChunkSummariesReference(kv, b, SummaryNorm::kMean);
          rho = QueryBlockSummariesReference(qv, 2, c.q_block, SummaryNorm::kMean);
        } else {
          b = *SegmentKeysReference(kv, 0, lk, c);
          kappa = ChunkSummariesReference(kv, b, ChunkSummaryNorm(c));
          rho = ScoreQuerySummariesReference(qv, 2, c);
        }
        auto sel = c.policy == Policy::kOracleTopk
                       ? SelectOracleTopkReference(qv, kv, c)
                       : SelectSpansReference({shape, &b, &kappa, &rho}, c);
        ASSERT_TRUE(sel.ok()) << sel.status();
        ASSERT_TRUE(CheckSelection(*sel, shape).ok()) << CheckSelection(*sel, shape);
        for (int64_t g = 0; g < 4; ++g) {
          for (int64_t p = lk - lq; p < lk; ++p) {
            const std::vector<Span>& spans = sel->ForQuery(g, p);
            const int64_t e = sel->unit == SelectionUnit::kQueryHeadRow
                                  ? p + 1
                                  : std::min((p / c.q_block + 1) * c.q_block, lk);
            ASSERT_FALSE(spans.empty());
            EXPECT_LE(spans.back().end, e);
            int64_t selected = 0, causal = 0;
            for (size_t n = 0; n < spans.size(); ++n) {
              if (n > 0) {
                EXPECT_LT(spans[n - 1].end, spans[n].begin);  // Disjoint, not adjacent.
              }
              selected += spans[n].size();
              causal += std::max<int64_t>(0, std::min(spans[n].end, p + 1) - spans[n].begin);
            }
            if (c.policy != Policy::kDense) {
              EXPECT_LE(causal, c.budget);
            }
            if (c.policy == Policy::kDense || e <= c.budget) {
              ASSERT_EQ(spans.size(), 1u);
              EXPECT_EQ(spans[0].begin, 0);
              EXPECT_EQ(spans[0].end, e);
            }
            if (c.policy == Policy::kDhsa || c.policy == Policy::kStreaming) {
              EXPECT_EQ(spans.front().begin, 0);
              EXPECT_GE(spans.front().end, std::min(c.sink, e));  // Sink kept.
              const int64_t window = c.policy == Policy::kDhsa ? c.local : c.budget - c.sink;
              EXPECT_EQ(spans.back().end, e);
              EXPECT_LE(spans.back().begin, std::max<int64_t>(0, e - window));  // Local kept.
            }
            if (c.policy == Policy::kDhsa && e > c.budget) {
              EXPECT_EQ(selected, c.budget);  // Enough eligible chunks here to fill the budget.
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllPolicies, SelectionPropertyTest,
                         ::testing::Values(Policy::kDhsa, Policy::kBlockTopk, Policy::kStreaming,
                                           Policy::kDense, Policy::kOracleTopk),
                         [](const auto& info) { return std::string(PolicyName(info.param)); });

TEST(SelectionTest, OracleTakesTheHighestScoringKeysAsASet) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, 2, 300, 16);
  const Tensor k = testing::RandomTensor(rng, 1, 300, 16);
  DhsaConfig c;
  c.budget = 50;
  auto sel = SelectOracleTopkReference(*HeadsView::Of(q, "Q"), *HeadsView::Of(k, "K"), c);
  ASSERT_TRUE(sel.ok());
  for (int64_t g = 0; g < 2; ++g) {
    for (int64_t p : {0, 49, 50, 123, 299}) {
      std::vector<std::pair<double, int64_t>> scores;
      for (int64_t t = 0; t <= p; ++t) {
        double dot = 0;
        for (int c2 = 0; c2 < 16; ++c2)
          dot += double{q.Get((g * 300 + p) * 16 + c2)} * k.Get(t * 16 + c2);
        scores.push_back({-dot, t});
      }
      std::sort(scores.begin(), scores.end());
      std::set<int64_t> want, got;
      for (int64_t n = 0; n < std::min<int64_t>(50, p + 1); ++n) want.insert(scores[n].second);
      for (const Span& s : sel->ForQuery(g, p)) {
        for (int64_t t = s.begin; t < s.end; ++t) got.insert(t);
      }
      EXPECT_EQ(got, want) << "head " << g << " row " << p;
    }
  }
}

TEST(SelectionTest, NormaliseSpansMergesOverlapsAndAdjacency) {
  EXPECT_THAT(NormaliseSpans({{5, 8}, {0, 2}, {2, 3}, {7, 9}, {4, 4}}),
              ElementsAre(SpanIs(0, 3), SpanIs(5, 9)));
}

}  // namespace
}  // namespace dhsa

namespace dhsa {
namespace {

// The mass score from the raw tensors (mean queries and mean keys taken here, not from the
// summaries code), for KV head h and absolute block `block`, with queries [t0, lk).
std::vector<double> MassFromTensors(const Tensor& q, const Tensor& k, const std::vector<int64_t>& b,
                                    const DhsaConfig& c, int64_t h, int64_t block) {
  const int64_t hq = q.shape[0], lq = q.shape[1], d = q.shape[2];
  const int64_t hkv = k.shape[0], lk = k.shape[1], t0 = lk - lq, group = hq / hkv;
  const int64_t e = std::min((block + 1) * c.q_block, lk);
  const int64_t eligible = EligibleChunks(b, block * c.q_block);
  std::vector<double> total(static_cast<size_t>(eligible), 0.0);
  auto logits_of = [&](const std::vector<double>& mq) {
    std::vector<double> logit;
    for (size_t j = 0; j + 1 < b.size() && b[j] < e; ++j) {
      double dot = 0;
      for (int64_t x = 0; x < d; ++x) {
        double mk = 0;
        for (int64_t t = b[j]; t < b[j + 1]; ++t) mk += k.Get((h * lk + t) * d + x);
        dot += mq[x] * mk / static_cast<double>(b[j + 1] - b[j]);
      }
      logit.push_back(dot / std::sqrt(static_cast<double>(d)) +
                      std::log(static_cast<double>(b[j + 1] - b[j])));
    }
    return logit;
  };
  const int64_t row_begin = std::max(t0, block * c.q_block);
  if (e - row_begin < c.score_rows) {
    // Fewer rows than a piece: one mean query over the group's heads and the rows; its logits.
    std::vector<double> mq(static_cast<size_t>(d), 0.0);
    for (int64_t g = h * group; g < (h + 1) * group; ++g) {
      for (int64_t p = row_begin; p < e; ++p) {
        for (int64_t x = 0; x < d; ++x) {
          mq[x] += q.Get((g * lq + p - t0) * d + x) / static_cast<double>(group * (e - row_begin));
        }
      }
    }
    const std::vector<double> logit = logits_of(mq);
    for (int64_t j = 0; j < eligible; ++j) total[j] = logit[j];
    return total;
  }
  for (int64_t g = h * group; g < (h + 1) * group; ++g) {
    for (int64_t first = block * c.q_block; first < e; first += c.score_rows) {
      const int64_t a = std::max(first, t0), z = std::min(first + c.score_rows, e);
      if (a >= z) continue;
      std::vector<double> mq(static_cast<size_t>(d), 0.0);
      for (int64_t p = a; p < z; ++p) {
        for (int64_t x = 0; x < d; ++x) mq[x] += q.Get((g * lq + p - t0) * d + x) / (z - a);
      }
      const std::vector<double> logit = logits_of(mq);
      const double top = *std::max_element(logit.begin(), logit.end());
      double zsum = 0;
      for (double l : logit) zsum += std::exp(l - top);
      for (int64_t j = 0; j < eligible; ++j) total[j] += std::exp(logit[j] - top) / zsum;
    }
  }
  return total;
}

TEST(SelectionTest, MassScoreIsTheSoftmaxShareOfMeanQueriesOverMeanKeys) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  DhsaConfig c;
  c.q_block = 12;
  c.score_rows = 4;
  c.chunk_score = ChunkScore::kMass;
  c.chunk_mean = 7;
  c.chunk_min = 3;
  c.chunk_max = 15;
  c.sink = 4;
  c.local = 12;
  c.budget = 40;
  // lq 3 and 1: a last block with fewer rows than a piece.
  for (int64_t lq : {int64_t{83}, int64_t{30}, int64_t{3}, int64_t{1}}) {
    const int64_t lk = 83;
    const Tensor q = testing::RandomTensor(rng, 6, lq, 13);
    const Tensor k = testing::SegmentedTensor(rng, 2, lk, 13);
    HeadsView qv = *HeadsView::Of(q, "q");
    qv.offset = lk - lq;
    const HeadsView kv = *HeadsView::Of(k, "k");
    const std::vector<int64_t> b = *SegmentKeysReference(kv, 0, lk, c);
    const Summaries kappa = ChunkSummariesReference(kv, b, ChunkSummaryNorm(c));
    const Summaries rho = ScoreQuerySummariesReference(qv, 2, c);
    EXPECT_EQ(rho.heads, 6);
    SelectionInputs in = {{6, 2, 13, lq, lk}, &b, &kappa, &rho};
    for (int64_t block = (lk - lq) / c.q_block; block * c.q_block < lk; ++block) {
      for (int64_t h = 0; h < 2; ++h) {
        const std::vector<float> got = ChunkScoresReference(in, c, h, block);
        const std::vector<double> want = MassFromTensors(q, k, b, c, h, block);
        ASSERT_EQ(got.size(), want.size());
        for (size_t j = 0; j < want.size(); ++j) {
          EXPECT_NEAR(got[j], want[j], 1e-5 * std::abs(want[j]) + 1e-12)
              << "lq " << lq << " block " << block << " head " << h << " chunk " << j;
        }
      }
    }
    EXPECT_TRUE(SelectSpansReference(in, c).ok());
    // rho of the paper's shape is refused under the mass score, and the other way round.
    const Summaries paper_rho = QueryBlockSummariesReference(qv, 2, c.q_block, SummaryNorm::kMean);
    SelectionInputs wrong = {{6, 2, 13, lq, lk}, &b, &kappa, &paper_rho};
    EXPECT_EQ(SelectSpansReference(wrong, c).status().code(), absl::StatusCode::kInvalidArgument);
    DhsaConfig paper = c;
    paper.chunk_score = ChunkScore::kPaper;
    EXPECT_EQ(SelectSpansReference(in, paper).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(SelectionTest, MassScoreNeedsScoreRowsDividingTheQueryBlock) {
  DhsaConfig c = PaperConfig();  // q_block 128.
  c.chunk_score = ChunkScore::kMass;
  c.score_rows = 48;
  EXPECT_EQ(ValidateConfig(c).code(), absl::StatusCode::kInvalidArgument);
  c.score_rows = 32;
  EXPECT_TRUE(ValidateConfig(c).ok());
  EXPECT_EQ(*ParseChunkScore("paper"), ChunkScore::kPaper);
  EXPECT_EQ(*ParseChunkScore(ChunkScoreName(ChunkScore::kMass)), ChunkScore::kMass);
  EXPECT_FALSE(ParseChunkScore("quest").ok());
}

}  // namespace
}  // namespace dhsa
