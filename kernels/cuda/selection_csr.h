// A Selection in the CSR form the CUDA kernels read (SparseAttentionCudaParams), on the host and
// uploaded to the device.
#ifndef DHSA_KERNELS_CUDA_SELECTION_CSR_H_
#define DHSA_KERNELS_CUDA_SELECTION_CSR_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/sparse_attention_cuda.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// Entry e = kv_head * num_blocks + b owns spans [entry_offsets[e], entry_offsets[e + 1]).
struct SelectionCsr {
  int64_t block_size = 0;
  int64_t first_block = 0;
  int64_t num_blocks = 0;
  int64_t num_heads = 0;               // KV heads.
  std::vector<int64_t> entry_offsets;  // [num_heads * num_blocks + 1], starting at 0.
  std::vector<CudaSpan> spans;         // Sorted, disjoint, non-empty within each entry.
  std::vector<int32_t> span_starts;    // Per span: keys in the entry's earlier spans.
};

// The CSR of a per-(KV head, query block) selection, empty spans dropped. InvalidArgument for
// oracle_topk's per-row selections, unsorted or overlapping spans, or positions outside
// [0, 2^31 - 1).
absl::StatusOr<SelectionCsr> SelectionToCsr(const Selection& selection);

// The CSR arrays in device memory (synchronous upload).
class DeviceSelection {
 public:
  static absl::StatusOr<DeviceSelection> Upload(const SelectionCsr& csr);
  static absl::StatusOr<DeviceSelection> Upload(const Selection& selection);

  // Points the selection fields of `params` at these arrays; InvalidArgument if params.hkv is not
  // the selection's number of KV heads.
  absl::Status Attach(SparseAttentionCudaParams* params) const;

  int64_t num_spans() const { return num_spans_; }

 private:
  int64_t block_size_ = 0;
  int64_t first_block_ = 0;
  int64_t num_blocks_ = 0;
  int64_t num_heads_ = 0;
  int64_t num_spans_ = 0;
  DeviceBuffer entry_offsets_;
  DeviceBuffer spans_;
  DeviceBuffer span_starts_;
};

}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SELECTION_CSR_H_
