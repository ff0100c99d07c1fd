// Reference merge, in double.
#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/merge/merge.h"

namespace dhsa {

absl::Status MergePartialsReference(const std::vector<PartialView>& parts, int64_t rows,
                                    int64_t dim, float* o, float* lse) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  std::vector<double> acc(static_cast<size_t>(dim));
  for (int64_t r = 0; r < rows; ++r) {
    double m = kNegInf;
    for (size_t s = 0; s < parts.size(); ++s) {
      const float l = parts[s].lse[r];
      if (std::isnan(l) || l == std::numeric_limits<float>::infinity()) {
        return absl::InvalidArgumentError(absl::StrCat("partial ", s, " has lse ", l, " at row ", r,
                                                       "; expected finite or -inf"));
      }
      m = std::max(m, static_cast<double>(l));
    }
    float* out = o + r * dim;
    if (m == kNegInf) {
      std::fill(out, out + dim, 0.0f);
      lse[r] = -std::numeric_limits<float>::infinity();
      continue;
    }
    double sum = 0.0;
    for (const PartialView& part : parts) sum += std::exp(part.lse[r] - m);
    const double total = m + std::log(sum);
    std::fill(acc.begin(), acc.end(), 0.0);
    for (const PartialView& part : parts) {
      if (part.lse[r] == -std::numeric_limits<float>::infinity()) continue;
      const double w = std::exp(part.lse[r] - total);
      const float* po = part.o + r * dim;
      for (int64_t c = 0; c < dim; ++c) acc[c] += w * po[c];
    }
    for (int64_t c = 0; c < dim; ++c) out[c] = static_cast<float>(acc[c]);
    lse[r] = static_cast<float>(total);
  }
  return absl::OkStatus();
}

}  // namespace dhsa
