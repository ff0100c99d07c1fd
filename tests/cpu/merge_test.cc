#include "kernels/cpu/merge.h"

#include <cmath>
#include <limits>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cpu/cpu_test_util.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

// The merge of spec/DHSA.md computed with every operation in `Real`.
template <typename Real>
testing::AttentionValues MergeIn(const std::vector<std::vector<float>>& o,
                                 const std::vector<std::vector<float>>& lse, int64_t rows,
                                 int64_t dim) {
  testing::AttentionValues out;
  out.o.assign(static_cast<size_t>(rows * dim), 0.0);
  out.lse.assign(static_cast<size_t>(rows), -testing::kInf);
  for (int64_t r = 0; r < rows; ++r) {
    Real m = -std::numeric_limits<Real>::infinity();
    for (const auto& l : lse) m = std::max(m, static_cast<Real>(l[r]));
    if (std::isinf(m)) continue;
    Real sum = 0;
    for (const auto& l : lse) sum += std::exp(static_cast<Real>(l[r]) - m);
    const Real total = m + std::log(sum);
    std::vector<Real> acc(static_cast<size_t>(dim), Real{0});
    for (size_t s = 0; s < o.size(); ++s) {
      if (std::isinf(lse[s][r])) continue;
      const Real w = std::exp(static_cast<Real>(lse[s][r]) - total);
      for (int64_t c = 0; c < dim; ++c) acc[c] += w * static_cast<Real>(o[s][r * dim + c]);
    }
    for (int64_t c = 0; c < dim; ++c) out.o[static_cast<size_t>(r * dim + c)] = acc[c];
    out.lse[static_cast<size_t>(r)] = static_cast<double>(total);
  }
  return out;
}

TEST(MergeCpuTest, MatchesFp64WithinTheToleranceRuleIncludingEmptyRows) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rows = 301, dim = 72;
  for (int parts : {1, 2, 5}) {
    SCOPED_TRACE(::testing::Message() << parts << " partials");
    std::vector<std::vector<float>> o(parts), lse(parts);
    std::vector<PartialView> views;
    for (int s = 0; s < parts; ++s) {
      for (int64_t i = 0; i < rows * dim; ++i) o[s].push_back(normal(rng));
      for (int64_t r = 0; r < rows; ++r) {
        // Some partials saw no key of a row; row 0 is empty everywhere.
        const bool empty = r == 0 || (r + s) % 7 == 0;
        lse[s].push_back(empty ? -std::numeric_limits<float>::infinity() : 20.0f * normal(rng));
        if (empty) std::fill(o[s].begin() + r * dim, o[s].begin() + (r + 1) * dim, 0.0f);
      }
      views.push_back({o[s].data(), lse[s].data()});
    }
    testing::PoisonedOutputs out(1, rows, dim);
    ASSERT_TRUE(MergePartialsCpu(views, rows, dim, out.o.data(), out.lse.data(), 2).ok());
    const testing::AttentionValues fp64 = MergeIn<double>(o, lse, rows, dim);
    const testing::AttentionValues naive = MergeIn<float>(o, lse, rows, dim);
    testing::ExpectWithinTolerance(out.o.data(), fp64.o, naive.o, "o");
    testing::ExpectWithinTolerance(out.lse.data(), fp64.lse, naive.lse, "lse");
    EXPECT_EQ(out.lse[0], -std::numeric_limits<float>::infinity());
    for (int64_t c = 0; c < dim; ++c) EXPECT_EQ(out.o[c], 0.0f);
  }
}

TEST(MergeCpuTest, PlusInfinityOrNanLseIsAnError) {
  for (float bad : {std::numeric_limits<float>::infinity(), std::nanf("")}) {
    std::vector<float> o(4, 1.0f), lse = {0.0f, bad};
    std::vector<float> out_o(4), out_lse(2);
    const absl::Status s =
        MergePartialsCpu({{o.data(), lse.data()}}, 2, 2, out_o.data(), out_lse.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("row 1"));
  }
}

}  // namespace
}  // namespace dhsa
