#include <cmath>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dhsa.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

using ::testing::HasSubstr;

struct BadCase {
  const char* name;
  std::vector<int64_t> q, k, v;
  DhsaConfig config;
  const char* message;
};

DhsaConfig With(void (*edit)(DhsaConfig&)) {
  DhsaConfig c;
  edit(c);
  return c;
}

TEST(AttendTest, BadInputsAreInvalidArgumentWithAMessageThatSaysWhatToFix) {
  const std::vector<BadCase> cases = {
      {"2-D Q", {4, 16}, {2, 16, 8}, {2, 16, 8}, {}, "3-D"},
      {"heads not a multiple", {3, 16, 8}, {2, 16, 8}, {2, 16, 8}, {}, "multiple of KV heads"},
      {"head dims differ", {4, 16, 8}, {2, 16, 16}, {2, 16, 16}, {}, "same head dim"},
      {"K and V differ", {4, 16, 8}, {2, 16, 8}, {2, 15, 8}, {}, "same shape"},
      {"more queries than keys", {4, 17, 8}, {2, 16, 8}, {2, 16, 8}, {}, "Lq <= Lk"},
      {"no queries", {4, 0, 8}, {2, 16, 8}, {2, 16, 8}, {}, "positive"},
      {"W < Bq",
       {4, 16, 8},
       {2, 16, 8},
       {2, 16, 8},
       With([](DhsaConfig& c) { c.local = c.q_block / 2; }),
       "q_block"},
      {"budget below sink + local",
       {4, 16, 8},
       {2, 16, 8},
       {2, 16, 8},
       With([](DhsaConfig& c) { c.budget = 300; }),
       "sink + local"},
      {"negative budget",
       {4, 16, 8},
       {2, 16, 8},
       {2, 16, 8},
       With([](DhsaConfig& c) { c.budget = -1; }),
       "budget must be positive"},
      {"negative sink",
       {4, 16, 8},
       {2, 16, 8},
       {2, 16, 8},
       With([](DhsaConfig& c) { c.sink = -1; }),
       "sink"},
      {"chunk_min > chunk_max",
       {4, 16, 8},
       {2, 16, 8},
       {2, 16, 8},
       With([](DhsaConfig& c) { c.chunk_min = 200; }),
       "chunk_min"},
      {"NaN scale",
       {4, 16, 8},
       {2, 16, 8},
       {2, 16, 8},
       With([](DhsaConfig& c) { c.scale = std::nanf(""); }),
       "scale"},
  };
  std::mt19937_64 rng(testing::FreshSeed());
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    auto make = [&](const std::vector<int64_t>& shape) {
      Tensor t = Tensor::Zeros(DType::kF32, shape);
      std::normal_distribution<float> normal;
      for (int64_t i = 0; i < t.NumElements(); ++i) static_cast<float*>(t.data())[i] = normal(rng);
      return t;
    };
    auto result = AttendReference(make(c.q), make(c.k), make(c.v), c.config);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(c.message));
  }
}

TEST(AttendTest, NonFiniteInputsAreRejectedWithTheirPosition) {
  std::mt19937_64 rng(testing::FreshSeed());
  Tensor q = testing::RandomTensor(rng, 2, 8, 4);
  const Tensor k = testing::RandomTensor(rng, 1, 8, 4);
  Tensor v = testing::RandomTensor(rng, 1, 8, 4);
  static_cast<float*>(q.data())[(1 * 8 + 3) * 4 + 2] = std::nanf("");
  auto r = AttendReference(q, k, v, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("Q holds a non-finite value (nan) at [1, 3, 2]"));
  q = testing::RandomTensor(rng, 2, 8, 4);
  static_cast<float*>(v.data())[5] = INFINITY;
  r = AttendReference(q, k, v, {});
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("V holds a non-finite value"));
}

TEST(AttendTest, DecodeStepsMatchTheDenseRowsAndKeepBoundaries) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int64_t lk = 2300, d = 64;
  const Tensor qall = testing::RandomTensor(rng, 4, lk, d);
  const Tensor k = testing::SegmentedTensor(rng, 2, lk, d);
  const Tensor v = testing::RandomTensor(rng, 2, lk, d);
  DhsaConfig config;
  config.budget = 1024;
  // Prefill the first 2200 keys, then decode one token at a time up to 2300.
  auto prefix = [&](const Tensor& t, int64_t len) {
    Tensor out = Tensor::Zeros(DType::kF32, {t.shape[0], len, d});
    for (int64_t h = 0; h < t.shape[0]; ++h) {
      std::memcpy(static_cast<float*>(out.data()) + h * len * d,
                  static_cast<const float*>(t.data()) + h * t.shape[1] * d, len * d * 4);
    }
    return out;
  };
  auto row = [&](int64_t p) {
    Tensor out = Tensor::Zeros(DType::kF32, {4, 1, d});
    for (int64_t g = 0; g < 4; ++g) {
      std::memcpy(static_cast<float*>(out.data()) + g * d,
                  static_cast<const float*>(qall.data()) + (g * lk + p) * d, d * 4);
    }
    return out;
  };
  auto first = AttendReference(prefix(qall, 2200), prefix(k, 2200), prefix(v, 2200), config);
  ASSERT_TRUE(first.ok()) << first.status();
  std::vector<int64_t> boundaries = first->boundaries;
  for (int64_t p = 2200; p < lk; ++p) {
    const std::vector<int64_t> before = boundaries;
    AttendOptions options;
    options.prior_boundaries = &before;
    options.decode = true;
    const Tensor kp = prefix(k, p + 1), vp = prefix(v, p + 1);
    auto step = AttendReference(row(p), kp, vp, config, options);
    ASSERT_TRUE(step.ok()) << step.status();
    // Old boundaries (all but the old tail) never move.
    for (size_t j = 0; j + 2 < before.size(); ++j) ASSERT_EQ(step->boundaries[j], before[j]);
    boundaries = step->boundaries;
    ASSERT_EQ(boundaries.back(), p + 1);
    // One decode row attends to at most the budget.
    EXPECT_LE(step->computed_pairs, 4 * config.budget);
    // With the budget raised past the length, decode is dense attention of that row.
    if (p % 37 == 0) {
      DhsaConfig wide = config;
      wide.budget = p + 1;
      DhsaConfig dense;
      dense.policy = Policy::kDense;
      auto a = AttendReference(row(p), kp, vp, wide, options);
      auto b = AttendReference(row(p), kp, vp, dense);
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_EQ(testing::MaxAbsDiff(a->o, b->o), 0.0);
    }
  }
}

TEST(AttendTest, PriorBoundariesMustEndAtT0) {
  std::mt19937_64 rng(testing::FreshSeed());
  const Tensor q = testing::RandomTensor(rng, 2, 8, 4);
  const Tensor k = testing::RandomTensor(rng, 1, 20, 4);
  const Tensor v = testing::RandomTensor(rng, 1, 20, 4);
  const std::vector<int64_t> wrong = {0, 10};
  AttendOptions options;
  options.prior_boundaries = &wrong;
  auto r = AttendReference(q, k, v, {}, options);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("t0 = 12"));
}

}  // namespace
}  // namespace dhsa
