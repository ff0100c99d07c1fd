#include "kernels/fidelity/oracle_rows.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/fidelity/parallel.h"

namespace dhsa {

absl::StatusOr<Selection> SelectOracleTopkRowsReference(const HeadsView& q, const HeadsView& k,
                                                        const DhsaConfig& config,
                                                        const std::vector<int64_t>& rows,
                                                        int num_threads) {
  if (config.budget <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("budget must be positive; got ", config.budget));
  }
  if (k.offset != 0 || k.heads == 0 || q.heads % k.heads != 0 || q.dim != k.dim) {
    return absl::InvalidArgumentError("Q and K do not fit together (K must start at position 0)");
  }
  for (int64_t r : rows) {
    if (r < 0 || r >= q.len || q.offset + r >= k.len) {
      return absl::InvalidArgumentError(
          absl::StrCat("row ", r, " is outside the queries [0, ", q.len, ") or past the keys"));
    }
  }
  Selection sel;
  sel.unit = SelectionUnit::kQueryHeadRow;
  sel.block_size = 1;
  sel.first_block = q.offset;
  sel.num_blocks = q.len;
  sel.num_heads = q.heads;
  sel.group = q.heads / k.heads;
  sel.spans.resize(static_cast<size_t>(sel.num_heads * sel.num_blocks));
  const int64_t n_rows = static_cast<int64_t>(rows.size()), d = q.dim;
  ParallelFor(q.heads * n_rows, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> qrow(static_cast<size_t>(d)), krow(static_cast<size_t>(d));
    std::vector<double> qd(static_cast<size_t>(d));
    std::vector<std::pair<double, int64_t>> scored;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / n_rows, r = rows[item % n_rows], h = g / sel.group;
      const int64_t p = q.offset + r;
      std::vector<Span>& out = sel.At(g, r);
      if (p + 1 <= config.budget) {
        out = {{0, p + 1}};
        continue;
      }
      q.Row(g, r, qrow.data());
      for (int64_t c = 0; c < d; ++c) qd[c] = qrow[c];
      scored.clear();
      for (int64_t t = 0; t <= p; ++t) {
        k.Row(h, t, krow.data());
        // Ascending (-score, position): highest score first, ties to the lower position.
        scored.push_back({-DotDouble(qd.data(), krow.data(), d), t});
      }
      std::nth_element(scored.begin(), scored.begin() + config.budget, scored.end());
      std::vector<Span> spans;
      spans.reserve(static_cast<size_t>(config.budget));
      for (int64_t n = 0; n < config.budget; ++n) {
        spans.push_back({scored[n].second, scored[n].second + 1});
      }
      out = NormaliseSpans(std::move(spans));
    }
  });
  return sel;
}

int64_t OracleComputedPairs(int64_t hq, int64_t t0, int64_t lk, int64_t budget) {
  // Positions p with p + 1 <= budget contribute p + 1; the rest contribute budget.
  int64_t pairs = 0;
  const int64_t dense_end = std::min(lk, std::max(t0, budget));  // Rows [t0, dense_end) are dense.
  pairs += dense_end * (dense_end + 1) / 2 - t0 * (t0 + 1) / 2;
  pairs += (lk - dense_end) * budget;
  return hq * pairs;
}

}  // namespace dhsa
