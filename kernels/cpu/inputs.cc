#include "kernels/cpu/inputs.h"

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vector_ops.h"

namespace dhsa {

absl::Status CheckFiniteCpu(const HeadsView& t, absl::string_view name, int num_threads,
                            int64_t first_row) {
  if (first_row >= t.len) return absl::OkStatus();
  std::vector<char> finite(static_cast<size_t>(t.heads), 1);
  cpu::ParallelFor(t.heads, num_threads, [&](int64_t h, int) {
    const char* rows =
        static_cast<const char*>(t.data) + t.Index(h, first_row) * DTypeSize(t.dtype);
    finite[static_cast<size_t>(h)] = cpu::AllFinite(rows, t.dtype, (t.len - first_row) * t.dim);
  });
  for (int64_t h = 0; h < t.heads; ++h) {
    if (finite[static_cast<size_t>(h)]) continue;
    for (int64_t i = first_row; i < t.len; ++i) {
      for (int64_t c = 0; c < t.dim; ++c) {
        const float x = t.At(h, i, c);
        if (!std::isfinite(x)) {
          return absl::InvalidArgumentError(absl::StrCat(name, " holds a non-finite value (", x,
                                                         ") at [", h, ", ", i, ", ", c, "]"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace dhsa
