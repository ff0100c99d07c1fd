// The `dhsa` subcommands. Each takes the arguments after its name and returns the exit code.
#ifndef DHSA_CLIENTS_CLI_COMMANDS_H_
#define DHSA_CLIENTS_CLI_COMMANDS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace dhsa::cli {

// Exit codes: 0 success; 2 bad usage or bad input (files, flags, shapes); 3 the service answered
// with an error or could not be reached; 1 anything else.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitBadInput = 2;
inline constexpr int kExitServerError = 3;

// Prints "dhsa <command>: <message>" on stderr and returns the exit code for `status`.
// `from_server`: the status came from the service (exit 3) rather than from local input.
int ReportError(const std::string& command, const absl::Status& status, bool from_server = false);

int RunAttend(const std::vector<std::string>& args);
int RunBench(const std::vector<std::string>& args);
int RunGen(const std::vector<std::string>& args);
int RunServe(const std::vector<std::string>& args);
int RunDemo(const std::vector<std::string>& args);
int RunEval(const std::vector<std::string>& args);
int RunLm(const std::vector<std::string>& args);

}  // namespace dhsa::cli

#endif  // DHSA_CLIENTS_CLI_COMMANDS_H_
