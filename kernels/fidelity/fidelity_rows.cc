#include "kernels/fidelity/fidelity_rows.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/fidelity/parallel.h"

namespace dhsa {
namespace {

// Row (h, t) of `view` as float: in place for float32 storage, else converted into `buffer`.
const float* RowAsFloat(const HeadsView& view, int64_t h, int64_t t, float* buffer) {
  if (view.dtype == DType::kF32) return static_cast<const float*>(view.data) + view.Index(h, t);
  view.Row(h, t, buffer);
  return buffer;
}

void QueryRow(const HeadsView& q, int64_t g, int64_t r, std::vector<float>& tmp,
              std::vector<double>& out) {
  q.Row(g, r, tmp.data());
  for (int64_t c = 0; c < q.dim; ++c) out[c] = tmp[c];
}

absl::Status CheckRows(const HeadsView& q, const HeadsView& k, const std::vector<int64_t>& rows) {
  if (k.offset != 0 || k.heads == 0 || q.heads % k.heads != 0 || q.dim != k.dim) {
    return absl::InvalidArgumentError("Q and K do not fit together (K must start at position 0)");
  }
  for (int64_t r : rows) {
    if (r < 0 || r >= q.len || q.offset + r >= k.offset + k.len) {
      return absl::InvalidArgumentError(
          absl::StrCat("row ", r, " is outside the queries [0, ", q.len, ") or past the keys"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DenseRows> DenseAttentionRows(const HeadsView& q, const HeadsView& k,
                                             const HeadsView& v, float scale,
                                             const std::vector<int64_t>& rows, int num_threads) {
  absl::Status ok = CheckRows(q, k, rows);
  if (!ok.ok()) return ok;
  if (v.heads != k.heads || v.len != k.len || v.dim != k.dim || v.offset != k.offset) {
    return absl::InvalidArgumentError("V does not match K");
  }
  DenseRows dense;
  dense.rows = rows;
  dense.heads = q.heads;
  dense.dim = q.dim;
  dense.scale = scale;
  const int64_t n_rows = static_cast<int64_t>(rows.size()), d = q.dim;
  const int64_t group = q.heads / k.heads;
  dense.o.assign(static_cast<size_t>(q.heads * n_rows * d), 0.0);
  dense.lse.assign(static_cast<size_t>(q.heads * n_rows), 0.0);
  ParallelFor(q.heads * n_rows, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(static_cast<size_t>(d)), buffer(static_cast<size_t>(d));
    std::vector<double> qd(static_cast<size_t>(d)), logits;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / n_rows, n = item % n_rows, h = g / group;
      const int64_t p = q.offset + rows[n];
      QueryRow(q, g, rows[n], tmp, qd);
      logits.resize(static_cast<size_t>(p + 1));
      double m = -INFINITY;
      for (int64_t t = 0; t <= p; ++t) {
        logits[t] = scale * DotDouble(qd.data(), RowAsFloat(k, h, t, buffer.data()), d);
        m = std::max(m, logits[t]);
      }
      double z = 0.0;
      double* o = dense.o.data() + item * d;
      for (int64_t t = 0; t <= p; ++t) {
        const double w = std::exp(logits[t] - m);
        z += w;
        const float* vr = RowAsFloat(v, h, t, buffer.data());
        for (int64_t c = 0; c < d; ++c) o[c] += w * vr[c];
      }
      for (int64_t c = 0; c < d; ++c) o[c] /= z;
      dense.lse[static_cast<size_t>(item)] = m + std::log(z);
    }
  });
  return dense;
}

absl::StatusOr<FidelityReport> MeasureFidelityRows(const HeadsView& q, const HeadsView& k,
                                                   const DenseRows& dense,
                                                   const Selection& selection,
                                                   const std::vector<float>& o_rows,
                                                   int num_threads) {
  absl::Status ok = CheckRows(q, k, dense.rows);
  if (!ok.ok()) return ok;
  const int64_t n_rows = static_cast<int64_t>(dense.rows.size()), d = q.dim;
  if (dense.heads != q.heads || dense.dim != d ||
      o_rows.size() != static_cast<size_t>(q.heads * n_rows * d)) {
    return absl::InvalidArgumentError(absl::StrCat("sparse output must be [Hq, rows, d] = [",
                                                   q.heads, ", ", n_rows, ", ", d,
                                                   "] and match the dense rows"));
  }
  const int64_t group = q.heads / k.heads;
  std::vector<double> recalls(static_cast<size_t>(q.heads * n_rows));
  std::vector<double> err2(recalls.size()), ref2(recalls.size());
  ParallelFor(q.heads * n_rows, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(static_cast<size_t>(d)), buffer(static_cast<size_t>(d));
    std::vector<double> qd(static_cast<size_t>(d));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / n_rows, n = item % n_rows, h = g / group;
      const int64_t p = q.offset + dense.rows[n];
      QueryRow(q, g, dense.rows[n], tmp, qd);
      const double lse = dense.Lse(g, n);
      double recall = 0.0;
      for (const Span& s : selection.ForQuery(g, p)) {
        for (int64_t t = std::max<int64_t>(s.begin, 0); t < std::min(s.end, p + 1); ++t) {
          recall += std::exp(
              dense.scale * DotDouble(qd.data(), RowAsFloat(k, h, t, buffer.data()), d) - lse);
        }
      }
      recalls[static_cast<size_t>(item)] = recall;
      const double* ref = dense.Output(g, n);
      const float* o = o_rows.data() + item * d;
      double e2 = 0.0, r2 = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        e2 += (o[c] - ref[c]) * (o[c] - ref[c]);
        r2 += ref[c] * ref[c];
      }
      err2[static_cast<size_t>(item)] = e2;
      ref2[static_cast<size_t>(item)] = r2;
    }
  });
  FidelityReport report;
  report.rows = static_cast<int64_t>(recalls.size());
  if (recalls.empty()) return report;
  for (int64_t g = 0; g < q.heads; ++g) {
    double e2 = 0.0, r2 = 0.0;
    for (int64_t n = 0; n < n_rows; ++n) {
      e2 += err2[static_cast<size_t>(g * n_rows + n)];
      r2 += ref2[static_cast<size_t>(g * n_rows + n)];
    }
    report.output_rel_error += r2 > 0 ? std::sqrt(e2 / r2) : std::sqrt(e2);
  }
  report.output_rel_error /= static_cast<double>(q.heads);
  for (double r : recalls) report.recall_mean += r;
  report.recall_mean /= static_cast<double>(recalls.size());
  std::sort(recalls.begin(), recalls.end());
  report.recall_p5 = recalls[static_cast<size_t>(0.05 * static_cast<double>(recalls.size() - 1))];
  return report;
}

}  // namespace dhsa
