// `dhsa gen`: writes a structured synthetic workload (q.npy, k.npy, v.npy, meta.json).
#include <chrono>
#include <cstdio>

#include "bench/workload/workload.h"
#include "clients/cli/commands.h"
#include "clients/cli/flags.h"
#include "clients/cli/table.h"
#include "kernels/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace dhsa::cli {
namespace {

struct GenFlags {
  std::string out, dtype = "float32", progress = "auto";
  bool json = false;
};

absl::Status Gen(const GenFlags& f, WorkloadConfig config) {
  if (f.out.empty()) return absl::InvalidArgumentError("--out is required (a directory)");
  DHSA_ASSIGN_OR_RETURN(config.dtype, ParseDType(f.dtype));
  DHSA_ASSIGN_OR_RETURN(const bool show, ShowProgress(f.progress));
  DHSA_RETURN_IF_ERROR(ValidateWorkloadConfig(config));
  ProgressBar bar(show);
  // Generating takes about as long as writing; neither reports finer progress.
  bar.Update(0, "generating " + std::to_string(config.len) + " tokens");
  const auto start = std::chrono::steady_clock::now();
  DHSA_ASSIGN_OR_RETURN(Workload w, GenerateWorkload(config));
  const int64_t bytes =
      static_cast<int64_t>(w.q.bytes.size() + w.k.bytes.size() + w.v.bytes.size());
  bar.Update(0.5, "writing " + FormatBytes(static_cast<double>(bytes)) + " to " + f.out);
  DHSA_RETURN_IF_ERROR(WriteWorkload(w, f.out));
  bar.Finish();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (f.json) {
    nlohmann::json j;
    j["dir"] = f.out;
    j["files"] = {f.out + "/q.npy", f.out + "/k.npy", f.out + "/v.npy", f.out + "/meta.json"};
    j["q_shape"] = w.q.shape;
    j["kv_shape"] = w.k.shape;
    j["dtype"] = DTypeName(config.dtype);
    j["segments"] = w.segments.size();
    j["needles"] = w.needles.size();
    j["bytes"] = bytes;
    j["seconds"] = seconds;
    std::printf("%s\n", j.dump(2).c_str());
    return absl::OkStatus();
  }
  const std::string& out = f.out;
  std::printf("dhsa gen: wrote %s/{q,k,v}.npy and meta.json in %.2f s\n", out.c_str(), seconds);
  std::printf(
      "  Q [%lld, %lld, %lld]  K/V [%lld, %lld, %lld]  %s; %zu topic segments, %zu needles\n",
      static_cast<long long>(config.hq), static_cast<long long>(config.len),
      static_cast<long long>(config.dim), static_cast<long long>(config.hkv),
      static_cast<long long>(config.len), static_cast<long long>(config.dim),
      std::string(DTypeName(config.dtype)).c_str(), w.segments.size(), w.needles.size());
  return absl::OkStatus();
}

}  // namespace

int RunGen(const std::vector<std::string>& args) {
  WorkloadConfig c;
  GenFlags f;
  int64_t seed = static_cast<int64_t>(c.seed), retrieve = c.retrieve, needles = c.needles;
  FlagSet flags("gen", "--out DIR [flags]",
                "Generates a structured long-context workload for one layer: topic segments of\n"
                "keys, queries that retrieve earlier segments, a sink key, rotary embeddings and\n"
                "planted needles (bench/workload/workload.h documents the model). Writes\n"
                "DIR/q.npy [Hq, L, d], DIR/k.npy and DIR/v.npy [Hkv, L, d], and DIR/meta.json.",
                "  dhsa gen --out /tmp/w --len 32768\n"
                "  dhsa gen --out /tmp/small --len 4099 --hq 4 --hkv 1 --dim 64 --dtype float16\n"
                "  dhsa gen --out /tmp/w --len 131072 --json > /tmp/w.json");
  flags.String("out", &f.out, "directory to write");
  flags.Int("len", &c.len, "tokens (Lq = Lk)");
  flags.Int("hq", &c.hq, "query heads");
  flags.Int("hkv", &c.hkv, "KV heads");
  flags.Int("dim", &c.dim, "head dim");
  flags.Int("seed", &seed, "random seed");
  flags.String("dtype", &f.dtype, "float32 or float16");
  flags.Double("segment-mean", &c.segment_mean, "mean topic segment length (log-normal)");
  flags.Int("retrieve", &retrieve, "earlier segments each query segment attends to");
  flags.Int("needles", &needles, "planted needles");
  flags.Int("rope-dims", &c.rope_dims, "head dims carrying rotary embeddings");
  flags.Bool("json", &f.json, "print what was written as JSON");
  flags.String("progress", &f.progress, kProgressHelp);
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) return ReportError("gen", parsed);
  if (flags.help_requested()) {
    std::printf("%s", flags.Help().c_str());
    return kExitOk;
  }
  c.seed = static_cast<uint64_t>(seed);
  c.retrieve = static_cast<int>(retrieve);
  c.needles = static_cast<int>(needles);
  absl::Status s = Gen(f, c);
  if (!s.ok()) return ReportError("gen", s);
  return kExitOk;
}

}  // namespace dhsa::cli
