// Hopper (sm_90a, wgmma) sparse attention kernel instantiation: bfloat16 storage, head dim 128.
#include "kernels/cuda/sparse_attention_hopper_ws.cuh"
#include "kernels/cuda/sparse_attention_launch.h"

namespace dhsa {
namespace sparse_attention_kernel {

cudaError_t LaunchHopperBf16Dim128(const SparseAttentionCudaParams& params, cudaStream_t stream) {
  return sparse_attention_hopper::LaunchDefault<__nv_bfloat16, 128>(params, stream);
}

cudaError_t LaunchHopperSerialBf16Dim128(const SparseAttentionCudaParams& params,
                                         cudaStream_t stream) {
  return sparse_attention_hopper::Launch<__nv_bfloat16, 128, false>(params, stream);
}

}  // namespace sparse_attention_kernel
}  // namespace dhsa
