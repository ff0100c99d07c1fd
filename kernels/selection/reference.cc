// Reference selection: per (KV head, query block), chunks ranked by a full sort of their scores.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "kernels/selection/selection.h"

namespace dhsa {
namespace {

// Chunk indices by descending score; ties put the later chunk first.
std::vector<int64_t> RankChunks(const std::vector<float>& scores) {
  std::vector<int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (scores[a] != scores[b]) return scores[a] > scores[b];
    return a > b;
  });
  return order;
}

}  // namespace

std::vector<Span> SelectDhsaSpansReference(const std::vector<int64_t>& b,
                                           const std::vector<float>& scores, const DhsaConfig& c,
                                           int64_t e) {
  const Span sink = {0, std::min(c.sink, e)};
  const Span local = {std::max<int64_t>(0, e - c.local), e};
  std::vector<Span> spans = {sink, local};
  // |sink U local|; the rest of the budget goes to chunks.
  const int64_t kept = sink.size() + local.size() - std::max<int64_t>(0, sink.end - local.begin);
  int64_t remaining = c.budget - kept;
  for (int64_t j : RankChunks(scores)) {
    if (remaining <= 0) break;
    // Sink is a prefix and local a suffix of [0, e), so a chunk's new tokens form one interval.
    const int64_t a = std::max(b[j], sink.end), z = std::min(b[j + 1], local.begin);
    if (z <= a) continue;
    const int64_t take = std::min(z - a, remaining);  // Cut to the budget: earliest tokens kept.
    spans.push_back({a, a + take});
    remaining -= take;
  }
  return NormaliseSpans(std::move(spans));
}

namespace {

// block_topk for one (KV head, block) whose row block [block_begin, e) ends past the budget.
std::vector<Span> SelectBlockTopkBlock(const std::vector<float>& scores, const DhsaConfig& c,
                                       int64_t block_begin, int64_t e) {
  const int64_t diag_begin = block_begin / c.block * c.block;
  const int64_t diag_blocks = (e - diag_begin + c.block - 1) / c.block;
  std::vector<Span> spans = {{diag_begin, e}};
  int64_t remaining = c.budget / c.block - diag_blocks;
  for (int64_t j : RankChunks(scores)) {
    if (remaining <= 0) break;
    spans.push_back({j * c.block, (j + 1) * c.block});
    --remaining;
  }
  return NormaliseSpans(std::move(spans));
}

}  // namespace

Selection EmptyBlockSelection(const AttentionShape& shape, int64_t q_block) {
  Selection s;
  s.unit = SelectionUnit::kKvHeadBlock;
  s.block_size = q_block;
  s.first_block = shape.t0() / q_block;
  s.num_blocks = (shape.lk - 1) / q_block - s.first_block + 1;
  s.num_heads = shape.hkv;
  s.group = shape.group();
  s.spans.resize(static_cast<size_t>(s.num_heads * s.num_blocks));
  return s;
}

absl::Status CheckScoreSummaries(const SelectionInputs& in, const DhsaConfig& config) {
  const AttentionShape& shape = in.shape;
  const bool mass = config.policy == Policy::kDhsa && config.chunk_score == ChunkScore::kMass;
  const int64_t rows = mass ? config.score_rows : config.q_block;
  const int64_t heads = mass ? shape.hq : shape.hkv;
  const int64_t count = (shape.lk - 1) / rows - shape.t0() / rows + 1;
  if (in.rho->heads != heads || in.rho->count != count || in.rho->dim != shape.dim ||
      in.kappa->heads != shape.hkv || in.kappa->dim != shape.dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query summaries must be [", heads, ", ", count, ", ", shape.dim, "] for the ",
        mass ? "mass" : "paper", " chunk score (one per ", mass ? "query head" : "KV head", " and ",
        rows, " rows) and chunk summaries [", shape.hkv, ", chunks, ", shape.dim, "]; got [",
        in.rho->heads, ", ", in.rho->count, ", ", in.rho->dim, "] and [", in.kappa->heads, ", ",
        in.kappa->count, ", ", in.kappa->dim, "]"));
  }
  return absl::OkStatus();
}

int64_t EligibleChunks(const std::vector<int64_t>& b, int64_t position) {
  // b[j + 1] is the end of chunk j.
  return static_cast<int64_t>(std::upper_bound(b.begin() + 1, b.end(), position) - (b.begin() + 1));
}

std::vector<Span> NormaliseSpans(std::vector<Span> spans) {
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  std::vector<Span> out;
  for (const Span& s : spans) {
    if (s.end <= s.begin) continue;
    if (!out.empty() && s.begin <= out.back().end) {
      out.back().end = std::max(out.back().end, s.end);
    } else {
      out.push_back(s);
    }
  }
  return out;
}

namespace {

// ChunkScoresReference for dhsa's kMass score.
std::vector<float> MassScoresReference(const SelectionInputs& in, const DhsaConfig& config,
                                       int64_t kv_head, int64_t block) {
  const std::vector<int64_t>& b = *in.boundaries;
  const AttentionShape& shape = in.shape;
  const int64_t eligible = EligibleChunks(b, block * config.q_block);
  const int64_t e = std::min((block + 1) * config.q_block, shape.lk);
  // Chunks starting before e: b[j] < e.
  const int64_t visible =
      static_cast<int64_t>(std::lower_bound(b.begin(), b.end() - 1, e) - b.begin());
  const int64_t dim = in.kappa->dim;
  const double scale = EffectiveScale(config, dim);
  const int64_t group = shape.group();
  const int64_t g_begin = config.shared_heads ? 0 : kv_head * group;
  const int64_t g_end = config.shared_heads ? shape.hq : (kv_head + 1) * group;
  const int64_t rows = config.score_rows;
  const int64_t first_piece = shape.t0() / rows;
  const int64_t row_begin = std::max(shape.t0(), block * config.q_block);
  const int64_t p_begin = row_begin / rows;
  const int64_t p_end = (e - 1) / rows + 1;
  std::vector<double> total(static_cast<size_t>(eligible), 0.0),
      logits(static_cast<size_t>(visible));
  auto logit = [&](const double* r, int64_t h, int64_t c) {
    const float* k = in.kappa->Row(h, c);
    double dot = 0.0;
    for (int64_t x = 0; x < dim; ++x) dot += r[x] * k[x];
    return scale * dot + std::log(static_cast<double>(b[c + 1] - b[c]));
  };
  if (e - row_begin < rows) {
    // Fewer rows than a piece (decode): per KV head of the group (every KV head with
    // shared_heads), one mean query over its query heads and the block's rows; the score is the
    // mean over those KV heads of the logit l(c) (one softmax ranks chunks as its logits do).
    const int64_t h_begin = g_begin / group, h_end = g_end / group;
    std::vector<double> mean(static_cast<size_t>(dim));
    for (int64_t h = h_begin; h < h_end; ++h) {
      std::fill(mean.begin(), mean.end(), 0.0);
      for (int64_t g = h * group; g < (h + 1) * group; ++g) {
        for (int64_t piece = p_begin; piece < p_end; ++piece) {
          const int64_t n = std::min(e, (piece + 1) * rows) - std::max(row_begin, piece * rows);
          const float* r = in.rho->Row(g, piece - first_piece);
          for (int64_t x = 0; x < dim; ++x) mean[x] += static_cast<double>(r[x]) * n;
        }
      }
      for (double& x : mean) x /= static_cast<double>(group * (e - row_begin));
      for (int64_t j = 0; j < eligible; ++j) total[j] += logit(mean.data(), h, j);
    }
    for (double& t : total) t /= static_cast<double>(h_end - h_begin);
    return std::vector<float>(total.begin(), total.end());
  }
  std::vector<double> r(static_cast<size_t>(dim));
  for (int64_t g = g_begin; g < g_end; ++g) {
    for (int64_t piece = p_begin; piece < p_end; ++piece) {
      const float* rf = in.rho->Row(g, piece - first_piece);
      std::copy(rf, rf + dim, r.begin());
      double top = -std::numeric_limits<double>::infinity();
      for (int64_t c = 0; c < visible; ++c) {
        logits[c] = logit(r.data(), g / group, c);
        top = std::max(top, logits[c]);
      }
      double z = 0.0;
      for (int64_t c = 0; c < visible; ++c) z += std::exp(logits[c] - top);
      for (int64_t j = 0; j < eligible; ++j) total[j] += std::exp(logits[j] - top) / z;
    }
  }
  return std::vector<float>(total.begin(), total.end());
}

}  // namespace

std::vector<float> ChunkScoresReference(const SelectionInputs& in, const DhsaConfig& config,
                                        int64_t kv_head, int64_t block) {
  if (config.policy == Policy::kDhsa && config.chunk_score == ChunkScore::kMass) {
    return MassScoresReference(in, config, kv_head, block);
  }
  const std::vector<int64_t>& b = *in.boundaries;
  const int64_t eligible = EligibleChunks(b, block * config.q_block);
  const int64_t rho_index = block - in.shape.t0() / config.q_block;
  const int64_t dim = in.kappa->dim;
  std::vector<float> scores(static_cast<size_t>(eligible), 0.0f);
  const int64_t h_begin = config.shared_heads ? 0 : kv_head;
  const int64_t h_end = config.shared_heads ? in.shape.hkv : kv_head + 1;
  for (int64_t j = 0; j < eligible; ++j) {
    double total = 0.0;
    for (int64_t h = h_begin; h < h_end; ++h) {
      const float* r = in.rho->Row(h, rho_index);
      const float* k = in.kappa->Row(h, j);
      double dot = 0.0;
      for (int64_t c = 0; c < dim; ++c) dot += static_cast<double>(r[c]) * k[c];
      total += dot;
    }
    scores[j] = static_cast<float>(total / static_cast<double>(h_end - h_begin));
  }
  return scores;
}

absl::StatusOr<Selection> SelectSpansReference(const SelectionInputs& in,
                                               const DhsaConfig& config) {
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
  if (scored) DHSA_RETURN_IF_ERROR(CheckScoreSummaries(in, config));
  Selection sel = EmptyBlockSelection(in.shape, config.q_block);
  for (int64_t bi = 0; bi < sel.num_blocks; ++bi) {
    const int64_t block = sel.first_block + bi;
    const int64_t e = std::min((block + 1) * config.q_block, in.shape.lk);
    for (int64_t h = 0; h < sel.num_heads; ++h) {
      std::vector<Span>& spans = sel.At(h, bi);
      if (config.policy == Policy::kDense || e <= config.budget) {
        spans = {{0, e}};
        continue;
      }
      switch (config.policy) {
        case Policy::kStreaming:
          spans = NormaliseSpans(
              {{0, std::min(config.sink, e)}, {e - (config.budget - config.sink), e}});
          break;
        case Policy::kDhsa:
          if (config.shared_heads && h > 0) {
            spans = sel.At(0, bi);
          } else {
            spans = SelectDhsaSpansReference(*in.boundaries,
                                             ChunkScoresReference(in, config, h, block), config, e);
          }
          break;
        case Policy::kBlockTopk:
          if (config.shared_heads && h > 0) {
            spans = sel.At(0, bi);
          } else {
            spans = SelectBlockTopkBlock(ChunkScoresReference(in, config, h, block), config,
                                         block * config.q_block, e);
          }
          break;
        case Policy::kDense:
        case Policy::kOracleTopk:
          break;
      }
    }
  }
  return sel;
}

absl::StatusOr<Selection> SelectOracleTopkReference(const HeadsView& q, const HeadsView& k,
                                                    const DhsaConfig& config) {
  if (config.budget <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("budget must be positive; got ", config.budget));
  }
  Selection sel;
  sel.unit = SelectionUnit::kQueryHeadRow;
  sel.block_size = 1;
  sel.first_block = q.offset;
  sel.num_blocks = q.len;
  sel.num_heads = q.heads;
  sel.group = q.heads / k.heads;
  sel.spans.resize(static_cast<size_t>(sel.num_heads * sel.num_blocks));
  std::vector<float> qrow(static_cast<size_t>(q.dim)), krow(static_cast<size_t>(q.dim));
  std::vector<std::pair<double, int64_t>> scored;
  for (int64_t g = 0; g < q.heads; ++g) {
    const int64_t h = g / sel.group;
    for (int64_t r = 0; r < q.len; ++r) {
      const int64_t p = q.offset + r;
      if (p + 1 <= config.budget) {
        sel.At(g, r) = {{0, p + 1}};
        continue;
      }
      q.Row(g, r, qrow.data());
      scored.clear();
      for (int64_t t = 0; t <= p; ++t) {
        k.Row(h, t, krow.data());
        double dot = 0.0;
        for (int64_t c = 0; c < q.dim; ++c) dot += static_cast<double>(qrow[c]) * krow[c];
        scored.push_back(
            {-dot, t});  // Ascending (-score, position): highest score, lowest t first.
      }
      std::nth_element(scored.begin(), scored.begin() + config.budget, scored.end());
      std::vector<Span> spans;
      for (int64_t n = 0; n < config.budget; ++n)
        spans.push_back({scored[n].second, scored[n].second + 1});
      sel.At(g, r) = NormaliseSpans(std::move(spans));
    }
  }
  return sel;
}

int64_t CountComputedPairs(const Selection& selection, const AttentionShape& shape) {
  int64_t pairs = 0;
  for (int64_t g = 0; g < shape.hq; ++g) {
    for (int64_t p = shape.t0(); p < shape.lk; ++p) {
      for (const Span& s : selection.ForQuery(g, p)) {
        pairs += std::max<int64_t>(0, std::min(s.end, p + 1) - s.begin);
      }
    }
  }
  return pairs;
}

absl::Status CheckSelection(const Selection& sel, const AttentionShape& shape) {
  if (sel.block_size <= 0 || sel.group != shape.group() ||
      sel.spans.size() != static_cast<size_t>(sel.num_heads * sel.num_blocks) ||
      sel.first_block != shape.t0() / sel.block_size ||
      sel.first_block + sel.num_blocks - 1 != (shape.lk - 1) / sel.block_size ||
      sel.num_heads != (sel.unit == SelectionUnit::kKvHeadBlock ? shape.hkv : shape.hq)) {
    return absl::InvalidArgumentError("selection does not match the shapes of Q and K");
  }
  for (size_t n = 0; n < sel.spans.size(); ++n) {
    int64_t prev_end = -1;
    for (const Span& s : sel.spans[n]) {
      if (s.begin < 0 || s.end > shape.lk || s.begin >= s.end || s.begin <= prev_end) {
        return absl::InvalidArgumentError(absl::StrCat(
            "selection entry ", n, " has a span [", s.begin, ", ", s.end,
            ") that is empty, outside [0, ", shape.lk, ") or not after the previous one"));
      }
      prev_end = s.end;
    }
  }
  return absl::OkStatus();
}

}  // namespace dhsa
