// Storage element types and scalar conversions between them and float.
#ifndef DHSA_KERNELS_COMMON_DTYPE_H_
#define DHSA_KERNELS_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dhsa {

// Element type of a stored tensor. Accumulation is always fp32 or wider.
enum class DType { kF32, kF16, kBF16 };

// Bytes per element.
size_t DTypeSize(DType dtype);

// Lower-case name: "float32", "float16", "bfloat16".
absl::string_view DTypeName(DType dtype);

// Parses "float32"/"f32"/"fp32", "float16"/"f16"/"fp16"/"half", "bfloat16"/"bf16".
absl::StatusOr<DType> ParseDType(absl::string_view name);

// IEEE binary16 bits -> float (exact).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // Subnormal: value = mant * 2^-24.
      float f = static_cast<float>(mant) * (1.0f / 16777216.0f);
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// float -> IEEE binary16 bits, round to nearest even; overflow gives inf, NaN stays NaN.
uint16_t FloatToHalf(float f);

// bfloat16 bits -> float (exact).
inline float BFloat16ToFloat(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// float -> bfloat16 bits, round to nearest even; NaN stays NaN.
uint16_t FloatToBFloat16(float f);

// Reads element `index` of a buffer of `dtype` as float.
inline float LoadAsFloat(const void* data, DType dtype, size_t index) {
  switch (dtype) {
    case DType::kF32: {
      float v;
      std::memcpy(&v, static_cast<const char*>(data) + 4 * index, 4);
      return v;
    }
    case DType::kF16: {
      uint16_t v;
      std::memcpy(&v, static_cast<const char*>(data) + 2 * index, 2);
      return HalfToFloat(v);
    }
    case DType::kBF16: {
      uint16_t v;
      std::memcpy(&v, static_cast<const char*>(data) + 2 * index, 2);
      return BFloat16ToFloat(v);
    }
  }
  return 0.0f;
}

// Writes `value` rounded to `dtype` into element `index` of a buffer.
void StoreFromFloat(void* data, DType dtype, size_t index, float value);

}  // namespace dhsa

#endif  // DHSA_KERNELS_COMMON_DTYPE_H_
