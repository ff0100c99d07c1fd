// The algorithm flags shared by every subcommand that runs attention (attend, eval, serve, bench).
#ifndef DHSA_CLIENTS_CLI_DHSA_FLAGS_H_
#define DHSA_CLIENTS_CLI_DHSA_FLAGS_H_

#include <string>

#include "absl/status/statusor.h"
#include "clients/cli/flags.h"
#include "kernels/common/config.h"

namespace dhsa::cli {

// Defaults are DhsaConfig{}'s.
struct DhsaFlags {
  std::string preset = "default";  // default or paper (kernels/common/config.h Preset).
  std::string policy = "dhsa";
  int64_t budget = DhsaConfig{}.budget, sink = DhsaConfig{}.sink, local = DhsaConfig{}.local,
          q_block = DhsaConfig{}.q_block;
  std::string boundaries = "dynamic";
  int64_t chunk_mean = DhsaConfig{}.chunk_mean, chunk_min = DhsaConfig{}.chunk_min,
          chunk_max = DhsaConfig{}.chunk_max, block = DhsaConfig{}.block;
  bool shared_heads = false;
  bool mean_summaries = false;
  std::string chunk_score = std::string(ChunkScoreName(DhsaConfig{}.chunk_score));
  int64_t score_rows = DhsaConfig{}.score_rows;
  double scale = 0;
  // The flag set these were parsed by (AddDhsaFlags sets it), to tell the flags given on the
  // command line, which override the preset, from defaults. When null, a value overrides the
  // preset when it differs from DhsaConfig{}'s.
  const FlagSet* flags = nullptr;
};

// Declares --preset --policy --budget --sink --local --q-block --boundaries --chunk-mean
// --chunk-min --chunk-max --block --shared-heads --mean-summaries --chunk-score --score-rows
// --scale, and points values->flags at `flags`.
void AddDhsaFlags(FlagSet& flags, DhsaFlags* values);

// The help line of --preset.
extern const char kPresetHelp[];

// The config the flags describe, validated: the preset's knobs (ApplyPreset), then every flag
// given explicitly.
absl::StatusOr<DhsaConfig> ToDhsaConfig(const DhsaFlags& values);

}  // namespace dhsa::cli

#endif  // DHSA_CLIENTS_CLI_DHSA_FLAGS_H_
