// `dhsa eval`: fidelity of selection policies against dense attention, per policy and budget.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/eval/eval.h"
#include "bench/lm/lm_eval.h"
#include "bench/lm/tinylm.h"
#include "bench/workload/workload.h"
#include "clients/cli/commands.h"
#include "clients/cli/dhsa_flags.h"
#include "clients/cli/flags.h"
#include "clients/cli/table.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/sparse_attention.h"
#include "kernels/dhsa.h"
#include "kernels/io/file.h"
#include "nlohmann/json.hpp"

namespace dhsa::cli {
namespace {

struct EvalFlags {
  std::string workload;
  std::string budgets = "1024,2048,4096";
  std::string policies = "dhsa,block_topk,streaming,oracle_topk";
  std::string seeds = "1";
  std::string progress = "auto";
  std::string json_out;
  std::string backend = "reference";
  int64_t rows = 512;
  int64_t row_seed = 1;
  int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  bool full = false;
  bool match_pairs = true;
  bool json = false;
  DhsaFlags dhsa;
  WorkloadConfig gen;
  int64_t retrieve = WorkloadConfig().retrieve;
  int64_t needles = WorkloadConfig().needles;
  // --model: the language-model table (bench/lm).
  std::string model;
  std::string text = "/usr/lib/python3.11";
  std::string lm_policies = "local,streaming,block_topk,dhsa,oracle_block";
  std::string trace_policies = "dhsa,block_topk,streaming";
  int64_t windows = 8;
  int64_t window = 8192;
  int64_t trace_rows = 256;
};

absl::StatusOr<std::vector<int64_t>> ParseIntList(const std::string& text, const char* flag) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int64_t x;
    if (!absl::SimpleAtoi(part, &x)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, " needs comma-separated integers; got '", text, "'"));
    }
    out.push_back(x);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, " is empty"));
  return out;
}

// A one-line bar on stderr, redrawn in place.
class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled), start_(Clock::now()) {}
  void Update(double fraction, const std::string& stage) {
    if (!enabled_) return;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(fraction * kWidth + 0.5);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    std::fprintf(stderr, "\r\033[K[%s%s] %3.0f%% %6.0f s  %s", std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '.').c_str(), 100.0 * fraction, elapsed,
                 stage.c_str());
    std::fflush(stderr);
  }
  void Finish() {
    if (enabled_) std::fprintf(stderr, "\r\033[K");
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool enabled_;
  Clock::time_point start_;
};

std::string Fixed(double x, int digits) { return absl::StrFormat("%.*f", digits, x); }

const PolicyResult* Find(const EvalReport& r, const std::string& policy, int64_t budget) {
  for (const PolicyResult& p : r.results) {
    if (p.policy == policy && p.budget == budget) return &p;
  }
  return nullptr;
}

// "-23.4%": dhsa's output error relative to block_topk's.
std::string ErrorChange(const EvalReport& r, int64_t budget) {
  const PolicyResult* a = Find(r, "dhsa", budget);
  const PolicyResult* b = Find(r, "block_topk", budget);
  if (a == nullptr || b == nullptr || b->fidelity.output_rel_error <= 0) return "";
  return absl::StrFormat(
      "%+.1f%%", 100.0 * (a->fidelity.output_rel_error / b->fidelity.output_rel_error - 1.0));
}

void PrintReport(const EvalReport& r, const std::vector<EvalReport>& per_input,
                 const std::vector<int64_t>& budgets, const std::string& what) {
  std::printf("dhsa eval: Q [%lld, %lld, %lld]  K/V [%lld, %lld, %lld]  %s\n",
              static_cast<long long>(r.shape.hq), static_cast<long long>(r.shape.lq),
              static_cast<long long>(r.shape.dim), static_cast<long long>(r.shape.hkv),
              static_cast<long long>(r.shape.lk), static_cast<long long>(r.shape.dim),
              what.c_str());
  std::printf(
      "  recall and output error on %lld sampled query rows x %lld heads; needle hits on %lld "
      "needle query rows\n",
      static_cast<long long>(r.sampled_rows), static_cast<long long>(r.shape.hq),
      static_cast<long long>(r.needle_rows));
  std::printf(
      "  time = selection (reference kernels, whole sequence) + attention (%s backend) %s; "
      "oracle_topk (reference attention) is timed on its rows and scaled\n\n",
      r.attention_name.c_str(),
      r.full ? "over all rows (--full)"
             : "on the sampled rows scaled to all rows by computed pairs");
  Table t({"budget", "policy", "ran at", "recall", "recall p5", "out err", "needle hit", "density",
           "select", "attention", "time"});
  for (const PolicyResult& p : r.results) {
    t.AddRow({absl::StrCat(p.budget), p.policy, absl::StrCat(p.run_budget),
              Fixed(p.fidelity.recall_mean, 4), Fixed(p.fidelity.recall_p5, 4),
              Fixed(p.fidelity.output_rel_error, 4),
              p.needle_pairs > 0 ? Fixed(p.needle_hit_rate(), 3) : "-",
              absl::StrFormat("%.2f%%", 100.0 * p.density()),
              FormatSeconds(p.select_seconds) + (p.select_estimated ? "*" : ""),
              FormatSeconds(p.attention_seconds) + (p.attention_estimated ? "*" : ""),
              FormatSeconds(p.select_seconds + p.attention_seconds)});
  }
  std::printf("%s", t.Render().c_str());
  bool estimated = false;
  for (const PolicyResult& p : r.results) estimated |= p.select_estimated || p.attention_estimated;
  if (estimated) std::printf("  * estimated from the sampled rows\n");
  std::printf(
      "  ran at: the budget each policy ran at, the smallest at which it computes at least the "
      "(query, key) pairs dhsa computes at the nominal budget (--match-pairs; "
      "bench/eval/pair_match.h)\n");
  std::string change;
  for (int64_t b : budgets) {
    const std::string c = ErrorChange(r, b);
    if (c.empty()) continue;
    absl::StrAppend(&change, change.empty() ? "" : ", ", "budget ", b, " ", c);
    if (per_input.size() > 1) {
      std::vector<std::string> each;
      for (const EvalReport& e : per_input) each.push_back(ErrorChange(e, b));
      absl::StrAppend(&change, " (per input ", absl::StrJoin(each, " "), ")");
    }
  }
  if (!change.empty()) std::printf("\ndhsa output error vs block_topk: %s\n", change.c_str());
  for (const std::string& note : r.notes) std::printf("note: %s\n", note.c_str());
  if (!r.boundaries.empty()) {
    std::printf("\nchunk boundaries vs the %lld true segment starts (precision / recall):\n",
                static_cast<long long>(r.true_segments));
    Table b({"policy", "chunks", "P exact", "R exact", "P +-2", "R +-2"});
    for (const BoundaryResult& br : r.boundaries) {
      b.AddRow({br.policy, absl::StrCat(br.chunks), Fixed(br.exact.precision, 3),
                Fixed(br.exact.recall, 3), Fixed(br.near.precision, 3), Fixed(br.near.recall, 3)});
    }
    std::printf("%s", b.Render().c_str());
  }
}

std::string Percent(double x) { return absl::StrFormat("%+.2f%%", 100.0 * x); }

void PrintLmReport(const LmEvalReport& r, const std::string& model, const std::string& text) {
  std::printf(
      "dhsa eval --model %s: bits per byte on the second half of %zu windows of %lld bytes "
      "of %s\n",
      model.c_str(), r.offsets.size(), static_cast<long long>(r.window), text.c_str());
  std::printf("window offsets: %s\n\n", absl::StrJoin(r.offsets, " ").c_str());
  const LmRun& dense = r.runs.front();
  std::vector<std::string> header = {"budget", "policy", "ran at", "bpb", "vs dense", "density"};
  for (size_t w = 0; w < r.offsets.size(); ++w) header.push_back(absl::StrCat("w", w));
  header.push_back("time");
  Table t(header);
  for (const LmRun& run : r.runs) {
    std::vector<std::string> row = {run.budget > 0 ? absl::StrCat(run.budget) : "-",
                                    run.policy,
                                    run.budget > 0 ? absl::StrCat(run.run_budget) : "-",
                                    Fixed(run.MeanBpb(), 4),
                                    Percent(run.MeanBpb() / dense.MeanBpb() - 1.0),
                                    absl::StrFormat("%.1f%%", 100.0 * run.MeanDensity())};
    for (size_t w = 0; w < run.bpb.size(); ++w) {
      row.push_back(run.budget > 0 ? Percent(run.bpb[w] / dense.bpb[w] - 1.0)
                                   : Fixed(run.bpb[w], 4));
    }
    row.push_back(FormatSeconds(run.seconds));
    t.AddRow(row);
  }
  std::printf("%s", t.Render().c_str());
  std::printf(
      "  vs dense: mean bpb over windows relative to dense; w<n>: window n (dense: its bpb,"
      " others: relative to dense on that window); ran at: the budget each policy ran at, the"
      " smallest at which it computes at least dhsa's (query, key) pairs (--match-pairs)\n");
  if (r.layers.empty()) return;
  std::printf("\nattention fidelity per layer on the dense run's traces (mean over windows):\n");
  Table f({"layer", "budget", "policy", "ran at", "recall", "recall p5", "out err", "density"});
  for (size_t l = 0; l < r.layers.size(); ++l) {
    for (const PolicyResult& p : r.layers[l].results) {
      f.AddRow({absl::StrCat(l), absl::StrCat(p.budget), p.policy, absl::StrCat(p.run_budget),
                Fixed(p.fidelity.recall_mean, 4), Fixed(p.fidelity.recall_p5, 4),
                Fixed(p.fidelity.output_rel_error, 4),
                absl::StrFormat("%.2f%%", 100.0 * p.density())});
    }
  }
  std::printf("%s", f.Render().c_str());
}

absl::Status EvalModel(EvalFlags& f, const EvalOptions& options, bool show) {
  DHSA_ASSIGN_OR_RETURN(TinyLm model, LoadTinyLm(f.model));
  DHSA_ASSIGN_OR_RETURN(std::string text, ReadCorpus(f.text));
  LmEvalOptions lm;
  lm.base = options.base;
  lm.budgets = options.budgets;
  lm.window = f.window;
  lm.num_threads = options.num_threads;
  lm.trace_rows = f.trace_rows;
  lm.match_pairs = f.match_pairs;
  DHSA_ASSIGN_OR_RETURN(lm.offsets,
                        EvenWindowOffsets(static_cast<int64_t>(text.size()), f.window, f.windows));
  for (absl::string_view p : absl::StrSplit(f.lm_policies, ',', absl::SkipWhitespace())) {
    lm.policies.emplace_back(p);
  }
  for (absl::string_view p : absl::StrSplit(f.trace_policies, ',', absl::SkipWhitespace())) {
    lm.trace_policies.emplace_back(p);
  }
  ProgressBar bar(show);
  lm.progress = [&](double fraction, const std::string& stage) { bar.Update(fraction, stage); };
  DHSA_ASSIGN_OR_RETURN(LmEvalReport report, RunLmEval(model, text, lm));
  bar.Finish();
  PrintLmReport(report, f.model, f.text);
  return absl::OkStatus();
}

absl::Status Eval(EvalFlags& f, bool budgets_given, bool policies_given) {
  DHSA_ASSIGN_OR_RETURN(DhsaConfig base, ToDhsaConfig(f.dhsa));
  EvalOptions options;
  options.base = base;
  DHSA_ASSIGN_OR_RETURN(options.budgets, ParseIntList(f.budgets, "budgets"));
  for (absl::string_view p : absl::StrSplit(f.policies, ',', absl::SkipWhitespace())) {
    options.policies.emplace_back(p);
  }
  if (options.policies.empty()) return absl::InvalidArgumentError("--policies is empty");
  options.rows = f.rows;
  options.row_seed = static_cast<uint64_t>(f.row_seed);
  options.full = f.full;
  options.match_pairs = f.match_pairs;
  options.num_threads = static_cast<int>(std::max<int64_t>(1, f.threads));
  DHSA_ASSIGN_OR_RETURN(const Backend backend, ParseBackend(f.backend));
  options.attention = backend == Backend::kCpu ? &SparseAttentionCpu : &SparseAttentionReference;
  options.attention_name = std::string(BackendName(backend));
  DHSA_ASSIGN_OR_RETURN(std::vector<int64_t> seeds, ParseIntList(f.seeds, "seeds"));
  if (!f.workload.empty() && seeds.size() > 1) {
    return absl::InvalidArgumentError(
        "--seeds with several seeds needs the generator, not "
        "--workload");
  }
  bool show = f.progress == "on" || (f.progress == "auto" && isatty(STDERR_FILENO) && !f.json);
  if (f.progress != "on" && f.progress != "off" && f.progress != "auto") {
    return absl::InvalidArgumentError("--progress must be auto, on or off");
  }
  if (!f.model.empty()) {
    if (!budgets_given) options.budgets = {512, 1024, 2048};
    if (policies_given) f.lm_policies = f.policies;
    return EvalModel(f, options, show);
  }
  ProgressBar bar(show);
  f.gen.retrieve = static_cast<int>(f.retrieve);
  f.gen.needles = static_cast<int>(f.needles);

  std::vector<EvalReport> reports;
  const double n = static_cast<double>(seeds.size());
  for (size_t i = 0; i < seeds.size(); ++i) {
    const std::string prefix =
        seeds.size() > 1 ? absl::StrCat("seed ", seeds[i], " (", i + 1, "/", seeds.size(), "): ")
                         : "";
    EvalInput input;
    if (!f.workload.empty()) {
      bar.Update(0, "reading " + f.workload);
      DHSA_ASSIGN_OR_RETURN(input, ReadEvalInput(f.workload));
    } else {
      WorkloadConfig c = f.gen;
      c.seed = static_cast<uint64_t>(seeds[i]);
      bar.Update(static_cast<double>(i) / n, prefix + "generating the workload");
      DHSA_ASSIGN_OR_RETURN(Workload w, GenerateWorkload(c));
      input = EvalInputFromWorkload(std::move(w));
    }
    options.progress = [&](double fraction, const std::string& stage) {
      bar.Update((static_cast<double>(i) + fraction) / n, prefix + stage);
    };
    DHSA_ASSIGN_OR_RETURN(EvalReport r, RunEval(input, options));
    reports.push_back(std::move(r));
  }
  bar.Finish();
  DHSA_ASSIGN_OR_RETURN(EvalReport mean, AverageReports(reports));
  std::string what;
  if (!f.workload.empty()) {
    what = f.workload;
    mean.source = f.workload;
  } else {
    what = absl::StrCat("generated (bench/workload), seed", seeds.size() > 1 ? "s " : " ",
                        absl::StrJoin(seeds, ","), seeds.size() > 1 ? ": mean over seeds" : "");
  }
  if (f.json || !f.json_out.empty()) {
    std::string per;
    for (const EvalReport& r : reports) {
      absl::StrAppend(&per, per.empty() ? "" : ",", EvalReportJson(r));
    }
    const std::string doc =
        absl::StrCat("{\"inputs\": ", nlohmann::json(what).dump(),
                     ", \"mean\": ", EvalReportJson(mean), ", \"per_input\": [", per, "]}\n");
    if (!f.json_out.empty()) DHSA_RETURN_IF_ERROR(WriteFileAtomically(f.json_out, doc));
    if (f.json) {
      std::printf("%s", doc.c_str());
      return absl::OkStatus();
    }
  }
  PrintReport(mean, reports, options.budgets, what);
  return absl::OkStatus();
}

}  // namespace

int RunEval(const std::vector<std::string>& args) {
  EvalFlags f;
  FlagSet flags(
      "eval", "[--workload DIR | generator flags] [--budgets ...] [--policies ...] [flags]",
      "Compares selection policies with dense attention on one layer's Q, K, V: per policy\n"
      "and budget, attention recall (mean, 5th percentile) and output relative error on\n"
      "sampled query rows, needle hit rate on every planted needle query, density (computed\n"
      "over causal pairs, exact) and time. Inputs come from --workload DIR (q.npy, k.npy,\n"
      "v.npy and the meta.json of `dhsa gen`) or are generated here, one per seed (the report\n"
      "is then the mean over seeds). Policies: dhsa, block_topk, streaming, dense,\n"
      "oracle_topk, and dhsa variants that change one ingredient: dhsa_paper (the spec's\n"
      "method, preset paper), dhsa_fixed (fixed chunks of --chunk-mean keys), dhsa_paper_mean\n"
      "(plain-mean summaries; the paper score only), dhsa_shared (one selection for all KV\n"
      "heads), dhsa_<boundary mode>; modifiers combine (dhsa_paper_fixed_mean). With true\n"
      "segments known, chunk boundaries are scored against them.",
      "  dhsa eval --len 32768 --seeds 1,2,3,4,5 --budgets 1024,2048,4096\n"
      "  dhsa eval --len 8192 --policies dhsa,dhsa_paper,dhsa_fixed,dhsa_shared,block_topk"
      " --budgets 1024\n"
      "  dhsa gen --out /tmp/w --len 16384 && dhsa eval --workload /tmp/w --json\n"
      "  dhsa eval --model ../shared/data/tinylm/tinylm.safetensors --text /usr/lib/python3.11");
  flags.String("workload", &f.workload, "directory with q.npy k.npy v.npy [meta.json]");
  flags.String("model", &f.model,
               "tinylm .safetensors: bits per byte of the model with each policy in every layer"
               " (policies also local, oracle_block; budgets default 512,1024,2048)");
  flags.String("text", &f.text, "--model: text file or directory of *.py files");
  flags.Int("windows", &f.windows, "--model: windows spread evenly over the text");
  flags.Int("window", &f.window, "--model: bytes per window (bpb on its second half)");
  flags.Int("trace-rows", &f.trace_rows,
            "--model: rows per layer and window for the per-layer fidelity (0: none)");
  flags.String("trace-policies", &f.trace_policies,
               "--model: policies of the per-layer fidelity table");
  flags.String("budgets", &f.budgets, "comma-separated token budgets (Nb)");
  flags.String("policies", &f.policies, "comma-separated policies and dhsa variants");
  flags.Int("rows", &f.rows, "query rows sampled (one per stratum) for recall and error");
  flags.Int("row-seed", &f.row_seed, "seed of the row sample");
  flags.Bool("full", &f.full, "time attention over every row instead of estimating it");
  flags.Bool("match-pairs", &f.match_pairs,
             "run each policy at the smallest budget at which it computes at least dhsa's (query,"
             " key) pairs at the nominal budget (false: every policy at the nominal budget)");
  flags.String("backend", &f.backend,
               "sparse attention that is run, timed and judged: reference or cpu (the fast path;"
               " time it with --full)");
  flags.Int("threads", &f.threads, "threads");
  flags.Bool("json", &f.json, "print the report as JSON");
  flags.String("json-out", &f.json_out, "also write the JSON report to this file");
  flags.String("progress", &f.progress, "progress bar on stderr: auto (a terminal), on, off");
  f.dhsa.flags = &flags;
  flags.String("preset", &f.dhsa.preset, kPresetHelp);
  flags.Int("sink", &f.dhsa.sink, "first keys always kept (S)");
  flags.Int("local", &f.dhsa.local, "most recent keys always kept (W, >= q-block)");
  flags.Int("q-block", &f.dhsa.q_block, "query rows per block (Bq)");
  flags.String("boundaries", &f.dhsa.boundaries, "chunking of plain dhsa (dynamic or fixed)");
  flags.Int("chunk-mean", &f.dhsa.chunk_mean, "target mean chunk length (fixed: the length)");
  flags.Int("chunk-min", &f.dhsa.chunk_min, "minimum chunk length");
  flags.Int("chunk-max", &f.dhsa.chunk_max, "longer chunks are split");
  flags.Int("block", &f.dhsa.block, "key block length of block_topk (Bk)");
  flags.String("chunk-score", &f.dhsa.chunk_score,
               "chunk score of dhsa: paper (the spec's rho . kappa) or mass (estimated attention"
               " mass, docs/fidelity.md)");
  flags.Int("score-rows", &f.dhsa.score_rows,
            "mass score: query rows per mean query (divides q-block)");
  flags.Double("scale", &f.dhsa.scale, "softmax scale; 0 = 1/sqrt(d)");
  flags.Int("len", &f.gen.len, "generator: tokens (Lq = Lk)");
  flags.Int("hq", &f.gen.hq, "generator: query heads");
  flags.Int("hkv", &f.gen.hkv, "generator: KV heads");
  flags.Int("dim", &f.gen.dim, "generator: head dim");
  flags.String("seeds", &f.seeds, "generator: comma-separated seeds, one input each");
  flags.Double("segment-mean", &f.gen.segment_mean, "generator: mean topic segment length");
  flags.Double("segment-sigma", &f.gen.segment_sigma, "generator: sigma of log segment length");
  flags.Double("noise", &f.gen.noise, "generator: per-element key noise");
  flags.Int("retrieve", &f.retrieve, "generator: earlier segments each query segment attends to");
  flags.Double("query-focus", &f.gen.query_focus, "generator: logit a query gives its topics");
  flags.Double("query-locality", &f.gen.query_locality,
               "generator: share of a query's own segment topic");
  flags.Double("head-spread", &f.gen.head_spread,
               "generator: sigma of log mixing weights across heads");
  flags.Double("sink-strength", &f.gen.sink_strength, "generator: logit of the sink key");
  flags.Double("needle-strength", &f.gen.needle_strength, "generator: logit of needle keys");
  flags.Int("needles", &f.needles, "generator: planted needles");
  flags.Int("rope-dims", &f.gen.rope_dims, "generator: head dims carrying rotary embeddings");
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) return ReportError("eval", parsed);
  if (flags.help_requested()) {
    std::printf("%s", flags.Help().c_str());
    return kExitOk;
  }
  absl::Status s = Eval(f, flags.Given("budgets"), flags.Given("policies"));
  if (!s.ok()) return ReportError("eval", s);
  return kExitOk;
}

}  // namespace dhsa::cli
