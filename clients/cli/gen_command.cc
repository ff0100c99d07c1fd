// `dhsa gen`: writes a structured synthetic workload (q.npy, k.npy, v.npy, meta.json).
#include <chrono>
#include <cstdio>

#include "bench/workload/workload.h"
#include "clients/cli/commands.h"
#include "clients/cli/flags.h"
#include "kernels/common/status_macros.h"

namespace dhsa::cli {
namespace {

absl::Status Gen(const std::string& out, WorkloadConfig config, const std::string& dtype) {
  if (out.empty()) return absl::InvalidArgumentError("--out is required (a directory)");
  DHSA_ASSIGN_OR_RETURN(config.dtype, ParseDType(dtype));
  const auto start = std::chrono::steady_clock::now();
  DHSA_ASSIGN_OR_RETURN(Workload w, GenerateWorkload(config));
  DHSA_RETURN_IF_ERROR(WriteWorkload(w, out));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
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
  std::string out, dtype = "float32";
  int64_t seed = static_cast<int64_t>(c.seed), retrieve = c.retrieve, needles = c.needles;
  FlagSet flags("gen", "--out DIR [flags]",
                "Generates a structured long-context workload for one layer: topic segments of\n"
                "keys, queries that retrieve earlier segments, a sink key, rotary embeddings and\n"
                "planted needles (bench/workload/workload.h documents the model). Writes\n"
                "DIR/q.npy [Hq, L, d], DIR/k.npy and DIR/v.npy [Hkv, L, d], and DIR/meta.json.",
                "  dhsa gen --out /tmp/w --len 32768\n"
                "  dhsa gen --out /tmp/small --len 4099 --hq 4 --hkv 1 --dim 64 --dtype float16");
  flags.String("out", &out, "directory to write");
  flags.Int("len", &c.len, "tokens (Lq = Lk)");
  flags.Int("hq", &c.hq, "query heads");
  flags.Int("hkv", &c.hkv, "KV heads");
  flags.Int("dim", &c.dim, "head dim");
  flags.Int("seed", &seed, "random seed");
  flags.String("dtype", &dtype, "float32 or float16");
  flags.Double("segment-mean", &c.segment_mean, "mean topic segment length (log-normal)");
  flags.Int("retrieve", &retrieve, "earlier segments each query segment attends to");
  flags.Int("needles", &needles, "planted needles");
  flags.Int("rope-dims", &c.rope_dims, "head dims carrying rotary embeddings");
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) return ReportError("gen", parsed);
  if (flags.help_requested()) {
    std::printf("%s", flags.Help().c_str());
    return kExitOk;
  }
  c.seed = static_cast<uint64_t>(seed);
  c.retrieve = static_cast<int>(retrieve);
  c.needles = static_cast<int>(needles);
  absl::Status s = Gen(out, c, dtype);
  if (!s.ok()) return ReportError("gen", s);
  return kExitOk;
}

}  // namespace dhsa::cli
