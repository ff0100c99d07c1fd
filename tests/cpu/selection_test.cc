#include "kernels/cpu/selection.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/summaries/summaries.h"
#include "tests/cpu/cpu_test_util.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

// Boundaries, summaries and the SelectionInputs over them, from the reference.
struct Prepared {
  AttentionShape shape;
  std::vector<int64_t> boundaries;
  Summaries kappa, rho;
  SelectionInputs in;
};

std::unique_ptr<Prepared> Prepare(const Tensor& q, const Tensor& k, const DhsaConfig& c) {
  auto p = std::make_unique<Prepared>();
  HeadsView qv = *HeadsView::Of(q, "q");
  const HeadsView kv = *HeadsView::Of(k, "k");
  p->shape = {q.shape[0], k.shape[0], q.shape[2], q.shape[1], k.shape[1]};
  qv.offset = p->shape.t0();
  DhsaConfig seg = c;
  if (c.policy == Policy::kBlockTopk) {
    seg.boundary_mode = BoundaryMode::kFixed;
    seg.chunk_mean = c.block;
  }
  p->boundaries = *SegmentKeysReference(kv, 0, kv.len, seg);
  p->kappa = ChunkSummariesReference(kv, p->boundaries, ChunkSummaryNorm(c));
  p->rho = ScoreQuerySummariesReference(qv, kv.heads, c);
  p->in.shape = p->shape;
  p->in.boundaries = &p->boundaries;
  p->in.kappa = &p->kappa;
  p->in.rho = &p->rho;
  return p;
}

struct Case {
  std::string name;
  int64_t hq, hkv, lq, lk, d;
  DhsaConfig config;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

DhsaConfig Mass(DhsaConfig c, int64_t score_rows, BoundaryMode mode = BoundaryMode::kDynamic) {
  c.chunk_score = ChunkScore::kMass;
  c.score_rows = score_rows;
  c.boundary_mode = mode;
  return c;
}

// The spec's method (paper chunk score) on a smaller structure; Mass() switches the score.
DhsaConfig Config(Policy policy, int64_t budget, bool shared_heads = false) {
  DhsaConfig c = PaperConfig();
  c.policy = policy;
  c.budget = budget;
  c.sink = 16;
  c.local = 64;
  c.q_block = 32;
  c.chunk_mean = 16;
  c.chunk_min = 4;
  c.chunk_max = 48;
  c.block = 16;
  c.shared_heads = shared_heads;
  return c;
}

class SelectionCpuTest : public ::testing::TestWithParam<Case> {};

TEST_P(SelectionCpuTest, ScoresWithinToleranceAndSpansEqualTheReference) {
  const Case& c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, c.hq, c.lq, c.d);
  const Tensor k = testing::SegmentedTensor(rng, c.hkv, c.lk, c.d);
  const auto p = Prepare(q, k, c.config);
  const auto got = SelectSpansCpu(p->in, c.config, 2);
  const auto want = SelectSpansReference(p->in, c.config);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(want.ok()) << want.status();
  testing::ExpectSameUpToTies(*got, *want, p->in, c.config);

  if (c.config.policy != Policy::kDhsa && c.config.policy != Policy::kBlockTopk) return;
  if (c.config.chunk_score == ChunkScore::kMass) {
    // fp32 GEMM and exponentials against the reference's double arithmetic: every block's scores
    // agree to kMassScoreTolerance of the block's largest score. The error seen is printed beside
    // the tolerance.
    double worst = 0;
    for (int64_t block = p->shape.t0() / c.config.q_block; block * c.config.q_block < c.lk;
         ++block) {
      for (int64_t h = 0; h < c.hkv; ++h) {
        const auto got_scores = ChunkScoresCpu(p->in, c.config, h, block);
        ASSERT_TRUE(got_scores.ok()) << got_scores.status();
        const std::vector<float> want_scores = ChunkScoresReference(p->in, c.config, h, block);
        ASSERT_EQ(got_scores->size(), want_scores.size());
        float largest = 0;
        for (float w : want_scores) largest = std::max(largest, std::abs(w));
        for (size_t j = 0; j < want_scores.size(); ++j) {
          const double error = std::abs((*got_scores)[j] - want_scores[j]);
          worst = std::max(worst, error / largest);
          EXPECT_LE(error, kMassScoreTolerance * largest)
              << "block " << block << " head " << h << " chunk " << j << ": " << (*got_scores)[j]
              << " vs " << want_scores[j];
        }
      }
    }
    std::printf("%s: largest score error / largest score %.2e (tolerance %.0e)\n", c.name.c_str(),
                worst, static_cast<double>(kMassScoreTolerance));
    return;
  }
  // Scores of the last block: fp64 judge, naive fp32 yardstick.
  const int64_t block = (c.lk - 1) / c.config.q_block;
  const int64_t rho_index = block - p->shape.t0() / c.config.q_block;
  for (int64_t h = 0; h < c.hkv; ++h) {
    const auto scores_or = ChunkScoresCpu(p->in, c.config, h, block);
    ASSERT_TRUE(scores_or.ok()) << scores_or.status();
    const std::vector<float>& scores = *scores_or;
    ASSERT_EQ(scores.size(), ChunkScoresReference(p->in, c.config, h, block).size());
    const int64_t h0 = c.config.shared_heads ? 0 : h, h1 = c.config.shared_heads ? c.hkv : h + 1;
    double error = 0, naive_error = 0;
    for (size_t j = 0; j < scores.size(); ++j) {
      double exact = 0;
      float naive = 0;
      for (int64_t hh = h0; hh < h1; ++hh) {
        float naive_head = 0;
        for (int64_t i = 0; i < c.d; ++i) {
          const float r = p->rho.Row(hh, rho_index)[i];
          const float kk = p->kappa.Row(hh, static_cast<int64_t>(j))[i];
          exact += static_cast<double>(r) * kk;
          naive_head += r * kk;
        }
        naive += naive_head;
      }
      exact /= static_cast<double>(h1 - h0);
      naive /= static_cast<float>(h1 - h0);
      error = std::max(error, std::abs(scores[j] - exact));
      naive_error = std::max(naive_error, std::abs(naive - exact));
    }
    EXPECT_LE(error, 2 * naive_error) << "head " << h;
  }
}

INSTANTIATE_TEST_SUITE_P(
    PoliciesAndOddSizes, SelectionCpuTest,
    ::testing::Values(
        Case{"dhsa_lk97", 8, 2, 97, 97, 32, Config(Policy::kDhsa, 96)},
        Case{"dhsa_lk1025", 8, 2, 1025, 1025, 64, Config(Policy::kDhsa, 256)},
        Case{"dhsa_lk4099_lq_lt_lk", 4, 2, 1000, 4099, 64, Config(Policy::kDhsa, 512)},
        Case{"dhsa_decode", 8, 2, 1, 4099, 128, PaperConfig()},
        Case{"dhsa_shared_heads", 8, 4, 1025, 1025, 32, Config(Policy::kDhsa, 256, true)},
        Case{"mass_lk97", 8, 2, 97, 97, 32, Mass(Config(Policy::kDhsa, 96), 8)},
        Case{"mass_lk1025_d61", 6, 2, 1025, 1025, 61, Mass(Config(Policy::kDhsa, 256), 16)},
        Case{"mass_fixed_rows1", 4, 4, 700, 700, 32,
             Mass(Config(Policy::kDhsa, 192), 1, BoundaryMode::kFixed)},
        Case{"mass_lq_lt_lk", 6, 2, 333, 4099, 64, Mass(Config(Policy::kDhsa, 512), 32)},
        Case{"mass_decode", 8, 2, 1, 4099, 128, Mass(DhsaConfig{}, 16)},
        Case{"mass_shared_heads", 8, 4, 1025, 1025, 32, Mass(Config(Policy::kDhsa, 256, true), 4)},
        // Fewer rows than a piece, over two pieces: one mean query per KV head.
        Case{"mass_few_rows_two_pieces", 6, 2, 5, 1011, 13, Mass(Config(Policy::kDhsa, 256), 8)},
        Case{"mass_decode_shared_heads", 8, 2, 1, 2049, 64,
             Mass(Config(Policy::kDhsa, 256, true), 8)},
        Case{"mass_decode_d61", 4, 1, 1, 3001, 61, Mass(Config(Policy::kDhsa, 512), 16)},
        Case{"block_topk", 4, 2, 1025, 1025, 32, Config(Policy::kBlockTopk, 256)},
        Case{"block_topk_shared", 4, 2, 700, 700, 32, Config(Policy::kBlockTopk, 128, true)},
        Case{"streaming", 4, 2, 1025, 1025, 16, Config(Policy::kStreaming, 128)},
        Case{"dense", 4, 2, 300, 1025, 16, Config(Policy::kDense, 128)}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// The highest-scoring chunks all lie inside the sink, where they add no key: the first batch of
// ranked candidates cannot fill the budget and the ranking must widen.
TEST(SelectionCpuTest, RankingWidensWhenTheBestChunksAddNothing) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int64_t d = 16, lk = 4096;
  Tensor q = testing::RandomTensor(rng, 2, lk, d, 0.1f);
  Tensor k = testing::SegmentedTensor(rng, 1, lk, d);
  float* kf = static_cast<float*>(k.data());
  float* qf = static_cast<float*>(q.data());
  for (int64_t t = 0; t < 1024; ++t) kf[t * d] += 100.0f;   // Sink keys share a direction ...
  for (int64_t t = 0; t < 2 * lk; ++t) qf[t * d] += 10.0f;  // ... every query likes.
  DhsaConfig c = Config(Policy::kDhsa, 1536);
  c.sink = 1024;
  c.local = 256;
  c.q_block = 64;
  const auto p = Prepare(q, k, c);
  const auto got = SelectSpansCpu(p->in, c);
  ASSERT_TRUE(got.ok());
  testing::ExpectSameUpToTies(*got, *SelectSpansReference(p->in, c), p->in, c);
  for (const std::vector<Span>& spans : got->spans) {
    int64_t keys = 0;
    for (const Span& s : spans) keys += s.size();
    EXPECT_LE(keys, c.budget);
  }
  EXPECT_EQ(CountComputedPairsCpu(*got, p->shape), CountComputedPairs(*got, p->shape));
}

TEST(SelectionCpuTest, ComputedPairsEqualTheReferenceCount) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int64_t lq : {int64_t{1}, int64_t{333}, int64_t{1025}}) {
    const Tensor q = testing::RandomTensor(rng, 4, lq, 16);
    const Tensor k = testing::SegmentedTensor(rng, 2, 1025, 16);
    for (Policy policy : {Policy::kDhsa, Policy::kDense, Policy::kStreaming}) {
      const DhsaConfig c = Config(policy, 128);
      const auto p = Prepare(q, k, c);
      const Selection sel = *SelectSpansCpu(p->in, c);
      EXPECT_EQ(CountComputedPairsCpu(sel, p->shape), CountComputedPairs(sel, p->shape));
    }
    HeadsView qv = *HeadsView::Of(q, "q");
    qv.offset = 1025 - lq;
    const Selection oracle =
        *SelectOracleTopkReference(qv, *HeadsView::Of(k, "k"), Config(Policy::kOracleTopk, 100));
    const auto p = Prepare(q, k, Config(Policy::kDense, 128));
    EXPECT_EQ(CountComputedPairsCpu(oracle, p->shape), CountComputedPairs(oracle, p->shape));
  }
}

TEST(SelectionCpuTest, ErrorsMatchTheReference) {
  std::mt19937_64 rng(1);
  const Tensor q = testing::RandomTensor(rng, 2, 64, 8);
  const Tensor k = testing::RandomTensor(rng, 1, 64, 8);
  DhsaConfig c = Config(Policy::kDhsa, 96);
  const auto p = Prepare(q, k, c);
  SelectionInputs missing = p->in;
  missing.kappa = nullptr;
  EXPECT_EQ(SelectSpansCpu(missing, c).status(), SelectSpansReference(missing, c).status());
  c.local = 8;
  EXPECT_EQ(SelectSpansCpu(p->in, c).status(), SelectSpansReference(p->in, c).status());
  c = Config(Policy::kOracleTopk, 96);
  EXPECT_EQ(SelectSpansCpu(p->in, c).status(), SelectSpansReference(p->in, c).status());
}

}  // namespace
}  // namespace dhsa
