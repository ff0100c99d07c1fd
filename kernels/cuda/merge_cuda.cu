// The LSE merge of partial results on the device (the function of kernels/merge/reference.cc, in
// fp64): one warp per row.
#include <cstdint>

#include "kernels/cuda/selection_cuda_launch.h"

namespace dhsa {
namespace selection_kernel {
namespace {

constexpr int kMergeThreads = 256;

__global__ void __launch_bounds__(kMergeThreads)
    MergeKernel(const float* const* __restrict__ part_o, const float* const* __restrict__ part_lse,
                int32_t parts, int64_t rows, int64_t dim, float* __restrict__ o,
                float* __restrict__ lse, int32_t* __restrict__ error) {
  const int64_t row = (int64_t{blockIdx.x} * kMergeThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // Whole warps.
  double m = -INFINITY;
  bool bad = false;
  for (int32_t s = 0; s < parts; ++s) {
    const float l = part_lse[s][row];
    if (isnan(l) || l == INFINITY) bad = true;
    m = fmax(m, static_cast<double>(l));
  }
  float* out = o + row * dim;
  if (bad) {
    if (lane == 0) atomicOr(error, 1);
    return;
  }
  if (m == -INFINITY) {
    for (int64_t c = lane; c < dim; c += 32) out[c] = 0.0f;
    if (lane == 0) lse[row] = -INFINITY;
    return;
  }
  double sum = 0.0;
  for (int32_t s = 0; s < parts; ++s) sum += exp(static_cast<double>(part_lse[s][row]) - m);
  const double total = m + log(sum);
  for (int64_t c = lane; c < dim; c += 32) {
    double acc = 0.0;
    for (int32_t s = 0; s < parts; ++s) {
      const float l = part_lse[s][row];
      if (l == -INFINITY) continue;
      acc += exp(static_cast<double>(l) - total) * part_o[s][row * dim + c];
    }
    out[c] = static_cast<float>(acc);
  }
  if (lane == 0) lse[row] = static_cast<float>(total);
}

}  // namespace

cudaError_t LaunchMerge(const float* const* part_o, const float* const* part_lse, int32_t parts,
                        int64_t rows, int64_t dim, float* o, float* lse, int32_t* error,
                        cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows * 32 + kMergeThreads - 1) / kMergeThreads);
  MergeKernel<<<blocks, kMergeThreads, 0, stream>>>(part_o, part_lse, parts, rows, dim, o, lse,
                                                    error);
  return cudaGetLastError();
}

}  // namespace selection_kernel
}  // namespace dhsa
