// Step 5 of spec/DHSA.md: exact softmax attention over the selected key spans, returning O and the
// log-sum-exp LSE per query row and head.
#ifndef DHSA_KERNELS_ATTENTION_SPARSE_ATTENTION_H_
#define DHSA_KERNELS_ATTENTION_SPARSE_ATTENTION_H_

#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// A run of consecutive key positions held in one place: K and V rows [k.offset, k.offset + k.len).
struct KvRun {
  HeadsView k;  // [Hkv, n, d]; row r is absolute position k.offset + r.
  HeadsView v;  // Same shape and offset as k.
};

// Everything one sparse attention call reads and writes.
struct SparseAttentionParams {
  HeadsView q;  // [Hq, Lq, d]; row r is absolute position q.offset + r (= t0 + r).
  HeadsView k;  // [Hkv, n, d]; row r is absolute position k.offset + r: all keys, or one stripe.
  HeadsView v;  // Same shape and offset as k.
  // Further runs of keys (a worker's other stripes), each after the previous one (k's first) and
  // disjoint from it; keys in the gaps between runs are not attended, as keys outside k are not.
  // Same heads, dim and dtypes as k and v. A backend that cannot walk runs declines the call.
  std::vector<KvRun> more_kv;
  const Selection* selection = nullptr;  // Spans in absolute positions; clipped to k's rows.
  float scale = 0.0f;                    // Softmax scale (> 0).
  OutputView o;                          // [Hq, Lq, d] fp32.
  OutputView lse;       // [Hq, Lq, 1] fp32, natural log; -inf where a row saw no key (then o = 0).
  int num_threads = 1;  // Threads over (head, row) ranges.
  // Polled between pieces of work when set (from any thread): once it returns true the call stops
  // with Cancelled and the outputs are unspecified. The reference does not poll.
  std::function<bool()> cancelled;
};

// Reference: per row, scores of every selected key at or before the row (inside k's rows), then a
// two-pass softmax in double. Memory beyond the outputs: one row of scores per thread.
absl::Status SparseAttentionReference(const SparseAttentionParams& params);

// The runs of keys of `params`: {k, v} then more_kv. InvalidArgument when a run does not fit k
// (heads, dim, dtype, V's shape and offset) or does not start after the previous one ends.
absl::StatusOr<std::vector<KvRun>> KeyRuns(const SparseAttentionParams& params);

}  // namespace dhsa

#endif  // DHSA_KERNELS_ATTENTION_SPARSE_ATTENTION_H_
