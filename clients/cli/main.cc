// `dhsa`: the command-line tool. Flags are parsed here and in each subcommand, nowhere else.
#include <cstdio>
#include <string>
#include <vector>

#include "clients/cli/commands.h"

namespace dhsa::cli {

int ReportError(const std::string& command, const absl::Status& status, bool from_server) {
  std::fprintf(stderr, "dhsa %s: %s\n", command.c_str(), std::string(status.message()).c_str());
  if (from_server) return kExitServerError;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kFailedPrecondition:
      return kExitBadInput;
    default:
      return kExitFailure;
  }
}

}  // namespace dhsa::cli

namespace {

constexpr char kUsage[] =
    "usage: dhsa <command> [flags]   (dhsa <command> --help for its flags and examples)\n"
    "\n"
    "commands:\n"
    "  attend   DHSA attention of one layer: Q, K, V files in, O (and LSE, selection) out\n"
    "  bench    time the fast CPU path against the reference, dense attention and a GEMM peak\n"
    "  gen      write a structured synthetic long-context workload (q.npy, k.npy, v.npy)\n"
    "  serve    run the router and N workers in this process (the embedded service)\n"
    "  demo     the main job: a multi-layer prefill + decode through the service, with a report\n"
    "  eval     fidelity of dhsa vs block_topk, streaming and oracle_topk against dense attention\n"
    "  lm       bits per byte of the trained tinylm with every layer's attention done by dhsa\n"
    "\n"
    "output: tables by default, --json for machines (attend, gen, demo, bench, eval); a\n"
    "progress bar on stderr for long runs when it is a terminal (--progress auto|on|off)\n"
    "\n"
    "exit codes: 0 ok, 2 bad usage or input, 3 service error, 1 other failure\n";

}  // namespace

int main(int argc, char** argv) {
  using namespace dhsa::cli;
  if (argc < 2) {
    std::fprintf(stderr, "%s", kUsage);
    return kExitBadInput;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "--help" || command == "-h" || command == "help") {
    std::printf("%s", kUsage);
    return kExitOk;
  }
  if (command == "attend") return RunAttend(args);
  if (command == "bench") return RunBench(args);
  if (command == "gen") return RunGen(args);
  if (command == "serve") return RunServe(args);
  if (command == "demo") return RunDemo(args);
  if (command == "eval") return RunEval(args);
  if (command == "lm") return RunLm(args);
  std::fprintf(stderr, "dhsa: unknown command '%s'\n\n%s", command.c_str(), kUsage);
  return kExitBadInput;
}
