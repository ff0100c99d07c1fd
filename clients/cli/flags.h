// Command-line flags of one `dhsa` subcommand: declared with a help line, parsed once in main.
#ifndef DHSA_CLIENTS_CLI_FLAGS_H_
#define DHSA_CLIENTS_CLI_FLAGS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace dhsa::cli {

class FlagSet {
 public:
  // `usage` is the synopsis line, `description` what the command does, `examples` a few lines.
  FlagSet(std::string command, std::string usage, std::string description, std::string examples);

  // Each flag binds to a variable that already holds its default.
  void String(const std::string& name, std::string* value, const std::string& help);
  void Int(const std::string& name, int64_t* value, const std::string& help);
  void Double(const std::string& name, double* value, const std::string& help);
  void Bool(const std::string& name, bool* value, const std::string& help);

  // Parses `--name value`, `--name=value` and, for booleans, `--name` / `--name=false`. Unknown
  // flags, missing values and malformed numbers are InvalidArgument naming the flag. Sets
  // help_requested() on --help / -h.
  absl::Status Parse(const std::vector<std::string>& args);
  bool help_requested() const { return help_; }
  // True when the flag appeared on the command line.
  bool Given(const std::string& name) const { return given_.count(name) > 0; }
  std::string Help() const;

 private:
  enum class Kind { kString, kInt, kDouble, kBool };
  struct Flag {
    Kind kind;
    void* value;
    std::string help;
    std::string default_text;
  };
  absl::Status Set(const std::string& name, Flag& flag, const std::string& text);

  std::string command_, usage_, description_, examples_;
  std::map<std::string, Flag> flags_;
  std::vector<std::string> order_;
  std::map<std::string, bool> given_;
  bool help_ = false;
};

}  // namespace dhsa::cli

#endif  // DHSA_CLIENTS_CLI_FLAGS_H_
