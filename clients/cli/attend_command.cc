// `dhsa attend`: DHSA attention of one layer, files in and files out.
#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "clients/cli/commands.h"
#include "clients/cli/dhsa_flags.h"
#include "clients/cli/flags.h"
#include "clients/cli/table.h"
#include "clients/cpp/client.h"
#include "kernels/common/status_macros.h"
#include "kernels/dhsa.h"
#include "kernels/fidelity/fidelity.h"
#include "kernels/io/file.h"
#include "kernels/io/npy.h"
#include "kernels/io/safetensors.h"
#include "nlohmann/json.hpp"

namespace dhsa::cli {
namespace {

struct AttendFlags {
  std::string q, k, v, out, lse_out, selection_out, target;
  std::string backend = "cpu", progress = "auto";
  double timeout = 600;
  int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  int64_t check_rows = 0;
  bool json = false;
  DhsaFlags dhsa;
};

// {"boundaries": [...], "q_block": Bq, "selection": [{"kv_head": h, "block": i, "spans": [[a,
// b]]}]} (oracle_topk: entries per query head and row: {"q_head": g, "row": p, "spans": ...},
// q_block 1).
std::string SelectionJson(const AttendResult& r) {
  const Selection& s = r.selection;
  const bool per_row = s.unit == SelectionUnit::kQueryHeadRow;
  nlohmann::json entries = nlohmann::json::array();
  for (int64_t h = 0; h < s.num_heads; ++h) {
    for (int64_t b = 0; b < s.num_blocks; ++b) {
      nlohmann::json spans = nlohmann::json::array();
      for (const Span& span : s.At(h, b)) spans.push_back({span.begin, span.end});
      nlohmann::json e;
      e[per_row ? "q_head" : "kv_head"] = h;
      e[per_row ? "row" : "block"] = s.first_block + b;
      e["spans"] = std::move(spans);
      entries.push_back(std::move(e));
    }
  }
  nlohmann::json doc;
  doc["boundaries"] = r.boundaries;
  doc["q_block"] = s.block_size;
  doc["selection"] = std::move(entries);
  return doc.dump() + "\n";
}

absl::StatusOr<Tensor> LoadInput(const std::string& path, const char* flag, const char* name) {
  if (path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " is required (a .npy or .safetensors file)"));
  }
  return ReadTensorFile(path, name);
}

// The same call through a running service: a one-layer sequence; keys before t0 are sent first
// as an earlier prefill (with zero queries, whose output is dropped), as the library assumes.
// Errors the service returns are marked `*from_server`.
absl::StatusOr<AttendResult> AttendThroughService(const AttendFlags& f, const Tensor& q,
                                                  const Tensor& k, const Tensor& v,
                                                  const DhsaConfig& config, ProgressBar& bar,
                                                  bool* from_server) {
  if (!f.selection_out.empty() || f.check_rows > 0) {
    return absl::InvalidArgumentError(
        "--selection-out and --check-rows need the selection, which the service keeps to itself; "
        "run without --target for them");
  }
  if (q.shape.size() != 3 || k.shape.size() != 3 || v.shape.size() != 3) {
    return absl::InvalidArgumentError("Q, K and V must be 3-D [heads, len, dim]");
  }
  if (q.dtype != k.dtype || q.dtype != v.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat("the service stores one dtype per sequence: Q, K and V must share it; got ",
                     DTypeName(q.dtype), ", ", DTypeName(k.dtype), ", ", DTypeName(v.dtype)));
  }
  if (k.shape[1] < q.shape[1] || k.shape != v.shape) {
    return absl::InvalidArgumentError(absl::StrCat("shapes do not fit: Q ", ShapeString(q.shape),
                                                   ", K ", ShapeString(k.shape), ", V ",
                                                   ShapeString(v.shape)));
  }
  // The bar moves by bytes sent: the earlier keys' upload, then the queries with the new keys.
  const double bytes_total = static_cast<double>(q.bytes.size() + k.bytes.size() + v.bytes.size());
  const int64_t lk = k.shape[1], t0 = lk - q.shape[1];
  const double bytes_earlier = static_cast<double>(k.bytes.size() + v.bytes.size()) *
                               static_cast<double>(t0) /
                               static_cast<double>(std::max<int64_t>(1, lk));
  bar.Update(0, "connecting to " + f.target);
  *from_server = true;
  ClientOptions options;
  options.timeout = std::chrono::milliseconds(static_cast<int64_t>(f.timeout * 1000));
  options.connect_timeout = std::min(options.connect_timeout, options.timeout);
  DHSA_ASSIGN_OR_RETURN(Client client, Client::Connect(f.target, options));
  SequenceOptions so;
  so.q_heads = static_cast<int>(q.shape[0]);
  so.kv_heads = static_cast<int>(k.shape[0]);
  so.head_dim = static_cast<int>(q.shape[2]);
  so.dtype = q.dtype;
  so.config = config;
  DHSA_ASSIGN_OR_RETURN(Sequence seq, client.CreateSequence(so));
  absl::StatusOr<AttentionOutput> out;
  if (t0 > 0) {
    bar.Update(0, absl::StrCat("uploading the ", t0, " earlier keys and values (",
                               FormatBytes(bytes_earlier), ")"));
    out = seq.Prefill(0, Tensor::Zeros(q.dtype, {q.shape[0], t0, q.shape[2]}),
                      SliceTokens(k, 0, t0), SliceTokens(v, 0, t0));
  }
  if (out.ok() || t0 == 0) {
    bar.Update(bytes_earlier / bytes_total,
               absl::StrCat("prefill of ", q.shape[1], " queries (",
                            FormatBytes(bytes_total - bytes_earlier), " up), attention"));
    // Not `t0 > 0 ? SliceTokens(k, t0, lk) : k`: that copies k and v when t0 is 0.
    out = t0 > 0 ? seq.Prefill(0, q, SliceTokens(k, t0, lk), SliceTokens(v, t0, lk), true)
                 : seq.Prefill(0, q, k, v, /*want_lse=*/true);
  }
  const absl::Status released = seq.Release().status();
  if (!out.ok()) return out.status();
  if (!released.ok()) return released;
  AttendResult result;
  result.o = std::move(out->o);
  result.lse = std::move(out->lse);
  result.computed_pairs = out->stats.computed_pairs();
  result.causal_pairs = out->stats.causal_pairs();
  result.times.boundaries = out->stats.boundaries_seconds();
  result.times.selection = out->stats.selection_seconds();
  result.times.attention =
      out->stats.dispatch_seconds() + out->stats.attention_seconds() + out->stats.merge_seconds();
  return result;
}

absl::Status Attend(const AttendFlags& f, bool* from_server) {
  DHSA_ASSIGN_OR_RETURN(DhsaConfig config, ToDhsaConfig(f.dhsa));
  if (f.out.empty()) return absl::InvalidArgumentError("--out is required (the .npy file for O)");
  DHSA_ASSIGN_OR_RETURN(const bool show_progress, ShowProgress(f.progress));
  ProgressBar bar(show_progress);
  bar.Update(0, "reading inputs");
  DHSA_ASSIGN_OR_RETURN(Tensor q, LoadInput(f.q, "q", "q"));
  DHSA_ASSIGN_OR_RETURN(Tensor k, LoadInput(f.k, "k", "k"));
  DHSA_ASSIGN_OR_RETURN(Tensor v, LoadInput(f.v, "v", "v"));

  AttendOptions options;
  options.num_threads = static_cast<int>(std::max<int64_t>(1, f.threads));
  DHSA_ASSIGN_OR_RETURN(options.backend, ParseBackend(f.backend));
  const auto start = std::chrono::steady_clock::now();
  if (f.target.empty()) bar.Update(0, "attention in process on the " + f.backend + " backend");
  DHSA_ASSIGN_OR_RETURN(AttendResult result,
                        f.target.empty()
                            ? dhsa::Attend(q, k, v, config, options)
                            : AttendThroughService(f, q, k, v, config, bar, from_server));
  *from_server = false;
  bar.Update(1, "writing outputs");
  const double total =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  // Everything is serialised before anything is written: a failure leaves no partial output.
  DHSA_ASSIGN_OR_RETURN(std::string o_bytes, SerializeNpy(result.o));
  std::string lse_bytes, selection_bytes;
  if (!f.lse_out.empty()) {
    DHSA_ASSIGN_OR_RETURN(lse_bytes, SerializeNpy(result.lse));
  }
  if (!f.selection_out.empty()) selection_bytes = SelectionJson(result);

  FidelityReport fidelity;
  if (f.check_rows > 0) {
    DHSA_ASSIGN_OR_RETURN(HeadsView qv, HeadsView::Of(q, "Q"));
    DHSA_ASSIGN_OR_RETURN(HeadsView kv, HeadsView::Of(k, "K"));
    DHSA_ASSIGN_OR_RETURN(HeadsView vv, HeadsView::Of(v, "V"));
    qv.offset = kv.len - qv.len;
    DHSA_ASSIGN_OR_RETURN(fidelity, MeasureFidelity(qv, kv, vv, result.selection, result.o,
                                                    EffectiveScale(config, qv.dim),
                                                    SpreadRows(qv.len, f.check_rows)));
  }

  DHSA_RETURN_IF_ERROR(WriteFileAtomically(f.out, o_bytes));
  if (!f.lse_out.empty()) DHSA_RETURN_IF_ERROR(WriteFileAtomically(f.lse_out, lse_bytes));
  if (!f.selection_out.empty()) {
    DHSA_RETURN_IF_ERROR(WriteFileAtomically(f.selection_out, selection_bytes));
  }
  bar.Finish();

  const double density = static_cast<double>(result.computed_pairs) /
                         static_cast<double>(std::max<int64_t>(1, result.causal_pairs));
  const int64_t chunks = std::max<int64_t>(0, static_cast<int64_t>(result.boundaries.size()) - 1);
  if (f.json) {
    nlohmann::json j;
    j["policy"] = PolicyName(config.policy);
    j["budget"] = config.budget;
    j["q_shape"] = q.shape;
    j["k_shape"] = k.shape;
    j["dtype"] = DTypeName(q.dtype);
    j["chunks"] = chunks;
    j["computed_pairs"] = result.computed_pairs;
    j["causal_pairs"] = result.causal_pairs;
    j["density"] = density;
    j["seconds"] = {{"boundaries", result.times.boundaries},
                    {"summaries", result.times.summaries},
                    {"selection", result.times.selection},
                    {"attention", result.times.attention},
                    {"total", total}};
    if (f.check_rows > 0) {
      j["fidelity"] = {{"rows", fidelity.rows},
                       {"recall_mean", fidelity.recall_mean},
                       {"recall_p5", fidelity.recall_p5},
                       {"output_rel_error", fidelity.output_rel_error}};
    }
    std::printf("%s\n", j.dump(2).c_str());
    return absl::OkStatus();
  }
  const int64_t lk = k.shape[1];
  std::printf("dhsa attend: policy %s, budget %lld (sink %lld, local %lld, q_block %lld), %s\n",
              std::string(PolicyName(config.policy)).c_str(), static_cast<long long>(config.budget),
              static_cast<long long>(config.sink), static_cast<long long>(config.local),
              static_cast<long long>(config.q_block),
              f.target.empty() ? ("in process on the " + f.backend + " backend").c_str()
                               : ("through the service at " + f.target).c_str());
  std::printf("  Q %s  K %s  V %s  %s, queries at positions [%lld, %lld)\n",
              ShapeString(q.shape).c_str(), ShapeString(k.shape).c_str(),
              ShapeString(v.shape).c_str(), std::string(DTypeName(q.dtype)).c_str(),
              static_cast<long long>(lk - q.shape[1]), static_cast<long long>(lk));
  if (chunks > 0) {
    std::printf("  chunks: %lld (mean %.1f keys)\n", static_cast<long long>(chunks),
                static_cast<double>(lk) / static_cast<double>(chunks));
  }
  std::printf("  computed pairs: %s of %s causal = %.2f%% density\n\n",
              FormatCount(static_cast<double>(result.computed_pairs)).c_str(),
              FormatCount(static_cast<double>(result.causal_pairs)).c_str(), 100.0 * density);
  Table stages({"stage", "time"});
  stages.AddRow({"boundaries", FormatSeconds(result.times.boundaries)});
  stages.AddRow({"summaries", FormatSeconds(result.times.summaries)});
  stages.AddRow({"selection", FormatSeconds(result.times.selection)});
  stages.AddRow({"attention", FormatSeconds(result.times.attention)});
  stages.AddRow({"total", FormatSeconds(total)});
  std::printf("%s\n", stages.Render().c_str());
  if (f.check_rows > 0) {
    std::printf("fidelity vs dense attention on %lld sampled (head, row) pairs:\n",
                static_cast<long long>(fidelity.rows));
    Table fid({"measure", "value"});
    fid.AddRow({"attention recall, mean", absl::StrFormat("%.4f", fidelity.recall_mean)});
    fid.AddRow({"attention recall, 5th percentile", absl::StrFormat("%.4f", fidelity.recall_p5)});
    fid.AddRow({"output relative error", absl::StrFormat("%.4f", fidelity.output_rel_error)});
    std::printf("%s\n", fid.Render().c_str());
  }
  std::printf("wrote %s", f.out.c_str());
  if (!f.lse_out.empty()) std::printf(", %s", f.lse_out.c_str());
  if (!f.selection_out.empty()) std::printf(", %s", f.selection_out.c_str());
  std::printf("\n");
  return absl::OkStatus();
}

}  // namespace

int RunAttend(const std::vector<std::string>& args) {
  AttendFlags f;
  FlagSet flags(
      "attend", "--q Q.npy --k K.npy --v V.npy --out O.npy [flags]",
      "Computes DHSA attention of one layer in process, or through the service at --target.\n"
      "Q is [Hq, Lq, d], K and V are [Hkv, Lk, d] (.npy float32/float16, or .safetensors\n"
      "with tensors q, k, v, where bfloat16 is allowed); the queries are the last Lq\n"
      "positions (t0 = Lk - Lq). Writes O [Hq, Lq, d] float32, optionally LSE [Hq, Lq]\n"
      "float32 and the selection as JSON, only once everything has succeeded. Prints a\n"
      "table (--json: a JSON object). Exit codes: 0 ok, 2 bad input (files, flags,\n"
      "shapes), 3 the service failed or answered with an error, 1 anything else.",
      "  dhsa gen --out /tmp/w --len 32768\n"
      "  dhsa attend --q /tmp/w/q.npy --k /tmp/w/k.npy --v /tmp/w/v.npy --out /tmp/w/o.npy"
      " --check-rows 64\n"
      "  dhsa attend --q in.safetensors --k in.safetensors --v in.safetensors --out o.npy"
      " --policy block_topk --budget 1024 --selection-out sel.json\n"
      "  dhsa attend --target 127.0.0.1:50051 --q /tmp/w/q.npy --k /tmp/w/k.npy --v /tmp/w/v.npy"
      " --out o.npy --json");
  flags.String("q", &f.q, "queries [Hq, Lq, d]");
  flags.String("k", &f.k, "keys [Hkv, Lk, d]");
  flags.String("v", &f.v, "values [Hkv, Lk, d]");
  flags.String("out", &f.out, "where to write O (.npy)");
  flags.String("lse-out", &f.lse_out, "where to write LSE (.npy), natural log");
  flags.String("selection-out", &f.selection_out, "where to write the selection (.json)");
  AddDhsaFlags(flags, &f.dhsa);
  flags.String("backend", &f.backend,
               "kernels for in-process attention: cpu (the fast path) or reference (the judge)");
  flags.Int("threads", &f.threads, "threads for attention");
  flags.Int("check-rows", &f.check_rows,
            "measure recall and error against dense attention on this many query rows (0: off)");
  flags.Bool("json", &f.json, "print the report as JSON");
  flags.String("target", &f.target, "router HOST:PORT: compute through the service instead");
  flags.Double("timeout", &f.timeout, "deadline of each service call, seconds");
  flags.String("progress", &f.progress, kProgressHelp);
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) return ReportError("attend", parsed);
  if (flags.help_requested()) {
    std::printf("%s", flags.Help().c_str());
    return kExitOk;
  }
  bool from_server = false;
  absl::Status s = Attend(f, &from_server);
  if (!s.ok()) return ReportError("attend", s, from_server);
  return kExitOk;
}

}  // namespace dhsa::cli
