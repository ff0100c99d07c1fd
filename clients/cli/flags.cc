#include "clients/cli/flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace dhsa::cli {

FlagSet::FlagSet(std::string command, std::string usage, std::string description,
                 std::string examples)
    : command_(std::move(command)),
      usage_(std::move(usage)),
      description_(std::move(description)),
      examples_(std::move(examples)) {}

void FlagSet::String(const std::string& name, std::string* value, const std::string& help) {
  flags_[name] = {Kind::kString, value, help, value->empty() ? "" : *value};
  order_.push_back(name);
}

void FlagSet::Int(const std::string& name, int64_t* value, const std::string& help) {
  flags_[name] = {Kind::kInt, value, help, absl::StrCat(*value)};
  order_.push_back(name);
}

void FlagSet::Double(const std::string& name, double* value, const std::string& help) {
  flags_[name] = {Kind::kDouble, value, help, absl::StrCat(*value)};
  order_.push_back(name);
}

void FlagSet::Bool(const std::string& name, bool* value, const std::string& help) {
  flags_[name] = {Kind::kBool, value, help, *value ? "true" : ""};
  order_.push_back(name);
}

absl::Status FlagSet::Set(const std::string& name, Flag& flag, const std::string& text) {
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " needs ", what, "; got '", text,
                                                   "' (see dhsa ", command_, " --help)"));
  };
  switch (flag.kind) {
    case Kind::kString:
      *static_cast<std::string*>(flag.value) = text;
      break;
    case Kind::kInt:
      if (!absl::SimpleAtoi(text, static_cast<int64_t*>(flag.value))) return bad("an integer");
      break;
    case Kind::kDouble:
      if (!absl::SimpleAtod(text, static_cast<double*>(flag.value))) return bad("a number");
      break;
    case Kind::kBool:
      if (!absl::SimpleAtob(text, static_cast<bool*>(flag.value))) return bad("true or false");
      break;
  }
  given_[name] = true;
  return absl::OkStatus();
}

absl::Status FlagSet::Parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h") {
      help_ = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg,
                                                     "'; flags look like --name value (see dhsa ",
                                                     command_, " --help)"));
    }
    std::string name = arg.substr(2), text;
    const size_t eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      text = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    auto it = flags_.find(name);
    if (it == flags_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown flag --", name, " for dhsa ", command_, " (see dhsa ", command_, " --help)"));
    }
    if (!inline_value) {
      if (it->second.kind == Kind::kBool) {
        text = "true";
      } else if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      } else {
        text = args[++i];
      }
    }
    absl::Status s = Set(name, it->second, text);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

std::string FlagSet::Help() const {
  std::string out =
      absl::StrCat("usage: dhsa ", command_, " ", usage_, "\n\n", description_, "\n\nflags:\n");
  for (const std::string& name : order_) {
    const Flag& f = flags_.at(name);
    std::string left = absl::StrCat("  --", name, f.kind == Kind::kBool ? "" : " VALUE");
    if (left.size() < 26) left.resize(26, ' ');
    absl::StrAppend(&out, left, " ", f.help);
    if (!f.default_text.empty()) absl::StrAppend(&out, " (default ", f.default_text, ")");
    absl::StrAppend(&out, "\n");
  }
  if (!examples_.empty()) absl::StrAppend(&out, "\nexamples:\n", examples_, "\n");
  return out;
}

}  // namespace dhsa::cli
