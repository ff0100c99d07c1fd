// Output for people: plain-text tables (columns padded to their widest cell, numbers
// right-aligned), number formats, and a progress bar on stderr.
#ifndef DHSA_CLIENTS_CLI_TABLE_H_
#define DHSA_CLIENTS_CLI_TABLE_H_

#include <chrono>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dhsa::cli {

class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void AddRow(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  std::string Render() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// "1.23 s", "45.6 ms", "789 us".
std::string FormatSeconds(double seconds);
// "12.3 MB" style, powers of 1000.
std::string FormatBytes(double bytes);
// "1.23e9" for large counts, plain digits below 1e6.
std::string FormatCount(double count);

// The value of a `--progress` flag: "on" draws the bar, "off" does not, "auto" draws it when
// stderr is a terminal (so logs and pipes get none). Anything else is InvalidArgument.
absl::StatusOr<bool> ShowProgress(const std::string& mode);
inline constexpr char kProgressHelp[] = "progress bar on stderr: auto (when a terminal), on, off";

// A one-line bar on stderr, redrawn in place: "[#####.....]  42%   12 s  stage". Does nothing
// when disabled; Finish() clears the line so the report that follows starts clean.
class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled), start_(Clock::now()) {}
  ~ProgressBar() { Finish(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // `fraction` in [0, 1] (clamped); `stage` says what runs now.
  void Update(double fraction, const std::string& stage);
  void Finish();

 private:
  using Clock = std::chrono::steady_clock;
  bool enabled_;
  bool drawn_ = false;
  Clock::time_point start_;
};

}  // namespace dhsa::cli

#endif  // DHSA_CLIENTS_CLI_TABLE_H_
