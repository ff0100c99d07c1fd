#include <cmath>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/dhsa.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

// Softmax attention over exactly the keys a selection lists (and causality), computed directly.
void NaiveSelectedAttention(const Tensor& q, const Tensor& k, const Tensor& v, const Selection& sel,
                            double scale, std::vector<double>* o, std::vector<double>* lse) {
  const int64_t hq = q.shape[0], lq = q.shape[1], d = q.shape[2];
  const int64_t hkv = k.shape[0], lk = k.shape[1], t0 = lk - lq;
  o->assign(static_cast<size_t>(hq * lq * d), 0.0);
  lse->assign(static_cast<size_t>(hq * lq), 0.0);
  for (int64_t g = 0; g < hq; ++g) {
    const int64_t h = g / (hq / hkv);
    for (int64_t r = 0; r < lq; ++r) {
      const int64_t p = t0 + r;
      std::vector<bool> mask(static_cast<size_t>(lk), false);
      for (const Span& s : sel.ForQuery(g, p)) {
        for (int64_t t = s.begin; t < s.end && t <= p; ++t) mask[t] = true;
      }
      double m = -INFINITY, z = 0;
      std::vector<double> w(static_cast<size_t>(lk), 0.0);
      for (int64_t t = 0; t < lk; ++t) {
        if (!mask[t]) continue;
        double dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += double{q.Get((g * lq + r) * d + c)} * k.Get((h * lk + t) * d + c);
        w[t] = dot * scale;
        m = std::max(m, w[t]);
      }
      for (int64_t t = 0; t < lk; ++t) {
        if (!mask[t]) continue;
        w[t] = std::exp(w[t] - m);
        z += w[t];
      }
      for (int64_t t = 0; t < lk; ++t) {
        if (!mask[t]) continue;
        for (int64_t c = 0; c < d; ++c)
          (*o)[(g * lq + r) * d + c] += w[t] / z * v.Get((h * lk + t) * d + c);
      }
      (*lse)[g * lq + r] = m + std::log(z);
    }
  }
}

struct Case {
  int64_t hq, hkv, lq, lk, d;
};

class DenseAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(DenseAttentionTest, DenseEqualsNaiveSoftmaxAttention) {
  const Case c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, c.hq, c.lq, c.d);
  const Tensor k = testing::SegmentedTensor(rng, c.hkv, c.lk, c.d);
  const Tensor v = testing::RandomTensor(rng, c.hkv, c.lk, c.d);
  DhsaConfig config;
  config.policy = Policy::kDense;
  AttendOptions options;
  options.num_threads = 2;
  auto result = AttendReference(q, k, v, config, options);
  ASSERT_TRUE(result.ok()) << result.status();
  std::vector<double> o, lse;
  testing::NaiveDenseAttention(q, k, v, 1.0 / std::sqrt(double(c.d)), &o, &lse);
  EXPECT_LT(testing::MaxAbsDiff(result->o, o), 2e-6);
  EXPECT_LT(testing::MaxAbsDiff(result->lse, lse), 2e-5);
  EXPECT_EQ(result->computed_pairs, result->causal_pairs);
}

INSTANTIATE_TEST_SUITE_P(OddSizes, DenseAttentionTest,
                         ::testing::Values(Case{2, 1, 97, 97, 64}, Case{6, 2, 1025, 1025, 64},
                                           Case{2, 2, 4099, 4099, 32}, Case{4, 2, 33, 200, 128},
                                           Case{4, 1, 1, 777, 64}),
                         [](const auto& info) {
                           const Case& c = info.param;
                           return "hq" + std::to_string(c.hq) + "_hkv" + std::to_string(c.hkv) +
                                  "_lq" + std::to_string(c.lq) + "_lk" + std::to_string(c.lk) +
                                  "_d" + std::to_string(c.d);
                         });

TEST(SparseAttentionTest, EveryPolicyEqualsNaiveAttentionOverItsSelection) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, 4, 700, 64);
  const Tensor k = testing::SegmentedTensor(rng, 2, 1000, 64);
  const Tensor v = testing::RandomTensor(rng, 2, 1000, 64);
  for (Policy policy :
       {Policy::kDhsa, Policy::kBlockTopk, Policy::kStreaming, Policy::kOracleTopk}) {
    SCOPED_TRACE(PolicyName(policy));
    DhsaConfig config;
    config.policy = policy;
    config.budget = 384;
    config.sink = 32;
    config.local = 128;
    config.q_block = 64;
    auto result = AttendReference(q, k, v, config);
    ASSERT_TRUE(result.ok()) << result.status();
    std::vector<double> o, lse;
    NaiveSelectedAttention(q, k, v, result->selection, 0.125, &o, &lse);
    EXPECT_LT(testing::MaxAbsDiff(result->o, o), 2e-6);
    EXPECT_LT(testing::MaxAbsDiff(result->lse, lse), 2e-5);
    EXPECT_LT(result->computed_pairs, result->causal_pairs);
  }
}

TEST(SparseAttentionTest, HalfAndBFloat16InputsAccumulateInFloat) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const Tensor q = testing::RandomTensor(rng, 4, 300, 64).ConvertTo(dtype);
    const Tensor k = testing::SegmentedTensor(rng, 2, 300, 64).ConvertTo(dtype);
    const Tensor v = testing::RandomTensor(rng, 2, 300, 64).ConvertTo(dtype);
    DhsaConfig config;
    config.policy = Policy::kDense;
    auto result = AttendReference(q, k, v, config);
    ASSERT_TRUE(result.ok());
    // The exact answer for the rounded inputs: no error beyond fp32 rounding of the outputs.
    std::vector<double> o, lse;
    testing::NaiveDenseAttention(q, k, v, 0.125, &o, &lse);
    EXPECT_LT(testing::MaxAbsDiff(result->o, o), 2e-6);
    EXPECT_LT(testing::MaxAbsDiff(result->lse, lse), 2e-5);
  }
}

TEST(SparseAttentionTest, BudgetAtLeastTheCausalLengthIsDense) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, 2, 513, 64);
  const Tensor k = testing::SegmentedTensor(rng, 1, 513, 64);
  const Tensor v = testing::RandomTensor(rng, 1, 513, 64);
  DhsaConfig dense;
  dense.policy = Policy::kDense;
  auto want = AttendReference(q, k, v, dense);
  for (Policy policy :
       {Policy::kDhsa, Policy::kBlockTopk, Policy::kStreaming, Policy::kOracleTopk}) {
    DhsaConfig config;
    config.policy = policy;
    config.budget = 513;
    auto got = AttendReference(q, k, v, config);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(testing::MaxAbsDiff(got->o, want->o), 0.0) << PolicyName(policy);
    EXPECT_EQ(got->computed_pairs, got->causal_pairs);
  }
}

TEST(SparseAttentionTest, ChunkedPrefillRowsEqualTheFullPrefillForDense) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int64_t lk = 611, lq = 150, d = 64;
  const Tensor q = testing::RandomTensor(rng, 4, lk, d);
  const Tensor k = testing::SegmentedTensor(rng, 2, lk, d);
  const Tensor v = testing::RandomTensor(rng, 2, lk, d);
  Tensor tail = Tensor::Zeros(DType::kF32, {4, lq, d});
  for (int64_t g = 0; g < 4; ++g) {
    std::memcpy(static_cast<float*>(tail.data()) + g * lq * d,
                static_cast<const float*>(q.data()) + (g * lk + lk - lq) * d,
                lq * d * sizeof(float));
  }
  DhsaConfig config;
  config.policy = Policy::kDense;
  auto full = AttendReference(q, k, v, config);
  auto part = AttendReference(tail, k, v, config);
  ASSERT_TRUE(full.ok() && part.ok());
  for (int64_t g = 0; g < 4; ++g) {
    for (int64_t r = 0; r < lq; ++r) {
      for (int64_t c = 0; c < d; ++c) {
        ASSERT_EQ(part->o.Get((g * lq + r) * d + c), full->o.Get((g * lk + lk - lq + r) * d + c));
      }
      ASSERT_EQ(part->lse.Get(g * lq + r), full->lse.Get(g * lk + lk - lq + r));
    }
  }
}

TEST(SparseAttentionTest, GroupHeadsShareTheirKvHead) {
  // Query heads 0 and 1 are equal and use KV head 0; head 2 equal too but uses KV head 1.
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  Tensor one = testing::RandomTensor(rng, 1, 64, 64);
  std::vector<float> values = one.ToFloats();
  std::vector<float> four;
  for (int i = 0; i < 4; ++i) four.insert(four.end(), values.begin(), values.end());
  const Tensor q = Tensor::FromFloats({4, 64, 64}, four);
  const Tensor k = testing::RandomTensor(rng, 2, 64, 64);
  const Tensor v = testing::RandomTensor(rng, 2, 64, 64);
  DhsaConfig config;
  config.policy = Policy::kDense;
  auto r = AttendReference(q, k, v, config);
  ASSERT_TRUE(r.ok());
  const float* o = static_cast<const float*>(r->o.data());
  EXPECT_EQ(std::memcmp(o, o + 64 * 64, 64 * 64 * sizeof(float)), 0);
  EXPECT_NE(std::memcmp(o, o + 2 * 64 * 64, 64 * 64 * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(o + 2 * 64 * 64, o + 3 * 64 * 64, 64 * 64 * sizeof(float)), 0);
}

// A worker holds its stripes as separate runs, with gaps where other workers' stripes lie: the
// result is attention over the held selected keys only; runs that cover every key change nothing.
TEST(SparseAttentionTest, KeyRunsAttendOnlyTheKeysTheyHold) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, 4, 400, 32).ConvertTo(DType::kBF16);
  const Tensor k = testing::SegmentedTensor(rng, 2, 1000, 32).ConvertTo(DType::kBF16);
  const Tensor v = testing::RandomTensor(rng, 2, 1000, 32).ConvertTo(DType::kBF16);
  DhsaConfig config;
  config.budget = 256;
  config.sink = 16;
  config.local = 64;
  config.q_block = 32;
  config.chunk_mean = 16;
  config.chunk_min = 4;
  config.chunk_max = 48;
  auto whole = AttendReference(q, k, v, config);
  ASSERT_TRUE(whole.ok()) << whole.status();
  const std::vector<int64_t> cuts = {0, 257, 258, 611, 1000};
  std::vector<Tensor> k_parts, v_parts;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    k_parts.push_back(SliceTokens(k, cuts[i], cuts[i + 1]));
    v_parts.push_back(SliceTokens(v, cuts[i], cuts[i + 1]));
  }
  auto run = [&](size_t i) {
    KvRun r{*HeadsView::Of(k_parts[i], "k"), *HeadsView::Of(v_parts[i], "v")};
    r.k.offset = r.v.offset = cuts[i];
    return r;
  };
  for (const std::vector<size_t>& held :
       {std::vector<size_t>{0, 1, 2, 3}, std::vector<size_t>{0, 1, 3}, std::vector<size_t>{2}}) {
    SCOPED_TRACE(::testing::Message() << held.size() << " runs held");
    SparseAttentionParams p;
    p.q = *HeadsView::Of(q, "q");
    p.q.offset = 600;  // The queries are the last 400 positions of a 1000-token prefill.
    const KvRun first = run(held[0]);
    p.k = first.k;
    p.v = first.v;
    std::vector<std::pair<int64_t, int64_t>> ranges = {{cuts[held[0]], cuts[held[0] + 1]}};
    for (size_t i = 1; i < held.size(); ++i) {
      p.more_kv.push_back(run(held[i]));
      ranges.push_back({cuts[held[i]], cuts[held[i] + 1]});
    }
    const Selection sel = whole->selection;
    p.selection = &sel;
    p.scale = 1.0f / std::sqrt(32.0f);
    std::vector<float> o(4 * 400 * 32, NAN), lse(4 * 400, NAN);
    p.o = OutputView{o.data(), 4, 400, 32};
    p.lse = OutputView{lse.data(), 4, 400, 1};
    p.num_threads = 2;
    ASSERT_TRUE(SparseAttentionReference(p).ok());
    std::vector<double> want_o, want_lse;
    NaiveSelectedAttention(q, k, v, testing::ClipToHeld(sel, ranges), p.scale, &want_o, &want_lse);
    double max_o = 0, max_lse = 0;
    for (size_t i = 0; i < o.size(); ++i) max_o = std::max(max_o, std::abs(o[i] - want_o[i]));
    for (size_t i = 0; i < lse.size(); ++i) {
      if (std::isinf(want_lse[i])) {
        EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << "row " << i << " holds no key";
        EXPECT_EQ(o[i * 32], 0.0f);
      } else {
        max_lse = std::max(max_lse, std::abs(lse[i] - want_lse[i]));
      }
    }
    EXPECT_LT(max_o, 2e-6);
    EXPECT_LT(max_lse, 2e-5);
  }
}

TEST(SparseAttentionTest, KeyRunsThatOverlapOrDoNotMatchAreInvalidArgument) {
  std::mt19937_64 rng(3);
  const Tensor q = testing::RandomTensor(rng, 2, 8, 16);
  const Tensor k = testing::RandomTensor(rng, 1, 8, 16);
  const Tensor k3 = testing::RandomTensor(rng, 2, 8, 16);
  Selection sel;
  sel.num_heads = 1;
  sel.num_blocks = 1;
  sel.block_size = 8;
  sel.spans = {{{0, 8}}};
  std::vector<float> o(2 * 8 * 16), lse(2 * 8);
  SparseAttentionParams p;
  p.q = *HeadsView::Of(q, "q");
  p.k = p.v = *HeadsView::Of(k, "k");
  p.selection = &sel;
  p.scale = 0.25f;
  p.o = OutputView{o.data(), 2, 8, 16};
  p.lse = OutputView{lse.data(), 2, 8, 1};
  SparseAttentionParams overlap = p;
  KvRun again{p.k, p.v};
  again.k.offset = again.v.offset = 7;
  overlap.more_kv.push_back(again);
  EXPECT_EQ(SparseAttentionReference(overlap).code(), absl::StatusCode::kInvalidArgument);
  SparseAttentionParams heads = p;
  KvRun other{*HeadsView::Of(k3, "k"), *HeadsView::Of(k3, "v")};
  other.k.offset = other.v.offset = 8;
  heads.more_kv.push_back(other);
  EXPECT_EQ(SparseAttentionReference(heads).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dhsa
