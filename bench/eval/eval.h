// `dhsa eval`: fidelity of selection policies against dense attention on one layer's Q, K, V
// (spec/DHSA.md "How fidelity is measured"), without full attention.
//
// For every (policy, budget): the selection of every query block (cheap, timed in full); the
// sparse attention of sampled query rows only (timed, then scaled to all rows by computed pairs);
// recall and output error on those rows against dense attention of the same rows (computed once
// for all policies); needle hits at every needle query; density over every row (exact).
// oracle_topk is per row: it is selected for the sampled and needle rows only, and its density is
// counted exactly without a selection.
#ifndef DHSA_BENCH_EVAL_EVAL_H_
#define DHSA_BENCH_EVAL_EVAL_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/eval/boundary_quality.h"
#include "bench/workload/workload.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/common/config.h"
#include "kernels/common/inputs.h"
#include "kernels/common/tensor.h"
#include "kernels/fidelity/fidelity.h"

namespace dhsa {

// One layer's inputs plus what a generator knows about them (empty when unknown).
struct EvalInput {
  Tensor q;                             // [Hq, Lq, d].
  Tensor k;                             // [Hkv, Lk, d].
  Tensor v;                             // [Hkv, Lk, d].
  std::vector<int64_t> segment_starts;  // True topic segment starts, ascending.
  std::vector<Needle> needles;          // Planted needles, absolute positions.
  std::string source;                   // Where the inputs came from, for the report.
};

// Reads DIR/q.npy, DIR/k.npy, DIR/v.npy and, if present, DIR/meta.json (segments and needles as
// `dhsa gen` writes them).
absl::StatusOr<EvalInput> ReadEvalInput(const std::string& dir);

// Takes the tensors and ground truth of a generated workload.
EvalInput EvalInputFromWorkload(Workload w);

// The sparse attention the evaluation runs (and times) on the sampled rows: the reference by
// default; any backend with the same contract fits. oracle_topk always runs on the reference.
using SparseAttentionFn = absl::Status (*)(const SparseAttentionParams&);

struct EvalOptions {
  DhsaConfig base;                    // Every knob except policy and budget.
  std::vector<std::string> policies;  // Names VariantConfig accepts.
  std::vector<int64_t> budgets;
  int64_t rows = 512;     // Query rows sampled over the sequence (StratifiedRows).
  uint64_t row_seed = 1;  // Seed of the row sample.
  bool full = false;      // Attention over every row (timed in full; errors still on the samples).
  int num_threads = 1;
  SparseAttentionFn attention = &SparseAttentionReference;
  std::string attention_name = "reference";  // Names `attention` in the report.
  // Run every policy but dense at the smallest budget at which it computes at least the pairs
  // that dhsa under `base` computes at the nominal budget (bench/eval/pair_match.h). False: every
  // policy at the nominal budget.
  bool match_pairs = true;
  // Called after each step with the fraction done and what comes next; may be empty.
  std::function<void(double fraction, const std::string& stage)> progress;
};

struct PolicyResult {
  std::string policy;
  int64_t budget = 0;            // Nominal.
  int64_t run_budget = 0;        // The budget it ran at (EvalOptions::match_pairs).
  FidelityReport fidelity;       // On the sampled rows.
  int64_t needle_pairs = 0;      // (query head, needle query, needle key) triples.
  int64_t needle_hits = 0;       // Of those, selected.
  int64_t computed_pairs = 0;    // Over all rows and query heads, exact.
  int64_t causal_pairs = 0;      // What dense computes.
  int64_t chunks = 0;            // Chunks the keys were cut into (0 for policies without chunks).
  double select_seconds = 0;     // Boundaries + summaries + selection.
  double attention_seconds = 0;  // Sparse attention over all rows (estimated unless `full`).
  bool attention_estimated = true;
  bool select_estimated = false;  // oracle_topk: scaled from its rows.
  double density() const {
    return causal_pairs > 0 ? static_cast<double>(computed_pairs) / causal_pairs : 0.0;
  }
  double needle_hit_rate() const {
    return needle_pairs > 0 ? static_cast<double>(needle_hits) / needle_pairs : 0.0;
  }
};

// Chunk boundaries of one policy against the true segment starts.
struct BoundaryResult {
  std::string policy;
  int64_t chunks = 0;
  BoundaryMatch exact;  // Tolerance 0.
  BoundaryMatch near;   // Tolerance 2 tokens.
};

struct EvalReport {
  AttentionShape shape;
  std::string source;
  int64_t sampled_rows = 0;  // Rows measured for recall and error.
  int64_t needle_rows = 0;   // Needle query rows checked for hits.
  bool full = false;
  std::string attention_name;         // The sparse attention run and timed.
  double dense_seconds = 0;           // Dense attention of the sampled rows (the ground truth).
  std::vector<PolicyResult> results;  // For each budget, the policies in the order asked.
  std::vector<BoundaryResult> boundaries;  // When the true segments are known.
  int64_t true_segments = 0;
  std::vector<std::string> notes;  // Unequal computed pairs and the like.
};

absl::StatusOr<EvalReport> RunEval(const EvalInput& input, const EvalOptions& options);

// `count` row indices of [0, lq) (all of them when count >= lq), ascending: one per stratum
// [n*lq/count, (n+1)*lq/count), at an offset drawn from `seed` and n. Evenly spaced rows
// (SpreadRows) sit at a few fixed offsets inside each query block when the spacing divides the
// block size, and a row's offset in its block decides how many recent keys the policies keep for it
// (dhsa's local window against block_topk's query block): the strata spread the offsets evenly.
std::vector<int64_t> StratifiedRows(int64_t lq, int64_t count, uint64_t seed);

// Mean over reports of the same policies and budgets (several seeds): fidelity, times, density
// and boundary scores averaged; needle and pair counts summed (so rates are pooled). Notes are
// kept once each.
absl::StatusOr<EvalReport> AverageReports(const std::vector<EvalReport>& reports);

// The report as JSON text (one object).
std::string EvalReportJson(const EvalReport& report);

}  // namespace dhsa

#endif  // DHSA_BENCH_EVAL_EVAL_H_
