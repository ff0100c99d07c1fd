// One DHSA attention call in process (spec/DHSA.md Steps 1-5) on the reference kernels.
#ifndef DHSA_KERNELS_DHSA_H_
#define DHSA_KERNELS_DHSA_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/inputs.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"

namespace dhsa {

struct AttendOptions {
  int num_threads = 1;       // Threads for sparse attention.
  bool check_finite = true;  // Reject NaN/Inf in Q, K, V (InvalidArgument naming the element).
  // Boundaries of the keys stored before this call ([0, t0)), ending at t0. Null: the old keys are
  // segmented as if they had come in one earlier prefill.
  const std::vector<int64_t>* prior_boundaries = nullptr;
  bool decode = false;  // The new keys came from decode: they grow the tail chunk (spec "Decode").
};

// Seconds spent in each step.
struct StageTimes {
  double boundaries = 0;
  double summaries = 0;
  double selection = 0;
  double attention = 0;
};

struct AttendResult {
  Tensor o;    // [Hq, Lq, d] float32.
  Tensor lse;  // [Hq, Lq] float32.
  // Chunk boundaries used: dynamic/fixed chunks for dhsa, key blocks for block_topk, {0, Lk} for
  // the policies that need none.
  std::vector<int64_t> boundaries;
  Selection selection;
  int64_t computed_pairs = 0;  // (query, key) pairs attended, over all query heads.
  int64_t causal_pairs = 0;    // What dense attention computes.
  StageTimes times;
};

// Q [Hq, Lq, d], K and V [Hkv, Lk, d]; the queries are positions [Lk - Lq, Lk). Inputs float32,
// float16 or bfloat16, accumulated in fp32 or wider.
absl::StatusOr<AttendResult> AttendReference(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const DhsaConfig& config,
                                             const AttendOptions& options = {});

}  // namespace dhsa

#endif  // DHSA_KERNELS_DHSA_H_
