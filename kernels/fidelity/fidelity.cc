#include "kernels/fidelity/fidelity.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace dhsa {

std::vector<int64_t> SpreadRows(int64_t lq, int64_t count) {
  std::vector<int64_t> rows;
  if (lq <= 0 || count <= 0) return rows;
  count = std::min(count, lq);
  for (int64_t n = 1; n <= count; ++n) rows.push_back(n * lq / count - 1);
  return rows;
}

absl::StatusOr<FidelityReport> MeasureFidelity(const HeadsView& q, const HeadsView& k,
                                               const HeadsView& v, const Selection& selection,
                                               const Tensor& o, float scale,
                                               const std::vector<int64_t>& rows) {
  if (o.shape != std::vector<int64_t>{q.heads, q.len, q.dim} || o.dtype != DType::kF32) {
    return absl::InvalidArgumentError("output to judge must be float32 [Hq, Lq, d]");
  }
  const int64_t d = q.dim, group = q.heads / k.heads;
  std::vector<float> qrow(static_cast<size_t>(d)), krow(static_cast<size_t>(d));
  std::vector<double> weights, dense(static_cast<size_t>(d));
  std::vector<double> recalls;
  std::vector<double> err2(static_cast<size_t>(q.heads), 0.0),
      ref2(static_cast<size_t>(q.heads), 0.0);
  for (int64_t g = 0; g < q.heads; ++g) {
    const int64_t h = g / group;
    for (int64_t r : rows) {
      if (r < 0 || r >= q.len)
        return absl::InvalidArgumentError(absl::StrCat("row ", r, " out of range"));
      const int64_t p = q.offset + r;
      q.Row(g, r, qrow.data());
      weights.assign(static_cast<size_t>(p + 1), 0.0);
      double m = -INFINITY;
      for (int64_t t = 0; t <= p; ++t) {
        k.Row(h, t, krow.data());
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += static_cast<double>(qrow[c]) * krow[c];
        weights[t] = dot * scale;
        m = std::max(m, weights[t]);
      }
      double z = 0;
      for (double& w : weights) z += (w = std::exp(w - m));
      std::fill(dense.begin(), dense.end(), 0.0);
      for (int64_t t = 0; t <= p; ++t) {
        v.Row(h, t, krow.data());
        for (int64_t c = 0; c < d; ++c) dense[c] += weights[t] / z * krow[c];
      }
      double recall = 0;
      for (const Span& s : selection.ForQuery(g, p)) {
        for (int64_t t = s.begin; t < std::min(s.end, p + 1); ++t) recall += weights[t] / z;
      }
      recalls.push_back(recall);
      for (int64_t c = 0; c < d; ++c) {
        const double diff = o.Get((g * q.len + r) * d + c) - dense[c];
        err2[g] += diff * diff;
        ref2[g] += dense[c] * dense[c];
      }
    }
  }
  FidelityReport report;
  report.rows = static_cast<int64_t>(recalls.size());
  if (recalls.empty()) return report;
  for (double r : recalls) report.recall_mean += r;
  report.recall_mean /= static_cast<double>(recalls.size());
  std::sort(recalls.begin(), recalls.end());
  report.recall_p5 = recalls[static_cast<size_t>(0.05 * static_cast<double>(recalls.size() - 1))];
  for (int64_t g = 0; g < q.heads; ++g) {
    report.output_rel_error += ref2[g] > 0 ? std::sqrt(err2[g] / ref2[g]) : std::sqrt(err2[g]);
  }
  report.output_rel_error /= static_cast<double>(q.heads);
  return report;
}

}  // namespace dhsa
