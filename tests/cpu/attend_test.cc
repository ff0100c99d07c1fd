// Attend on the CPU backend against AttendReference, end to end: boundaries, summaries and
// selection as the reference's, outputs within the tolerance rule.
#include <cmath>
#include <random>
#include <string>

#include "bench/workload/workload.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dhsa.h"
#include "tests/cpu/cpu_test_util.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

using ::testing::HasSubstr;

// The spec's method (paper chunk score) on a smaller structure; MassConfig() is the mass score's.
DhsaConfig SmallConfig(Policy policy) {
  DhsaConfig c = PaperConfig();
  c.policy = policy;
  c.budget = 384;
  c.sink = 64;
  c.local = 128;
  c.q_block = 64;
  c.chunk_mean = 16;
  c.chunk_min = 4;
  c.chunk_max = 48;
  c.block = 32;
  return c;
}

// SmallConfig(kDhsa) with the mass chunk score over 8-row pieces.
DhsaConfig MassConfig() {
  DhsaConfig c = SmallConfig(Policy::kDhsa);
  c.chunk_score = ChunkScore::kMass;
  c.score_rows = 8;
  return c;
}

// Checks `got` (CPU backend) against `want` (reference) for the same call: same boundaries,
// summaries and selection (as sets, up to ties), pair counts, and o/lse on `rows` within the
// tolerance rule against fp64 over the selection.
void ExpectMatchesReference(const AttendResult& got, const AttendResult& want, const Tensor& q,
                            const Tensor& k, const Tensor& v, const DhsaConfig& config,
                            int64_t row_stride) {
  EXPECT_EQ(got.boundaries, want.boundaries);
  EXPECT_EQ(got.kappa.data, want.kappa.data);
  HeadsView qv = *HeadsView::Of(q, "q");
  qv.offset = k.shape[1] - q.shape[1];
  if (config.policy == Policy::kDhsa || config.policy == Policy::kBlockTopk) {
    const Summaries rho = ScoreQuerySummariesReference(qv, k.shape[0], config);
    SelectionInputs in;
    in.shape = {q.shape[0], k.shape[0], q.shape[2], q.shape[1], k.shape[1]};
    in.boundaries = &want.boundaries;
    in.kappa = &want.kappa;
    in.rho = &rho;
    testing::ExpectSameUpToTies(got.selection, want.selection, in, config);
  } else {
    EXPECT_EQ(got.selection.spans, want.selection.spans);
  }
  if (got.selection.spans == want.selection.spans) {
    EXPECT_EQ(got.computed_pairs, want.computed_pairs);
  }
  EXPECT_EQ(got.causal_pairs, want.causal_pairs);

  SparseAttentionParams p;
  p.q = qv;
  p.k = *HeadsView::Of(k, "k");
  p.v = *HeadsView::Of(v, "v");
  p.selection = &got.selection;
  p.scale = EffectiveScale(config, q.shape[2]);
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < q.shape[1]; r += row_stride) rows.push_back(r);
  rows.push_back(q.shape[1] - 1);
  const testing::AttentionValues fp64 = testing::SelectedAttention<double>(p, rows);
  const testing::AttentionValues naive = testing::SelectedAttention<float>(p, rows);
  testing::ExpectWithinTolerance(static_cast<const float*>(got.o.data()), fp64.o, naive.o, "o");
  testing::ExpectWithinTolerance(static_cast<const float*>(got.lse.data()), fp64.lse, naive.lse,
                                 "lse");
}

struct Case {
  std::string name;
  int64_t hq, hkv, lq, lk, d;
  DType dtype;
  DhsaConfig config;
  bool workload;  // Structured workload (bench/workload) for Lq = Lk, else segmented keys.
  int64_t row_stride;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class AttendCpuTest : public ::testing::TestWithParam<Case> {};

TEST_P(AttendCpuTest, MatchesTheReference) {
  const Case& c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Tensor q, k, v;
  if (c.workload) {
    WorkloadConfig wc;
    wc.len = c.lk;
    wc.hq = c.hq;
    wc.hkv = c.hkv;
    wc.dim = c.d;
    wc.seed = seed;
    wc.dtype = c.dtype;
    Workload w = *GenerateWorkload(wc);
    q = std::move(w.q);
    k = std::move(w.k);
    v = std::move(w.v);
  } else {
    q = testing::RandomTensor(rng, c.hq, c.lq, c.d).ConvertTo(c.dtype);
    k = testing::SegmentedTensor(rng, c.hkv, c.lk, c.d).ConvertTo(c.dtype);
    v = testing::RandomTensor(rng, c.hkv, c.lk, c.d).ConvertTo(c.dtype);
  }
  AttendOptions options;
  options.num_threads = 2;
  const auto got = Attend(q, k, v, c.config, options);
  const auto want = AttendReference(q, k, v, c.config, options);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(want.ok()) << want.status();
  ExpectMatchesReference(*got, *want, q, k, v, c.config, c.row_stride);
}

INSTANTIATE_TEST_SUITE_P(
    WorkloadsPoliciesAndOddSizes, AttendCpuTest,
    ::testing::Values(
        Case{"workload_f32", 8, 2, 1500, 1500, 64, DType::kF32, SmallConfig(Policy::kDhsa), true,
             3},
        Case{"workload_f16", 4, 2, 1025, 1025, 64, DType::kF16, SmallConfig(Policy::kDhsa), true,
             2},
        Case{"workload_bf16", 4, 1, 1025, 1025, 128, DType::kBF16, SmallConfig(Policy::kDhsa), true,
             2},
        Case{"lq_lt_lk_bf16", 4, 2, 1000, 4099, 32, DType::kBF16, SmallConfig(Policy::kDhsa), false,
             3},
        Case{"lk97", 4, 2, 97, 97, 32, DType::kF32, SmallConfig(Policy::kDhsa), false, 1},
        Case{"single_query_default_config", 8, 2, 1, 4099, 128, DType::kF32, DhsaConfig{}, false,
             1},
        Case{"single_query_paper_config", 8, 2, 1, 4099, 128, DType::kF32, PaperConfig(), false, 1},
        Case{"mass_workload", 8, 2, 1500, 1500, 64, DType::kF32, MassConfig(), true, 3},
        Case{"mass_lq_lt_lk_bf16", 6, 2, 333, 4099, 32, DType::kBF16, MassConfig(), false, 3},
        Case{"block_topk", 4, 2, 1025, 1025, 32, DType::kF16, SmallConfig(Policy::kBlockTopk),
             false, 2},
        Case{"streaming", 4, 2, 700, 700, 32, DType::kF32, SmallConfig(Policy::kStreaming), false,
             2},
        Case{"dense", 6, 2, 300, 1025, 32, DType::kF32, SmallConfig(Policy::kDense), false, 2},
        Case{"oracle", 4, 2, 257, 257, 16, DType::kF32, SmallConfig(Policy::kOracleTopk), false,
             1}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// A prefill, then decode one token at a time past several tail segmentations, each call keeping
// the previous call's boundaries and chunk summaries, against the reference recomputing them.
TEST(AttendCpuTest, DecodeWithKeptSummariesMatchesTheReference) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int64_t hq = 4, hkv = 2, d = 32, prefill = 700, total = 820;
  const Tensor q_all = testing::RandomTensor(rng, hq, total, d);
  const Tensor k_all = testing::SegmentedTensor(rng, hkv, total, d);
  const Tensor v_all = testing::RandomTensor(rng, hkv, total, d);
  auto rows = [](const Tensor& t, int64_t a, int64_t b) {
    Tensor out = Tensor::Zeros(t.dtype, {t.shape[0], b - a, t.shape[2]});
    const size_t row = static_cast<size_t>(t.shape[2]) * DTypeSize(t.dtype);
    for (int64_t h = 0; h < t.shape[0]; ++h) {
      std::copy_n(t.bytes.begin() + static_cast<std::ptrdiff_t>((h * t.shape[1] + a) * row),
                  (b - a) * row,
                  out.bytes.begin() + static_cast<std::ptrdiff_t>(h * (b - a) * row));
    }
    return out;
  };
  DhsaConfig config = SmallConfig(Policy::kDhsa);
  config.budget = 256;
  AttendOptions options;
  options.num_threads = 2;
  auto state = Attend(rows(q_all, 0, prefill), rows(k_all, 0, prefill), rows(v_all, 0, prefill),
                      config, options);
  ASSERT_TRUE(state.ok()) << state.status();
  for (int64_t end = prefill + 1; end <= total; ++end) {
    SCOPED_TRACE(::testing::Message() << "decode to " << end);
    const Tensor q = rows(q_all, end - 1, end), k = rows(k_all, 0, end), v = rows(v_all, 0, end);
    AttendOptions decode = options;
    decode.decode = true;
    decode.prior_boundaries = &state->boundaries;
    decode.prior_kappa = &state->kappa;
    auto got = Attend(q, k, v, config, decode);
    ASSERT_TRUE(got.ok()) << got.status();
    decode.prior_kappa = nullptr;
    const auto want = AttendReference(q, k, v, config, decode);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectMatchesReference(*got, *want, q, k, v, config, 1);
    if (::testing::Test::HasFailure()) return;
    state = std::move(got);
  }
}

TEST(AttendCpuTest, BadPriorsAndNonFiniteNewKeysAreInvalidArgument) {
  std::mt19937_64 rng(testing::FreshSeed());
  const Tensor q = testing::RandomTensor(rng, 4, 1, 16);
  Tensor k = testing::RandomTensor(rng, 2, 300, 16);
  const Tensor v = testing::RandomTensor(rng, 2, 300, 16);
  DhsaConfig config = SmallConfig(Policy::kDhsa);
  const auto prefill =
      Attend(testing::RandomTensor(rng, 4, 299, 16), testing::RandomTensor(rng, 2, 299, 16),
             testing::RandomTensor(rng, 2, 299, 16), config);
  ASSERT_TRUE(prefill.ok());
  AttendOptions options;
  options.decode = true;
  options.prior_kappa = &prefill->kappa;
  auto s = Attend(q, k, v, config, options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("prior boundaries"));
  std::vector<int64_t> fewer(prefill->boundaries.begin(), prefill->boundaries.end());
  fewer.erase(fewer.begin() + 1);
  options.prior_boundaries = &fewer;
  s = Attend(q, k, v, config, options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("prior kappa"));

  options.prior_boundaries = &prefill->boundaries;
  static_cast<float*>(k.data())[(300 + 299) * 16 + 5] = std::nanf("");  // Head 1, the new key.
  for (Backend backend : {Backend::kCpu, Backend::kReference}) {
    options.backend = backend;
    s = Attend(q, k, v, config, options).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()),
                HasSubstr("K holds a non-finite value (nan) at [1, 299, 5]"));
  }
}

TEST(AttendCpuTest, BackendNamesRoundTrip) {
  for (Backend b : {Backend::kCpu, Backend::kReference})
    EXPECT_EQ(*ParseBackend(BackendName(b)), b);
  EXPECT_EQ(ParseBackend("gpu").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AttendOptions{}.backend, Backend::kCpu);
}

}  // namespace
}  // namespace dhsa
