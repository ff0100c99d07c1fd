// `dhsa demo`: the main job. Starts the service (router + workers in this process, or uses
// --target), sends a generated multi-layer long-context prefill and decode steps through the C++
// SDK, runs the same work in process, and prints a short report.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/workload/workload.h"
#include "clients/cli/commands.h"
#include "clients/cli/dhsa_flags.h"
#include "clients/cli/flags.h"
#include "clients/cli/table.h"
#include "clients/cpp/client.h"
#include "kernels/common/status_macros.h"
#include "kernels/dhsa.h"
#include "kernels/fidelity/fidelity.h"
#include "nlohmann/json.hpp"
#include "services/router/embedded.h"

namespace dhsa::cli {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct DemoFlags {
  std::string target, progress = "auto";
  bool json = false;
  int64_t workers = 2, len = 32768, layers = 2, decode = 64;
  int64_t hq = 8, hkv = 2, dim = 128, check_rows = 16, threads = 0;
  DhsaFlags dhsa;
};

double MaxAbsDiff(const Tensor& a, const Tensor& b) {
  double worst = 0;
  for (int64_t i = 0; i < a.NumElements(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(a.Get(i)) - b.Get(i)));
  }
  return worst;
}

struct Totals {
  double prefill_seconds = 0, decode_seconds = 0;
  std::vector<double> prefill_per_layer;  // Seconds of each layer's prefill, in order.
  double boundaries = 0, selection = 0, dispatch = 0, attention = 0, merge = 0;
  double worker_kernel = 0, router_total = 0;
  double bytes_to = 0, bytes_from = 0;
  double computed = 0, causal = 0;
  std::string worker_transport;  // As the router reported it (the last prefill's).
  bool client_shared_memory = false;
  void Add(const v1::CallStats& s) {
    if (!s.transport().empty()) worker_transport = s.transport();
    boundaries += s.boundaries_seconds();
    selection += s.selection_seconds();
    dispatch += s.dispatch_seconds();
    attention += s.attention_seconds();
    merge += s.merge_seconds();
    worker_kernel += s.worker_kernel_seconds();
    router_total += s.total_seconds();
    bytes_to += static_cast<double>(s.bytes_to_workers());
    bytes_from += static_cast<double>(s.bytes_from_workers());
    computed += static_cast<double>(s.computed_pairs());
    causal += static_cast<double>(s.causal_pairs());
  }
};

// The service's error, marked so that the exit code says the service failed (3), not the input.
absl::Status FromService(absl::Status s, bool* from_server) {
  if (!s.ok()) *from_server = true;
  return s;
}
template <typename T>
absl::StatusOr<T> FromService(absl::StatusOr<T> s, bool* from_server) {
  if (!s.ok()) *from_server = true;
  return s;
}

absl::Status Demo(const DemoFlags& f, bool* from_server) {
  DHSA_ASSIGN_OR_RETURN(DhsaConfig config, ToDhsaConfig(f.dhsa));
  DHSA_ASSIGN_OR_RETURN(const bool show_progress, ShowProgress(f.progress));
  if (config.policy == Policy::kOracleTopk) {
    return absl::InvalidArgumentError(
        "oracle_topk is for evaluation only; the service does not serve it");
  }
  if (f.len < 1 || f.layers < 1 || f.decode < 0) {
    return absl::InvalidArgumentError("--len and --layers must be >= 1, --decode >= 0");
  }
  const int threads = f.threads > 0
                          ? static_cast<int>(f.threads)
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  // The bar: service prefill 0-50%, service decode 50-70%, the same work in process 70-100%.
  ProgressBar bar(show_progress);
  const double layers_d = static_cast<double>(f.layers);
  std::unique_ptr<EmbeddedService> embedded;
  std::string target = f.target;
  if (target.empty()) {
    bar.Update(0, "starting the router and " + std::to_string(f.workers) + " workers");
    EmbeddedOptions options;
    options.num_workers = static_cast<int>(f.workers);
    options.threads = threads;
    options.default_config = config;
    DHSA_ASSIGN_OR_RETURN(embedded, EmbeddedService::Start(options));
    target = embedded->router_address();
  }

  // The workload: one generated layer per model layer (different seeds), len + decode tokens.
  bar.Update(0, absl::StrCat("generating ", f.layers, " layers of ", f.len + f.decode, " tokens"));
  std::vector<Workload> layers;
  for (int64_t l = 0; l < f.layers; ++l) {
    WorkloadConfig wc;
    wc.len = f.len + f.decode;
    wc.hq = f.hq;
    wc.hkv = f.hkv;
    wc.dim = f.dim;
    wc.seed = static_cast<uint64_t>(l + 1);
    wc.needles = static_cast<int>(std::min<int64_t>(8, (wc.len - 1) / 48));
    DHSA_ASSIGN_OR_RETURN(Workload w, GenerateWorkload(wc));
    layers.push_back(std::move(w));
  }

  ClientOptions client_options;
  client_options.timeout = std::chrono::minutes(30);
  DHSA_ASSIGN_OR_RETURN(Client client,
                        FromService(Client::Connect(target, client_options), from_server));
  SequenceOptions so;
  so.num_layers = static_cast<int>(f.layers);
  so.q_heads = static_cast<int>(f.hq);
  so.kv_heads = static_cast<int>(f.hkv);
  so.head_dim = static_cast<int>(f.dim);
  so.config = config;
  DHSA_ASSIGN_OR_RETURN(Sequence seq, FromService(client.CreateSequence(so), from_server));

  // Prefill, layer by layer: through the service, then the same in process (the stateless
  // library), each layer's outputs compared and let go before the next layer, as an engine reuses
  // its activation buffers: from layer 1 on both sides run on memory they have used before.
  Totals service;
  AttendOptions options;
  options.num_threads = threads;
  double local_prefill = 0, local_decode = 0, worst_diff = 0;
  std::vector<double> local_prefill_per_layer;
  int64_t local_decode_steps = 0;
  FidelityReport fidelity;
  std::vector<std::vector<int64_t>> local_boundaries;  // Each layer's, for decode in process.
  for (int64_t l = 0; l < f.layers; ++l) {
    bar.Update(
        0.5 * static_cast<double>(l) / layers_d,
        absl::StrCat("prefill of layer ", l, " (", f.len, " tokens), service and in process"));
    const Workload& w = layers[l];
    // Sliced before the clocks start.
    const Tensor q = SliceTokens(w.q, 0, f.len), k = SliceTokens(w.k, 0, f.len),
                 v = SliceTokens(w.v, 0, f.len);
    auto start = Clock::now();
    DHSA_ASSIGN_OR_RETURN(AttentionOutput out,
                          FromService(seq.Prefill(static_cast<int>(l), q, k, v), from_server));
    service.prefill_per_layer.push_back(Since(start));
    service.prefill_seconds += service.prefill_per_layer.back();
    service.Add(out.stats);
    service.client_shared_memory = out.shared_memory;

    start = Clock::now();
    DHSA_ASSIGN_OR_RETURN(AttendResult r, Attend(q, k, v, config, options));
    local_prefill_per_layer.push_back(Since(start));
    local_prefill += local_prefill_per_layer.back();
    worst_diff = std::max(worst_diff, MaxAbsDiff(r.o, out.o));
    if (l == 0 && f.check_rows > 0) {
      DHSA_ASSIGN_OR_RETURN(HeadsView qv, HeadsView::Of(q, "Q"));
      DHSA_ASSIGN_OR_RETURN(HeadsView kv, HeadsView::Of(k, "K"));
      DHSA_ASSIGN_OR_RETURN(HeadsView vv, HeadsView::Of(v, "V"));
      DHSA_ASSIGN_OR_RETURN(
          fidelity, MeasureFidelity(qv, kv, vv, r.selection, out.o, EffectiveScale(config, f.dim),
                                    SpreadRows(f.len, f.check_rows)));
    }
    local_boundaries.push_back(std::move(r.boundaries));
  }
  std::vector<std::vector<Tensor>> service_decode(static_cast<size_t>(f.layers));
  for (int64_t step = 0; step < f.decode; ++step) {
    const int64_t p = f.len + step;
    bar.Update(0.5 + 0.2 * static_cast<double>(step) / static_cast<double>(f.decode),
               absl::StrCat("service: decode step ", step + 1, " of ", f.decode));
    for (int64_t l = 0; l < f.layers; ++l) {
      const Workload& w = layers[l];
      const auto start = Clock::now();
      DHSA_ASSIGN_OR_RETURN(
          AttentionOutput out,
          FromService(seq.Decode(static_cast<int>(l), SliceTokens(w.q, p, p + 1),
                                 SliceTokens(w.k, p, p + 1), SliceTokens(w.v, p, p + 1)),
                      from_server));
      service.decode_seconds += Since(start);
      service.bytes_to += static_cast<double>(out.stats.bytes_to_workers());
      service.bytes_from += static_cast<double>(out.stats.bytes_from_workers());
      service_decode[l].push_back(std::move(out.o));
    }
  }
  DHSA_ASSIGN_OR_RETURN(v1::SequenceInfo info, FromService(seq.Info(), from_server));
  DHSA_RETURN_IF_ERROR(FromService(seq.Release().status(), from_server));

  // Decode in process (the stateless library recomputes chunk summaries each step): every 16th
  // step and the last compared (each stateless call copies the whole cache).
  for (int64_t l = 0; l < f.layers; ++l) {
    bar.Update(0.7 + 0.3 * static_cast<double>(l) / layers_d,
               absl::StrCat("in process: decode of layer ", l));
    const Workload& w = layers[l];
    std::vector<int64_t> boundaries = std::move(local_boundaries[l]);
    for (int64_t step = 0; step < f.decode; ++step) {
      const int64_t p = f.len + step;
      const Tensor kp = SliceTokens(w.k, 0, p + 1), vp = SliceTokens(w.v, 0, p + 1);
      AttendOptions decode = options;
      decode.prior_boundaries = &boundaries;
      decode.decode = true;
      const auto s = Clock::now();
      DHSA_ASSIGN_OR_RETURN(AttendResult d,
                            Attend(SliceTokens(w.q, p, p + 1), kp, vp, config, decode));
      if (step % 16 == 0 || step + 1 == f.decode) {
        local_decode += Since(s);
        ++local_decode_steps;
        worst_diff = std::max(worst_diff, MaxAbsDiff(d.o, service_decode[l][step]));
      }
      boundaries = d.boundaries;
    }
  }

  bar.Finish();
  const double prefill_tokens = static_cast<double>(f.len * f.layers);
  const double decode_calls = static_cast<double>(f.decode * f.layers);
  const double local_decode_per_call =
      local_decode / static_cast<double>(std::max<int64_t>(1, local_decode_steps));
  if (f.json) {
    nlohmann::json j;
    j["config"] = {{"layers", f.layers},     {"len", f.len},
                   {"decode", f.decode},     {"hq", f.hq},
                   {"hkv", f.hkv},           {"dim", f.dim},
                   {"dtype", "float32"},     {"policy", PolicyName(config.policy)},
                   {"budget", config.budget}};
    j["service"] = {{"target", target},
                    {"embedded", embedded != nullptr},
                    {"workers", info.workers_size()},
                    {"kv_bytes", info.kv_bytes()},
                    {"prefill_seconds", service.prefill_seconds},
                    {"prefill_seconds_per_layer", service.prefill_per_layer},
                    {"prefill_tokens_per_second", prefill_tokens / service.prefill_seconds},
                    {"stages_seconds",
                     {{"boundaries", service.boundaries},
                      {"selection", service.selection},
                      {"dispatch", service.dispatch},
                      {"attention", service.attention},
                      {"worker_kernel", service.worker_kernel},
                      {"merge", service.merge},
                      {"client_transfer", service.prefill_seconds - service.router_total}}},
                    {"bytes_to_workers", service.bytes_to},
                    {"worker_transport", service.worker_transport},
                    {"client_shared_memory", service.client_shared_memory},
                    {"bytes_from_workers", service.bytes_from},
                    {"density", service.computed / std::max(1.0, service.causal)}};
    j["in_process"] = {{"prefill_seconds", local_prefill},
                       {"prefill_seconds_per_layer", local_prefill_per_layer},
                       {"prefill_tokens_per_second", prefill_tokens / local_prefill}};
    if (f.decode > 0) {
      j["service"]["decode_seconds_per_token_per_layer"] = service.decode_seconds / decode_calls;
      j["service"]["decode_tokens_per_second"] =
          static_cast<double>(f.decode) / service.decode_seconds;
      j["in_process"]["decode_seconds_per_token_per_layer"] = local_decode_per_call;
    }
    j["max_abs_difference"] = worst_diff;
    j["compared_decode_steps"] = local_decode_steps;
    if (f.check_rows > 0) {
      j["fidelity"] = {{"rows", fidelity.rows},
                       {"recall_mean", fidelity.recall_mean},
                       {"recall_p5", fidelity.recall_p5},
                       {"output_rel_error", fidelity.output_rel_error}};
    }
    std::printf("%s\n", j.dump(2).c_str());
    if (embedded) embedded->Shutdown();
    return absl::OkStatus();
  }
  std::printf(
      "dhsa demo: %lld layers x %lld tokens prefill + %lld decode steps; Hq %lld, Hkv %lld, "
      "d %lld, float32; policy %s, budget %lld\n",
      static_cast<long long>(f.layers), static_cast<long long>(f.len),
      static_cast<long long>(f.decode), static_cast<long long>(f.hq), static_cast<long long>(f.hkv),
      static_cast<long long>(f.dim), std::string(PolicyName(config.policy)).c_str(),
      static_cast<long long>(config.budget));
  std::printf("service: router %s, %d workers%s; KV held %s on %d workers\n\n", target.c_str(),
              info.workers_size(), embedded ? " in this process" : "",
              FormatBytes(static_cast<double>(info.kv_bytes())).c_str(), info.workers_size());
  Table t({"", "service", "in process"});
  t.AddRow({"prefill, all layers", FormatSeconds(service.prefill_seconds),
            FormatSeconds(local_prefill)});
  if (f.layers > 1) {
    // The client's first call also opens its shared-memory region and touches fresh buffers; the
    // later layers are the service as an engine's layer-by-layer prefill sees it.
    const auto later = [](const std::vector<double>& v) {
      double sum = 0;
      for (size_t i = 1; i < v.size(); ++i) sum += v[i];
      return sum / static_cast<double>(v.size() - 1);
    };
    t.AddRow({"prefill, layer 0 (first call)", FormatSeconds(service.prefill_per_layer[0]),
              FormatSeconds(local_prefill_per_layer[0])});
    t.AddRow({"prefill, each later layer (mean)", FormatSeconds(later(service.prefill_per_layer)),
              FormatSeconds(later(local_prefill_per_layer))});
  }
  t.AddRow({"prefill tokens/s", absl::StrFormat("%.0f", prefill_tokens / service.prefill_seconds),
            absl::StrFormat("%.0f", prefill_tokens / local_prefill)});
  if (f.decode > 0) {
    t.AddRow({"decode, per token per layer", FormatSeconds(service.decode_seconds / decode_calls),
              FormatSeconds(local_decode_per_call)});
    t.AddRow({"decode tokens/s (all layers)",
              absl::StrFormat("%.1f", static_cast<double>(f.decode) / service.decode_seconds),
              "-"});
  }
  std::printf("%s\n", t.Render().c_str());
  std::printf("prefill time per stage, summed over layers (router view):\n");
  Table stages({"stage", "time"});
  stages.AddRow({"boundaries", FormatSeconds(service.boundaries)});
  stages.AddRow({"summaries + selection", FormatSeconds(service.selection)});
  stages.AddRow({"dispatch (KV + queries to workers)", FormatSeconds(service.dispatch)});
  stages.AddRow({"worker attention", FormatSeconds(service.attention)});
  stages.AddRow({"  of which the slowest worker's kernel", FormatSeconds(service.worker_kernel)});
  stages.AddRow({"merge", FormatSeconds(service.merge)});
  stages.AddRow({service.client_shared_memory ? "client <-> router, shared memory (the rest)"
                                              : "client <-> router streaming (the rest)",
                 FormatSeconds(service.prefill_seconds - service.router_total)});
  std::printf("%s\n", stages.Render().c_str());
  std::printf(
      "router <-> workers (%s): %s to workers, %s from workers; density %.2f%% of causal pairs\n",
      service.worker_transport.empty() ? "grpc" : service.worker_transport.c_str(),
      FormatBytes(service.bytes_to).c_str(), FormatBytes(service.bytes_from).c_str(),
      100.0 * service.computed / std::max(1.0, service.causal));
  std::printf("client <-> router: %s\n",
              service.client_shared_memory ? "shared memory (same host)" : "gRPC messages");
  std::printf(
      "service vs in process: max |O difference| = %.3g over all prefill rows and %lld "
      "compared decode steps\n",
      worst_diff, static_cast<long long>(local_decode_steps));
  if (f.check_rows > 0) {
    std::printf(
        "fidelity vs dense attention (layer 0, %lld (head, row) pairs): recall mean %.4f, "
        "5th percentile %.4f; output relative error %.4f\n",
        static_cast<long long>(fidelity.rows), fidelity.recall_mean, fidelity.recall_p5,
        fidelity.output_rel_error);
  }
  if (embedded) embedded->Shutdown();
  return absl::OkStatus();
}

}  // namespace

int RunDemo(const std::vector<std::string>& args) {
  DemoFlags f;
  FlagSet flags("demo", "[--workers N | --target HOST:PORT] [flags]",
                "The main job: starts the service (router + N workers in this process) unless\n"
                "--target names a running router, sends a generated long-context workload of\n"
                "several layers through the C++ SDK (prefill, then decode steps), runs the same\n"
                "work in process, and reports time per stage, bytes moved, tokens/s, the\n"
                "difference between the two results and the fidelity against dense attention.\n"
                "Exit codes: 0 ok, 2 bad flags, 3 the service failed or answered with an\n"
                "error, 1 anything else.",
                "  dhsa demo\n"
                "  dhsa demo --len 8192 --layers 1 --decode 16\n"
                "  dhsa demo --target 127.0.0.1:50051 --policy block_topk\n"
                "  dhsa demo --len 4096 --decode 8 --json > demo.json");
  flags.String("target", &f.target, "router address; empty: start router + workers here");
  flags.Int("workers", &f.workers, "workers to start when there is no --target");
  flags.Int("len", &f.len, "tokens prefilled per layer");
  flags.Int("layers", &f.layers, "layers");
  flags.Int("decode", &f.decode, "decode steps after the prefill");
  flags.Int("hq", &f.hq, "query heads");
  flags.Int("hkv", &f.hkv, "KV heads");
  flags.Int("dim", &f.dim, "head dim");
  flags.Int("check-rows", &f.check_rows, "rows checked against dense attention (0: off)");
  flags.Int("threads", &f.threads, "threads (0: all cores)");
  AddDhsaFlags(flags, &f.dhsa);
  flags.Bool("json", &f.json, "print the report as JSON");
  flags.String("progress", &f.progress, kProgressHelp);
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) return ReportError("demo", parsed);
  if (flags.help_requested()) {
    std::printf("%s", flags.Help().c_str());
    return kExitOk;
  }
  bool from_server = false;
  absl::Status s = Demo(f, &from_server);
  if (!s.ok()) return ReportError("demo", s, from_server);
  return kExitOk;
}

}  // namespace dhsa::cli
