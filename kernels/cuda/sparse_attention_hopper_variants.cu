// The Hopper kernel's tuning variants (sparse_attention_variants.h): bfloat16, head dim 128.
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/sparse_attention_cuda.h"
#include "kernels/cuda/sparse_attention_hopper.cuh"
#include "kernels/cuda/sparse_attention_hopper_ws.cuh"
#include "kernels/cuda/sparse_attention_variants.h"

namespace dhsa {
namespace {

using Launcher = cudaError_t (*)(const SparseAttentionCudaParams&, cudaStream_t);

struct Variant {
  const char* name;
  Launcher launch;
};

#if defined(DHSA_CUDA_HOPPER_KERNELS)
using sparse_attention_hopper::Launch;
constexpr Variant kVariants[] = {
    {"serial", &Launch<__nv_bfloat16, 128, false, false>},
    {"overlap", &Launch<__nv_bfloat16, 128, true, false>},
    {"early", &Launch<__nv_bfloat16, 128, true, true>},
    {"ws", &sparse_attention_hopper::LaunchWs<__nv_bfloat16, 128, false>},
    {"ws_pp", &sparse_attention_hopper::LaunchWs<__nv_bfloat16, 128, true>},
    // Not yet run on a device: the producer at 40 registers with its gathers unrolled.
    {"ws_r40", &sparse_attention_hopper::LaunchWs<__nv_bfloat16, 128, false, 40>},
    // Diagnostic (wrong results): "early" without the K/V loads after tile 0.
    {"diag_noload", &Launch<__nv_bfloat16, 128, true, true, false>},
    // Diagnostic (wrong results, not yet run on a device): "ws" without the loads after tile 0.
    {"diag_ws_noload", &sparse_attention_hopper::LaunchWs<__nv_bfloat16, 128, false, 24, false>},
};
constexpr int kCount = sizeof(kVariants) / sizeof(kVariants[0]);
#else
constexpr Variant kVariants[] = {{"none", nullptr}};
constexpr int kCount = 0;
#endif

}  // namespace

int SparseAttentionHopperVariantCount() { return kCount; }

const char* SparseAttentionHopperVariantName(int index) {
  return index >= 0 && index < kCount ? kVariants[index].name : "?";
}

absl::Status SparseAttentionCudaHopperVariant(const SparseAttentionCudaParams& params, int index,
                                              cudaStream_t stream) {
  if (index < 0 || index >= kCount) {
    return absl::InvalidArgumentError(
        absl::StrCat("Hopper kernel variant ", index, " of ", kCount));
  }
  if (params.dtype != DType::kBF16 || params.head_dim != 128) {
    return absl::UnimplementedError("the Hopper kernel variants have bfloat16, head dim 128 only");
  }
  SparseAttentionCudaParams p = params;
  p.kernel = SparseAttentionCudaKernel::kHopper;
  const absl::Status status = CanImplement(p);
  if (!status.ok()) return status;
  return CudaStatus(kVariants[index].launch(p, stream), "sparse attention variant launch");
}

}  // namespace dhsa
