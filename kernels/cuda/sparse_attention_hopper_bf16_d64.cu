// Hopper (sm_90a, wgmma) sparse attention kernel instantiation: bfloat16 storage, head dim 64.
#include "kernels/cuda/sparse_attention_hopper_ws.cuh"
#include "kernels/cuda/sparse_attention_launch.h"

namespace dhsa {
namespace sparse_attention_kernel {

cudaError_t LaunchHopperBf16Dim64(const SparseAttentionCudaParams& params, cudaStream_t stream) {
  return sparse_attention_hopper::LaunchDefault<__nv_bfloat16, 64>(params, stream);
}

}  // namespace sparse_attention_kernel
}  // namespace dhsa
