// The selection policies `dhsa eval` compares, by name: the spec's policies plus dhsa variants
// that each change one ingredient, to show where a difference comes from.
#ifndef DHSA_BENCH_EVAL_VARIANTS_H_
#define DHSA_BENCH_EVAL_VARIANTS_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/config.h"

namespace dhsa {

struct Variant {
  DhsaConfig config;
  // Chunks are the input's true segments (split above chunk_max), not a boundary rule: the best
  // any boundary rule could do on a generated workload. Evaluation only.
  bool true_boundaries = false;
  // True when the variant cuts keys into chunks (dhsa variants and block_topk).
  bool has_chunks() const {
    return config.policy == Policy::kDhsa || config.policy == Policy::kBlockTopk;
  }
};

// `name` is a policy (dhsa, block_topk, streaming, dense, oracle_topk) or dhsa followed by
// modifiers joined with '_', applied to `base` in order:
//   paper: the spec's method (ApplyPreset(kPaper): paper score, 128-row query blocks, chunks of
//   8-128 keys; local window at least the query block); fixed, dynamic or any other boundary
//   mode name: the chunking rule (fixed = chunks of chunk_mean keys); truth: the true segments of
//   the input; mean: plain-mean summaries instead of sqrt (the paper score only: an error with
//   the mass score, which always uses means); shared: one selection for all KV heads
//   (shared_heads); mass: the mass chunk score alone; q<N>: query blocks of N rows (local window
//   at least N); c<N>: chunks of N keys (dynamic chunks: mean N, min and max scaled alike); r<N>:
//   score_rows of the mass score; n<N>, x<N>: chunk_min, chunk_max.
// e.g. dhsa_paper, dhsa_fixed, dhsa_shared, dhsa_truth, dhsa_paper_mean, dhsa_paper_fixed. The
// budget is left as in `base`.
absl::StatusOr<Variant> ParseVariant(absl::string_view name, const DhsaConfig& base);

}  // namespace dhsa

#endif  // DHSA_BENCH_EVAL_VARIANTS_H_
