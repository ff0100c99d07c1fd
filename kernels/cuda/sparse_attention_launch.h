// The per-instantiation launchers of the sparse attention kernel, one .cu file each (kept apart so
// the builds run in parallel); sparse_attention_cuda.cc dispatches to them.
#ifndef DHSA_KERNELS_CUDA_SPARSE_ATTENTION_LAUNCH_H_
#define DHSA_KERNELS_CUDA_SPARSE_ATTENTION_LAUNCH_H_

#include <cuda_runtime_api.h>

#include "kernels/cuda/sparse_attention_cuda.h"

namespace dhsa {
namespace sparse_attention_kernel {

// Enqueue the kernel for the params' dtype and head dim (the params passed CanImplement).
cudaError_t LaunchBf16Dim64(const SparseAttentionCudaParams& params, cudaStream_t stream);
cudaError_t LaunchBf16Dim128(const SparseAttentionCudaParams& params, cudaStream_t stream);
cudaError_t LaunchF16Dim64(const SparseAttentionCudaParams& params, cudaStream_t stream);
cudaError_t LaunchF16Dim128(const SparseAttentionCudaParams& params, cudaStream_t stream);

// The Hopper (wgmma) kernel, sparse_attention_hopper.cuh: built with a body only for sm_90a, so
// called only when the build has that target (DHSA_CUDA_HOPPER_KERNELS) and the device is sm_90.
cudaError_t LaunchHopperBf16Dim64(const SparseAttentionCudaParams& params, cudaStream_t stream);
cudaError_t LaunchHopperBf16Dim128(const SparseAttentionCudaParams& params, cudaStream_t stream);
cudaError_t LaunchHopperF16Dim64(const SparseAttentionCudaParams& params, cudaStream_t stream);
cudaError_t LaunchHopperF16Dim128(const SparseAttentionCudaParams& params, cudaStream_t stream);
// Its variant without the softmax / O += P V overlap (bf16, d = 128 only).
cudaError_t LaunchHopperSerialBf16Dim128(const SparseAttentionCudaParams& params,
                                         cudaStream_t stream);

}  // namespace sparse_attention_kernel
}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SPARSE_ATTENTION_LAUNCH_H_
