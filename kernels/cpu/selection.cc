#include "kernels/cpu/selection.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/attention_kernels.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vector_ops.h"

namespace dhsa {
namespace {

// Visits chunk indices in descending score order (ties: the later chunk first) until `visit`
// returns false. The first `batch` candidates: the batch-th largest score by partial selection over
// the plain scores (a copy in `values`), then a sort of the chunks scoring at least that; the rest,
// if ever needed, by partial selection over indices, twice as many at a time.
template <typename Visit>
void VisitByScore(const std::vector<float>& scores, size_t batch, std::vector<int64_t>& order,
                  std::vector<float>& values, const Visit& visit) {
  auto before = [&](int64_t a, int64_t b) {
    const float sa = scores[static_cast<size_t>(a)], sb = scores[static_cast<size_t>(b)];
    return sa > sb || (sa == sb && a > b);
  };
  batch = std::max<size_t>(batch, 16);
  order.clear();
  if (batch < scores.size()) {
    values.assign(scores.begin(), scores.end());
    const auto nth = values.begin() + static_cast<std::ptrdiff_t>(batch - 1);
    std::nth_element(values.begin(), nth, values.end(), std::greater<float>());
    const float cut = *nth;
    for (size_t j = 0; j < scores.size(); ++j) {
      if (scores[j] >= cut) order.push_back(static_cast<int64_t>(j));
    }
    std::sort(order.begin(), order.end(), before);
    for (int64_t j : order) {
      if (!visit(j)) return;
    }
    order.clear();
    for (size_t j = 0; j < scores.size(); ++j) {
      if (!(scores[j] >= cut)) order.push_back(static_cast<int64_t>(j));
    }
    batch *= 2;
  } else {
    order.resize(scores.size());
    std::iota(order.begin(), order.end(), 0);
  }
  size_t ranked = 0;
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
                                  const DhsaConfig& c, int64_t e, std::vector<int64_t>& order,
                                  std::vector<float>& values) {
  const Span sink = {0, std::min(c.sink, e)};
  const Span local = {std::max<int64_t>(0, e - c.local), e};
  std::vector<Span> spans = {sink, local};
  const int64_t kept = sink.size() + local.size() - std::max<int64_t>(0, sink.end - local.begin);
  int64_t remaining = c.budget - kept;
  if (remaining <= 0 || scores.empty()) return NormaliseSpans(std::move(spans));
  const int64_t covered = b[scores.size()] - b[0];
  const int64_t mean_len = std::max<int64_t>(1, covered / static_cast<int64_t>(scores.size()));
  // Enough candidates for the budget at the eligible chunks' mean length, and a quarter more (the
  // ranking widens if chunks inside the sink or the local window leave it short).
  const size_t batch = static_cast<size_t>(remaining / mean_len + remaining / (4 * mean_len) + 8);
  VisitByScore(scores, batch, order, values, [&](int64_t j) {
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
                                       int64_t block_begin, int64_t e, std::vector<int64_t>& order,
                                       std::vector<float>& values) {
  const int64_t diag_begin = block_begin / c.block * c.block;
  const int64_t diag_blocks = (e - diag_begin + c.block - 1) / c.block;
  std::vector<Span> spans = {{diag_begin, e}};
  int64_t remaining = c.budget / c.block - diag_blocks;
  if (remaining > 0 && !scores.empty()) {
    VisitByScore(scores, static_cast<size_t>(remaining), order, values, [&](int64_t j) {
      spans.push_back({j * c.block, (j + 1) * c.block});
      return --remaining > 0;
    });
  }
  return NormaliseSpans(std::move(spans));
}

// Buffers of the mass score, kept by each thread across blocks.
struct MassScratch {
  std::vector<float> a;          // Mean queries, [rows, dim].
  std::vector<float> logits;     // [rows, width].
  std::vector<float> max, sum;   // Per row.
  std::vector<int64_t> row_end;  // Per block of the batch: one past its last row.
  float unused = 0;
};

// Blocks of query rows whose mass scores come from one GEMM: 128 rows' worth (Bq >= 128: one).
int64_t MassBatchBlocks(const DhsaConfig& config) {
  return std::max<int64_t>(1, 128 / config.q_block);
}

// ChunkScoresCpu for dhsa's kMass score, for the absolute query blocks [block_begin, block_end)
// and KV head `kv_head`: scores[n] for block block_begin + n (its eligible chunks). `log_len`
// holds log(len) of every chunk. Per KV head taken, one fp32 GEMM of the blocks' mean queries
// against the chunks visible to the last block (kernels/cpu/gemm.h), the logits of chunks a block
// cannot see set to -inf, then the attention's vectorised softmax step (exp in fp32), and the
// shares summed in fp32. A block with fewer rows than a piece gets the logits of its one mean
// query.
absl::Status MassScoresCpu(const SelectionInputs& in, const DhsaConfig& config, int64_t kv_head,
                           int64_t block_begin, int64_t block_end,
                           const std::vector<float>& log_len, MassScratch& s,
                           std::vector<std::vector<float>>& scores) {
  const std::vector<int64_t>& b = *in.boundaries;
  const AttentionShape& shape = in.shape;
  const int64_t dim = in.kappa->dim;
  const float scale = EffectiveScale(config, dim);
  const int64_t group = shape.group();
  const int64_t h_begin = config.shared_heads ? 0 : kv_head;
  const int64_t h_end = config.shared_heads ? shape.hkv : kv_head + 1;
  const int64_t rows = config.score_rows;
  const int64_t first_piece = shape.t0() / rows;
  const int64_t blocks = block_end - block_begin;
  scores.resize(static_cast<size_t>(blocks));
  // Per block: its pieces, its visible chunks (starting before its end), its rows of the GEMM.
  struct Block {
    int64_t row_begin, e, p_begin, p_end, visible, eligible;
    bool few_rows;
  };
  std::vector<Block> info(static_cast<size_t>(blocks));
  int64_t m = 0, visible = 0;
  s.row_end.resize(static_cast<size_t>(blocks));
  for (int64_t n = 0; n < blocks; ++n) {
    const int64_t block = block_begin + n;
    Block& x = info[static_cast<size_t>(n)];
    x.e = std::min((block + 1) * config.q_block, shape.lk);
    x.row_begin = std::max(shape.t0(), block * config.q_block);
    x.p_begin = x.row_begin / rows;
    x.p_end = (x.e - 1) / rows + 1;
    x.visible = static_cast<int64_t>(std::lower_bound(b.begin(), b.end() - 1, x.e) - b.begin());
    x.eligible = EligibleChunks(b, block * config.q_block);
    x.few_rows = x.e - x.row_begin < rows;
    m += x.few_rows ? 1 : group * (x.p_end - x.p_begin);
    s.row_end[static_cast<size_t>(n)] = m;
    visible = std::max(visible, x.visible);
    scores[static_cast<size_t>(n)].assign(static_cast<size_t>(x.eligible), 0.0f);
  }
  if (visible == 0) return absl::OkStatus();
  const int64_t width = (visible + cpu::kScoreAlign - 1) / cpu::kScoreAlign * cpu::kScoreAlign;
  s.a.resize(static_cast<size_t>(m * dim));
  s.logits.resize(static_cast<size_t>(m * width));
  for (int64_t h = h_begin; h < h_end; ++h) {
    for (int64_t n = 0; n < blocks; ++n) {
      const Block& x = info[static_cast<size_t>(n)];
      float* dst = s.a.data() + (n == 0 ? 0 : s.row_end[static_cast<size_t>(n - 1)]) * dim;
      if (x.few_rows) {
        // The pieces' means weighted by their rows in the block, over the group's query heads.
        std::fill(dst, dst + dim, 0.0f);
        const float norm = 1.0f / static_cast<float>(group * (x.e - x.row_begin));
        for (int64_t g = h * group; g < (h + 1) * group; ++g) {
          for (int64_t piece = x.p_begin; piece < x.p_end; ++piece) {
            const int64_t count =
                std::min(x.e, (piece + 1) * rows) - std::max(x.row_begin, piece * rows);
            cpu::AxpyF32(in.rho->Row(g, piece - first_piece), static_cast<float>(count) * norm, dim,
                         dst);
          }
        }
        continue;
      }
      // Rows of one query head are consecutive pieces: copied head after head.
      for (int64_t g = h * group; g < (h + 1) * group; ++g) {
        const float* src = in.rho->Row(g, x.p_begin - first_piece);
        dst = std::copy(src, src + (x.p_end - x.p_begin) * dim, dst);
      }
    }
    // logits[r][c] = scale * a[r] . kappa[h][c].
    DHSA_RETURN_IF_ERROR(cpu::GemmF32(true, m, visible, dim, scale, s.a.data(), dim,
                                      in.kappa->Row(h, 0), dim, 0.0f, s.logits.data(), width));
    for (int64_t n = 0, r = 0; n < blocks; ++n) {
      const Block& x = info[static_cast<size_t>(n)];
      for (; r < s.row_end[static_cast<size_t>(n)]; ++r) {
        float* row = s.logits.data() + r * width;
        for (int64_t c = 0; c < x.visible; ++c) row[c] += log_len[static_cast<size_t>(c)];
        std::fill(row + x.visible, row + width, -std::numeric_limits<float>::infinity());
      }
    }
    // Each row becomes exp(l - max l), with its sum, as in the attention's first softmax step.
    s.max.assign(static_cast<size_t>(m), -std::numeric_limits<float>::infinity());
    s.sum.assign(static_cast<size_t>(m), 0.0f);
    for (int64_t n = 0, r = 0; n < blocks; ++n) {
      const Block& x = info[static_cast<size_t>(n)];
      const int64_t end = s.row_end[static_cast<size_t>(n)];
      float* out = scores[static_cast<size_t>(n)].data();
      if (x.few_rows) {  // One mean query: its logits rank the chunks as its softmax would.
        cpu::AxpyF32(s.logits.data() + r * width, 1.0f, x.eligible, out);
        r = end;
        continue;
      }
      cpu::SoftmaxStep(s.logits.data() + r * width, end - r, width, width, s.max.data() + r,
                       s.sum.data() + r, &s.unused, 0, 0);
      for (; r < end; ++r) {
        cpu::AxpyF32(s.logits.data() + r * width, 1.0f / s.sum[static_cast<size_t>(r)], x.eligible,
                     out);
      }
    }
  }
  for (int64_t n = 0; n < blocks; ++n) {
    const Block& x = info[static_cast<size_t>(n)];
    if (x.few_rows && h_end - h_begin > 1) {
      std::vector<float>& out = scores[static_cast<size_t>(n)];
      cpu::ScaleF32(out.data(), 1.0f / static_cast<float>(h_end - h_begin), x.eligible, out.data());
    }
  }
  return absl::OkStatus();
}

std::vector<float> LogChunkLengths(const std::vector<int64_t>& b) {
  std::vector<float> out(b.size() - 1);
  for (size_t c = 0; c + 1 < b.size(); ++c) out[c] = std::log(static_cast<float>(b[c + 1] - b[c]));
  return out;
}

// ChunkScoresCpu for the paper's score and block_topk: dot products in double.
std::vector<float> PaperScoresCpu(const SelectionInputs& in, const DhsaConfig& config,
                                  int64_t kv_head, int64_t block) {
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

}  // namespace

absl::StatusOr<std::vector<float>> ChunkScoresCpu(const SelectionInputs& in,
                                                  const DhsaConfig& config, int64_t kv_head,
                                                  int64_t block) {
  if (config.policy == Policy::kDhsa && config.chunk_score == ChunkScore::kMass) {
    MassScratch scratch;
    std::vector<std::vector<float>> scores;
    DHSA_RETURN_IF_ERROR(MassScoresCpu(in, config, kv_head, block, block + 1,
                                       LogChunkLengths(*in.boundaries), scratch, scores));
    return std::move(scores[0]);
  }
  return PaperScoresCpu(in, config, kv_head, block);
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
  const bool mass = config.policy == Policy::kDhsa && config.chunk_score == ChunkScore::kMass;
  const std::vector<float> log_len = mass ? LogChunkLengths(*in.boundaries) : std::vector<float>();
  struct ThreadState {
    std::vector<int64_t> order;
    std::vector<float> values;
    MassScratch scratch;
    std::vector<std::vector<float>> scores;
    absl::Status status;
  };
  std::vector<ThreadState> threads(static_cast<size_t>(std::max(1, num_threads)));
  // Groups of `batch` blocks (the mass score scores a group with one GEMM per KV head); later
  // groups have more eligible chunks: hand them out first.
  const int64_t batch = mass ? MassBatchBlocks(config) : 1;
  const int64_t groups = (sel.num_blocks + batch - 1) / batch;
  cpu::ParallelFor(groups, num_threads, [&](int64_t n, int thread) {
    const int64_t bi_begin = (groups - 1 - n) * batch;
    const int64_t bi_end = std::min(sel.num_blocks, bi_begin + batch);
    ThreadState& state = threads[static_cast<size_t>(thread)];
    for (int64_t h = 0; h < sel.num_heads; ++h) {
      if (scored && config.shared_heads && h > 0) {
        for (int64_t bi = bi_begin; bi < bi_end; ++bi) sel.At(h, bi) = sel.At(0, bi);
        continue;
      }
      // Blocks [bi_begin, scored_begin) end within the budget and keep every key.
      int64_t scored_begin = bi_begin;
      if (config.policy != Policy::kDense) {
        while (scored_begin < bi_end &&
               std::min((sel.first_block + scored_begin + 1) * config.q_block, in.shape.lk) <=
                   config.budget) {
          ++scored_begin;
        }
      }
      if (mass && scored_begin < bi_end) {
        absl::Status status =
            MassScoresCpu(in, config, h, sel.first_block + scored_begin, sel.first_block + bi_end,
                          log_len, state.scratch, state.scores);
        if (!status.ok()) {
          state.status.Update(status);
          return;
        }
      }
      for (int64_t bi = bi_begin; bi < bi_end; ++bi) {
        const int64_t block = sel.first_block + bi;
        const int64_t e = std::min((block + 1) * config.q_block, in.shape.lk);
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
            spans = SelectDhsaBlock(*in.boundaries,
                                    mass ? state.scores[static_cast<size_t>(bi - scored_begin)]
                                         : PaperScoresCpu(in, config, h, block),
                                    config, e, state.order, state.values);
            break;
          case Policy::kBlockTopk:
            spans = SelectBlockTopkBlock(PaperScoresCpu(in, config, h, block), config,
                                         block * config.q_block, e, state.order, state.values);
            break;
          case Policy::kDense:
          case Policy::kOracleTopk:
            break;
        }
      }
    }
  });
  for (const ThreadState& state : threads) {
    if (!state.status.ok()) return state.status;
  }
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
