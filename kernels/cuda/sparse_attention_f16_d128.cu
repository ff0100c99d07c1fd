// Sparse attention kernel instantiation: f16 storage, head dim 128.
#include "kernels/cuda/sparse_attention_kernel.cuh"
#include "kernels/cuda/sparse_attention_launch.h"

namespace dhsa {
namespace sparse_attention_kernel {

cudaError_t LaunchF16Dim128(const SparseAttentionCudaParams& params, cudaStream_t stream) {
  return Launch<__half, 128>(params, stream);
}

}  // namespace sparse_attention_kernel
}  // namespace dhsa
