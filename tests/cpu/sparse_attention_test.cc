#include "kernels/cpu/sparse_attention.h"

#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/merge.h"
#include "tests/cpu/cpu_test_util.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

// A small config whose budget still leaves room for chunks at the odd sizes below.
DhsaConfig SmallConfig(Policy policy, int64_t budget) {
  DhsaConfig c;
  c.policy = policy;
  c.budget = budget;
  c.sink = 16;
  c.local = 64;
  c.q_block = 32;
  c.chunk_mean = 16;
  c.chunk_min = 4;
  c.chunk_max = 48;
  c.block = 16;
  return c;
}

struct Case {
  std::string name;
  int64_t hq, hkv, lq, lk, d;
  DType dtype;
  DhsaConfig config;
  bool structured = true;  // Keys in topic segments (else Gaussian).
  int64_t row_stride = 1;  // Rows checked against fp64: every row_stride-th and the last.
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Inputs {
  Tensor q, k, v;
  HeadsView qv, kv, vv;
};

Inputs MakeInputs(const Case& c, std::mt19937_64& rng) {
  Inputs in;
  in.q = testing::RandomTensor(rng, c.hq, c.lq, c.d).ConvertTo(c.dtype);
  in.k = (c.structured ? testing::SegmentedTensor(rng, c.hkv, c.lk, c.d)
                       : testing::RandomTensor(rng, c.hkv, c.lk, c.d))
             .ConvertTo(c.dtype);
  in.v = testing::RandomTensor(rng, c.hkv, c.lk, c.d).ConvertTo(c.dtype);
  in.qv = *HeadsView::Of(in.q, "q");
  in.kv = *HeadsView::Of(in.k, "k");
  in.vv = *HeadsView::Of(in.v, "v");
  in.qv.offset = c.lk - c.lq;
  return in;
}

std::vector<int64_t> CheckedRows(int64_t lq, int64_t stride) {
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < lq; r += stride) rows.push_back(r);
  if (rows.back() != lq - 1) rows.push_back(lq - 1);
  return rows;
}

class SparseAttentionCpuTest : public ::testing::TestWithParam<Case> {};

TEST_P(SparseAttentionCpuTest, MatchesFp64WithinTheToleranceRuleAndWritesEveryOutput) {
  const Case& c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Inputs in = MakeInputs(c, rng);
  const Selection sel = c.config.policy == Policy::kOracleTopk
                            ? *SelectOracleTopkReference(in.qv, in.kv, c.config)
                            : testing::ReferenceSelection(in.qv, in.kv, c.config);
  SparseAttentionParams p;
  p.q = in.qv;
  p.k = in.kv;
  p.v = in.vv;
  p.selection = &sel;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  p.num_threads = 2;
  testing::PoisonedOutputs out(c.hq, c.lq, c.d);
  out.Attach(p, c.hq, c.lq, c.d);
  ASSERT_TRUE(SparseAttentionCpu(p).ok());
  for (float x : out.o) ASSERT_FALSE(std::isnan(x)) << "an output element was not written";
  for (float x : out.lse) ASSERT_FALSE(std::isnan(x)) << "an lse element was not written";

  const std::vector<int64_t> rows = CheckedRows(c.lq, c.row_stride);
  const testing::AttentionValues fp64 = testing::SelectedAttention<double>(p, rows);
  const testing::AttentionValues naive = testing::SelectedAttention<float>(p, rows);
  testing::ExpectWithinTolerance(out.o.data(), fp64.o, naive.o, "o");
  testing::ExpectWithinTolerance(out.lse.data(), fp64.lse, naive.lse, "lse");
}

INSTANTIATE_TEST_SUITE_P(
    OddSizesDtypesAndPolicies, SparseAttentionCpuTest,
    ::testing::Values(
        Case{"lk97_gqa_f32", 8, 2, 97, 97, 128, DType::kF32, SmallConfig(Policy::kDhsa, 96)},
        Case{"lk1025_f16", 8, 2, 1025, 1025, 64, DType::kF16, SmallConfig(Policy::kDhsa, 256)},
        Case{"lk4099_bf16", 4, 2, 4099, 4099, 64, DType::kBF16, SmallConfig(Policy::kDhsa, 512),
             true, 7},
        Case{"lq_lt_lk_mha_d72", 4, 4, 300, 1025, 72, DType::kF32, SmallConfig(Policy::kDhsa, 256),
             false},
        Case{"decode_lk4099", 8, 2, 1, 4099, 128, DType::kF32, DhsaConfig{}},
        Case{"decode_lk1025_f16", 8, 2, 1, 1025, 128, DType::kF16, SmallConfig(Policy::kDhsa, 128)},
        Case{"dense_group8_panels", 8, 1, 200, 1025, 128, DType::kF32,
             SmallConfig(Policy::kDense, 256)},
        Case{"streaming_d256_bf16", 6, 3, 257, 1025, 256, DType::kBF16,
             SmallConfig(Policy::kStreaming, 128), true, 3},
        Case{"block_topk_f16", 4, 2, 700, 700, 64, DType::kF16,
             SmallConfig(Policy::kBlockTopk, 256)},
        Case{"oracle_rows", 4, 2, 300, 300, 32, DType::kF32, SmallConfig(Policy::kOracleTopk, 96)}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// Q, K and V need not share a storage type.
TEST(SparseAttentionCpuTest, MixedStorageTypes) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Case c{"", 4, 2, 300, 700, 64, DType::kF32, SmallConfig(Policy::kDhsa, 192)};
  for (DType k_type : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (DType v_type : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(::testing::Message()
                   << DTypeName(k_type) << " keys, " << DTypeName(v_type) << " values");
      Inputs in = MakeInputs(c, rng);
      in.q = in.q.ConvertTo(DType::kF16);
      in.k = in.k.ConvertTo(k_type);
      in.v = in.v.ConvertTo(v_type);
      SparseAttentionParams p;
      p.q = *HeadsView::Of(in.q, "q");
      p.q.offset = c.lk - c.lq;
      p.k = *HeadsView::Of(in.k, "k");
      p.v = *HeadsView::Of(in.v, "v");
      const Selection sel = testing::ReferenceSelection(p.q, p.k, c.config);
      p.selection = &sel;
      p.scale = 0.125f;
      p.num_threads = 2;
      testing::PoisonedOutputs out(c.hq, c.lq, c.d);
      out.Attach(p, c.hq, c.lq, c.d);
      ASSERT_TRUE(SparseAttentionCpu(p).ok());
      const testing::AttentionValues fp64 = testing::SelectedAttention<double>(p);
      const testing::AttentionValues naive = testing::SelectedAttention<float>(p);
      testing::ExpectWithinTolerance(out.o.data(), fp64.o, naive.o, "o");
      testing::ExpectWithinTolerance(out.lse.data(), fp64.lse, naive.lse, "lse");
    }
  }
}

TEST(SparseAttentionCpuTest, ThreadCountDoesNotChangeTheResult) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Case c{"", 8, 2, 517, 517, 64, DType::kF32, SmallConfig(Policy::kDhsa, 128)};
  Inputs in = MakeInputs(c, rng);
  const Selection sel = testing::ReferenceSelection(in.qv, in.kv, c.config);
  std::vector<std::vector<float>> results;
  for (int threads : {1, 3}) {
    SparseAttentionParams p;
    p.q = in.qv;
    p.k = in.kv;
    p.v = in.vv;
    p.selection = &sel;
    p.scale = 0.125f;
    p.num_threads = threads;
    testing::PoisonedOutputs out(c.hq, c.lq, c.d);
    out.Attach(p, c.hq, c.lq, c.d);
    ASSERT_TRUE(SparseAttentionCpu(p).ok());
    out.o.insert(out.o.end(), out.lse.begin(), out.lse.end());
    results.push_back(out.o);
  }
  EXPECT_EQ(results[0], results[1]);
}

// A worker's view: K/V in stripes with offsets; rows whose selected keys all lie elsewhere get
// o = 0 and lse = -inf; merging the stripes' partials gives the whole result.
TEST(SparseAttentionCpuTest, KeyStripesGivePartialsThatMergeIntoTheWhole) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Case c{"", 4, 2, 180, 1025, 64, DType::kBF16, SmallConfig(Policy::kDhsa, 192)};
  Inputs in = MakeInputs(c, rng);
  const Selection sel = testing::ReferenceSelection(in.qv, in.kv, c.config);
  const float scale = 0.125f;
  const std::vector<int64_t> cuts = {0, 300, 301, 1025};
  std::vector<testing::PoisonedOutputs> parts;
  for (size_t s = 0; s + 1 < cuts.size(); ++s) {
    SparseAttentionParams p;
    p.q = in.qv;
    p.k = in.kv;
    p.v = in.vv;
    for (HeadsView* view : {&p.k, &p.v}) {
      view->data =
          static_cast<const char*>(view->data) + view->Index(0, cuts[s]) * DTypeSize(view->dtype);
      view->head_stride = c.lk * c.d;
      view->len = cuts[s + 1] - cuts[s];
      view->offset = cuts[s];
    }
    p.selection = &sel;
    p.scale = scale;
    p.num_threads = 2;
    parts.emplace_back(c.hq, c.lq, c.d);
    parts.back().Attach(p, c.hq, c.lq, c.d);
    ASSERT_TRUE(SparseAttentionCpu(p).ok());
    const testing::AttentionValues fp64 = testing::SelectedAttention<double>(p);
    const testing::AttentionValues naive = testing::SelectedAttention<float>(p);
    SCOPED_TRACE(::testing::Message() << "stripe " << s);
    testing::ExpectWithinTolerance(parts.back().o.data(), fp64.o, naive.o, "stripe o");
    testing::ExpectWithinTolerance(parts.back().lse.data(), fp64.lse, naive.lse, "stripe lse");
  }
  std::vector<PartialView> views;
  for (const auto& part : parts) views.push_back({part.o.data(), part.lse.data()});
  testing::PoisonedOutputs merged(c.hq, c.lq, c.d);
  ASSERT_TRUE(
      MergePartialsCpu(views, c.hq * c.lq, c.d, merged.o.data(), merged.lse.data(), 2).ok());

  SparseAttentionParams whole;
  whole.q = in.qv;
  whole.k = in.kv;
  whole.v = in.vv;
  whole.selection = &sel;
  whole.scale = scale;
  const testing::AttentionValues fp64 = testing::SelectedAttention<double>(whole);
  const testing::AttentionValues naive = testing::SelectedAttention<float>(whole);
  testing::ExpectWithinTolerance(merged.o.data(), fp64.o, naive.o, "merged o");
  testing::ExpectWithinTolerance(merged.lse.data(), fp64.lse, naive.lse, "merged lse");
}

// A worker holding its stripes as separate runs, with gaps where other workers' stripes lie: one
// call attends the held selected keys only, as the fp64 attention over the selection cut to them.
TEST(SparseAttentionCpuTest, KeyRunsWithGapsAttendOnlyTheHeldKeys) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Case c{"", 4, 2, 333, 1025, 64, DType::kBF16, SmallConfig(Policy::kDhsa, 192)};
  Inputs in = MakeInputs(c, rng);
  const Selection sel = testing::ReferenceSelection(in.qv, in.kv, c.config);
  const std::vector<int64_t> cuts = {0, 300, 301, 640, 700, 1025};
  for (const std::vector<size_t>& held :
       {std::vector<size_t>{0, 1, 2, 3, 4}, std::vector<size_t>{0, 2, 4}, std::vector<size_t>{1, 3},
        std::vector<size_t>{4}}) {
    SCOPED_TRACE(::testing::Message() << held.size() << " runs, the first " << held[0]);
    SparseAttentionParams p;
    p.q = in.qv;
    p.selection = &sel;
    p.scale = 0.125f;
    p.num_threads = 2;
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (size_t i : held) {
      KvRun run{in.kv, in.vv};
      for (HeadsView* view : {&run.k, &run.v}) {
        view->data =
            static_cast<const char*>(view->data) + view->Index(0, cuts[i]) * DTypeSize(view->dtype);
        view->head_stride = c.lk * c.d;
        view->len = cuts[i + 1] - cuts[i];
        view->offset = cuts[i];
      }
      if (ranges.empty()) {
        p.k = run.k;
        p.v = run.v;
      } else {
        p.more_kv.push_back(run);
      }
      ranges.push_back({cuts[i], cuts[i + 1]});
    }
    testing::PoisonedOutputs out(c.hq, c.lq, c.d);
    out.Attach(p, c.hq, c.lq, c.d);
    ASSERT_TRUE(SparseAttentionCpu(p).ok());
    for (float x : out.o) ASSERT_FALSE(std::isnan(x)) << "an output element was not written";
    for (float x : out.lse) ASSERT_FALSE(std::isnan(x)) << "an lse element was not written";

    const Selection clipped = testing::ClipToHeld(sel, ranges);
    SparseAttentionParams whole = p;
    whole.k = in.kv;
    whole.v = in.vv;
    whole.more_kv.clear();
    whole.selection = &clipped;
    const testing::AttentionValues fp64 = testing::SelectedAttention<double>(whole);
    const testing::AttentionValues naive = testing::SelectedAttention<float>(whole);
    testing::ExpectWithinTolerance(out.o.data(), fp64.o, naive.o, "o");
    testing::ExpectWithinTolerance(out.lse.data(), fp64.lse, naive.lse, "lse");
  }
}

TEST(SparseAttentionCpuTest, BadParamsAreInvalidArgument) {
  std::mt19937_64 rng(1);
  const Case c{"", 4, 2, 64, 64, 16, DType::kF32, SmallConfig(Policy::kDense, 64)};
  Inputs in = MakeInputs(c, rng);
  const Selection sel = testing::ReferenceSelection(in.qv, in.kv, c.config);
  testing::PoisonedOutputs out(c.hq, c.lq, c.d);
  SparseAttentionParams p;
  p.q = in.qv;
  p.k = in.kv;
  p.v = in.vv;
  p.selection = &sel;
  p.scale = 0.25f;
  out.Attach(p, c.hq, c.lq, c.d);
  SparseAttentionParams no_selection = p;
  no_selection.selection = nullptr;
  EXPECT_EQ(SparseAttentionCpu(no_selection).code(), absl::StatusCode::kInvalidArgument);
  SparseAttentionParams no_scale = p;
  no_scale.scale = 0;
  EXPECT_EQ(SparseAttentionCpu(no_scale).code(), absl::StatusCode::kInvalidArgument);
  SparseAttentionParams short_o = p;
  short_o.o.len = 3;
  EXPECT_EQ(SparseAttentionCpu(short_o).code(), absl::StatusCode::kInvalidArgument);
  Selection few = sel;
  few.num_blocks = 1;
  few.spans.resize(static_cast<size_t>(few.num_heads));
  SparseAttentionParams uncovered = p;
  uncovered.selection = &few;
  EXPECT_EQ(SparseAttentionCpu(uncovered).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dhsa
