// `dhsa lm`: tinylm's bits per byte on windows of text, with every layer's attention done by our
// library in process or by the service (--target).
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/lm/lm_eval.h"
#include "bench/lm/lm_policies.h"
#include "bench/lm/tinylm.h"
#include "clients/cli/commands.h"
#include "clients/cli/dhsa_flags.h"
#include "clients/cli/flags.h"
#include "clients/cpp/client.h"
#include "kernels/common/status_macros.h"
#include "kernels/io/npy.h"

namespace dhsa::cli {
namespace {

struct LmFlags {
  std::string model = "../shared/data/tinylm/tinylm.safetensors";
  std::string text = "/usr/lib/python3.11";
  std::string target;
  std::string dump_traces;
  int64_t offset = 0;
  int64_t window = 8192;
  int64_t windows = 1;
  int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  DhsaFlags dhsa;
};

absl::Status MakeDir(const std::string& path) {
  if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create directory ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status Lm(const LmFlags& f) {
  DhsaFlags knobs = f.dhsa;
  knobs.policy = "dhsa";  // The policy name is parsed below (it may be local or oracle_block).
  DHSA_ASSIGN_OR_RETURN(DhsaConfig base, ToDhsaConfig(knobs));
  DHSA_ASSIGN_OR_RETURN(LmPolicy policy, ParseLmPolicy(f.dhsa.policy, base, f.dhsa.budget));
  if (f.windows <= 0 || f.window < 2 || f.offset < 0) {
    return absl::InvalidArgumentError("--windows must be positive, --window >= 2, --offset >= 0");
  }
  DHSA_ASSIGN_OR_RETURN(TinyLm model, LoadTinyLm(f.model));
  DHSA_ASSIGN_OR_RETURN(std::string text, ReadCorpus(f.text));
  if (f.offset + f.windows * f.window > static_cast<int64_t>(text.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("--offset ", f.offset, " + ", f.windows, " windows of ", f.window,
                     " bytes run past the end of the text (", text.size(), " bytes)"));
  }
  std::optional<Client> client;
  if (!f.target.empty()) {
    if (policy.kind != LmPolicy::Kind::kLibrary) {
      return absl::InvalidArgumentError(
          absl::StrCat("--target serves library policies only; '", policy.name, "' is not one"));
    }
    DHSA_ASSIGN_OR_RETURN(Client c, Client::Connect(f.target));
    client = std::move(c);
  }
  if (!f.dump_traces.empty()) DHSA_RETURN_IF_ERROR(MakeDir(f.dump_traces));
  const int threads = static_cast<int>(std::max<int64_t>(1, f.threads));
  const TinyLmConfig& mc = model.config;
  std::printf(
      "dhsa lm: %s, %lld layers, %lld/%lld heads, head dim %lld; policy %s, budget %lld%s\n",
      f.model.c_str(), static_cast<long long>(mc.n_layer), static_cast<long long>(mc.n_head),
      static_cast<long long>(mc.n_kv_head), static_cast<long long>(mc.head_dim),
      policy.name.c_str(), static_cast<long long>(policy.config.budget),
      client ? absl::StrCat(", attention by the service at ", f.target).c_str()
             : ", attention in process (cpu backend)");
  std::printf("bits per byte on the second half of each %lld-byte window of %s\n\n",
              static_cast<long long>(f.window), f.text.c_str());
  std::printf("%-10s %8s %9s %10s %10s %10s\n", "offset", "bpb", "density", "time", "attention",
              "bytes/s");
  double bpb_sum = 0, seconds_sum = 0;
  for (int64_t w = 0; w < f.windows; ++w) {
    const int64_t offset = f.offset + w * f.window;
    const std::vector<uint8_t> bytes(text.begin() + offset, text.begin() + offset + f.window);
    LmAttentionStats stats;
    std::optional<Sequence> seq;
    if (client) {
      SequenceOptions so;
      so.num_layers = static_cast<int>(mc.n_layer);
      so.q_heads = static_cast<int>(mc.n_head);
      so.kv_heads = static_cast<int>(mc.n_kv_head);
      so.head_dim = static_cast<int>(mc.head_dim);
      so.config = policy.config;
      DHSA_ASSIGN_OR_RETURN(Sequence s, client->CreateSequence(so));
      seq = std::move(s);
    }
    LayerAttention attention = [&](int64_t layer, const Tensor& q, const Tensor& k,
                                   const Tensor& v) -> absl::StatusOr<Tensor> {
      if (seq) {
        DHSA_ASSIGN_OR_RETURN(PrefillOutput out, seq->Prefill(static_cast<int>(layer), q, k, v));
        return std::move(out.o);
      }
      return LmAttention(policy, q, k, v, threads, &stats);
    };
    LayerTap tap;
    if (!f.dump_traces.empty()) {
      tap = [&](int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v) -> absl::Status {
        const std::string dir = absl::StrCat(f.dump_traces, "/window", w);
        DHSA_RETURN_IF_ERROR(MakeDir(dir));
        const std::string layer_dir = absl::StrCat(dir, "/layer", layer);
        DHSA_RETURN_IF_ERROR(MakeDir(layer_dir));
        DHSA_RETURN_IF_ERROR(WriteNpy(layer_dir + "/q.npy", q));
        DHSA_RETURN_IF_ERROR(WriteNpy(layer_dir + "/k.npy", k));
        return WriteNpy(layer_dir + "/v.npy", v);
      };
    }
    ForwardTimes times;
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::vector<float>> logits =
        TinyLmForward(model, bytes, attention, threads, tap, &times);
    if (seq) (void)seq->Release();
    if (!logits.ok()) return logits.status();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double bpb = BitsPerByte(*logits, mc.vocab, bytes, f.window / 2);
    bpb_sum += bpb;
    seconds_sum += seconds;
    std::printf("%-10lld %8.4f %9s %9.2fs %9.2fs %10.0f\n", static_cast<long long>(offset), bpb,
                stats.causal_pairs > 0
                    ? absl::StrFormat("%.2f%%", 100.0 * static_cast<double>(stats.computed_pairs) /
                                                    static_cast<double>(stats.causal_pairs))
                          .c_str()
                    : "-",
                seconds, times.attention, static_cast<double>(f.window) / seconds);
    std::fflush(stdout);
  }
  if (f.windows > 1) {
    std::printf("%-10s %8.4f %9s %9.2fs %9s %10.0f\n", "mean", bpb_sum / f.windows, "",
                seconds_sum / f.windows, "",
                static_cast<double>(f.window * f.windows) / seconds_sum);
  }
  if (!f.dump_traces.empty()) {
    std::printf(
        "\ntraces: %s/window<n>/layer<l>/{q,k,v}.npy (after rotary; dhsa eval --workload)\n",
        f.dump_traces.c_str());
  }
  return absl::OkStatus();
}

}  // namespace

int RunLm(const std::vector<std::string>& args) {
  LmFlags f;
  FlagSet flags(
      "lm", "--model PATH --text FILE|DIR [--offset N --window 8192 --windows K] [--policy ...]",
      "Runs tinylm (../shared/data/tinylm) over windows of text with every layer's attention\n"
      "done by this library in process (fast CPU backend) or by the service at --target, and\n"
      "prints bits per byte on the second half of each window and bytes/s. --text is a file, or a\n"
      "directory whose *.py files are concatenated in sorted order, each after a line\n"
      "`# ==== <name> ====` (tinylm's training format). Windows are consecutive from --offset.\n"
      "Policies: dense, streaming, block_topk, dhsa and its variants (dhsa_paper, dhsa_fixed,\n"
      "...), and for evaluation local (last `budget` keys of each query block) and oracle_block\n"
      "(dhsa's structure with chunks ranked by their true attention mass).",
      "  dhsa lm --model ../shared/data/tinylm/tinylm.safetensors --text /usr/lib/python3.11 \\\n"
      "      --offset 1000000 --windows 2 --policy dhsa --budget 1024\n"
      "  dhsa lm --policy dense --window 2048 --dump-traces /tmp/traces\n"
      "  dhsa serve --workers 2 & dhsa lm --target 127.0.0.1:50051 --policy dhsa");
  flags.String("model", &f.model, "tinylm .safetensors file");
  flags.String("text", &f.text, "text file, or a directory of *.py files");
  flags.Int("offset", &f.offset, "byte offset of the first window");
  flags.Int("window", &f.window, "bytes per window (bpb is measured on its second half)");
  flags.Int("windows", &f.windows, "consecutive windows");
  flags.String("target", &f.target, "router HOST:PORT: attention by the service");
  flags.String("dump-traces", &f.dump_traces,
               "write each layer's Q, K, V after rotary to DIR/window<n>/layer<l>/{q,k,v}.npy");
  flags.Int("threads", &f.threads, "threads");
  AddDhsaFlags(flags, &f.dhsa);
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) return ReportError("lm", parsed);
  if (flags.help_requested()) {
    std::printf("%s", flags.Help().c_str());
    return kExitOk;
  }
  absl::Status s = Lm(f);
  if (!s.ok()) return ReportError("lm", s);
  return kExitOk;
}

}  // namespace dhsa::cli
