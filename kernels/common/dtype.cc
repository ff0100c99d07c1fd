#include "kernels/common/dtype.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace dhsa {

size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "float32";
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
  }
  return "unknown";
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n == "float32" || n == "f32" || n == "fp32") return DType::kF32;
  if (n == "float16" || n == "f16" || n == "fp16" || n == "half") return DType::kF16;
  if (n == "bfloat16" || n == "bf16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", name, "'; expected float32, float16 or bfloat16"));
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN (quiet).
  if (abs >= 0x47800000u) return sign | 0x7c00u;  // >= 65536 (after rounding: inf).
  if (abs < 0x38800000u) {
    // Result is subnormal or zero: value = m * 2^-24 with m rounded to nearest even.
    if (abs < 0x33000000u) return sign;  // Below half the smallest subnormal: +-0.
    const uint32_t exp = abs >> 23;      // Biased float exponent, 102..112.
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24: mant >> shift gives units of 2^-24.
    uint32_t m = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (m & 1u))) ++m;
    return sign | static_cast<uint16_t>(m);
  }
  // Normal: rebias the exponent and round the mantissa from 23 to 10 bits.
  uint32_t h = ((abs >> 23) - 112u) << 10 | ((abs >> 13) & 0x3ffu);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // May carry into inf: correct.
  return sign | static_cast<uint16_t>(h);
}

uint16_t FloatToBFloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

void StoreFromFloat(void* data, DType dtype, size_t index, float value) {
  char* bytes = static_cast<char*>(data);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(bytes + 4 * index, &value, 4);
      return;
    case DType::kF16: {
      const uint16_t h = FloatToHalf(value);
      std::memcpy(bytes + 2 * index, &h, 2);
      return;
    }
    case DType::kBF16: {
      const uint16_t b = FloatToBFloat16(value);
      std::memcpy(bytes + 2 * index, &b, 2);
      return;
    }
  }
}

}  // namespace dhsa
