#include "kernels/cpu/boundaries.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "kernels/boundaries/boundaries.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

// The gap dissimilarity computed naively in fp32 (the tolerance rule's yardstick).
std::vector<double> NaiveGapDissimilarityF32(const HeadsView& k, int64_t begin, int64_t end,
                                             int64_t window) {
  std::vector<double> delta;
  const int64_t f = k.heads * k.dim;
  for (int64_t t = begin + 1; t < end; ++t) {
    std::vector<float> left(static_cast<size_t>(f), 0.0f), right(left.size(), 0.0f);
    auto add = [&](int64_t s, std::vector<float>& acc) {
      for (int64_t h = 0; h < k.heads; ++h) {
        float n2 = 0;
        for (int64_t c = 0; c < k.dim; ++c)
          n2 += k.At(h, s - k.offset, c) * k.At(h, s - k.offset, c);
        if (n2 == 0) continue;
        for (int64_t c = 0; c < k.dim; ++c)
          acc[h * k.dim + c] += k.At(h, s - k.offset, c) / std::sqrt(n2);
      }
    };
    for (int64_t s = std::max(begin, t - window); s < t; ++s) add(s, left);
    for (int64_t s = t; s < std::min(end, t + window); ++s) add(s, right);
    float dot = 0, nl = 0, nr = 0;
    for (int64_t i = 0; i < f; ++i) {
      dot += left[i] * right[i];
      nl += left[i] * left[i];
      nr += right[i] * right[i];
    }
    delta.push_back(nl == 0 || nr == 0 ? 0.0 : 1.0 - dot / std::sqrt(nl * nr));
  }
  return delta;
}

struct Case {
  int64_t hkv, lk, d;
  DType dtype;
  bool structured;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << "Hkv " << c.hkv << " Lk " << c.lk << " d " << c.d << " " << DTypeName(c.dtype);
}

class BoundariesCpuTest : public ::testing::TestWithParam<Case> {};

TEST_P(BoundariesCpuTest, DissimilarityMatchesAndBoundariesEqualTheReference) {
  const Case c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor k = (c.structured ? testing::SegmentedTensor(rng, c.hkv, c.lk, c.d)
                                 : testing::RandomTensor(rng, c.hkv, c.lk, c.d))
                       .ConvertTo(c.dtype);
  const HeadsView kv = *HeadsView::Of(k, "k");

  const std::vector<double> want = GapDissimilarityReference(kv, 0, c.lk, 4);
  const std::vector<double> got = GapDissimilarityCpu(kv, 0, c.lk, 4, 2);
  const std::vector<double> naive = NaiveGapDissimilarityF32(kv, 0, c.lk, 4);
  ASSERT_EQ(got.size(), want.size());
  double error = 0, naive_error = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    error = std::max(error, std::abs(got[i] - want[i]));
    naive_error = std::max(naive_error, std::abs(naive[i] - want[i]));
  }
  EXPECT_LE(error, 2 * naive_error);
  EXPECT_LE(error, 1e-12) << "double throughout: only the reduction order differs";

  DhsaConfig config;
  for (int64_t mean : {8, 32}) {
    config.chunk_mean = mean;
    config.chunk_min = mean / 4;
    config.chunk_max = 4 * mean;
    for (int64_t begin : {int64_t{0}, c.lk / 3}) {
      SCOPED_TRACE(::testing::Message() << "chunk_mean " << mean << " begin " << begin);
      EXPECT_EQ(*SegmentKeysCpu(kv, begin, c.lk, config, 2),
                *SegmentKeysReference(kv, begin, c.lk, config));
    }
  }
  config.boundary_mode = BoundaryMode::kFixed;
  EXPECT_EQ(*SegmentKeysCpu(kv, 5, c.lk, config), *SegmentKeysReference(kv, 5, c.lk, config));
}

INSTANTIATE_TEST_SUITE_P(OddSizes, BoundariesCpuTest,
                         ::testing::Values(Case{2, 97, 128, DType::kF32, true},
                                           Case{1, 1025, 64, DType::kF16, true},
                                           Case{4, 4099, 32, DType::kBF16, true},
                                           Case{2, 1025, 72, DType::kF32, false}));

TEST(BoundariesCpuTest, ZeroKeysTieEverywhereAndFallBackToPositionOrder) {
  const Tensor k = Tensor::Zeros(DType::kF32, {2, 300, 16});
  const HeadsView kv = *HeadsView::Of(k, "k");
  DhsaConfig config;
  EXPECT_EQ(*SegmentKeysCpu(kv, 0, 300, config), *SegmentKeysReference(kv, 0, 300, config));
}

TEST(BoundariesCpuTest, KeysHeldAsAStripeWithAnOffset) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor k = testing::SegmentedTensor(rng, 2, 600, 32);
  HeadsView kv = *HeadsView::Of(k, "k");
  kv.offset = 1000;  // These rows are positions [1000, 1600).
  DhsaConfig config;
  EXPECT_EQ(*SegmentKeysCpu(kv, 1100, 1600, config), *SegmentKeysReference(kv, 1100, 1600, config));
  const auto outside = SegmentKeysCpu(kv, 900, 1600, config);
  EXPECT_EQ(outside.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(outside.status().message(),
            SegmentKeysReference(kv, 900, 1600, config).status().message());
}

TEST(BoundariesCpuTest, PrefillAndDecodeAppendsEqualTheReference) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor k = testing::SegmentedTensor(rng, 2, 1400, 32);
  const HeadsView kv = *HeadsView::Of(k, "k");
  DhsaConfig config;
  config.chunk_max = 40;  // The decode tail is segmented every few dozen steps.
  std::vector<int64_t> got = *AppendPrefillBoundariesCpu(kv, {0}, 700, config);
  std::vector<int64_t> want = *AppendPrefillBoundariesReference(kv, {0}, 700, config);
  ASSERT_EQ(got, want);
  got = *AppendPrefillBoundariesCpu(kv, got, 1200, config, 2);
  want = *AppendPrefillBoundariesReference(kv, want, 1200, config);
  ASSERT_EQ(got, want);
  for (int64_t end = 1201; end <= 1400; ++end) {
    got = *AppendDecodeBoundariesCpu(kv, got, end, config);
    want = *AppendDecodeBoundariesReference(kv, want, end, config);
    ASSERT_EQ(got, want) << "decode to " << end;
  }
  EXPECT_EQ(AppendDecodeBoundariesCpu(kv, got, 1400, config).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dhsa
