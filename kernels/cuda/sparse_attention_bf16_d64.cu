// Sparse attention kernel instantiation: bf16 storage, head dim 64.
#include "kernels/cuda/sparse_attention_kernel.cuh"
#include "kernels/cuda/sparse_attention_launch.h"

namespace dhsa {
namespace sparse_attention_kernel {

cudaError_t LaunchBf16Dim64(const SparseAttentionCudaParams& params, cudaStream_t stream) {
  return Launch<__nv_bfloat16, 64>(params, stream);
}

}  // namespace sparse_attention_kernel
}  // namespace dhsa
