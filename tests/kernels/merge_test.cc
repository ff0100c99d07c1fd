#include "kernels/merge/merge.h"

#include <cmath>
#include <limits>
#include <random>

#include "gtest/gtest.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/dhsa.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Partial attention over keys [begin, end) only, as a worker holding that stripe computes it.
void StripeAttention(const Tensor& q, const Tensor& k, const Tensor& v, const Selection& sel,
                     int64_t begin, int64_t end, std::vector<float>* o, std::vector<float>* lse) {
  const int64_t hq = q.shape[0], lq = q.shape[1], d = q.shape[2];
  const int64_t hkv = k.shape[0], lk = k.shape[1];
  // Copy the stripe out, as a worker stores it.
  Tensor ks = Tensor::Zeros(DType::kF32, {hkv, end - begin, d});
  Tensor vs = Tensor::Zeros(DType::kF32, {hkv, end - begin, d});
  for (int64_t h = 0; h < hkv; ++h) {
    std::memcpy(static_cast<float*>(ks.data()) + h * (end - begin) * d,
                static_cast<const float*>(k.data()) + (h * lk + begin) * d, (end - begin) * d * 4);
    std::memcpy(static_cast<float*>(vs.data()) + h * (end - begin) * d,
                static_cast<const float*>(v.data()) + (h * lk + begin) * d, (end - begin) * d * 4);
  }
  o->assign(static_cast<size_t>(hq * lq * d), 0.0f);
  lse->assign(static_cast<size_t>(hq * lq), 0.0f);
  SparseAttentionParams p;
  p.q = *HeadsView::Of(q, "Q");
  p.q.offset = lk - lq;
  p.k = *HeadsView::Of(ks, "K");
  p.k.offset = begin;
  p.v = *HeadsView::Of(vs, "V");
  p.v.offset = begin;
  p.selection = &sel;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.o = {o->data(), hq, lq, d};
  p.lse = {lse->data(), hq, lq, 1};
  ASSERT_TRUE(SparseAttentionReference(p).ok());
}

TEST(MergeTest, AnyPartitionOfTheKeysMergesToTheWhole) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (Policy policy : {Policy::kDense, Policy::kDhsa, Policy::kStreaming}) {
    const int64_t lk = 1025, lq = 400, d = 64;
    const Tensor q = testing::RandomTensor(rng, 4, lq, d);
    const Tensor k = testing::SegmentedTensor(rng, 2, lk, d);
    const Tensor v = testing::RandomTensor(rng, 2, lk, d);
    DhsaConfig config;
    config.policy = policy;
    config.budget = 512;
    config.sink = 64;
    config.local = 128;
    auto whole = AttendReference(q, k, v, config);
    ASSERT_TRUE(whole.ok());
    // Random cut points, including empty and one-token parts.
    std::uniform_int_distribution<int64_t> cut(0, lk);
    std::vector<int64_t> cuts = {0, lk, cut(rng), cut(rng), cut(rng), cut(rng), 1, lk - 1};
    const int64_t dup = cut(rng);
    cuts.push_back(dup);
    cuts.push_back(dup);  // An empty part.
    std::sort(cuts.begin(), cuts.end());
    std::vector<std::vector<float>> os(cuts.size() - 1), lses(cuts.size() - 1);
    std::vector<PartialView> parts;
    for (size_t s = 0; s + 1 < cuts.size(); ++s) {
      if (cuts[s] == cuts[s + 1]) {  // A worker with no keys answers o = 0, lse = -inf.
        os[s].assign(static_cast<size_t>(4 * lq * d), 0.0f);
        lses[s].assign(static_cast<size_t>(4 * lq), kNegInf);
      } else {
        StripeAttention(q, k, v, whole->selection, cuts[s], cuts[s + 1], &os[s], &lses[s]);
      }
      parts.push_back({os[s].data(), lses[s].data()});
    }
    std::vector<float> o(static_cast<size_t>(4 * lq * d)), lse(static_cast<size_t>(4 * lq));
    ASSERT_TRUE(MergePartialsReference(parts, 4 * lq, d, o.data(), lse.data()).ok());
    for (size_t i = 0; i < o.size(); ++i)
      ASSERT_NEAR(o[i], whole->o.Get(static_cast<int64_t>(i)), 2e-6);
    for (size_t i = 0; i < lse.size(); ++i) {
      ASSERT_NEAR(lse[i], whole->lse.Get(static_cast<int64_t>(i)), 2e-5);
    }
  }
}

TEST(MergeTest, AllEmptyRowsGiveZeroAndMinusInfinityNeverNaN) {
  const std::vector<float> o1 = {0, 0}, l1 = {kNegInf}, o2 = {0, 0}, l2 = {kNegInf};
  std::vector<float> o(2, 7.0f), lse(1, 7.0f);
  ASSERT_TRUE(MergePartialsReference({{o1.data(), l1.data()}, {o2.data(), l2.data()}}, 1, 2,
                                     o.data(), lse.data())
                  .ok());
  EXPECT_EQ(o[0], 0.0f);
  EXPECT_EQ(o[1], 0.0f);
  EXPECT_EQ(lse[0], kNegInf);
  ASSERT_TRUE(MergePartialsReference({}, 1, 2, o.data(), lse.data()).ok());
  EXPECT_EQ(lse[0], kNegInf);
}

TEST(MergeTest, HandWorkedTwoParts) {
  // Part 1: one key with score log(1) -> lse 0, o = (1, 0). Part 2: lse log(3), o = (0, 1).
  const std::vector<float> o1 = {1, 0}, l1 = {0.0f}, o2 = {0, 1}, l2 = {std::log(3.0f)};
  std::vector<float> o(2), lse(1);
  ASSERT_TRUE(MergePartialsReference({{o1.data(), l1.data()}, {o2.data(), l2.data()}}, 1, 2,
                                     o.data(), lse.data())
                  .ok());
  EXPECT_NEAR(lse[0], std::log(4.0f), 1e-6);
  EXPECT_NEAR(o[0], 0.25f, 1e-6);
  EXPECT_NEAR(o[1], 0.75f, 1e-6);
}

TEST(MergeTest, PlusInfinityOrNaNInAPartialIsAnError) {
  const std::vector<float> o1 = {1, 0};
  for (float bad : {std::numeric_limits<float>::infinity(), std::nanf("")}) {
    const std::vector<float> l1 = {bad};
    std::vector<float> o(2), lse(1);
    const absl::Status s =
        MergePartialsReference({{o1.data(), l1.data()}}, 1, 2, o.data(), lse.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace dhsa
