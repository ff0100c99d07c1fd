// Configuration on the wire: the ServiceConfig JSON file, DhsaParams <-> DhsaConfig, and the
// selection carried by a worker's AttendHeader <-> Selection.
#ifndef DHSA_SERVICES_COMMON_CONFIG_H_
#define DHSA_SERVICES_COMMON_CONFIG_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "dhsa/v1/config.pb.h"
#include "dhsa/v1/service_config.pb.h"
#include "dhsa/v1/worker.pb.h"
#include "kernels/common/config.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// Reads a ServiceConfig from a JSON file (protobuf's JSON mapping; unknown fields are an error).
// An empty path gives the all-default (empty) message. NotFound if the file cannot be read,
// InvalidArgument naming the file for a parse error.
absl::StatusOr<v1::ServiceConfig> LoadServiceConfigJson(const std::string& path_or_empty);

// The kernel config for `params`: `defaults` with params.preset's knobs (PRESET_DEFAULT,
// PRESET_PAPER: ApplyPreset; unspecified: none), then every field set in `params` (zero /
// unspecified fields and false booleans keep that). Checked with ValidateConfig. InvalidArgument
// for unknown enum values.
absl::StatusOr<DhsaConfig> DhsaConfigFromProto(const v1::DhsaParams& params,
                                               const DhsaConfig& defaults);

// Every field of `config`, explicitly (no zero-means-default left).
void DhsaConfigToProto(const DhsaConfig& config, v1::DhsaParams* params);

// Writes the selection fields of a worker's AttendHeader: block_size, first_block, num_blocks,
// per_query_head, entries, and q_heads / kv_heads implied by num_heads and group. Other fields
// (ids, rows, head_dim, scale) are left as they are.
void SelectionToAttendHeader(const Selection& selection, v1::AttendHeader* header);

// The selection of an AttendHeader, checked: positive heads with q_heads % kv_heads == 0, positive
// block_size, entries.size() == heads * num_blocks, blocks covering the rows
// [q_begin, q_begin + num_rows) (num_rows >= 1), and in every entry begin/end of equal length with
// spans non-empty, non-negative, sorted and disjoint (adjacent allowed). InvalidArgument naming the
// entry otherwise.
absl::StatusOr<Selection> SelectionFromAttendHeader(const v1::AttendHeader& header);

}  // namespace dhsa

#endif  // DHSA_SERVICES_COMMON_CONFIG_H_
