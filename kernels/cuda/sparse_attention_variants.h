// Tuning variants of the Hopper sparse attention kernel (bfloat16, head dim 128: the shape of
// issue 5's benchmark), side by side in one build so that one device run times them all
// (bench/gpu/sparse_attention_bench --variants). Not part of the API: SparseAttentionCuda runs the
// chosen kernel (sparse_attention_cuda.h); these exist for measurement only.
#ifndef DHSA_KERNELS_CUDA_SPARSE_ATTENTION_VARIANTS_H_
#define DHSA_KERNELS_CUDA_SPARSE_ATTENTION_VARIANTS_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/cuda/sparse_attention_cuda.h"

namespace dhsa {

// Number of variants (0 where the build has no sm_90a code).
int SparseAttentionHopperVariantCount();

// Short name of variant `index` (0 <= index < count), e.g. "overlap" or "early". Names starting
// with "diag_" are diagnostics that time part of the work and give wrong outputs.
const char* SparseAttentionHopperVariantName(int index);

// Enqueues variant `index` on `stream` for `params` (bf16, head dim 128, CanImplement OK; the
// params' kernel field is ignored). Unimplemented for other shapes or without an sm_90 device.
absl::Status SparseAttentionCudaHopperVariant(const SparseAttentionCudaParams& params, int index,
                                              cudaStream_t stream);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SPARSE_ATTENTION_VARIANTS_H_
