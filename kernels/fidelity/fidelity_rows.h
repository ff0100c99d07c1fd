// Fidelity of many selections on the same sampled query rows: dense attention of those rows is
// computed once (output and log-sum-exp), then each selection is judged against it at the cost of
// its own selected keys only. Nothing of size Lq x Lk is held; memory is O(rows * Hq * d).
#ifndef DHSA_KERNELS_FIDELITY_FIDELITY_ROWS_H_
#define DHSA_KERNELS_FIDELITY_FIDELITY_ROWS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/tensor.h"
#include "kernels/fidelity/fidelity.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// Dense causal attention of `rows` (row indices into q, absolute positions q.offset + row), every
// query head, in double.
struct DenseRows {
  std::vector<int64_t> rows;
  int64_t heads = 0;        // Hq.
  int64_t dim = 0;          // d.
  float scale = 0.0f;       // Softmax scale the logits were taken with.
  std::vector<double> o;    // [heads, rows.size(), dim].
  std::vector<double> lse;  // [heads, rows.size()]: log of sum over keys <= p of exp(scale q.k).
  const double* Output(int64_t g, int64_t n) const {
    return o.data() + (g * static_cast<int64_t>(rows.size()) + n) * dim;
  }
  double Lse(int64_t g, int64_t n) const {
    return lse[static_cast<size_t>(g * static_cast<int64_t>(rows.size()) + n)];
  }
};

// `k`/`v` hold every key from position 0. Work is split over `num_threads` threads by row.
absl::StatusOr<DenseRows> DenseAttentionRows(const HeadsView& q, const HeadsView& k,
                                             const HeadsView& v, float scale,
                                             const std::vector<int64_t>& rows, int num_threads = 1);

// Judges `selection` and its sparse output on dense.rows: `o_rows` is [Hq, dense.rows.size(), d]
// float32 (row n of head g is the sparse output of query row dense.rows[n]). Recall of a row is
// sum over its selected keys <= p of exp(scale q.k - lse_dense), computed from Q and K (not from
// the sparse kernel's LSE), so a wrong kernel cannot hide a wrong recall. Output error per head is
// ||o - o_dense|| / ||o_dense|| over the rows, then averaged over heads, as in MeasureFidelity.
absl::StatusOr<FidelityReport> MeasureFidelityRows(const HeadsView& q, const HeadsView& k,
                                                   const DenseRows& dense,
                                                   const Selection& selection,
                                                   const std::vector<float>& o_rows,
                                                   int num_threads = 1);

}  // namespace dhsa

#endif  // DHSA_KERNELS_FIDELITY_FIDELITY_ROWS_H_
