// Steps 3 and 4 of spec/DHSA.md: chunk scores and the selection of key spans under a token budget,
// for every policy.
#ifndef DHSA_KERNELS_SELECTION_SELECTION_H_
#define DHSA_KERNELS_SELECTION_SELECTION_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/inputs.h"
#include "kernels/common/tensor.h"
#include "kernels/summaries/summaries.h"

namespace dhsa {

// Keys [begin, end), absolute positions.
struct Span {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const Span& o) const { return begin == o.begin && end == o.end; }
};

// What one selection entry covers.
enum class SelectionUnit {
  kKvHeadBlock,  // (KV head, query block of block_size rows): every policy but oracle_topk.
  kQueryHeadRow  // (query head, single row): oracle_topk.
};

// The keys every query may attend to (before per-token causality, applied in Step 5). Entry
// (head, b) covers absolute query block first_block + b; its spans are sorted, disjoint and
// non-adjacent.
struct Selection {
  SelectionUnit unit = SelectionUnit::kKvHeadBlock;
  int64_t block_size = 0;   // Rows per entry: q_block, or 1 for kQueryHeadRow.
  int64_t first_block = 0;  // Absolute index of the first block: t0 / block_size.
  int64_t num_blocks = 0;
  int64_t num_heads = 0;                 // KV heads, or query heads for kQueryHeadRow.
  int64_t group = 1;                     // Query heads per KV head.
  std::vector<std::vector<Span>> spans;  // [num_heads * num_blocks].

  std::vector<Span>& At(int64_t head, int64_t block) { return spans[head * num_blocks + block]; }
  const std::vector<Span>& At(int64_t head, int64_t block) const {
    return spans[head * num_blocks + block];
  }
  // The spans seen by query head `q_head` at absolute position `pos`.
  const std::vector<Span>& ForQuery(int64_t q_head, int64_t pos) const {
    const int64_t head = unit == SelectionUnit::kKvHeadBlock ? q_head / group : q_head;
    return At(head, pos / block_size - first_block);
  }
};

// What selection needs besides the config: shapes, and for `dhsa`/`block_topk` the chunk
// boundaries over [0, lk) with their summaries kappa (norm ChunkSummaryNorm(config)) and the query
// summaries rho of ScoreQuerySummaries*(q, hkv, config) (for block_topk: `fixed` boundaries of
// `block` keys, both summaries with kMean; for dhsa's kMass score, rho holds one mean query per
// query head and score_rows-row piece).
struct SelectionInputs {
  AttentionShape shape;
  const std::vector<int64_t>* boundaries = nullptr;
  const Summaries* kappa = nullptr;
  const Summaries* rho = nullptr;
};

// Scores of the chunks eligible for absolute query block `block` (those ending at or before
// block * q_block), chunks 0 .. eligible-1. kPaper (and block_topk): s[j] = rho[h][i] .
// kappa[h][j], with shared_heads the mean over KV heads. kMass: for each query head g of KV head
// h's group (every query head with shared_heads) and each piece p of score_rows rows of the block
// inside the query range, l[c] = scale * rho[g][p] . kappa[g / G][c] + log(len c) over the chunks c
// that start before the block's end e = min((block+1) * q_block, lk); s[j] = sum over (g, p) of
// exp(l[j] - max l) / sum_c exp(l[c] - max l). A block with fewer query rows in range than
// score_rows (decode) has one mean query per KV head instead, over its group's query heads and the
// block's rows (the pieces' means weighted by their rows), and s[j] is the mean over the KV heads
// (h, or every one with shared_heads) of that query's logit l[j]: one softmax ranks the chunks as
// its logits do, so the exponentials are skipped. In double, rounded to fp32 once.
std::vector<float> ChunkScoresReference(const SelectionInputs& in, const DhsaConfig& config,
                                        int64_t kv_head, int64_t block);

// Step 4 of dhsa for one (KV head, query block) whose row block ends at `e` (> budget): sink and
// local window, then the eligible chunks (scores[j] for chunk j of `boundaries`) in descending
// score, ties to the later chunk, counting only their tokens not yet kept, the last one cut to the
// budget. Sorted, disjoint spans. Exposed so that evaluation can rank chunks by other scores (the
// block oracle ranks them by true attention mass).
std::vector<Span> SelectDhsaSpansReference(const std::vector<int64_t>& boundaries,
                                           const std::vector<float>& scores,
                                           const DhsaConfig& config, int64_t e);

// Selection for dhsa, block_topk, streaming and dense. oracle_topk needs Q and K: see below.
absl::StatusOr<Selection> SelectSpansReference(const SelectionInputs& in, const DhsaConfig& config);

// oracle_topk: per query head and row, the `budget` causal keys of highest q.k (ties: lower
// position). Materialises one row of scores at a time.
absl::StatusOr<Selection> SelectOracleTopkReference(const HeadsView& q, const HeadsView& k,
                                                    const DhsaConfig& config);

// An empty per-(KV head, query block) selection for `shape` with blocks of `q_block` rows.
Selection EmptyBlockSelection(const AttentionShape& shape, int64_t q_block);

// InvalidArgument unless rho and kappa have the shapes `config`'s chunk score reads (see
// SelectionInputs): checked by SelectSpans* before any scoring.
absl::Status CheckScoreSummaries(const SelectionInputs& in, const DhsaConfig& config);

// Number of chunks ending at or before `position` (boundaries b: b[j + 1] ends chunk j).
int64_t EligibleChunks(const std::vector<int64_t>& b, int64_t position);

// Sorts and merges overlapping or adjacent spans, dropping empty ones.
std::vector<Span> NormaliseSpans(std::vector<Span> spans);

// (query, key) pairs the selection computes: over every query head and row, the selected keys at
// or before the row's position.
int64_t CountComputedPairs(const Selection& selection, const AttentionShape& shape);

// Checks a selection against the shapes (entries, spans sorted, disjoint, inside [0, lk)): used on
// selections that come from outside the process.
absl::Status CheckSelection(const Selection& selection, const AttentionShape& shape);

}  // namespace dhsa

#endif  // DHSA_KERNELS_SELECTION_SELECTION_H_
