// dhsa-router: the public Attention service in front of dhsa-worker processes.
//
//   dhsa-router [--config FILE.json] [--listen HOST:PORT] (--workers H:P,H:P | --worker-dns
//               dns:///NAME:PORT) [--max-message-bytes N] [--stripe-tokens N] [--threads N]
//               [--max-inflight N] [--drain-seconds S] [--worker-call-timeout S]
//               [--metrics-port N] [--transport auto|grpc|shm|nccl] [--shm-arena-bytes N]
//               [--client-shm-bytes N] [--selection-device auto|cpu|N]
//
// Flags override the JSON ServiceConfig. SIGTERM or SIGINT: readiness goes NOT_SERVING, calls in
// flight get drain_seconds to finish, then the process exits 0.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "dhsa/v1/service_config.pb.h"
#include "services/common/config.h"
#include "services/common/metrics.h"
#include "services/router/router.h"

namespace {

constexpr char kUsage[] =
    "usage: dhsa-router [--config FILE.json] [--listen HOST:PORT] (--workers HOST:PORT,... | "
    "--worker-dns dns:///NAME:PORT) [--max-message-bytes N] [--stripe-tokens N] [--threads N] "
    "[--max-inflight N] [--drain-seconds S] [--worker-call-timeout S] [--metrics-port N] "
    "[--transport auto|grpc|shm|nccl] [--shm-arena-bytes N] [--client-shm-bytes N]\n"
    "[--selection-device auto|cpu|N]\n"
    "--metrics-port N serves Prometheus /metrics on 0.0.0.0:N (0: off; deployments use 9464).\n"
    "--transport (data_plane.transport): how tensors move to the workers; auto (default) uses\n"
    "shared memory with workers on this host, gRPC bytes with the others.\n"
    "--shm-arena-bytes (data_plane.shm_arena_bytes): each shared-memory arena (default 1 GiB).\n"
    "--client-shm-bytes (client_shm_bytes): shared memory offered to each client on this host\n"
    "for its prefill tensors (default 4 GiB; -1 turns it off).\n"
    "--selection-device (selection_device): where a first prefill's boundaries, summaries and\n"
    "selection run: auto (default) on CUDA device 0 when this build has CUDA, a device is\n"
    "visible and the device selection supports the call, else the CPU; cpu: always the CPU;\n"
    "N: CUDA device N (start-up fails if it does not exist). Decode and chunked prefill select\n"
    "on the CPU.\n";

// One line naming the problem; exit status 2.
int Usage(const std::string& problem) {
  std::fprintf(stderr, "dhsa-router: %s (dhsa-router --help lists the flags)\n", problem.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  // Flags: "--name value" or "--name=value".
  const std::map<std::string, bool> known = {{"--config", true},
                                             {"--listen", true},
                                             {"--workers", true},
                                             {"--worker-dns", true},
                                             {"--max-message-bytes", true},
                                             {"--stripe-tokens", true},
                                             {"--threads", true},
                                             {"--max-inflight", true},
                                             {"--drain-seconds", true},
                                             {"--worker-call-timeout", true},
                                             {"--metrics-port", true},
                                             {"--transport", true},
                                             {"--shm-arena-bytes", true},
                                             {"--client-shm-bytes", true},
                                             {"--selection-device", true},
                                             {"--help", false}};
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    const size_t eq = arg.find('=');
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    auto it = known.find(arg);
    if (it == known.end()) return Usage("unknown flag '" + arg + "'");
    if (it->second && eq == std::string::npos) {
      if (i + 1 >= argc) return Usage("flag " + arg + " needs a value");
      value = argv[++i];
    }
    flags[arg] = value;
  }
  if (flags.count("--help") > 0) {
    std::fputs(kUsage, stdout);
    return 0;
  }

  absl::StatusOr<dhsa::v1::ServiceConfig> loaded =
      dhsa::LoadServiceConfigJson(flags.count("--config") ? flags["--config"] : "");
  if (!loaded.ok()) return Usage(std::string(loaded.status().message()));
  dhsa::v1::ServiceConfig config = *std::move(loaded);
  auto number = [&](const std::string& name, auto set) -> bool {
    auto it = flags.find(name);
    if (it == flags.end()) return true;
    double v;
    if (!absl::SimpleAtod(it->second, &v)) return false;
    set(v);
    return true;
  };
  if (flags.count("--listen")) config.set_listen_address(flags["--listen"]);
  if (flags.count("--workers")) {
    config.clear_worker_addresses();
    for (absl::string_view a : absl::StrSplit(flags["--workers"], ',', absl::SkipEmpty())) {
      config.add_worker_addresses(std::string(a));
    }
  }
  if (flags.count("--worker-dns")) config.set_worker_dns(flags["--worker-dns"]);
  const bool numbers_ok =
      number("--max-message-bytes",
             [&](double v) { config.set_max_message_bytes(static_cast<int64_t>(v)); }) &&
      number("--stripe-tokens",
             [&](double v) { config.set_stripe_tokens(static_cast<int64_t>(v)); }) &&
      number("--threads", [&](double v) { config.set_threads(static_cast<int32_t>(v)); }) &&
      number("--max-inflight",
             [&](double v) { config.set_max_inflight(static_cast<int32_t>(v)); }) &&
      number("--drain-seconds", [&](double v) { config.set_drain_seconds(v); }) &&
      number("--worker-call-timeout",
             [&](double v) { config.set_worker_call_timeout_seconds(v); }) &&
      number("--metrics-port",
             [&](double v) { config.set_metrics_port(static_cast<int32_t>(v)); }) &&
      number("--shm-arena-bytes",
             [&](double v) {
               config.mutable_data_plane()->set_shm_arena_bytes(static_cast<int64_t>(v));
             }) &&
      number("--client-shm-bytes",
             [&](double v) { config.set_client_shm_bytes(v == 0 ? -1 : static_cast<int64_t>(v)); });
  if (flags.count("--transport")) config.mutable_data_plane()->set_transport(flags["--transport"]);
  if (flags.count("--selection-device")) config.set_selection_device(flags["--selection-device"]);
  if (!numbers_ok) return Usage("a numeric flag has a value that is not a number");
  if (config.worker_addresses_size() > 0 && !config.worker_dns().empty() &&
      flags.count("--workers") + flags.count("--worker-dns") == 2) {
    return Usage("give --workers or --worker-dns, not both");
  }
  if (config.listen_address().empty()) config.set_listen_address("0.0.0.0:50051");
  if (config.metrics_port() < 0 || config.metrics_port() > 65535) {
    return Usage("metrics_port must be in [0, 65535]");
  }

  absl::StatusOr<dhsa::router::RouterOptions> options =
      dhsa::router::RouterOptionsFromServiceConfig(config);
  if (!options.ok()) return Usage(std::string(options.status().message()));

  // Signals are taken by sigwait below; block them before any thread starts so none gets them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::StatusOr<std::unique_ptr<dhsa::router::RouterServer>> server =
      dhsa::router::RouterServer::Start(*options);
  if (!server.ok()) {
    if (server.status().code() == absl::StatusCode::kInvalidArgument) {
      return Usage(std::string(server.status().message()));
    }
    std::fprintf(stderr, "dhsa-router: %s\n", std::string(server.status().message()).c_str());
    return 1;
  }
  if (config.metrics_port() > 0) {
    absl::StatusOr<int> metrics_port =
        dhsa::metrics::StartExposer(absl::StrCat("0.0.0.0:", config.metrics_port()));
    if (!metrics_port.ok()) {
      std::fprintf(stderr, "dhsa-router: %s\n",
                   std::string(metrics_port.status().message()).c_str());
      return 1;
    }
    std::fprintf(stderr, "dhsa-router: metrics on http://0.0.0.0:%d/metrics\n", *metrics_port);
  }
  std::fprintf(stderr, "dhsa-router: listening on port %d, %zu worker(s)%s%s\n", (*server)->port(),
               options->worker_addresses.size(), options->worker_dns.empty() ? "" : " from ",
               options->worker_dns.c_str());
  int signal = 0;
  sigwait(&signals, &signal);
  const double drain = config.drain_seconds() > 0 ? config.drain_seconds() : 30.0;
  std::fprintf(stderr, "dhsa-router: signal %d, draining for up to %.0f s\n", signal, drain);
  (*server)->Shutdown(std::chrono::milliseconds(static_cast<int64_t>(drain * 1000)));
  return 0;
}
