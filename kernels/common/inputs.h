// Validation of one layer call's Q, K, V (spec/DHSA.md "Shapes and names"), done once at the edge.
#ifndef DHSA_KERNELS_COMMON_INPUTS_H_
#define DHSA_KERNELS_COMMON_INPUTS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/common/tensor.h"

namespace dhsa {

// Shapes of one call: Q [hq, lq, d], K and V [hkv, lk, d]; queries are positions [t0, lk).
struct AttentionShape {
  int64_t hq = 0;
  int64_t hkv = 0;
  int64_t dim = 0;
  int64_t lq = 0;
  int64_t lk = 0;
  int64_t group() const { return hq / hkv; }  // G: query heads per KV head.
  int64_t t0() const { return lk - lq; }      // Absolute position of the first query.
};

// Checks shapes (3-D, hq % hkv == 0, same d, K and V alike, 1 <= lq <= lk) and returns them.
absl::StatusOr<AttentionShape> CheckShapes(const HeadsView& q, const HeadsView& k,
                                           const HeadsView& v);

// InvalidArgument naming the tensor and element if any element is NaN or infinite.
absl::Status CheckFinite(const HeadsView& t, absl::string_view name);

}  // namespace dhsa

#endif  // DHSA_KERNELS_COMMON_INPUTS_H_
