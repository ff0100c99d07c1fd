// Equal computed (query, key) pairs for every policy at a budget (spec/DHSA.md: "All policies are
// compared at the same computed (query, key) pairs"; issue 7).
//
// One budget does not give every policy the same pairs: a row p of a query block that ends at e
// attends to its policy's keys up to e cut at p, so policies with longer query blocks lose more
// of their budget to causality (on average (q_block - 1) / 2 keys a row: 63.5 for the spec's
// 128-row blocks, 7.5 for 16-row ones), block_topk keeps whole key blocks (the one holding e cut
// there), and oracle_topk keeps exactly `budget` keys a row. The evaluations therefore run every
// policy at the smallest budget at which it computes at least the pairs that `dhsa` (the base
// config) computes at the nominal budget: no policy is compared with fewer pairs than dhsa's.
//
// The pairs a policy computes depend on its structure (budget, sink, local window, query and key
// blocks) and the sequence length, not on the values of Q and K: streaming and block_topk do not
// look at the values for their counts, oracle_topk keeps min(p + 1, budget) keys a row, and dhsa
// fills its budget exactly (the last chunk cut to fit) from the eligible chunks, which hold every
// key before the local window when local >= q_block + chunk_max (a chunk that ends after the
// block's first row, and so is not eligible, then lies inside the window). Both presets meet
// that (16 + 16 <= 256, 128 + 128 <= 256); below it, a block just past the budget may find too
// few eligible keys, and its count depends on where the boundaries fall. They are counted here
// by running the reference selection on fixed inputs of one head and head dim 4
// (tests/eval/pair_match_test.cc checks the count against real selections).
#ifndef DHSA_BENCH_EVAL_PAIR_MATCH_H_
#define DHSA_BENCH_EVAL_PAIR_MATCH_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"

namespace dhsa {

// (query, key) pairs `config` computes for one query head on the queries [lk - lq, lk) of a
// causal sequence of lk keys.
absl::StatusOr<int64_t> StructuralPairs(const DhsaConfig& config, int64_t lq, int64_t lk);

// The smallest budget (at least the smallest `config` accepts) at which `config` computes at least
// `target` pairs (StructuralPairs), searched up to 4x config.budget + 4096; InvalidArgument when
// none there does.
absl::StatusOr<int64_t> PairMatchedBudget(const DhsaConfig& config, int64_t target, int64_t lq,
                                          int64_t lk);

}  // namespace dhsa

#endif  // DHSA_BENCH_EVAL_PAIR_MATCH_H_
