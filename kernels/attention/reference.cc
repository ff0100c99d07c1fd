// Reference sparse attention: two passes over the selected keys of each row, in double.
#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kernels/attention/sparse_attention.h"

namespace dhsa {
namespace {

// q . k with the products summed in double; eight independent partial sums keep the loop short
// (and let the compiler use vector registers) without changing what is computed.
double Dot(const double* q, const float* k, int64_t d) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    for (int j = 0; j < 8; ++j) part[j] += q[c + j] * k[c + j];
  }
  for (; c < d; ++c) part[0] += q[c] * k[c];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Row (h, t) of `view` as float: in place for float32 storage, else converted into `buffer`.
const float* RowAsFloat(const HeadsView& view, int64_t h, int64_t t, float* buffer) {
  if (view.dtype == DType::kF32) return static_cast<const float*>(view.data) + view.Index(h, t);
  view.Row(h, t, buffer);
  return buffer;
}

void AttendRows(const SparseAttentionParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.q.dim;
  const int64_t group = p.q.heads / p.k.heads;
  const int64_t k_first = p.k.offset, k_last = p.k.offset + p.k.len;
  std::vector<float> qf(static_cast<size_t>(d)), buffer(static_cast<size_t>(d));
  std::vector<double> q(static_cast<size_t>(d)), scores, acc(static_cast<size_t>(d));
  std::vector<int64_t> keys;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t g = n / p.q.len, r = n % p.q.len;
    const int64_t h = g / group;
    const int64_t pos = p.q.offset + r;
    p.q.Row(g, r, qf.data());
    for (int64_t c = 0; c < d; ++c) q[c] = qf[c];
    keys.clear();
    for (const Span& s : p.selection->ForQuery(g, pos)) {
      for (int64_t t = std::max(s.begin, k_first); t < std::min({s.end, pos + 1, k_last}); ++t) {
        keys.push_back(t);
      }
    }
    float* o = p.o.Row(g, r);
    float* lse = p.lse.Row(g, r);
    if (keys.empty()) {
      std::fill(o, o + d, 0.0f);
      *lse = -std::numeric_limits<float>::infinity();
      continue;
    }
    // Pass 1: scores and their maximum. Pass 2: exp, normaliser and the weighted sum of values.
    scores.resize(keys.size());
    double max_score = -std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < keys.size(); ++i) {
      scores[i] = Dot(q.data(), RowAsFloat(p.k, h, keys[i] - k_first, buffer.data()), d) * p.scale;
      max_score = std::max(max_score, scores[i]);
    }
    double denom = 0.0;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (size_t i = 0; i < keys.size(); ++i) {
      const double w = std::exp(scores[i] - max_score);
      denom += w;
      const float* v = RowAsFloat(p.v, h, keys[i] - k_first, buffer.data());
      for (int64_t c = 0; c < d; ++c) acc[c] += w * v[c];
    }
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(acc[c] / denom);
    *lse = static_cast<float>(max_score + std::log(denom));
  }
}

}  // namespace

absl::Status SparseAttentionReference(const SparseAttentionParams& p) {
  if (p.selection == nullptr) return absl::InvalidArgumentError("no selection given");
  if (!(p.scale > 0.0f)) return absl::InvalidArgumentError("softmax scale must be positive");
  if (p.q.dim != p.k.dim || p.k.heads == 0 || p.q.heads % p.k.heads != 0 ||
      p.v.heads != p.k.heads || p.v.len != p.k.len || p.v.dim != p.k.dim ||
      p.v.offset != p.k.offset) {
    return absl::InvalidArgumentError("Q, K and V shapes do not fit together");
  }
  if (p.o.heads != p.q.heads || p.o.len != p.q.len || p.o.dim != p.q.dim ||
      p.lse.heads != p.q.heads || p.lse.len != p.q.len || p.lse.dim != 1) {
    return absl::InvalidArgumentError("output views do not match Q");
  }
  const int64_t rows = p.q.heads * p.q.len;
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.num_threads, rows)));
  if (threads == 1) {
    AttendRows(p, 0, rows);
    return absl::OkStatus();
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back(AttendRows, std::cref(p), rows * t / threads, rows * (t + 1) / threads);
  }
  for (std::thread& t : pool) t.join();
  return absl::OkStatus();
}

}  // namespace dhsa
