// Row-restricted fidelity and oracle (kernels/fidelity/fidelity_rows.h, oracle_rows.h) against the
// full-sequence versions and the textbook dense attention.
#include "kernels/fidelity/fidelity_rows.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dhsa.h"
#include "kernels/fidelity/fidelity.h"
#include "kernels/fidelity/oracle_rows.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

using ::dhsa::testing::FreshSeed;
using ::dhsa::testing::NaiveDenseAttention;
using ::dhsa::testing::RandomTensor;
using ::dhsa::testing::SegmentedTensor;

struct Inputs {
  Tensor q, k, v;
  HeadsView qv, kv, vv;
};

// Q [hq, lq, d] for the last lq of lk positions, segmented K, Gaussian V.
Inputs MakeInputs(std::mt19937_64& rng, int64_t hq, int64_t hkv, int64_t lq, int64_t lk,
                  int64_t d) {
  Inputs in;
  in.q = RandomTensor(rng, hq, lq, d, 0.5f);
  in.k = SegmentedTensor(rng, hkv, lk, d);
  in.v = RandomTensor(rng, hkv, lk, d);
  in.qv = *HeadsView::Of(in.q, "Q");
  in.kv = *HeadsView::Of(in.k, "K");
  in.vv = *HeadsView::Of(in.v, "V");
  in.qv.offset = lk - lq;
  return in;
}

TEST(DenseAttentionRowsTest, MatchesNaiveDense) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int64_t hq = 4, hkv = 2, lq = 97, lk = 301, d = 24;
  Inputs in = MakeInputs(rng, hq, hkv, lq, lk, d);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> o, lse;
  NaiveDenseAttention(in.q, in.k, in.v, scale, &o, &lse);
  const std::vector<int64_t> rows = {0, 5, 50, 96};
  absl::StatusOr<DenseRows> dense =
      DenseAttentionRows(in.qv, in.kv, in.vv, static_cast<float>(scale), rows, 3);
  ASSERT_TRUE(dense.ok()) << dense.status();
  for (int64_t g = 0; g < hq; ++g) {
    for (size_t n = 0; n < rows.size(); ++n) {
      EXPECT_NEAR(dense->Lse(g, n), lse[g * lq + rows[n]], 1e-6);
      for (int64_t c = 0; c < d; ++c) {
        EXPECT_NEAR(dense->Output(g, n)[c], o[(g * lq + rows[n]) * d + c], 1e-6);
      }
    }
  }
}

TEST(DenseAttentionRowsTest, RejectsRowsOutOfRange) {
  std::mt19937_64 rng(1);
  Inputs in = MakeInputs(rng, 2, 1, 16, 16, 8);
  EXPECT_FALSE(DenseAttentionRows(in.qv, in.kv, in.vv, 0.3f, {16}).ok());
  EXPECT_FALSE(DenseAttentionRows(in.qv, in.kv, in.vv, 0.3f, {-1}).ok());
}

// The row-based measure must agree with MeasureFidelity on a real sparse result.
TEST(MeasureFidelityRowsTest, AgreesWithMeasureFidelity) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int64_t hq = 4, hkv = 2, lq = 700, lk = 900, d = 32;
  Inputs in = MakeInputs(rng, hq, hkv, lq, lk, d);
  DhsaConfig config;
  config.budget = 256;
  config.sink = 16;
  config.local = 64;
  config.q_block = 64;
  absl::StatusOr<AttendResult> r = AttendReference(in.q, in.k, in.v, config);
  ASSERT_TRUE(r.ok()) << r.status();
  const float scale = EffectiveScale(config, d);
  const std::vector<int64_t> rows = SpreadRows(lq, 40);
  absl::StatusOr<FidelityReport> want =
      MeasureFidelity(in.qv, in.kv, in.vv, r->selection, r->o, scale, rows);
  ASSERT_TRUE(want.ok()) << want.status();

  absl::StatusOr<DenseRows> dense = DenseAttentionRows(in.qv, in.kv, in.vv, scale, rows, 2);
  ASSERT_TRUE(dense.ok()) << dense.status();
  std::vector<float> o_rows;
  for (int64_t g = 0; g < hq; ++g) {
    for (int64_t row : rows) {
      for (int64_t c = 0; c < d; ++c) o_rows.push_back(r->o.Get((g * lq + row) * d + c));
    }
  }
  absl::StatusOr<FidelityReport> got =
      MeasureFidelityRows(in.qv, in.kv, *dense, r->selection, o_rows, 2);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->rows, want->rows);
  EXPECT_NEAR(got->recall_mean, want->recall_mean, 1e-9);
  EXPECT_NEAR(got->recall_p5, want->recall_p5, 1e-9);
  EXPECT_NEAR(got->output_rel_error, want->output_rel_error, 1e-6);
  EXPECT_LT(got->recall_mean, 1.0);
  EXPECT_GT(got->output_rel_error, 0.0);
}

TEST(MeasureFidelityRowsTest, RejectsWrongOutputSize) {
  std::mt19937_64 rng(2);
  Inputs in = MakeInputs(rng, 2, 1, 32, 32, 8);
  absl::StatusOr<DenseRows> dense = DenseAttentionRows(in.qv, in.kv, in.vv, 0.3f, {3, 9});
  ASSERT_TRUE(dense.ok());
  Selection sel;
  EXPECT_FALSE(MeasureFidelityRows(in.qv, in.kv, *dense, sel, std::vector<float>(5)).ok());
}

TEST(OracleRowsTest, MatchesFullOracleOnItsRows) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int64_t hq = 4, hkv = 2, lq = 150, lk = 257, d = 16;
  Inputs in = MakeInputs(rng, hq, hkv, lq, lk, d);
  DhsaConfig config;
  config.policy = Policy::kOracleTopk;
  config.budget = 120;
  absl::StatusOr<Selection> full = SelectOracleTopkReference(in.qv, in.kv, config);
  ASSERT_TRUE(full.ok()) << full.status();
  const std::vector<int64_t> rows = {0, 1, 17, 80, 149};
  absl::StatusOr<Selection> part = SelectOracleTopkRowsReference(in.qv, in.kv, config, rows, 2);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(part->first_block, full->first_block);
  EXPECT_EQ(part->num_blocks, full->num_blocks);
  for (int64_t g = 0; g < hq; ++g) {
    for (int64_t r = 0; r < lq; ++r) {
      const bool listed = std::find(rows.begin(), rows.end(), r) != rows.end();
      if (listed) {
        EXPECT_EQ(part->At(g, r), full->At(g, r)) << "head " << g << " row " << r;
      } else {
        EXPECT_TRUE(part->At(g, r).empty());
      }
    }
  }
}

TEST(OracleRowsTest, ComputedPairsExact) {
  std::mt19937_64 rng(3);
  for (int64_t lq : {1, 40, 300}) {
    const int64_t hq = 2, lk = 300;
    Inputs in = MakeInputs(rng, hq, 1, lq, lk, 8);
    for (int64_t budget : {1, 64, 299, 300, 1000}) {
      DhsaConfig config;
      config.policy = Policy::kOracleTopk;
      config.budget = budget;
      absl::StatusOr<Selection> full = SelectOracleTopkReference(in.qv, in.kv, config);
      ASSERT_TRUE(full.ok());
      const AttentionShape shape = {hq, 1, 8, lq, lk};
      EXPECT_EQ(OracleComputedPairs(hq, lk - lq, lk, budget), CountComputedPairs(*full, shape))
          << "lq " << lq << " budget " << budget;
    }
  }
}

}  // namespace
}  // namespace dhsa
