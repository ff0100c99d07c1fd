// Plain-text tables for people: columns padded to their widest cell, numbers right-aligned.
#ifndef DHSA_CLIENTS_CLI_TABLE_H_
#define DHSA_CLIENTS_CLI_TABLE_H_

#include <string>
#include <vector>

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

}  // namespace dhsa::cli

#endif  // DHSA_CLIENTS_CLI_TABLE_H_
