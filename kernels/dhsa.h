// One DHSA attention call in process (spec/DHSA.md Steps 1-5), on the fast CPU backend
// (kernels/cpu) or on the reference kernels that judge it.
#ifndef DHSA_KERNELS_DHSA_H_
#define DHSA_KERNELS_DHSA_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/config.h"
#include "kernels/common/inputs.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"

namespace dhsa {

// Which kernels run the steps. Both compute the same function (spec/DHSA.md); the CPU backend's
// results are tested against the reference's.
enum class Backend {
  kReference,  // Direct loops in double: slow, written to be checked by eye; the judge.
  kCpu         // Tiled, vectorised, multi-threaded (kernels/cpu): the fast path.
};

// "reference", "cpu".
absl::string_view BackendName(Backend backend);
absl::StatusOr<Backend> ParseBackend(absl::string_view name);

struct AttendOptions {
  Backend backend = Backend::kCpu;
  int num_threads = 1;  // Threads: for every step on kCpu, for sparse attention on kReference.
  // Reject NaN/Inf in Q, K, V (InvalidArgument naming the element). With prior_boundaries, the keys
  // before t0 were checked when they were stored: only Q and the new keys [t0, Lk) are.
  bool check_finite = true;
  // Boundaries of the keys stored before this call ([0, t0)), ending at t0. Null: the old keys are
  // segmented as if they had come in one earlier prefill.
  const std::vector<int64_t>* prior_boundaries = nullptr;
  // Summaries kappa of prior_boundaries' chunks (the AttendResult::kappa of the call that stored
  // those keys, same summary norm); needs prior_boundaries. On kCpu with the dhsa policy the
  // chunks that did not change keep these rows instead of summing their keys again (decode
  // recomputes only the tail chunk); the reference always recomputes.
  const Summaries* prior_kappa = nullptr;
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
  // Summaries of those chunks for dhsa and block_topk (empty otherwise): pass them back as
  // prior_kappa with these boundaries on the next call of the sequence.
  Summaries kappa;
  Selection selection;
  int64_t computed_pairs = 0;  // (query, key) pairs attended, over all query heads.
  int64_t causal_pairs = 0;    // What dense attention computes.
  StageTimes times;
};

// Q [Hq, Lq, d], K and V [Hkv, Lk, d]; the queries are positions [Lk - Lq, Lk). Inputs float32,
// float16 or bfloat16, accumulated in fp32 or wider. Runs on options.backend.
absl::StatusOr<AttendResult> Attend(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const DhsaConfig& config, const AttendOptions& options = {});

// Attend on the reference kernels whatever options.backend says: the judge for tests and for
// other backends.
absl::StatusOr<AttendResult> AttendReference(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const DhsaConfig& config,
                                             const AttendOptions& options = {});

}  // namespace dhsa

#endif  // DHSA_KERNELS_DHSA_H_
