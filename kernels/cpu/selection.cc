#include "kernels/cpu/selection.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vector_ops.h"

namespace dhsa {
namespace {

// Visits chunk indices in descending score order (ties: the later chunk first) until `visit`
// returns false, ranking `batch` more candidates at a time by partial selection.
template <typename Visit>
void VisitByScore(const std::vector<float>& scores, size_t batch, std::vector<int64_t>& order,
                  const Visit& visit) {
  order.resize(scores.size());
  std::iota(order.begin(), order.end(), 0);
  auto before = [&](int64_t a, int64_t b) {
    const float sa = scores[static_cast<size_t>(a)], sb = scores[static_cast<size_t>(b)];
    return sa > sb || (sa == sb && a > b);
  };
  size_t ranked = 0;
  batch = std::max<size_t>(batch, 16);
  while (ranked < order.size()) {
    const size_t stop = std::min(order.size(), ranked + batch);
    const auto first = order.begin() + static_cast<std::ptrdiff_t>(ranked);
    const auto last = order.begin() + static_cast<std::ptrdiff_t>(stop);
    if (stop < order.size()) std::nth_element(first, last, order.end(), before);
    std::sort(first, last, before);
    for (; ranked < stop; ++ranked) {
      if (!visit(order[ranked])) return;
    }
    batch *= 2;
  }
}

// dhsa, Step 4, for one (KV head, block) whose row block ends at `e` (> budget).
std::vector<Span> SelectDhsaBlock(const std::vector<int64_t>& b, const std::vector<float>& scores,
                                  const DhsaConfig& c, int64_t e, std::vector<int64_t>& order) {
  const Span sink = {0, std::min(c.sink, e)};
  const Span local = {std::max<int64_t>(0, e - c.local), e};
  std::vector<Span> spans = {sink, local};
  const int64_t kept = sink.size() + local.size() - std::max<int64_t>(0, sink.end - local.begin);
  int64_t remaining = c.budget - kept;
  if (remaining <= 0 || scores.empty()) return NormaliseSpans(std::move(spans));
  // Enough candidates for the budget at the eligible chunks' mean length, twice over.
  const int64_t covered = b[scores.size()] - b[0];
  const int64_t mean_len = std::max<int64_t>(1, covered / static_cast<int64_t>(scores.size()));
  const size_t batch = static_cast<size_t>(2 * remaining / mean_len + 8);
  VisitByScore(scores, batch, order, [&](int64_t j) {
    // Sink is a prefix and local a suffix of [0, e), so a chunk's new tokens form one interval.
    const int64_t a = std::max(b[static_cast<size_t>(j)], sink.end);
    const int64_t z = std::min(b[static_cast<size_t>(j) + 1], local.begin);
    if (z > a) {
      const int64_t take = std::min(z - a, remaining);  // Cut to the budget: earliest tokens kept.
      spans.push_back({a, a + take});
      remaining -= take;
    }
    return remaining > 0;
  });
  return NormaliseSpans(std::move(spans));
}

// block_topk for one (KV head, block) whose row block [block_begin, e) ends past the budget.
std::vector<Span> SelectBlockTopkBlock(const std::vector<float>& scores, const DhsaConfig& c,
                                       int64_t block_begin, int64_t e,
                                       std::vector<int64_t>& order) {
  const int64_t diag_begin = block_begin / c.block * c.block;
  const int64_t diag_blocks = (e - diag_begin + c.block - 1) / c.block;
  std::vector<Span> spans = {{diag_begin, e}};
  int64_t remaining = c.budget / c.block - diag_blocks;
  if (remaining > 0 && !scores.empty()) {
    VisitByScore(scores, static_cast<size_t>(remaining), order, [&](int64_t j) {
      spans.push_back({j * c.block, (j + 1) * c.block});
      return --remaining > 0;
    });
  }
  return NormaliseSpans(std::move(spans));
}

// ChunkScoresCpu for dhsa's kMass score: the reference's arithmetic, with the dot products of one
// mean query against every visible chunk in one vectorised pass.
std::vector<float> MassScoresCpu(const SelectionInputs& in, const DhsaConfig& config,
                                 int64_t kv_head, int64_t block) {
  const std::vector<int64_t>& b = *in.boundaries;
  const AttentionShape& shape = in.shape;
  const int64_t eligible = EligibleChunks(b, block * config.q_block);
  const int64_t e = std::min((block + 1) * config.q_block, shape.lk);
  const int64_t visible =
      static_cast<int64_t>(std::lower_bound(b.begin(), b.end() - 1, e) - b.begin());
  const int64_t dim = in.kappa->dim;
  const double scale = EffectiveScale(config, dim);
  const int64_t group = shape.group();
  const int64_t g_begin = config.shared_heads ? 0 : kv_head * group;
  const int64_t g_end = config.shared_heads ? shape.hq : (kv_head + 1) * group;
  const int64_t rows = config.score_rows;
  const int64_t first_piece = shape.t0() / rows;
  const int64_t p_begin = std::max(shape.t0(), block * config.q_block) / rows;
  const int64_t p_end = (e - 1) / rows + 1;
  std::vector<double> log_len(static_cast<size_t>(visible));
  for (int64_t c = 0; c < visible; ++c) {
    log_len[static_cast<size_t>(c)] = std::log(static_cast<double>(b[c + 1] - b[c]));
  }
  std::vector<double> total(static_cast<size_t>(eligible), 0.0), logits(log_len.size());
  for (int64_t g = g_begin; g < g_end; ++g) {
    for (int64_t piece = p_begin; piece < p_end; ++piece) {
      cpu::RowDotsF32InF64(in.rho->Row(g, piece - first_piece), in.kappa->Row(g / group, 0),
                           visible, dim, logits.data());
      double top = -std::numeric_limits<double>::infinity();
      for (size_t c = 0; c < logits.size(); ++c) {
        logits[c] = scale * logits[c] + log_len[c];
        top = std::max(top, logits[c]);
      }
      double z = 0.0;
      for (size_t c = 0; c < logits.size(); ++c) {
        logits[c] = std::exp(logits[c] - top);
        z += logits[c];
      }
      for (size_t j = 0; j < total.size(); ++j) total[j] += logits[j] / z;
    }
  }
  return std::vector<float>(total.begin(), total.end());
}

}  // namespace

std::vector<float> ChunkScoresCpu(const SelectionInputs& in, const DhsaConfig& config,
                                  int64_t kv_head, int64_t block) {
  if (config.policy == Policy::kDhsa && config.chunk_score == ChunkScore::kMass) {
    return MassScoresCpu(in, config, kv_head, block);
  }
  const std::vector<int64_t>& b = *in.boundaries;
  const int64_t eligible = EligibleChunks(b, block * config.q_block);
  const int64_t rho_index = block - in.shape.t0() / config.q_block;
  const int64_t dim = in.kappa->dim;
  const int64_t h_begin = config.shared_heads ? 0 : kv_head;
  const int64_t h_end = config.shared_heads ? in.shape.hkv : kv_head + 1;
  std::vector<double> total(static_cast<size_t>(eligible), 0.0), dots(total.size());
  for (int64_t h = h_begin; h < h_end; ++h) {
    cpu::RowDotsF32InF64(in.rho->Row(h, rho_index), in.kappa->Row(h, 0), eligible, dim,
                         dots.data());
    for (size_t j = 0; j < dots.size(); ++j) total[j] += dots[j];
  }
  std::vector<float> scores(total.size());
  const double heads = static_cast<double>(h_end - h_begin);
  for (size_t j = 0; j < total.size(); ++j) scores[j] = static_cast<float>(total[j] / heads);
  return scores;
}

absl::StatusOr<Selection> SelectSpansCpu(const SelectionInputs& in, const DhsaConfig& config,
                                         int num_threads) {
  absl::Status valid = ValidateConfig(config);
  if (!valid.ok()) return valid;
  if (config.policy == Policy::kOracleTopk) {
    return absl::InvalidArgumentError("oracle_topk needs Q and K: use SelectOracleTopkReference");
  }
  const bool scored = config.policy == Policy::kDhsa || config.policy == Policy::kBlockTopk;
  if (scored && (in.boundaries == nullptr || in.kappa == nullptr || in.rho == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat(PolicyName(config.policy), " needs boundaries and summaries"));
  }
  if (scored && (in.boundaries->empty() || in.boundaries->front() != 0 ||
                 in.boundaries->back() != in.shape.lk ||
                 in.kappa->count + 1 != static_cast<int64_t>(in.boundaries->size()))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "boundaries must run from 0 to Lk = ", in.shape.lk, " with one summary per chunk"));
  }
  if (scored) {
    absl::Status shapes = CheckScoreSummaries(in, config);
    if (!shapes.ok()) return shapes;
  }
  Selection sel = EmptyBlockSelection(in.shape, config.q_block);
  // Later blocks have more eligible chunks: hand them out first.
  cpu::ParallelFor(sel.num_blocks, num_threads, [&](int64_t n, int) {
    const int64_t bi = sel.num_blocks - 1 - n;
    const int64_t block = sel.first_block + bi;
    const int64_t e = std::min((block + 1) * config.q_block, in.shape.lk);
    std::vector<int64_t> order;
    for (int64_t h = 0; h < sel.num_heads; ++h) {
      std::vector<Span>& spans = sel.At(h, bi);
      if (config.policy == Policy::kDense || e <= config.budget) {
        spans = {{0, e}};
        continue;
      }
      if (scored && config.shared_heads && h > 0) {
        spans = sel.At(0, bi);
        continue;
      }
      switch (config.policy) {
        case Policy::kStreaming:
          spans = NormaliseSpans(
              {{0, std::min(config.sink, e)}, {e - (config.budget - config.sink), e}});
          break;
        case Policy::kDhsa:
          spans = SelectDhsaBlock(*in.boundaries, ChunkScoresCpu(in, config, h, block), config, e,
                                  order);
          break;
        case Policy::kBlockTopk:
          spans = SelectBlockTopkBlock(ChunkScoresCpu(in, config, h, block), config,
                                       block * config.q_block, e, order);
          break;
        case Policy::kDense:
        case Policy::kOracleTopk:
          break;
      }
    }
  });
  return sel;
}

int64_t CountComputedPairsCpu(const Selection& selection, const AttentionShape& shape) {
  const int64_t heads_per_entry =
      selection.unit == SelectionUnit::kKvHeadBlock ? selection.group : 1;
  int64_t pairs = 0;
  for (int64_t head = 0; head < selection.num_heads; ++head) {
    for (int64_t b = 0; b < selection.num_blocks; ++b) {
      const int64_t block = selection.first_block + b;
      const int64_t first = std::max(shape.t0(), block * selection.block_size);
      const int64_t end = std::min(shape.lk, (block + 1) * selection.block_size);
      for (const Span& s : selection.At(head, b)) {
        if (s.end <= first + 1) {  // Every row of the block sees the whole span.
          pairs += heads_per_entry * std::max<int64_t>(0, end - first) * s.size();
          continue;
        }
        for (int64_t p = first; p < end; ++p) {
          pairs += heads_per_entry * std::max<int64_t>(0, std::min(s.end, p + 1) - s.begin);
        }
      }
    }
  }
  return pairs;
}

}  // namespace dhsa
