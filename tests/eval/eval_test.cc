// `dhsa eval`'s library: the metrics on small structured inputs (dense is perfect, recall rises
// with the budget), the pieces (variants, needles, boundary matching) and the input round trip.
#include "bench/eval/eval.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "bench/eval/boundary_quality.h"
#include "bench/eval/needles.h"
#include "bench/eval/variants.h"
#include "bench/workload/workload.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

using ::dhsa::testing::FreshSeed;
using ::testing::HasSubstr;

WorkloadConfig SmallWorkload(uint64_t seed) {
  WorkloadConfig c;
  c.len = 2048;
  c.hq = 4;
  c.hkv = 2;
  c.dim = 32;
  c.rope_dims = 16;
  c.segment_mean = 24;
  c.needles = 4;
  c.seed = seed;
  return c;
}

// The spec's method (the paper preset) scaled down to a 2K sequence; dhsa_mass runs the default
// chunk score on that structure.
DhsaConfig SmallConfig() {
  DhsaConfig c = PaperConfig();
  c.sink = 32;
  c.local = 64;
  c.q_block = 32;
  c.chunk_mean = 16;
  c.chunk_min = 4;
  c.chunk_max = 64;
  c.block = 32;
  return c;
}

EvalInput SmallInput(uint64_t seed) {
  absl::StatusOr<Workload> w = GenerateWorkload(SmallWorkload(seed));
  EXPECT_TRUE(w.ok()) << w.status();
  return EvalInputFromWorkload(*std::move(w));
}

const PolicyResult& Result(const EvalReport& r, const std::string& policy, int64_t budget) {
  for (const PolicyResult& p : r.results) {
    if (p.policy == policy && p.budget == budget) return p;
  }
  ADD_FAILURE() << "no result for " << policy << " at " << budget;
  return r.results.front();
}

TEST(EvalTest, DenseIsPerfect) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  const EvalInput input = SmallInput(seed);
  EvalOptions options;
  options.base = SmallConfig();
  options.policies = {"dense"};
  options.budgets = {256};
  options.rows = 64;
  options.num_threads = 2;
  absl::StatusOr<EvalReport> r = RunEval(input, options);
  ASSERT_TRUE(r.ok()) << r.status();
  const PolicyResult& dense = Result(*r, "dense", 256);
  EXPECT_NEAR(dense.fidelity.recall_mean, 1.0, 1e-9);
  EXPECT_NEAR(dense.fidelity.recall_p5, 1.0, 1e-9);
  EXPECT_LT(dense.fidelity.output_rel_error, 1e-6);
  EXPECT_EQ(dense.fidelity.rows, 64 * 4);
  EXPECT_EQ(dense.computed_pairs, dense.causal_pairs);
  EXPECT_DOUBLE_EQ(dense.density(), 1.0);
  EXPECT_GT(dense.needle_pairs, 0);
  EXPECT_EQ(dense.needle_hits, dense.needle_pairs);
  EXPECT_EQ(r->sampled_rows, 64);
  EXPECT_EQ(r->needle_rows, 4 * kNeedleQueries);
}

TEST(EvalTest, RecallRisesWithBudget) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  const EvalInput input = SmallInput(seed);
  EvalOptions options;
  options.base = SmallConfig();
  options.policies = {"dhsa",      "block_topk",  "streaming",  "oracle_topk", "dhsa_fixed",
                      "dhsa_mean", "dhsa_shared", "dhsa_truth", "dhsa_mass"};
  options.budgets = {128, 256, 512, 1024};
  options.rows = 96;
  options.num_threads = 2;
  // Every policy at the nominal budget, so that oracle_topk's `budget` keys a row bound them all
  // (matched budgets are tested in pair_match_test.cc).
  options.match_pairs = false;
  absl::StatusOr<EvalReport> r = RunEval(input, options);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->results.size(), options.policies.size() * options.budgets.size());
  for (const std::string& policy : options.policies) {
    SCOPED_TRACE(policy);
    double prev_recall = 0, prev_density = 0;
    for (int64_t budget : options.budgets) {
      const PolicyResult& p = Result(*r, policy, budget);
      // Larger budgets select supersets for every policy: recall and density never drop.
      EXPECT_GE(p.fidelity.recall_mean, prev_recall - 1e-12) << budget;
      EXPECT_GT(p.density(), prev_density) << budget;
      EXPECT_LE(p.fidelity.recall_mean, 1.0 + 1e-9);
      EXPECT_GE(p.fidelity.recall_p5, 0.0);
      EXPECT_LE(p.fidelity.recall_p5, 1.0 + 1e-9);
      EXPECT_GE(p.needle_hit_rate(), 0.0);
      EXPECT_LE(p.needle_hit_rate(), 1.0);
      EXPECT_GT(p.attention_seconds, 0.0);
      prev_recall = p.fidelity.recall_mean;
      prev_density = p.density();
    }
    const PolicyResult& low = Result(*r, policy, 128);
    const PolicyResult& high = Result(*r, policy, 1024);
    EXPECT_GT(high.fidelity.recall_mean,
              low.fidelity.recall_mean + (policy == "oracle_topk" ? 0.0 : 0.02));
    EXPECT_LT(high.fidelity.output_rel_error, low.fidelity.output_rel_error);
  }
  // The oracle is the best any selection of `budget` keys per row can do.
  for (int64_t budget : options.budgets) {
    for (const std::string& policy : options.policies) {
      EXPECT_LE(Result(*r, policy, budget).fidelity.recall_mean,
                Result(*r, "oracle_topk", budget).fidelity.recall_mean + 1e-9)
          << policy << " " << budget;
    }
  }
  // The oracle's top-k sets are nested as the budget grows (ties broken by position), so its needle
  // hit rate never drops. (It need not be 1: a needle key can rank below `budget` other keys.)
  for (size_t i = 1; i < options.budgets.size(); ++i) {
    EXPECT_GE(Result(*r, "oracle_topk", options.budgets[i]).needle_hit_rate(),
              Result(*r, "oracle_topk", options.budgets[i - 1]).needle_hit_rate());
  }
  // Boundary quality: the true segments are found exactly by the truth variant, and dynamic
  // boundaries beat fixed ones.
  ASSERT_FALSE(r->boundaries.empty());
  double dynamic_recall = -1, fixed_recall = -1;
  for (const BoundaryResult& b : r->boundaries) {
    if (b.policy == "dhsa_truth") {
      EXPECT_DOUBLE_EQ(b.exact.recall, 1.0);
    }
    if (b.policy == "dhsa") dynamic_recall = b.near.recall;
    if (b.policy == "dhsa_fixed") fixed_recall = b.near.recall;
    EXPECT_GE(b.near.recall, b.exact.recall);
    EXPECT_GE(b.near.precision, b.exact.precision);
  }
  EXPECT_GT(dynamic_recall, fixed_recall);
}

// The per-row estimate runs the same kernel on the same rows as full attention: same errors.
TEST(EvalTest, FullAttentionGivesTheSameFidelity) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  const EvalInput input = SmallInput(seed);
  EvalOptions options;
  options.base = SmallConfig();
  options.policies = {"dhsa", "block_topk"};
  options.budgets = {256};
  options.rows = 32;
  absl::StatusOr<EvalReport> sampled = RunEval(input, options);
  options.full = true;
  absl::StatusOr<EvalReport> full = RunEval(input, options);
  ASSERT_TRUE(sampled.ok()) << sampled.status();
  ASSERT_TRUE(full.ok()) << full.status();
  for (size_t i = 0; i < sampled->results.size(); ++i) {
    const PolicyResult& a = sampled->results[i];
    const PolicyResult& b = full->results[i];
    EXPECT_TRUE(a.attention_estimated);
    EXPECT_FALSE(b.attention_estimated);
    EXPECT_EQ(a.computed_pairs, b.computed_pairs);
    EXPECT_DOUBLE_EQ(a.fidelity.recall_mean, b.fidelity.recall_mean);
    EXPECT_DOUBLE_EQ(a.fidelity.output_rel_error, b.fidelity.output_rel_error);
  }
}

// Queries that continue a stored sequence (t0 > 0) are measured at their absolute positions.
TEST(EvalTest, ChunkedPrefillQueries) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  EvalInput input = SmallInput(seed);
  const int64_t hq = input.q.shape[0], len = input.q.shape[1], d = input.q.shape[2];
  const int64_t lq = 700;
  std::vector<float> tail;
  for (int64_t g = 0; g < hq; ++g) {
    for (int64_t t = len - lq; t < len; ++t) {
      for (int64_t c = 0; c < d; ++c) tail.push_back(input.q.Get((g * len + t) * d + c));
    }
  }
  input.q = Tensor::FromFloats({hq, lq, d}, tail);
  EvalOptions options;
  options.base = SmallConfig();
  options.policies = {"dense", "dhsa", "oracle_topk"};
  options.budgets = {256};
  options.rows = 50;
  absl::StatusOr<EvalReport> r = RunEval(input, options);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->shape.t0(), len - lq);
  EXPECT_NEAR(Result(*r, "dense", 256).fidelity.recall_mean, 1.0, 1e-9);
  EXPECT_LT(Result(*r, "dense", 256).fidelity.output_rel_error, 1e-6);
  EXPECT_LT(Result(*r, "dhsa", 256).density(), 1.0);
}

TEST(EvalTest, ReadsWhatGenWrites) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(seed);
  absl::StatusOr<Workload> w = GenerateWorkload(SmallWorkload(seed));
  ASSERT_TRUE(w.ok());
  const std::string dir = (std::filesystem::path(::testing::TempDir()) / "eval_input").string();
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(WriteWorkload(*w, dir).ok());
  absl::StatusOr<EvalInput> read = ReadEvalInput(dir);
  ASSERT_TRUE(read.ok()) << read.status();
  const EvalInput direct = EvalInputFromWorkload(*w);
  EXPECT_EQ(read->q.bytes, direct.q.bytes);
  EXPECT_EQ(read->k.bytes, direct.k.bytes);
  EXPECT_EQ(read->v.bytes, direct.v.bytes);
  EXPECT_EQ(read->segment_starts, direct.segment_starts);
  ASSERT_EQ(read->needles.size(), direct.needles.size());
  for (size_t n = 0; n < direct.needles.size(); ++n) {
    EXPECT_EQ(read->needles[n].key_begin, direct.needles[n].key_begin);
    EXPECT_EQ(read->needles[n].query_end, direct.needles[n].query_end);
  }
  std::filesystem::remove(std::filesystem::path(dir) / "meta.json");
  absl::StatusOr<EvalInput> bare = ReadEvalInput(dir);
  ASSERT_TRUE(bare.ok()) << bare.status();
  EXPECT_TRUE(bare->needles.empty());
  EXPECT_TRUE(bare->segment_starts.empty());
  std::filesystem::remove_all(dir);
}

TEST(EvalTest, BadRequestsRejected) {
  const EvalInput input = SmallInput(1);
  EvalOptions options;
  options.base = SmallConfig();
  options.budgets = {256};
  options.rows = 8;
  options.policies = {"dhsa_bogus"};
  EXPECT_THAT(std::string(RunEval(input, options).status().message()), HasSubstr("bogus"));
  options.policies = {"dhsa"};
  options.budgets = {64};  // Below sink + local.
  EXPECT_THAT(std::string(RunEval(input, options).status().message()), HasSubstr("budget"));
  options.budgets = {};
  EXPECT_FALSE(RunEval(input, options).ok());
  EvalInput bare = SmallInput(1);
  bare.segment_starts.clear();
  options.budgets = {256};
  options.policies = {"dhsa_truth"};
  EXPECT_THAT(std::string(RunEval(bare, options).status().message()), HasSubstr("segments"));
}

TEST(EvalTest, AverageReportsPoolsSeeds) {
  EvalOptions options;
  options.base = SmallConfig();
  options.policies = {"dhsa", "streaming"};
  options.budgets = {256};
  options.rows = 16;
  std::vector<EvalReport> reports;
  for (uint64_t seed : {11, 12}) {
    absl::StatusOr<EvalReport> r = RunEval(SmallInput(seed), options);
    ASSERT_TRUE(r.ok()) << r.status();
    reports.push_back(*r);
  }
  absl::StatusOr<EvalReport> avg = AverageReports(reports);
  ASSERT_TRUE(avg.ok()) << avg.status();
  for (size_t i = 0; i < avg->results.size(); ++i) {
    const PolicyResult& a = reports[0].results[i];
    const PolicyResult& b = reports[1].results[i];
    const PolicyResult& m = avg->results[i];
    EXPECT_NEAR(m.fidelity.recall_mean, (a.fidelity.recall_mean + b.fidelity.recall_mean) / 2,
                1e-12);
    EXPECT_NEAR(m.fidelity.output_rel_error,
                (a.fidelity.output_rel_error + b.fidelity.output_rel_error) / 2, 1e-12);
    EXPECT_EQ(m.needle_pairs, a.needle_pairs + b.needle_pairs);
    EXPECT_EQ(m.computed_pairs, a.computed_pairs + b.computed_pairs);
  }
  reports[1].results.pop_back();
  EXPECT_FALSE(AverageReports(reports).ok());
}

TEST(StratifiedRowsTest, OnePerStratumAtVaryingOffsets) {
  const std::vector<int64_t> rows = StratifiedRows(32768, 1024, 7);
  ASSERT_EQ(rows.size(), 1024u);
  std::vector<int> offsets(128, 0);
  for (size_t n = 0; n < rows.size(); ++n) {
    EXPECT_GE(rows[n], static_cast<int64_t>(n) * 32);
    EXPECT_LT(rows[n], static_cast<int64_t>(n + 1) * 32);
    ++offsets[rows[n] % 128];
  }
  // Evenly spaced rows would sit at 4 offsets of a 128-row block; these cover most of them.
  EXPECT_GT(std::count_if(offsets.begin(), offsets.end(), [](int c) { return c > 0; }), 100);
  EXPECT_EQ(StratifiedRows(32768, 1024, 7), rows);
  EXPECT_NE(StratifiedRows(32768, 1024, 8), rows);
  EXPECT_EQ(StratifiedRows(5, 10, 1), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_TRUE(StratifiedRows(0, 10, 1).empty());
}

TEST(VariantTest, Names) {
  DhsaConfig base;
  base.budget = 999;
  absl::StatusOr<Variant> v = ParseVariant("block_topk", base);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->config.policy, Policy::kBlockTopk);
  EXPECT_EQ(v->config.budget, 999);
  v = ParseVariant("dhsa_paper_fixed_mean_shared", base);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->config.policy, Policy::kDhsa);
  EXPECT_EQ(v->config.boundary_mode, BoundaryMode::kFixed);
  EXPECT_EQ(v->config.summary_norm, SummaryNorm::kMean);
  EXPECT_TRUE(v->config.shared_heads);
  EXPECT_FALSE(v->true_boundaries);
  // `paper` is the spec's method: the paper preset's knobs, the rest of `base` kept.
  v = ParseVariant("dhsa_paper", base);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->config.chunk_score, ChunkScore::kPaper);
  EXPECT_EQ(v->config.q_block, 128);
  EXPECT_EQ(v->config.chunk_min, 8);
  EXPECT_EQ(v->config.chunk_max, 128);
  EXPECT_EQ(v->config.budget, 999);
  // The mass score (the default) always uses plain means: `mean` would be a silent no-op.
  EXPECT_FALSE(ParseVariant("dhsa_mean", base).ok());
  EXPECT_FALSE(ParseVariant("dhsa_paper_mean_mass", base).ok());
  v = ParseVariant("dhsa_mass_q32_r4", PaperConfig());
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->config.chunk_score, ChunkScore::kMass);
  EXPECT_EQ(v->config.q_block, 32);
  EXPECT_EQ(v->config.score_rows, 4);
  v = ParseVariant("dhsa_truth", base);
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v->true_boundaries);
  EXPECT_TRUE(v->has_chunks());
  EXPECT_FALSE(ParseVariant("streaming", base)->has_chunks());
  EXPECT_FALSE(ParseVariant("dhsa_", base).ok());
  EXPECT_FALSE(ParseVariant("block_topk_mean", base).ok());
  EXPECT_FALSE(ParseVariant("nope", base).ok());
}

TEST(BoundaryQualityTest, ExactAndNear) {
  // Interior predicted {10, 20, 33}; interior truth {10, 22, 40}.
  const BoundaryMatch exact = MatchBoundaries({0, 10, 20, 33, 50}, {0, 10, 22, 40}, 0);
  EXPECT_EQ(exact.predicted, 3);
  EXPECT_EQ(exact.truth, 3);
  EXPECT_EQ(exact.predicted_matched, 1);
  EXPECT_EQ(exact.truth_matched, 1);
  EXPECT_DOUBLE_EQ(exact.precision, 1.0 / 3);
  const BoundaryMatch near = MatchBoundaries({0, 10, 20, 33, 50}, {0, 10, 22, 40}, 2);
  EXPECT_EQ(near.predicted_matched, 2);
  EXPECT_EQ(near.truth_matched, 2);
  EXPECT_DOUBLE_EQ(near.recall, 2.0 / 3);
  const BoundaryMatch none = MatchBoundaries({0, 50}, {0, 10}, 2);
  EXPECT_EQ(none.predicted, 0);
  EXPECT_DOUBLE_EQ(none.precision, 0.0);
  EXPECT_DOUBLE_EQ(none.recall, 0.0);
}

TEST(NeedlesTest, CountsSelectedNeedleKeys) {
  // One KV head, two query heads, blocks of 4 rows, 16 positions.
  const AttentionShape shape = {2, 1, 8, 16, 16};
  Selection sel;
  sel.block_size = 4;
  sel.num_blocks = 4;
  sel.num_heads = 1;
  sel.group = 2;
  sel.spans.resize(4);
  sel.At(0, 3) = {{0, 2}, {12, 16}};                     // Rows 12..15 see keys 0, 1 and 12..15.
  const std::vector<Needle> needles = {{1, 3, 13, 15}};  // Keys 1, 2; queries 13, 14.
  const NeedleHits hits = CountNeedleHits(sel, shape, needles);
  EXPECT_EQ(hits.pairs, 2 * 2 * 2);  // Query heads x query rows x needle keys.
  EXPECT_EQ(hits.hits, 2 * 2);       // Key 1 is selected, key 2 is not.
  EXPECT_DOUBLE_EQ(hits.rate(), 0.5);
  EXPECT_EQ(NeedleQueryRows(shape, needles), (std::vector<int64_t>{13, 14}));
}

}  // namespace
}  // namespace dhsa
