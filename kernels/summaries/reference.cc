// Reference summaries: sums in double, normalised once.
#include <algorithm>
#include <cmath>

#include "kernels/summaries/summaries.h"

namespace dhsa {
namespace {

double Normaliser(int64_t count, SummaryNorm norm) {
  return norm == SummaryNorm::kSqrt ? std::sqrt(static_cast<double>(count))
                                    : static_cast<double>(count);
}

}  // namespace

Summaries ChunkSummariesReference(const HeadsView& k, const std::vector<int64_t>& boundaries,
                                  SummaryNorm norm) {
  Summaries s;
  s.heads = k.heads;
  s.count = boundaries.empty() ? 0 : static_cast<int64_t>(boundaries.size()) - 1;
  s.dim = k.dim;
  s.data.assign(static_cast<size_t>(s.heads * s.count * s.dim), 0.0f);
  std::vector<double> acc(static_cast<size_t>(k.dim));
  for (int64_t h = 0; h < k.heads; ++h) {
    for (int64_t j = 0; j < s.count; ++j) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const int64_t a = boundaries[j], b = boundaries[j + 1];
      for (int64_t t = a; t < b; ++t) {
        for (int64_t c = 0; c < k.dim; ++c) acc[c] += k.At(h, t - k.offset, c);
      }
      const double div = Normaliser(b - a, norm);
      float* out = s.data.data() + (h * s.count + j) * s.dim;
      for (int64_t c = 0; c < k.dim; ++c) out[c] = static_cast<float>(acc[c] / div);
    }
  }
  return s;
}

Summaries QueryBlockSummariesReference(const HeadsView& q, int64_t kv_heads, int64_t q_block,
                                       SummaryNorm norm) {
  const int64_t group = q.heads / kv_heads;
  const int64_t first = q.offset, last = q.offset + q.len;  // Query positions [first, last).
  const int64_t first_block = first / q_block;
  Summaries s;
  s.heads = kv_heads;
  s.count = (last - 1) / q_block - first_block + 1;
  s.dim = q.dim;
  s.data.assign(static_cast<size_t>(s.heads * s.count * s.dim), 0.0f);
  std::vector<double> acc(static_cast<size_t>(q.dim));
  for (int64_t h = 0; h < kv_heads; ++h) {
    for (int64_t i = 0; i < s.count; ++i) {
      const int64_t a = std::max(first, (first_block + i) * q_block);
      const int64_t b = std::min(last, (first_block + i + 1) * q_block);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t g = h * group; g < (h + 1) * group; ++g) {
        for (int64_t t = a; t < b; ++t) {
          for (int64_t c = 0; c < q.dim; ++c) acc[c] += q.At(g, t - q.offset, c);
        }
      }
      const double div = static_cast<double>(group) * Normaliser(b - a, norm);
      float* out = s.data.data() + (h * s.count + i) * s.dim;
      for (int64_t c = 0; c < q.dim; ++c) out[c] = static_cast<float>(acc[c] / div);
    }
  }
  return s;
}

Summaries ScoreQuerySummariesReference(const HeadsView& q, int64_t kv_heads,
                                       const DhsaConfig& config) {
  if (config.policy == Policy::kDhsa && config.chunk_score == ChunkScore::kMass) {
    return QueryBlockSummariesReference(q, q.heads, config.score_rows, SummaryNorm::kMean);
  }
  return QueryBlockSummariesReference(q, kv_heads, config.q_block, ChunkSummaryNorm(config));
}

}  // namespace dhsa
