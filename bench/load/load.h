// A bounded load generator for the DHSA service: `concurrency` client threads, each creating
// sequences over and over (prefill of `prefill_tokens`, then `decode_steps` decodes, then release)
// until `seconds` have passed. Counts every status code, measures per-call latency, and
// spot-checks every `check_every`-th sequence's prefill output against the in-process reference.
#ifndef DHSA_BENCH_LOAD_LOAD_H_
#define DHSA_BENCH_LOAD_LOAD_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "clients/cpp/client.h"
#include "kernels/common/config.h"

namespace dhsa::load {

struct LoadOptions {
  std::string target;  // Router "host:port".
  ClientOptions client;
  int concurrency = 8;
  double seconds = 10;
  int64_t prefill_tokens = 512;
  int decode_steps = 16;
  int q_heads = 4, kv_heads = 2, head_dim = 64;
  DhsaConfig config;
  int check_every = 4;  // 0: no spot checks.
  uint64_t seed = 1;
};

struct LoadReport {
  double seconds = 0;
  int64_t sequences = 0, prefills = 0, decodes = 0, prefill_tokens = 0;
  std::vector<double> prefill_latency, decode_latency;  // Seconds, sorted.
  std::map<std::string, int64_t> errors;                // Status code name -> count.
  int64_t checked = 0, wrong = 0;                       // Spot checks and mismatches.
  double max_rel_error = 0;
};

LoadReport RunLoad(const LoadOptions& options);

// Quantile q in [0, 1] of sorted values (0 when empty).
double Quantile(const std::vector<double>& sorted, double q);

// The report as a table for people.
std::string FormatReport(const LoadOptions& options, const LoadReport& report);

}  // namespace dhsa::load

#endif  // DHSA_BENCH_LOAD_LOAD_H_
