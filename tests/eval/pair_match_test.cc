// Equal computed pairs (bench/eval/pair_match.h): the structural count equals the pairs of real
// selections on structured inputs, and matched budgets are the smallest that reach dhsa's pairs.
#include "bench/eval/pair_match.h"

#include <string>
#include <vector>

#include "bench/eval/eval.h"
#include "bench/eval/variants.h"
#include "bench/workload/workload.h"
#include "gtest/gtest.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

using ::dhsa::testing::FreshSeed;

EvalInput Input(uint64_t seed, int64_t len) {
  WorkloadConfig c;
  c.len = len;
  c.hq = 4;
  c.hkv = 2;
  c.dim = 32;
  c.rope_dims = 16;
  c.segment_mean = 24;
  c.needles = 2;
  c.seed = seed;
  absl::StatusOr<Workload> w = GenerateWorkload(c);
  EXPECT_TRUE(w.ok()) << w.status();
  return EvalInputFromWorkload(*std::move(w));
}

// The preset with a smaller sink and key blocks, and the smallest local window for which the
// count is exact (q_block + chunk_max: pair_match.h).
DhsaConfig Small(DhsaConfig c) {
  c.sink = 32;
  c.local = std::max<int64_t>(64, c.q_block + c.chunk_max);
  c.block = 32;
  return c;
}

// RunEval without matching counts the pairs of the real selections (dynamic chunks, both chunk
// scores, block_topk, streaming, oracle): the structural count must equal them, per query head.
TEST(PairMatchTest, StructuralCountEqualsRealSelections) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  const EvalInput input = Input(seed, 1531);  // Odd length: the last query block is partial.
  for (const DhsaConfig& base : {Small(DhsaConfig{}), Small(PaperConfig())}) {
    EvalOptions options;
    options.base = base;
    options.policies = {"dhsa",       "dhsa_mass",  "dhsa_fixed", "dhsa_shared",
                        "dhsa_truth", "block_topk", "streaming",  "oracle_topk"};
    options.budgets = {320, 517, 900};
    options.rows = 8;
    options.match_pairs = false;
    absl::StatusOr<EvalReport> r = RunEval(input, options);
    ASSERT_TRUE(r.ok()) << r.status();
    for (const PolicyResult& p : r->results) {
      SCOPED_TRACE(p.policy + " at " + std::to_string(p.budget) + ", q_block " +
                   std::to_string(base.q_block));
      absl::StatusOr<Variant> v = ParseVariant(p.policy, base);
      ASSERT_TRUE(v.ok()) << v.status();
      v->config.budget = p.budget;
      absl::StatusOr<int64_t> pairs = StructuralPairs(v->config, 1531, 1531);
      ASSERT_TRUE(pairs.ok()) << pairs.status();
      EXPECT_EQ(*pairs * r->shape.hq, p.computed_pairs);
    }
  }
}

// Chunked prefill (queries after stored keys) too.
TEST(PairMatchTest, StructuralCountWithStoredKeys) {
  DhsaConfig c = Small(DhsaConfig{});
  c.budget = 333;
  const int64_t lk = 1000;
  for (int64_t lq : {1, 17, 999, 1000}) {
    absl::StatusOr<int64_t> pairs = StructuralPairs(c, lq, lk);
    ASSERT_TRUE(pairs.ok()) << pairs.status();
    // Every row keeps at most `budget` keys and at least its own key.
    EXPECT_LE(*pairs, lq * c.budget);
    EXPECT_GE(*pairs, lq);
  }
  c.policy = Policy::kDense;
  EXPECT_EQ(*StructuralPairs(c, 10, 30), 30 * 31 / 2 - 20 * 21 / 2);
  EXPECT_FALSE(StructuralPairs(c, 31, 30).ok());
}

TEST(PairMatchTest, MatchedBudgetIsTheSmallestThatReachesTheTarget) {
  const int64_t len = 2000;
  DhsaConfig dhsa = Small(DhsaConfig{});
  dhsa.budget = 512;
  const int64_t target = *StructuralPairs(dhsa, len, len);
  // dhsa itself, and streaming with the same query blocks, match at the nominal budget.
  EXPECT_EQ(*PairMatchedBudget(dhsa, target, len, len), 512);
  DhsaConfig streaming = dhsa;
  streaming.policy = Policy::kStreaming;
  EXPECT_EQ(*PairMatchedBudget(streaming, target, len, len), 512);
  for (DhsaConfig c : {Small(PaperConfig()), dhsa}) {
    for (Policy policy :
         {Policy::kDhsa, Policy::kBlockTopk, Policy::kStreaming, Policy::kOracleTopk}) {
      c.policy = policy;
      c.budget = 512;
      SCOPED_TRACE(std::string(PolicyName(policy)) + ", q_block " + std::to_string(c.q_block));
      absl::StatusOr<int64_t> b = PairMatchedBudget(c, target, len, len);
      ASSERT_TRUE(b.ok()) << b.status();
      DhsaConfig at = c;
      at.budget = *b;
      EXPECT_GE(*StructuralPairs(at, len, len), target);
      at.budget = *b - 1;
      if (ValidateConfig(at).ok()) {
        EXPECT_LT(*StructuralPairs(at, len, len), target);
      }
      // 128-row blocks lose more of the budget to causality than 16-row ones: more keys.
      if (c.q_block == 128 && policy != Policy::kOracleTopk) {
        EXPECT_GT(*b, 512);
      }
      // oracle_topk keeps `budget` keys in every row: fewer suffice.
      if (policy == Policy::kOracleTopk) {
        EXPECT_LT(*b, 512);
      }
    }
  }
  EXPECT_FALSE(PairMatchedBudget(dhsa, int64_t{1} << 40, len, len).ok());
}

// RunEval runs each policy at its matched budget and reports it.
TEST(PairMatchTest, EvalRunsMatchedBudgets) {
  const EvalInput input = Input(3, 1024);
  EvalOptions options;
  options.base = Small(DhsaConfig{});
  options.policies = {"dhsa", "streaming", "block_topk", "dhsa_paper", "oracle_topk", "dense"};
  options.budgets = {384};
  options.rows = 8;
  absl::StatusOr<EvalReport> r = RunEval(input, options);
  ASSERT_TRUE(r.ok()) << r.status();
  const PolicyResult* dhsa = nullptr;
  for (const PolicyResult& p : r->results) {
    if (p.policy == "dhsa") dhsa = &p;
  }
  ASSERT_NE(dhsa, nullptr);
  EXPECT_EQ(dhsa->run_budget, 384);
  for (const PolicyResult& p : r->results) {
    SCOPED_TRACE(p.policy);
    EXPECT_EQ(p.budget, 384);
    EXPECT_GE(p.computed_pairs, dhsa->computed_pairs);
    if (p.policy == "streaming" || p.policy == "dense") {
      EXPECT_EQ(p.run_budget, 384);
    }
    if (p.policy == "dhsa_paper") {
      EXPECT_GT(p.run_budget, 384);
    }
  }
  options.match_pairs = false;
  r = RunEval(input, options);
  ASSERT_TRUE(r.ok()) << r.status();
  for (const PolicyResult& p : r->results) EXPECT_EQ(p.run_budget, 384) << p.policy;
}

}  // namespace
}  // namespace dhsa
