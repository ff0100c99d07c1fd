// `dhsa bench --backend cpu`: the fast CPU path's speed, side by side with the reference, its own
// dense policy and the machine's GEMM peak (bench/cpu/cpu_bench.h).
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/cpu/cpu_bench.h"
#include "clients/cli/commands.h"
#include "clients/cli/flags.h"
#include "clients/cli/table.h"
#include "kernels/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace dhsa::cli {
namespace {

struct BenchFlags {
  std::string backend = "cpu";
  std::string lengths = "8192,32768,65536";
  int64_t hq = 8, hkv = 2, dim = 128, budget = 2048;
  std::string dtype = "float32";
  int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  int64_t repeats = 3;
  bool reference = true, dense = true;
  int64_t decode_tokens = 20;
  bool json = false;
  std::string progress = "auto";
};

double LoadAverage() {
  double load[1] = {0};
  return getloadavg(load, 1) == 1 ? load[0] : -1;
}

nlohmann::json TimingJson(const AttendTiming& t, double calibration_gflops) {
  return {{"total_s", t.total},
          {"selection_s", t.selection},
          {"attention_s", t.attention},
          {"computed_pairs", t.computed_pairs},
          {"causal_pairs", t.causal_pairs},
          {"attention_gflops", t.attention_gflops},
          {"vs_calibration", t.attention_gflops / calibration_gflops}};
}

std::vector<std::string> TimingRow(const std::string& length, const std::string& run,
                                   const AttendTiming& t, double calibration_gflops,
                                   const std::string& note) {
  return {length,
          run,
          FormatSeconds(t.total),
          FormatSeconds(t.selection),
          FormatSeconds(t.attention),
          absl::StrFormat("%.1f", t.attention_gflops),
          absl::StrFormat("%.2f", t.attention_gflops / calibration_gflops),
          note};
}

void PrintTable(const CpuBenchResult& r, double load_start, double load_end) {
  const CpuBenchConfig& c = r.config;
  std::printf(
      "dhsa bench: cpu backend, Hq=%lld Hkv=%lld d=%lld, budget %lld, %s, %d threads, SIMD %s\n",
      static_cast<long long>(c.hq), static_cast<long long>(c.hkv), static_cast<long long>(c.dim),
      static_cast<long long>(c.budget), std::string(DTypeName(c.dtype)).c_str(), c.threads,
      r.simd_target.c_str());
  std::printf("  load average %.2f at start, %.2f at end; GFLOP/s count 4*d per attended pair\n\n",
              load_start, load_end);
  Table t({"L", "run", "total", "selection", "attention", "GFLOP/s", "vs GEMM", "note"});
  t.AddRow({"-",
            absl::StrFormat("(d) GEMM %lldx%lldx%lld tiles", static_cast<long long>(r.tile_rows),
                            static_cast<long long>(r.tile_keys), static_cast<long long>(c.dim)),
            FormatSeconds(r.calibration_seconds), "", "",
            absl::StrFormat("%.1f", r.calibration_gflops), "1.00",
            "oneDNN sgemm, QK^T + PV, all threads"});
  for (const CpuBenchLength& l : r.lengths) {
    const std::string len = absl::StrCat(l.length);
    if (l.has_reference) {
      t.AddRow(TimingRow(len, "(a) reference, dhsa", l.reference, r.calibration_gflops,
                         absl::StrFormat("(c) is %.0fx faster", l.reference.total / l.dhsa.total)));
    }
    if (l.has_dense) {
      t.AddRow(TimingRow(len, "(b) cpu, dense", l.dense, r.calibration_gflops, ""));
    }
    std::string note = absl::StrFormat("selection %.1f%% of total, density %.2f%%",
                                       100.0 * l.dhsa.selection / l.dhsa.total,
                                       100.0 * static_cast<double>(l.dhsa.computed_pairs) /
                                           static_cast<double>(l.dhsa.causal_pairs));
    if (l.has_dense)
      absl::StrAppend(&note,
                      absl::StrFormat(", %.1fx faster than (b)", l.dense.total / l.dhsa.total));
    t.AddRow(TimingRow(len, "(c) cpu, dhsa", l.dhsa, r.calibration_gflops, note));
  }
  if (r.decode_length > 0) {
    t.AddRow(
        {absl::StrCat(r.decode_length), "decode, 1 token", FormatSeconds(r.decode_median), "", "",
         "", "",
         absl::StrFormat("median of %lld calls (best %s), kept chunk summaries",
                         static_cast<long long>(c.decode_tokens), FormatSeconds(r.decode_best))});
  }
  std::printf("%s", t.Render().c_str());
}

void PrintJson(const CpuBenchResult& r, double load_start, double load_end) {
  const CpuBenchConfig& c = r.config;
  nlohmann::json j;
  j["config"] = {{"hq", c.hq},
                 {"hkv", c.hkv},
                 {"dim", c.dim},
                 {"budget", c.budget},
                 {"dtype", DTypeName(c.dtype)},
                 {"threads", c.threads},
                 {"repeats", c.repeats},
                 {"lengths", c.lengths}};
  j["simd_target"] = r.simd_target;
  j["load_average"] = {{"start", load_start}, {"end", load_end}};
  j["calibration"] = {{"tile_rows", r.tile_rows},
                      {"tile_keys", r.tile_keys},
                      {"seconds", r.calibration_seconds},
                      {"gflops", r.calibration_gflops}};
  nlohmann::json lengths = nlohmann::json::array();
  for (const CpuBenchLength& l : r.lengths) {
    nlohmann::json e;
    e["length"] = l.length;
    if (l.has_reference) e["reference_dhsa"] = TimingJson(l.reference, r.calibration_gflops);
    if (l.has_dense) {
      e["cpu_dense"] = TimingJson(l.dense, r.calibration_gflops);
      e["dhsa_speedup_vs_dense"] = l.dense.total / l.dhsa.total;
    }
    e["cpu_dhsa"] = TimingJson(l.dhsa, r.calibration_gflops);
    e["selection_share"] = l.dhsa.selection / l.dhsa.total;
    lengths.push_back(std::move(e));
  }
  j["lengths"] = std::move(lengths);
  if (r.decode_length > 0) {
    j["decode"] = {{"length", r.decode_length},
                   {"calls", c.decode_tokens},
                   {"median_s", r.decode_median},
                   {"best_s", r.decode_best}};
  }
  std::printf("%s\n", j.dump(2).c_str());
}

absl::Status Bench(const BenchFlags& f) {
  if (f.backend != "cpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend ", f.backend,
                     " has no benchmark; only --backend cpu (which also times the "
                     "reference on the smallest length)"));
  }
  CpuBenchConfig c;
  c.lengths.clear();
  for (absl::string_view part : absl::StrSplit(f.lengths, ',', absl::SkipEmpty())) {
    int64_t len = 0;
    if (!absl::SimpleAtoi(part, &len) || len < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("--lengths wants comma-separated lengths >= 2; got '", f.lengths, "'"));
    }
    c.lengths.push_back(len);
  }
  c.hq = f.hq;
  c.hkv = f.hkv;
  c.dim = f.dim;
  c.budget = f.budget;
  DHSA_ASSIGN_OR_RETURN(c.dtype, ParseDType(f.dtype));
  c.threads = static_cast<int>(f.threads);
  c.repeats = static_cast<int>(f.repeats);
  c.reference = f.reference;
  c.dense = f.dense;
  c.decode_tokens = f.decode_tokens;
  DHSA_ASSIGN_OR_RETURN(const bool show_progress, ShowProgress(f.progress));
  // RunCpuBench names each step as it starts: calibration, then per length the workload, the
  // reference (smallest length), dhsa and dense, then decode. The bar counts steps (they differ
  // in length: dense and the reference take longest).
  const double lengths = static_cast<double>(c.lengths.size());
  const double steps =
      1 + lengths * (2 + (c.dense ? 1 : 0)) + (c.reference ? 1 : 0) + (c.decode_tokens > 0 ? 1 : 0);
  ProgressBar bar(show_progress);
  double done = 0;
  c.progress = [&](const std::string& line) { bar.Update(done++ / steps, line); };
  const double load_start = LoadAverage();
  DHSA_ASSIGN_OR_RETURN(CpuBenchResult r, RunCpuBench(c));
  bar.Finish();
  const double load_end = LoadAverage();
  if (f.json) {
    PrintJson(r, load_start, load_end);
  } else {
    PrintTable(r, load_start, load_end);
  }
  return absl::OkStatus();
}

}  // namespace

int RunBench(const std::vector<std::string>& args) {
  BenchFlags f;
  FlagSet flags(
      "bench", "--backend cpu [flags]",
      "Times the fast CPU path on structured workloads (Lq = Lk = L, a fresh prefill) and\n"
      "prints, in one run: (a) the reference on the smallest L, (b) the fast path with the\n"
      "dense policy, (c) the fast path with dhsa split into selection (boundaries, summaries,\n"
      "scores, selection) and attention, and (d) a library GEMM of the attention tiles' shapes\n"
      "on all threads at once: the machine's practical peak, so 'vs GEMM' is an efficiency\n"
      "measured side by side. Then one-token decode at the largest L with kept boundaries and\n"
      "chunk summaries. A table by default, --json for machines; a progress bar on stderr when\n"
      "it is a terminal. Other work on the machine skews the numbers: the load average is\n"
      "printed.",
      "  dhsa bench --backend cpu\n"
      "  dhsa bench --backend cpu --lengths 4096,16384 --reference=false --json\n"
      "  dhsa bench --backend cpu --lengths 65536 --dtype bfloat16 --progress on 2> progress.log");
  flags.String("backend", &f.backend, "backend to time: cpu");
  flags.String("lengths", &f.lengths, "comma-separated sequence lengths");
  flags.Int("hq", &f.hq, "query heads");
  flags.Int("hkv", &f.hkv, "KV heads");
  flags.Int("dim", &f.dim, "head dim");
  flags.Int("budget", &f.budget, "dhsa token budget per query row");
  flags.String("dtype", &f.dtype, "storage type of Q, K, V: float32, float16, bfloat16");
  flags.Int("threads", &f.threads, "threads");
  flags.Int("repeats", &f.repeats, "dhsa runs per length; the fastest is reported");
  flags.Bool("reference", &f.reference, "time (a), the reference on the smallest length");
  flags.Bool("dense", &f.dense, "time (b), the dense policy");
  flags.Int("decode-tokens", &f.decode_tokens,
            "decode calls timed at the largest length (0: none)");
  flags.Bool("json", &f.json, "print the results as JSON");
  flags.String("progress", &f.progress, kProgressHelp);
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) return ReportError("bench", parsed);
  if (flags.help_requested()) {
    std::printf("%s", flags.Help().c_str());
    return kExitOk;
  }
  absl::Status s = Bench(f);
  if (!s.ok()) return ReportError("bench", s);
  return kExitOk;
}

}  // namespace dhsa::cli
