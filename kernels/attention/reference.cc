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

// The run holding position `t`, or runs.size() when no run does (runs sorted, disjoint).
size_t RunHolding(const std::vector<KvRun>& runs, int64_t t) {
  const auto it = std::upper_bound(runs.begin(), runs.end(), t, [](int64_t pos, const KvRun& r) {
    return pos < r.k.offset + r.k.len;
  });
  if (it == runs.end() || it->k.offset > t) return runs.size();
  return static_cast<size_t>(it - runs.begin());
}

// A selected key: its run and its row there.
struct KeyAt {
  size_t run;
  int64_t row;
};

void AttendRows(const SparseAttentionParams& p, const std::vector<KvRun>& runs, int64_t begin,
                int64_t end) {
  const int64_t d = p.q.dim;
  const int64_t group = p.q.heads / p.k.heads;
  std::vector<float> qf(static_cast<size_t>(d)), buffer(static_cast<size_t>(d));
  std::vector<double> q(static_cast<size_t>(d)), scores, acc(static_cast<size_t>(d));
  std::vector<KeyAt> keys;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t g = n / p.q.len, r = n % p.q.len;
    const int64_t h = g / group;
    const int64_t pos = p.q.offset + r;
    p.q.Row(g, r, qf.data());
    for (int64_t c = 0; c < d; ++c) q[c] = qf[c];
    keys.clear();
    for (const Span& s : p.selection->ForQuery(g, pos)) {
      for (int64_t t = s.begin; t < std::min(s.end, pos + 1); ++t) {
        const size_t run = RunHolding(runs, t);
        if (run < runs.size()) keys.push_back({run, t - runs[run].k.offset});
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
      const HeadsView& k = runs[keys[i].run].k;
      scores[i] = Dot(q.data(), RowAsFloat(k, h, keys[i].row, buffer.data()), d) * p.scale;
      max_score = std::max(max_score, scores[i]);
    }
    double denom = 0.0;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (size_t i = 0; i < keys.size(); ++i) {
      const double w = std::exp(scores[i] - max_score);
      denom += w;
      const float* v = RowAsFloat(runs[keys[i].run].v, h, keys[i].row, buffer.data());
      for (int64_t c = 0; c < d; ++c) acc[c] += w * v[c];
    }
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(acc[c] / denom);
    *lse = static_cast<float>(max_score + std::log(denom));
  }
}

}  // namespace

absl::StatusOr<std::vector<KvRun>> KeyRuns(const SparseAttentionParams& p) {
  if (p.q.dim != p.k.dim || p.k.heads == 0 || p.q.heads % p.k.heads != 0 ||
      p.v.heads != p.k.heads || p.v.len != p.k.len || p.v.dim != p.k.dim ||
      p.v.offset != p.k.offset) {
    return absl::InvalidArgumentError("Q, K and V shapes do not fit together");
  }
  std::vector<KvRun> runs;
  runs.reserve(1 + p.more_kv.size());
  runs.push_back({p.k, p.v});
  for (const KvRun& run : p.more_kv) {
    const KvRun& last = runs.back();
    if (run.k.heads != p.k.heads || run.k.dim != p.k.dim || run.k.dtype != p.k.dtype ||
        run.v.heads != p.k.heads || run.v.dim != p.k.dim || run.v.dtype != p.v.dtype ||
        run.v.len != run.k.len || run.v.offset != run.k.offset) {
      return absl::InvalidArgumentError(
          absl::StrCat("key run ", runs.size(), " does not match K and V (heads ", p.k.heads,
                       ", dim ", p.k.dim, ", the same dtypes, V rows equal to K rows)"));
    }
    if (run.k.offset < last.k.offset + last.k.len) {
      return absl::InvalidArgumentError(
          absl::StrCat("key run ", runs.size(), " starts at position ", run.k.offset,
                       ", before the previous run ends at ", last.k.offset + last.k.len));
    }
    runs.push_back(run);
  }
  return runs;
}

absl::Status SparseAttentionReference(const SparseAttentionParams& p) {
  if (p.selection == nullptr) return absl::InvalidArgumentError("no selection given");
  if (!(p.scale > 0.0f)) return absl::InvalidArgumentError("softmax scale must be positive");
  absl::StatusOr<std::vector<KvRun>> runs = KeyRuns(p);
  if (!runs.ok()) return runs.status();
  if (p.o.heads != p.q.heads || p.o.len != p.q.len || p.o.dim != p.q.dim ||
      p.lse.heads != p.q.heads || p.lse.len != p.q.len || p.lse.dim != 1) {
    return absl::InvalidArgumentError("output views do not match Q");
  }
  const int64_t rows = p.q.heads * p.q.len;
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.num_threads, rows)));
  if (threads == 1) {
    AttendRows(p, *runs, 0, rows);
    return absl::OkStatus();
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back(AttendRows, std::cref(p), std::cref(*runs), rows * t / threads,
                      rows * (t + 1) / threads);
  }
  for (std::thread& t : pool) t.join();
  return absl::OkStatus();
}

}  // namespace dhsa
