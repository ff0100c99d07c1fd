// The selection a policy makes for one layer call, computed by the reference step functions
// (boundaries, summaries, SelectSpansReference) as Attend does on Backend::kReference, without the
// attention: what the GPU benchmark and tests feed the CUDA kernels at any length.
#ifndef DHSA_BENCH_GPU_REFERENCE_SELECTION_H_
#define DHSA_BENCH_GPU_REFERENCE_SELECTION_H_

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// Q [Hq, Lq, d] (positions Lk - Lq ..), K [Hkv, Lk, d], any storage type. Policies dense,
// streaming, dhsa and block_topk; `decode` appends the new keys as decode does (spec "Decode").
absl::StatusOr<Selection> ReferenceSelection(const Tensor& q, const Tensor& k,
                                             const DhsaConfig& config, bool decode = false);

}  // namespace dhsa

#endif  // DHSA_BENCH_GPU_REFERENCE_SELECTION_H_
