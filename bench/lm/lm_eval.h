// `dhsa lm` and `dhsa eval --model`: tinylm's bits per byte with every layer's attention replaced
// by a policy, over windows of text, plus per-layer attention fidelity on the dense run's traces.
#ifndef DHSA_BENCH_LM_LM_EVAL_H_
#define DHSA_BENCH_LM_LM_EVAL_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/eval/eval.h"
#include "bench/lm/tinylm.h"
#include "kernels/common/config.h"

namespace dhsa {

// The text: a file as it is, or for a directory its `*.py` files in byte-wise sorted name order,
// each preceded by the line `\n# ==== <name> ====\n` (tinylm's training format).
absl::StatusOr<std::string> ReadCorpus(const std::string& path);

// `count` window starts spread evenly over a text of `total` bytes: floor(n * (total - window) /
// (count - 1)) for n = 0 .. count-1 (0 alone when count is 1). InvalidArgument if total < window.
absl::StatusOr<std::vector<int64_t>> EvenWindowOffsets(int64_t total, int64_t window,
                                                       int64_t count);

struct LmEvalOptions {
  DhsaConfig base;                    // Every knob but the policy and budget.
  std::vector<std::string> policies;  // ParseLmPolicy names; `dense` is always run first.
  std::vector<int64_t> budgets;
  std::vector<int64_t> offsets;  // Window starts in the text.
  int64_t window = 8192;
  int num_threads = 1;
  // Per-layer fidelity on the dense traces (0: skipped): rows sampled per layer and window.
  int64_t trace_rows = 256;
  std::vector<std::string> trace_policies;  // Library policies for the per-layer table.
  // Run every policy at the smallest budget at which it computes at least dhsa's pairs (under
  // `base`, at the nominal budget) on a window: bench/eval/pair_match.h. Also for the traces.
  bool match_pairs = true;
  std::function<void(double fraction, const std::string& stage)> progress;
};

struct LmRun {
  std::string policy;
  int64_t budget = 0;            // 0 for dense.
  int64_t run_budget = 0;        // The budget it ran at (LmEvalOptions::match_pairs).
  std::vector<double> bpb;       // Per window.
  std::vector<double> density;   // Computed / causal pairs over all layers, per window.
  double seconds = 0;            // Forward passes, all windows.
  double attention_seconds = 0;  // Of which attention.
  double MeanBpb() const;
  double MeanDensity() const;
};

struct LmEvalReport {
  int64_t window = 0;
  std::vector<int64_t> offsets;
  std::vector<LmRun> runs;  // dense first, then per budget the policies in the order asked.
  // Per layer, per (policy, budget): fidelity on the dense traces, averaged over windows.
  std::vector<EvalReport> layers;
};

absl::StatusOr<LmEvalReport> RunLmEval(const TinyLm& model, const std::string& text,
                                       const LmEvalOptions& options);

}  // namespace dhsa

#endif  // DHSA_BENCH_LM_LM_EVAL_H_
