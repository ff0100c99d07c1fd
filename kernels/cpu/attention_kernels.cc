// Highway implementations of attention_kernels.h, compiled once per SIMD target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/attention_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Highway must come after foreach_target.h.
#include <algorithm>
#include <cmath>
#include <limits>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/cpu/attention_kernels.h"

HWY_BEFORE_NAMESPACE();
namespace dhsa::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void SoftmaxStepImpl(float* HWY_RESTRICT s, int64_t rows, int64_t lds, int64_t width,
                     float* HWY_RESTRICT m, float* HWY_RESTRICT l, float* HWY_RESTRICT o,
                     int64_t ldo, int64_t d) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const hn::ScalableTag<float> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    auto vmax = hn::Set(df, kNegInf);
    for (int64_t j = 0; j < width; j += lanes) vmax = hn::Max(vmax, hn::LoadU(df, row + j));
    const float old_max = m[r];
    const float new_max = std::max(old_max, hn::GetLane(hn::MaxOfLanes(df, vmax)));
    // A row with no key so far: -inf stays, and every exp below is exp(-inf) = 0.
    const float shift = new_max == kNegInf ? 0.0f : new_max;
    const auto vshift = hn::Set(df, shift);
    auto vsum = hn::Zero(df);
    for (int64_t j = 0; j < width; j += lanes) {
      const auto p = hn::Exp(df, hn::Sub(hn::LoadU(df, row + j), vshift));
      hn::StoreU(p, df, row + j);
      vsum = hn::Add(vsum, p);
    }
    const float sum = hn::GetLane(hn::SumOfLanes(df, vsum));
    if (old_max == new_max) {  // Includes a row still without keys: nothing to rescale.
      l[r] += sum;
      continue;
    }
    const float alpha = old_max == kNegInf ? 0.0f : std::exp(old_max - new_max);
    l[r] = l[r] * alpha + sum;
    m[r] = new_max;
    float* orow = o + r * ldo;
    const auto valpha = hn::Set(df, alpha);
    int64_t c = 0;
    for (; c + lanes <= d; c += lanes)
      hn::StoreU(hn::Mul(hn::LoadU(df, orow + c), valpha), df, orow + c);
    for (; c < d; ++c) orow[c] *= alpha;
  }
}

void NormaliseRowImpl(const float* HWY_RESTRICT acc, float l, int64_t d, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const auto vl = hn::Set(df, l);
  int64_t c = 0;
  for (; c + lanes <= d; c += lanes) hn::StoreU(hn::Div(hn::LoadU(df, acc + c), vl), df, out + c);
  for (; c < d; ++c) out[c] = acc[c] / l;
}

}  // namespace HWY_NAMESPACE
}  // namespace dhsa::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace dhsa::cpu {

HWY_EXPORT(SoftmaxStepImpl);
HWY_EXPORT(NormaliseRowImpl);

void SoftmaxStep(float* s, int64_t rows, int64_t lds, int64_t width, float* m, float* l, float* o,
                 int64_t ldo, int64_t d) {
  HWY_DYNAMIC_DISPATCH(SoftmaxStepImpl)(s, rows, lds, width, m, l, o, ldo, d);
}

void NormaliseRow(const float* acc, float l, int64_t d, float* out) {
  HWY_DYNAMIC_DISPATCH(NormaliseRowImpl)(acc, l, d, out);
}

}  // namespace dhsa::cpu
#endif  // HWY_ONCE
