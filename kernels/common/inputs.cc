#include "kernels/common/inputs.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace dhsa {

absl::StatusOr<AttentionShape> CheckShapes(const HeadsView& q, const HeadsView& k,
                                           const HeadsView& v) {
  auto shape = [](const HeadsView& t) { return ShapeString({t.heads, t.len, t.dim}); };
  if (q.heads <= 0 || q.len <= 0 || q.dim <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Q must be [Hq, Lq, d] with every size positive; got ", shape(q)));
  }
  if (k.heads <= 0 || k.len <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("K must be [Hkv, Lk, d] with every size positive; got ", shape(k)));
  }
  if (k.heads != v.heads || k.len != v.len || k.dim != v.dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("K and V must have the same shape; got K ", shape(k), " and V ", shape(v)));
  }
  if (q.dim != k.dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("Q and K must have the same head dim; got Q ", shape(q), " and K ", shape(k)));
  }
  if (q.heads % k.heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("query heads (", q.heads,
                                                   ") must be a multiple of KV heads (", k.heads,
                                                   ") for grouped-query attention"));
  }
  if (q.len > k.len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Q has more rows (", q.len, ") than K has keys (", k.len,
        "); the queries are the last Lq positions of the keys, so Lq <= Lk is required"));
  }
  AttentionShape s;
  s.hq = q.heads;
  s.hkv = k.heads;
  s.dim = q.dim;
  s.lq = q.len;
  s.lk = k.len;
  return s;
}

absl::Status CheckFinite(const HeadsView& t, absl::string_view name) {
  for (int64_t h = 0; h < t.heads; ++h) {
    for (int64_t i = 0; i < t.len; ++i) {
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
