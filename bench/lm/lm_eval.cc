#include "bench/lm/lm_eval.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bench/eval/pair_match.h"
#include "bench/lm/lm_policies.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/sparse_attention.h"
#include "kernels/io/file.h"

namespace dhsa {
namespace {

double Mean(const std::vector<double>& x) {
  double s = 0;
  for (double v : x) s += v;
  return x.empty() ? 0.0 : s / static_cast<double>(x.size());
}

}  // namespace

double LmRun::MeanBpb() const { return Mean(bpb); }
double LmRun::MeanDensity() const { return Mean(density); }

absl::StatusOr<std::string> ReadCorpus(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("no such file or directory: ", path));
  }
  if (!S_ISDIR(st.st_mode)) return ReadFileToString(path);
  DIR* dir = opendir(path.c_str());
  if (dir == nullptr) return absl::NotFoundError(absl::StrCat("cannot open directory ", path));
  std::vector<std::string> names;
  while (dirent* e = readdir(dir)) {
    const std::string name = e->d_name;
    if (absl::EndsWith(name, ".py")) names.push_back(name);
  }
  closedir(dir);
  std::sort(names.begin(), names.end());
  if (names.empty()) return absl::NotFoundError(absl::StrCat("no *.py files in ", path));
  std::string text;
  for (const std::string& name : names) {
    DHSA_ASSIGN_OR_RETURN(std::string body, ReadFileToString(path + "/" + name));
    absl::StrAppend(&text, "\n# ==== ", name, " ====\n", body);
  }
  return text;
}

absl::StatusOr<std::vector<int64_t>> EvenWindowOffsets(int64_t total, int64_t window,
                                                       int64_t count) {
  if (window <= 1 || count <= 0 || total < window) {
    return absl::InvalidArgumentError(absl::StrCat("cannot place ", count, " windows of ", window,
                                                   " bytes in a text of ", total, " bytes"));
  }
  std::vector<int64_t> offsets;
  for (int64_t n = 0; n < count; ++n) {
    offsets.push_back(count == 1 ? 0 : n * (total - window) / (count - 1));
  }
  return offsets;
}

absl::StatusOr<LmEvalReport> RunLmEval(const TinyLm& model, const std::string& text,
                                       const LmEvalOptions& options) {
  LmEvalReport report;
  report.window = options.window;
  report.offsets = options.offsets;
  std::vector<LmPolicy> policies;
  {
    DHSA_ASSIGN_OR_RETURN(LmPolicy dense,
                          ParseLmPolicy("dense", options.base, options.base.budget));
    policies.push_back(dense);
    LmRun run;
    run.policy = "dense";
    report.runs.push_back(run);
  }
  for (int64_t budget : options.budgets) {
    int64_t target = -1;
    if (options.match_pairs) {
      DhsaConfig dhsa = options.base;
      dhsa.policy = Policy::kDhsa;
      dhsa.budget = budget;
      absl::StatusOr<int64_t> pairs = StructuralPairs(dhsa, options.window, options.window);
      if (!pairs.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("cannot match pairs at budget ", budget, " (dhsa under the base config: ",
                         pairs.status().message(), "); give --match-pairs=false"));
      }
      target = *pairs;
    }
    for (const std::string& name : options.policies) {
      if (name == "dense") continue;
      DHSA_ASSIGN_OR_RETURN(LmPolicy p, ParseLmPolicy(name, options.base, budget));
      if (target >= 0 && p.config.policy != Policy::kDense) {
        // `local` counts as streaming does (the last `budget` keys of each query block);
        // oracle_block as the dhsa structure it keeps.
        DhsaConfig structure = p.config;
        if (p.kind == LmPolicy::Kind::kLocal) {
          structure.policy = Policy::kStreaming;
          structure.sink = 0;
        }
        DHSA_ASSIGN_OR_RETURN(p.config.budget,
                              PairMatchedBudget(structure, target, options.window, options.window));
      }
      policies.push_back(p);
      LmRun run;
      run.policy = name;
      run.budget = budget;
      run.run_budget = p.config.budget;
      report.runs.push_back(run);
    }
  }
  EvalOptions trace_eval;
  trace_eval.base = options.base;
  trace_eval.policies = options.trace_policies;
  trace_eval.budgets = options.budgets;
  trace_eval.rows = options.trace_rows;
  trace_eval.num_threads = options.num_threads;
  trace_eval.attention = &SparseAttentionCpu;
  trace_eval.attention_name = "cpu";
  trace_eval.match_pairs = options.match_pairs;
  const int64_t layers = model.config.n_layer;
  std::vector<std::vector<EvalReport>> per_layer(static_cast<size_t>(layers));
  const bool traces = options.trace_rows > 0 && !options.trace_policies.empty();

  const double steps = static_cast<double>(options.offsets.size() * policies.size());
  for (size_t w = 0; w < options.offsets.size(); ++w) {
    const int64_t offset = options.offsets[w];
    if (offset < 0 || offset + options.window > static_cast<int64_t>(text.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("window [", offset, ", ", offset + options.window,
                       ") is outside the text of ", text.size(), " bytes"));
    }
    const std::vector<uint8_t> bytes(text.begin() + offset, text.begin() + offset + options.window);
    for (size_t p = 0; p < policies.size(); ++p) {
      const LmPolicy& policy = policies[p];
      if (options.progress) {
        options.progress(
            static_cast<double>(w * policies.size() + p) / steps,
            absl::StrCat("window ", w + 1, "/", options.offsets.size(), ": ", policy.name,
                         p > 0 ? absl::StrCat(" @", policy.config.budget) : ""));
      }
      LmAttentionStats stats;
      LayerAttention attention = [&](int64_t, const Tensor& q, const Tensor& k,
                                     const Tensor& v) -> absl::StatusOr<Tensor> {
        return LmAttention(policy, q, k, v, options.num_threads, &stats);
      };
      std::vector<EvalInput> layer_inputs;
      LayerTap tap;
      if (p == 0 && traces) {
        tap = [&](int64_t, const Tensor& q, const Tensor& k, const Tensor& v) -> absl::Status {
          EvalInput in;
          in.q = q;
          in.k = k;
          in.v = v;
          layer_inputs.push_back(std::move(in));
          return absl::OkStatus();
        };
      }
      ForwardTimes times;
      const auto start = std::chrono::steady_clock::now();
      DHSA_ASSIGN_OR_RETURN(
          std::vector<float> logits,
          TinyLmForward(model, bytes, attention, options.num_threads, tap, &times));
      LmRun& run = report.runs[p];
      run.seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      run.attention_seconds += times.attention;
      run.bpb.push_back(BitsPerByte(logits, model.config.vocab, bytes, options.window / 2));
      run.density.push_back(stats.causal_pairs > 0 ? static_cast<double>(stats.computed_pairs) /
                                                         static_cast<double>(stats.causal_pairs)
                                                   : 0.0);
      for (size_t l = 0; l < layer_inputs.size(); ++l) {
        if (options.progress) {
          options.progress(static_cast<double>(w * policies.size()) / steps,
                           absl::StrCat("window ", w + 1, "/", options.offsets.size(),
                                        ": fidelity of layer ", l, " on its trace"));
        }
        layer_inputs[l].source = absl::StrCat("tinylm layer ", l);
        DHSA_ASSIGN_OR_RETURN(EvalReport r, RunEval(layer_inputs[l], trace_eval));
        per_layer[l].push_back(std::move(r));
      }
    }
  }
  if (traces) {
    for (int64_t l = 0; l < layers; ++l) {
      DHSA_ASSIGN_OR_RETURN(EvalReport avg, AverageReports(per_layer[static_cast<size_t>(l)]));
      report.layers.push_back(std::move(avg));
    }
  }
  return report;
}

}  // namespace dhsa
