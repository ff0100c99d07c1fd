// dhsa-worker: holds KV stripes and computes partial attention for a dhsa-router.
//
//   dhsa-worker [--config FILE.json] [--listen HOST:PORT] [--capacity-bytes N] [--threads N]
//               [--backend cpu|cuda] [--max-message-bytes N] [--drain-seconds S]
//               [--metrics-port N]
//
// Flags override the ServiceConfig read from --config. SIGTERM or SIGINT: health goes NOT_SERVING,
// calls in flight drain (bounded by drain_seconds, default 30), exit 0.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "services/common/config.h"
#include "services/common/metrics.h"
#include "services/worker/worker_server.h"

namespace {

constexpr char kUsage[] =
    "usage: dhsa-worker [--config FILE.json] [--listen HOST:PORT] [--capacity-bytes N]\n"
    "                   [--threads N] [--backend cpu|cuda] [--max-message-bytes N]\n"
    "                   [--drain-seconds S] [--metrics-port N]\n"
    "--metrics-port N serves Prometheus /metrics on 0.0.0.0:N (0: off; deployments use 9465).\n"
    "Flags override the dhsa.v1.ServiceConfig read from --config (protobuf JSON).\n";

constexpr double kDefaultDrainSeconds = 30;

// Exit status for bad command lines and options.
constexpr int kUsageError = 2;

int Fail(const std::string& message, int code) {
  std::cerr << "dhsa-worker: " << message << "\n";
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  // Block the shutdown signals before any thread starts, so that every thread inherits the mask
  // and only the sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  static const char* const kValueFlags[] = {"--config",         "--listen",
                                            "--capacity-bytes", "--threads",
                                            "--backend",        "--max-message-bytes",
                                            "--drain-seconds",  "--metrics-port"};
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    }
    std::string value;
    bool has_value = false;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    bool known = false;
    for (const char* flag : kValueFlags) known = known || arg == flag;
    if (!known) return Fail(absl::StrCat("unknown flag '", arg, "' (see --help)"), kUsageError);
    if (!has_value) {
      if (i + 1 >= argc) return Fail(absl::StrCat("flag ", arg, " needs a value"), kUsageError);
      value = argv[++i];
    }
    flags[arg] = value;
  }

  absl::StatusOr<dhsa::v1::ServiceConfig> config = dhsa::LoadServiceConfigJson(flags["--config"]);
  if (!config.ok()) return Fail(std::string(config.status().message()), kUsageError);
  dhsa::WorkerOptions options = dhsa::WorkerOptionsFromServiceConfig(*config);
  double drain_seconds =
      config->drain_seconds() > 0 ? config->drain_seconds() : kDefaultDrainSeconds;
  auto parse_int = [&](const char* flag, auto* out) {
    const auto it = flags.find(flag);
    if (it == flags.end()) return true;
    int64_t v = 0;
    if (!absl::SimpleAtoi(it->second, &v) || v < 0) return false;
    *out = static_cast<std::remove_pointer_t<decltype(out)>>(v);
    return true;
  };
  if (!parse_int("--capacity-bytes", &options.capacity_bytes) ||
      !parse_int("--threads", &options.threads) ||
      !parse_int("--max-message-bytes", &options.max_message_bytes)) {
    return Fail("--capacity-bytes, --threads and --max-message-bytes take a non-negative integer",
                kUsageError);
  }
  if (flags.count("--drain-seconds") &&
      (!absl::SimpleAtod(flags["--drain-seconds"], &drain_seconds) || drain_seconds < 0)) {
    return Fail("--drain-seconds takes a non-negative number", kUsageError);
  }
  int64_t metrics_port = config->metrics_port();
  if (!parse_int("--metrics-port", &metrics_port) || metrics_port < 0 || metrics_port > 65535) {
    return Fail("--metrics-port (metrics_port) takes a port number, 0 to 65535", kUsageError);
  }
  if (flags.count("--listen")) options.listen_address = flags["--listen"];
  if (flags.count("--backend")) options.backend = flags["--backend"];

  absl::StatusOr<std::unique_ptr<dhsa::WorkerServer>> server = dhsa::WorkerServer::Start(options);
  if (!server.ok()) {
    const bool bad_options = server.status().code() == absl::StatusCode::kInvalidArgument;
    return Fail(std::string(server.status().message()), bad_options ? kUsageError : 1);
  }
  const dhsa::WorkerOptions& o = (*server)->options();
  if (metrics_port > 0) {
    absl::StatusOr<int> bound = dhsa::metrics::StartExposer(absl::StrCat("0.0.0.0:", metrics_port));
    if (!bound.ok()) return Fail(std::string(bound.status().message()), 1);
    if (o.backend == "cuda") {
      const absl::Status gpu = dhsa::metrics::EnableGpuMemoryMetrics();
      if (!gpu.ok()) std::cerr << "dhsa-worker: no GPU memory metrics: " << gpu.message() << "\n";
    }
    std::cout << "dhsa-worker: metrics on http://0.0.0.0:" << *bound << "/metrics" << std::endl;
  }
  std::cout << "dhsa-worker listening on port " << (*server)->port() << " (" << o.listen_address
            << ", backend " << o.backend << ", capacity " << o.capacity_bytes << " bytes, "
            << o.threads << " threads)" << std::endl;

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::cout << "dhsa-worker: signal " << signal_number << ", draining for up to " << drain_seconds
            << " s" << std::endl;
  (*server)->Shutdown(absl::Seconds(drain_seconds));
  return 0;
}
