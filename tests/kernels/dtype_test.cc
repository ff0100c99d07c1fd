#include "kernels/common/dtype.h"

#include <cmath>
#include <limits>
#include <random>

#include "gtest/gtest.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

TEST(DTypeTest, HalfRoundTripsEveryHalfValue) {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = HalfToFloat(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
    } else {
      EXPECT_EQ(FloatToHalf(f), h) << "bits " << bits;
    }
  }
}

TEST(DTypeTest, HalfRoundsToNearestEven) {
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f)), 1.0f);
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties go to the even mantissa (1.0).
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f + std::ldexp(1.0f, -11))), 1.0f);
  EXPECT_EQ(HalfToFloat(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11))),
            1.0f + std::ldexp(1.0f, -9));
  EXPECT_EQ(HalfToFloat(FloatToHalf(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(65520.0f))));
  EXPECT_EQ(HalfToFloat(FloatToHalf(std::ldexp(1.0f, -24))), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(FloatToHalf(std::ldexp(1.0f, -26))), 0.0f);
  EXPECT_EQ(HalfToFloat(FloatToHalf(-2.5f)), -2.5f);
}

TEST(DTypeTest, RandomFloatsRoundToTheNearestHalfAndBFloat16) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 100.0f);
  for (int i = 0; i < 100000; ++i) {
    const float x = normal(rng);
    const float h = HalfToFloat(FloatToHalf(x));
    // Relative error at most half an ulp of a 10-bit mantissa (normal range).
    if (std::abs(x) > 1e-4f) {
      EXPECT_LE(std::abs(h - x), std::abs(x) * std::ldexp(1.0f, -11) * 1.0001f);
    }
    const float b = BFloat16ToFloat(FloatToBFloat16(x));
    EXPECT_LE(std::abs(b - x), std::abs(x) * std::ldexp(1.0f, -8) * 1.0001f);
  }
}

TEST(DTypeTest, BFloat16SpecialValues) {
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(std::nanf("")))));
  EXPECT_TRUE(std::isinf(BFloat16ToFloat(FloatToBFloat16(std::numeric_limits<float>::infinity()))));
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(1.0f)), 1.0f);
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(-3.0f)), -3.0f);
}

TEST(DTypeTest, ParsesNames) {
  EXPECT_EQ(*ParseDType("bf16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("float16"), DType::kF16);
  EXPECT_EQ(*ParseDType("FP32"), DType::kF32);
  EXPECT_FALSE(ParseDType("int8").ok());
}

}  // namespace
}  // namespace dhsa
