// `dhsa serve`: the router and N workers in one process on loopback ports (no cluster needed).
#include <csignal>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "clients/cli/commands.h"
#include "clients/cli/dhsa_flags.h"
#include "clients/cli/flags.h"
#include "kernels/common/status_macros.h"
#include "services/common/metrics.h"
#include "services/router/embedded.h"

namespace dhsa::cli {
namespace {

volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

absl::Status Serve(const EmbeddedOptions& options, double drain_seconds, int64_t metrics_port) {
  DHSA_ASSIGN_OR_RETURN(std::unique_ptr<EmbeddedService> service, EmbeddedService::Start(options));
  if (metrics_port > 0) {
    // On the router's host: 127.0.0.1 by default, 0.0.0.0 when serving others.
    const std::string host = options.listen_address.substr(0, options.listen_address.rfind(':'));
    DHSA_ASSIGN_OR_RETURN(const int port,
                          metrics::StartExposer(absl::StrCat(host, ":", metrics_port)));
    std::printf("dhsa serve: metrics of the router and workers on http://%s:%d/metrics\n",
                host.c_str(), port);
  }
  std::printf(
      "dhsa serve: router on %s with %d %s workers (stripes of %lld tokens); Ctrl-C or SIGTERM "
      "stops it\n",
      service->router_address().c_str(), service->num_workers(), options.backend.c_str(),
      static_cast<long long>(options.stripe_tokens));
  std::fflush(stdout);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::printf("dhsa serve: draining (up to %.0f s) and stopping\n", drain_seconds);
  std::fflush(stdout);
  service->Shutdown(std::chrono::milliseconds(static_cast<int64_t>(drain_seconds * 1000)));
  return absl::OkStatus();
}

}  // namespace

int RunServe(const std::vector<std::string>& args) {
  EmbeddedOptions options;
  options.listen_address = "127.0.0.1:50051";
  int64_t workers = options.num_workers, threads = 0, max_message = options.max_message_bytes;
  int64_t capacity = 0, metrics_port = 0;
  double drain = 30;
  DhsaFlags dhsa;
  FlagSet flags("serve", "[--workers N] [--listen HOST:PORT] [flags]",
                "Runs the router and N workers in this process, the workers on free 127.0.0.1\n"
                "ports and the router on --listen: the embedded default, no cluster needed.\n"
                "Clients (dhsa attend --target, dhsa demo --target, the SDKs) connect to the\n"
                "router. The algorithm flags set the defaults of sequences created without\n"
                "their own parameters.",
                "  dhsa serve --workers 2\n"
                "  dhsa serve --workers 3 --listen 0.0.0.0:50051 --budget 4096");
  flags.Int("workers", &workers, "worker count");
  flags.String("listen", &options.listen_address, "router address (port 0: any free port)");
  flags.Int("stripe-tokens", &options.stripe_tokens, "tokens per KV stripe");
  flags.Int("threads", &threads, "threads of the router and of each worker (0: all cores)");
  flags.Int("capacity-bytes", &capacity, "KV bytes per worker (0: half the memory, shared)");
  flags.String("backend", &options.backend,
               "workers' backend: cpu, or cuda (builds with CUDA; bf16/fp16, head dim 64/128)");
  flags.Int("max-message-bytes", &max_message, "largest gRPC message; tensors go in pieces");
  flags.Double("drain-seconds", &drain, "how long SIGTERM waits for calls in flight");
  flags.Int("metrics-port", &metrics_port,
            "Prometheus /metrics port on the --listen host, for the router and workers (0: off)");
  AddDhsaFlags(flags, &dhsa);
  absl::Status parsed = flags.Parse(args);
  if (!parsed.ok()) return ReportError("serve", parsed);
  if (flags.help_requested()) {
    std::printf("%s", flags.Help().c_str());
    return kExitOk;
  }
  if (metrics_port < 0 || metrics_port > 65535) {
    return ReportError("serve", absl::InvalidArgumentError(absl::StrCat(
                                    "--metrics-port must be 0 to 65535; got ", metrics_port)));
  }
  if (workers < 1 || workers > 64) {
    return ReportError("serve", absl::InvalidArgumentError(
                                    absl::StrCat("--workers must be 1 to 64; got ", workers)));
  }
  auto config = ToDhsaConfig(dhsa);
  if (!config.ok()) return ReportError("serve", config.status());
  options.num_workers = static_cast<int>(workers);
  options.threads = static_cast<int>(threads);
  options.capacity_bytes_per_worker = capacity;
  options.max_message_bytes = max_message;
  options.default_config = *config;
  absl::Status s = Serve(options, drain, metrics_port);
  if (!s.ok()) return ReportError("serve", s);
  return kExitOk;
}

}  // namespace dhsa::cli
