// Step 5 of spec/DHSA.md: exact softmax attention over the selected key spans, returning O and the
// log-sum-exp LSE per query row and head.
#ifndef DHSA_KERNELS_ATTENTION_SPARSE_ATTENTION_H_
#define DHSA_KERNELS_ATTENTION_SPARSE_ATTENTION_H_

#include "absl/status/status.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// Everything one sparse attention call reads and writes.
struct SparseAttentionParams {
  HeadsView q;  // [Hq, Lq, d]; row r is absolute position q.offset + r (= t0 + r).
  HeadsView k;  // [Hkv, n, d]; row r is absolute position k.offset + r: all keys, or one stripe.
  HeadsView v;  // Same shape and offset as k.
  const Selection* selection = nullptr;  // Spans in absolute positions; clipped to k's rows.
  float scale = 0.0f;                    // Softmax scale (> 0).
  OutputView o;                          // [Hq, Lq, d] fp32.
  OutputView lse;       // [Hq, Lq, 1] fp32, natural log; -inf where a row saw no key (then o = 0).
  int num_threads = 1;  // Threads over (head, row) ranges.
};

// Reference: per row, scores of every selected key at or before the row (inside k's rows), then a
// two-pass softmax in double. Memory beyond the outputs: one row of scores per thread.
absl::Status SparseAttentionReference(const SparseAttentionParams& params);

}  // namespace dhsa

#endif  // DHSA_KERNELS_ATTENTION_SPARSE_ATTENTION_H_
