#include "kernels/cpu/merge.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vector_ops.h"

namespace dhsa {

absl::Status MergePartialsCpu(const std::vector<PartialView>& parts, int64_t rows, int64_t dim,
                              float* o, float* lse, int num_threads) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (size_t s = 0; s < parts.size(); ++s) {
    for (int64_t r = 0; r < rows; ++r) {
      const float l = parts[s].lse[r];
      if (std::isnan(l) || l == kInf) {
        return absl::InvalidArgumentError(absl::StrCat("partial ", s, " has lse ", l, " at row ", r,
                                                       "; expected finite or -inf"));
      }
    }
  }
  cpu::ParallelForRanges(rows, num_threads, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      float* out = o + r * dim;
      double m = -kInf;
      for (const PartialView& part : parts) m = std::max(m, static_cast<double>(part.lse[r]));
      if (m == -kInf) {
        std::fill(out, out + dim, 0.0f);
        lse[r] = -kInf;
        continue;
      }
      double sum = 0.0;
      for (const PartialView& part : parts) sum += std::exp(part.lse[r] - m);
      const double total = m + std::log(sum);
      bool first = true;
      for (const PartialView& part : parts) {
        if (part.lse[r] == -kInf) continue;  // Such a partial saw no key; its o is not read.
        const float w = static_cast<float>(std::exp(part.lse[r] - total));
        if (first) {
          cpu::ScaleF32(part.o + r * dim, w, dim, out);
        } else {
          cpu::AxpyF32(part.o + r * dim, w, dim, out);
        }
        first = false;
      }
      lse[r] = static_cast<float>(total);
    }
  });
  return absl::OkStatus();
}

}  // namespace dhsa
