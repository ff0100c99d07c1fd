#include "kernels/cpu/summaries.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vector_ops.h"

namespace dhsa {
namespace {

double Normaliser(int64_t count, SummaryNorm norm) {
  return norm == SummaryNorm::kSqrt ? std::sqrt(static_cast<double>(count))
                                    : static_cast<double>(count);
}

// acc += row (h, t) of `view` (t a row of the view), in double.
void AddRow(const HeadsView& view, int64_t h, int64_t t, std::vector<float>& buffer,
            std::vector<double>& acc) {
  const float* row;
  if (view.dtype == DType::kF32) {
    row = static_cast<const float*>(view.data) + view.Index(h, t);
  } else {
    cpu::ToFloat(static_cast<const char*>(view.data) + view.Index(h, t) * DTypeSize(view.dtype),
                 view.dtype, view.dim, buffer.data());
    row = buffer.data();
  }
  cpu::AccumulateF64(row, view.dim, acc.data());
}

void StoreDivided(const std::vector<double>& acc, double divisor, float* out) {
  for (size_t c = 0; c < acc.size(); ++c) out[c] = static_cast<float>(acc[c] / divisor);
}

// Fills the rows of chunks [first_chunk, count) of every head of `s`.
void SummariseChunks(const HeadsView& k, const std::vector<int64_t>& boundaries, SummaryNorm norm,
                     int64_t first_chunk, int num_threads, Summaries& s) {
  const int64_t chunks = s.count - first_chunk;
  cpu::ParallelForRanges(s.heads * chunks, num_threads, [&](int64_t a, int64_t b) {
    std::vector<double> acc(static_cast<size_t>(k.dim));
    std::vector<float> buffer(static_cast<size_t>(k.dim));
    for (int64_t n = a; n < b; ++n) {
      const int64_t h = n / chunks, j = first_chunk + n % chunks;
      const int64_t begin = boundaries[static_cast<size_t>(j)];
      const int64_t end = boundaries[static_cast<size_t>(j + 1)];
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = begin; t < end; ++t) AddRow(k, h, t - k.offset, buffer, acc);
      StoreDivided(acc, Normaliser(end - begin, norm), s.data.data() + (h * s.count + j) * s.dim);
    }
  });
}

Summaries EmptySummaries(int64_t heads, int64_t count, int64_t dim) {
  Summaries s;
  s.heads = heads;
  s.count = count;
  s.dim = dim;
  s.data.resize(static_cast<size_t>(heads * count * dim));
  return s;
}

}  // namespace

Summaries ChunkSummariesCpu(const HeadsView& k, const std::vector<int64_t>& boundaries,
                            SummaryNorm norm, int num_threads) {
  const int64_t count = boundaries.empty() ? 0 : static_cast<int64_t>(boundaries.size()) - 1;
  Summaries s = EmptySummaries(k.heads, count, k.dim);
  SummariseChunks(k, boundaries, norm, 0, num_threads, s);
  return s;
}

Summaries UpdateChunkSummariesCpu(const HeadsView& k, const std::vector<int64_t>& boundaries,
                                  SummaryNorm norm, const std::vector<int64_t>& prior_boundaries,
                                  const Summaries& prior, int num_threads) {
  const int64_t count = boundaries.empty() ? 0 : static_cast<int64_t>(boundaries.size()) - 1;
  Summaries s = EmptySummaries(k.heads, count, k.dim);
  // Chunk j is unchanged when both lists agree on b[0..j+1].
  const size_t common = std::mismatch(boundaries.begin(), boundaries.end(),
                                      prior_boundaries.begin(), prior_boundaries.end())
                            .first -
                        boundaries.begin();
  const int64_t kept = std::min<int64_t>(
      {count, prior.count, std::max<int64_t>(0, static_cast<int64_t>(common) - 1)});
  for (int64_t h = 0; h < s.heads && kept > 0; ++h) {
    std::memcpy(s.data.data() + h * s.count * s.dim,
                prior.data.data() + h * prior.count * prior.dim,
                static_cast<size_t>(kept * s.dim) * sizeof(float));
  }
  SummariseChunks(k, boundaries, norm, kept, num_threads, s);
  return s;
}

Summaries QueryBlockSummariesCpu(const HeadsView& q, int64_t kv_heads, int64_t q_block,
                                 SummaryNorm norm, int num_threads) {
  const int64_t group = q.heads / kv_heads;
  const int64_t first = q.offset, last = q.offset + q.len;  // Query positions [first, last).
  const int64_t first_block = first / q_block;
  Summaries s = EmptySummaries(kv_heads, (last - 1) / q_block - first_block + 1, q.dim);
  // Ranges of (head, block) items, buffers per range: the mass score's pieces are many and small.
  cpu::ParallelForRanges(s.heads * s.count, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(static_cast<size_t>(q.dim));
    std::vector<float> buffer(static_cast<size_t>(q.dim));
    for (int64_t n = begin; n < end; ++n) {
      const int64_t h = n / s.count, i = n % s.count;
      const int64_t a = std::max(first, (first_block + i) * q_block);
      const int64_t b = std::min(last, (first_block + i + 1) * q_block);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t g = h * group; g < (h + 1) * group; ++g) {
        for (int64_t t = a; t < b; ++t) AddRow(q, g, t - q.offset, buffer, acc);
      }
      StoreDivided(acc, static_cast<double>(group) * Normaliser(b - a, norm),
                   s.data.data() + (h * s.count + i) * s.dim);
    }
  });
  return s;
}

Summaries ScoreQuerySummariesCpu(const HeadsView& q, int64_t kv_heads, const DhsaConfig& config,
                                 int num_threads) {
  if (config.policy == Policy::kDhsa && config.chunk_score == ChunkScore::kMass) {
    return QueryBlockSummariesCpu(q, q.heads, config.score_rows, SummaryNorm::kMean, num_threads);
  }
  return QueryBlockSummariesCpu(q, kv_heads, config.q_block, ChunkSummaryNorm(config), num_threads);
}

}  // namespace dhsa
