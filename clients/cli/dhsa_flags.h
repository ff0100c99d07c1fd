// The algorithm flags shared by every subcommand that runs attention (attend, eval, serve, bench).
#ifndef DHSA_CLIENTS_CLI_DHSA_FLAGS_H_
#define DHSA_CLIENTS_CLI_DHSA_FLAGS_H_

#include <string>

#include "absl/status/statusor.h"
#include "clients/cli/flags.h"
#include "kernels/common/config.h"

namespace dhsa::cli {

struct DhsaFlags {
  std::string policy = "dhsa";
  int64_t budget = 2048, sink = 128, local = 256, q_block = 128;
  std::string boundaries = "dynamic";
  int64_t chunk_mean = 32, chunk_min = 8, chunk_max = 128, block = 64;
  bool shared_heads = false;
  bool mean_summaries = false;
  std::string chunk_score = "paper";
  int64_t score_rows = 16;
  double scale = 0;
};

// Declares --policy --budget --sink --local --q-block --boundaries --chunk-mean --chunk-min
// --chunk-max --block --shared-heads --mean-summaries --chunk-score --score-rows --scale.
void AddDhsaFlags(FlagSet& flags, DhsaFlags* values);

// The config the flags describe, validated.
absl::StatusOr<DhsaConfig> ToDhsaConfig(const DhsaFlags& values);

}  // namespace dhsa::cli

#endif  // DHSA_CLIENTS_CLI_DHSA_FLAGS_H_
