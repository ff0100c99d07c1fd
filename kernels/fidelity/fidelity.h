// How close a sparse result is to dense attention (spec/DHSA.md "How fidelity is measured"),
// measured on sampled query rows so that no Lq x Lk matrix is needed.
#ifndef DHSA_KERNELS_FIDELITY_FIDELITY_H_
#define DHSA_KERNELS_FIDELITY_FIDELITY_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"

namespace dhsa {

struct FidelityReport {
  int64_t rows = 0;             // (query head, row) pairs measured.
  double recall_mean = 0;       // Mean over rows of the dense softmax weight on selected keys.
  double recall_p5 = 0;         // Its 5th percentile.
  double output_rel_error = 0;  // Per head ||o - o_dense|| / ||o_dense|| over the rows, averaged.
};

// `q` rows are positions q.offset + r, `k`/`v` all keys from 0; `o` [Hq, Lq, d] is the sparse
// output to judge; `rows` are row indices into q (every query head is measured at each).
absl::StatusOr<FidelityReport> MeasureFidelity(const HeadsView& q, const HeadsView& k,
                                               const HeadsView& v, const Selection& selection,
                                               const Tensor& o, float scale,
                                               const std::vector<int64_t>& rows);

// `count` row indices spread evenly over [0, lq), always including the last row.
std::vector<int64_t> SpreadRows(int64_t lq, int64_t count);

}  // namespace dhsa

#endif  // DHSA_KERNELS_FIDELITY_FIDELITY_H_
