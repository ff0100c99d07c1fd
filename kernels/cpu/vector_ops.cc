// Highway implementations of vector_ops.h. This file is compiled once per SIMD target through
// hwy/foreach_target.h; the HWY_ONCE part at the end holds the dispatching entry points.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/vector_ops.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Highway must come after foreach_target.h.
#include <cstring>

#include "hwy/highway.h"
#include "kernels/cpu/vector_ops.h"

HWY_BEFORE_NAMESPACE();
namespace dhsa::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void ToFloatImpl(const void* src, DType dtype, int64_t n, float* HWY_RESTRICT dst) {
  const hn::ScalableTag<float> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kBF16: {
      const hn::Rebind<hwy::bfloat16_t, decltype(df)> dh;
      const auto* p = static_cast<const hwy::bfloat16_t*>(src);
      for (; i + lanes <= n; i += lanes)
        hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, p + i)), df, dst + i);
      break;
    }
    case DType::kF16: {
      const hn::Rebind<hwy::float16_t, decltype(df)> dh;
      const auto* p = static_cast<const hwy::float16_t*>(src);
      for (; i + lanes <= n; i += lanes)
        hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, p + i)), df, dst + i);
      break;
    }
  }
  for (; i < n; ++i) dst[i] = LoadAsFloat(src, dtype, static_cast<size_t>(i));
}

void AccumulateF64Impl(const float* HWY_RESTRICT x, int64_t n, double* HWY_RESTRICT acc) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(dd));
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::Add(hn::LoadU(dd, acc + i), hn::PromoteTo(dd, hn::LoadU(df, x + i))), dd,
               acc + i);
  }
  for (; i < n; ++i) acc[i] += static_cast<double>(x[i]);
}

void AccumulateScaledF64Impl(const float* HWY_RESTRICT x, double scale, int64_t n,
                             double* HWY_RESTRICT acc) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(dd));
  const auto vs = hn::Set(dd, scale);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto product = hn::Mul(hn::PromoteTo(dd, hn::LoadU(df, x + i)), vs);
    hn::StoreU(hn::Add(hn::LoadU(dd, acc + i), product), dd, acc + i);
  }
  for (; i < n; ++i) acc[i] += static_cast<double>(x[i]) * scale;
}

double SumSquaresF64Impl(const float* HWY_RESTRICT x, int64_t n) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(dd));
  auto sum = hn::Zero(dd);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto v = hn::PromoteTo(dd, hn::LoadU(df, x + i));
    sum = hn::MulAdd(v, v, sum);
  }
  double total = hn::GetLane(hn::SumOfLanes(dd, sum));
  for (; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
  return total;
}

double DotF64Impl(const double* HWY_RESTRICT a, const double* HWY_RESTRICT b, int64_t n) {
  const hn::ScalableTag<double> dd;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(dd));
  auto sum0 = hn::Zero(dd), sum1 = hn::Zero(dd);
  int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    sum0 = hn::MulAdd(hn::LoadU(dd, a + i), hn::LoadU(dd, b + i), sum0);
    sum1 = hn::MulAdd(hn::LoadU(dd, a + i + lanes), hn::LoadU(dd, b + i + lanes), sum1);
  }
  for (; i + lanes <= n; i += lanes)
    sum0 = hn::MulAdd(hn::LoadU(dd, a + i), hn::LoadU(dd, b + i), sum0);
  double total = hn::GetLane(hn::SumOfLanes(dd, hn::Add(sum0, sum1)));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

double DotF32InF64Impl(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, int64_t n) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(dd));
  auto sum0 = hn::Zero(dd), sum1 = hn::Zero(dd);
  int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    sum0 = hn::MulAdd(hn::PromoteTo(dd, hn::LoadU(df, a + i)),
                      hn::PromoteTo(dd, hn::LoadU(df, b + i)), sum0);
    sum1 = hn::MulAdd(hn::PromoteTo(dd, hn::LoadU(df, a + i + lanes)),
                      hn::PromoteTo(dd, hn::LoadU(df, b + i + lanes)), sum1);
  }
  for (; i + lanes <= n; i += lanes) {
    sum0 = hn::MulAdd(hn::PromoteTo(dd, hn::LoadU(df, a + i)),
                      hn::PromoteTo(dd, hn::LoadU(df, b + i)), sum0);
  }
  double total = hn::GetLane(hn::SumOfLanes(dd, hn::Add(sum0, sum1)));
  for (; i < n; ++i) total += static_cast<double>(a[i]) * b[i];
  return total;
}

void RowDotsF32InF64Impl(const float* HWY_RESTRICT x, const float* HWY_RESTRICT rows, int64_t count,
                         int64_t dim, double* HWY_RESTRICT out) {
  for (int64_t j = 0; j < count; ++j) out[j] = DotF32InF64Impl(x, rows + j * dim, dim);
}

void ScaleF32Impl(const float* HWY_RESTRICT x, float w, int64_t n, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const auto vw = hn::Set(df, w);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) hn::StoreU(hn::Mul(hn::LoadU(df, x + i), vw), df, out + i);
  for (; i < n; ++i) out[i] = x[i] * w;
}

void AxpyF32Impl(const float* HWY_RESTRICT x, float w, int64_t n, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const auto vw = hn::Set(df, w);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::MulAdd(hn::LoadU(df, x + i), vw, hn::LoadU(df, out + i)), df, out + i);
  }
  for (; i < n; ++i) out[i] += x[i] * w;
}

// An element is not finite when its exponent bits are all ones.
template <typename T>
bool ExponentNeverFull(const T* HWY_RESTRICT bits, int64_t n, T exponent) {
  const hn::ScalableTag<T> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const auto mask = hn::Set(d, exponent);
  int64_t i = 0;
  for (; i + 4 * lanes <= n; i += 4 * lanes) {
    const auto e0 = hn::And(hn::LoadU(d, bits + i), mask);
    const auto e1 = hn::And(hn::LoadU(d, bits + i + lanes), mask);
    const auto e2 = hn::And(hn::LoadU(d, bits + i + 2 * lanes), mask);
    const auto e3 = hn::And(hn::LoadU(d, bits + i + 3 * lanes), mask);
    const auto full = hn::Or(hn::Or(hn::Eq(e0, mask), hn::Eq(e1, mask)),
                             hn::Or(hn::Eq(e2, mask), hn::Eq(e3, mask)));
    if (!hn::AllFalse(d, full)) return false;
  }
  for (; i < n; ++i) {
    if ((bits[i] & exponent) == exponent) return false;
  }
  return true;
}

bool AllFiniteImpl(const void* data, DType dtype, int64_t n) {
  switch (dtype) {
    case DType::kF32:
      return ExponentNeverFull(static_cast<const uint32_t*>(data), n, uint32_t{0x7f800000u});
    case DType::kF16:
      return ExponentNeverFull(static_cast<const uint16_t*>(data), n, uint16_t{0x7c00u});
    case DType::kBF16:
      return ExponentNeverFull(static_cast<const uint16_t*>(data), n, uint16_t{0x7f80u});
  }
  return true;
}

const char* SimdTargetNameImpl() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace dhsa::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace dhsa::cpu {

HWY_EXPORT(ToFloatImpl);
HWY_EXPORT(AccumulateF64Impl);
HWY_EXPORT(AccumulateScaledF64Impl);
HWY_EXPORT(SumSquaresF64Impl);
HWY_EXPORT(DotF64Impl);
HWY_EXPORT(DotF32InF64Impl);
HWY_EXPORT(RowDotsF32InF64Impl);
HWY_EXPORT(ScaleF32Impl);
HWY_EXPORT(AxpyF32Impl);
HWY_EXPORT(AllFiniteImpl);
HWY_EXPORT(SimdTargetNameImpl);

void ToFloat(const void* src, DType dtype, int64_t n, float* dst) {
  HWY_DYNAMIC_DISPATCH(ToFloatImpl)(src, dtype, n, dst);
}
void AccumulateF64(const float* x, int64_t n, double* acc) {
  HWY_DYNAMIC_DISPATCH(AccumulateF64Impl)(x, n, acc);
}
void AccumulateScaledF64(const float* x, double scale, int64_t n, double* acc) {
  HWY_DYNAMIC_DISPATCH(AccumulateScaledF64Impl)(x, scale, n, acc);
}
double SumSquaresF64(const float* x, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(SumSquaresF64Impl)(x, n);
}
double DotF64(const double* a, const double* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotF64Impl)(a, b, n);
}
double DotF32InF64(const float* a, const float* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotF32InF64Impl)(a, b, n);
}

void RowDotsF32InF64(const float* x, const float* rows, int64_t count, int64_t dim, double* out) {
  HWY_DYNAMIC_DISPATCH(RowDotsF32InF64Impl)(x, rows, count, dim, out);
}

void ScaleF32(const float* x, float w, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(ScaleF32Impl)(x, w, n, out);
}
void AxpyF32(const float* x, float w, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(AxpyF32Impl)(x, w, n, out);
}

bool AllFinite(const void* data, DType dtype, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(AllFiniteImpl)(data, dtype, n);
}

const char* SimdTargetName() { return HWY_DYNAMIC_DISPATCH(SimdTargetNameImpl)(); }

}  // namespace dhsa::cpu
#endif  // HWY_ONCE
