// Step 5 of spec/DHSA.md on the fast CPU path: the same call as SparseAttentionReference
// (kernels/attention/sparse_attention.h), computed tile by tile with an online softmax.
#ifndef DHSA_KERNELS_CPU_SPARSE_ATTENTION_H_
#define DHSA_KERNELS_CPU_SPARSE_ATTENTION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/attention/sparse_attention.h"

namespace dhsa {
namespace cpu {

// Keys per online-softmax step: the score panel is rows x keys floats (512 KB at 512 rows), small
// enough to stay in L2 between the two GEMMs.
inline constexpr int64_t kAttentionGroupKeys = 256;
// Query rows attended together (all G heads of a query block when G * Bq <= 512).
inline constexpr int64_t kAttentionPanelRows = 512;

}  // namespace cpu

// A tile is one selection entry: for (KV head, query block) the rows of all G query heads of the
// group at the block's positions (one K/V read serves the group), for oracle_topk one (query head,
// row). Tiles run on params.num_threads OpenMP threads, largest first. Per tile, in panels of at
// most 512 rows: the selected keys are walked in groups of up to 256 as they lie in K and V (each
// span a contiguous run of rows, read in place by the GEMM when stored as fp32; fp16/bf16 runs are
// converted into a per-thread fp32 panel of at most 256 rows first), scores = Q K^T and
// O += P V are oneDNN GEMMs, and the online softmax between them is vectorised. Accumulation is
// fp32. Memory beyond the outputs: about 1.3 MB of scratch per thread at d = 128.
absl::Status SparseAttentionCpu(const SparseAttentionParams& params);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CPU_SPARSE_ATTENTION_H_
