// Step 2 on the device: chunk summaries kappa and query-block summaries rho (the function of
// kernels/summaries/reference.cc): sums in fp64, divided and rounded to fp32 once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "kernels/cuda/selection_cuda_launch.h"

namespace dhsa {
namespace selection_kernel {
namespace {

constexpr int kSumThreads = 256;
constexpr int kMaxDim = 256;

__device__ __forceinline__ void AddEight(double (&acc)[8], const uint4 raw, __nv_bfloat16) {
  const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(x[i]);
    acc[2 * i] = __dadd_rn(acc[2 * i], f.x);
    acc[2 * i + 1] = __dadd_rn(acc[2 * i + 1], f.y);
  }
}

__device__ __forceinline__ void AddEight(double (&acc)[8], const uint4 raw, __half) {
  const __half2* x = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(x[i]);
    acc[2 * i] = __dadd_rn(acc[2 * i], f.x);
    acc[2 * i + 1] = __dadd_rn(acc[2 * i + 1], f.y);
  }
}

// Sums rows [0, rows) of `row_at(r)` (each `dim` elements of T, 16-byte aligned) into fp64 per
// feature, divides by `div` and writes fp32 to out[0, dim). dim / 8 threads cover a row with
// 16-byte loads; the block's row groups take rows round robin and their partial sums are added in
// group order.
template <typename T, typename RowAt>
__device__ void SumRows(int64_t rows, int dim, RowAt row_at, double div, float* out) {
  __shared__ double partial[kSumThreads / 8 * 8][8 + 1];  // [row group * lanes][8], padded.
  const int lanes = dim / 8;                              // Threads per row.
  const int groups = kSumThreads / lanes;
  const int tid = threadIdx.x, lane = tid % lanes, group = tid / lanes;
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  // kAhead rows' loads in flight before they are added (in the same order: rows group,
  // group + groups, ...).
  constexpr int kAhead = 8;
  int64_t r = group;
  for (; r + (kAhead - 1) * groups < rows; r += kAhead * groups) {
    uint4 raw[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      raw[u] = *reinterpret_cast<const uint4*>(row_at(r + u * groups) + lane * 8);
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) AddEight(acc, raw[u], T());
  }
  for (; r < rows; r += groups) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row_at(r) + lane * 8);
    AddEight(acc, raw, T());
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) partial[tid][i] = acc[i];
  __syncthreads();
  for (int c = tid; c < dim; c += kSumThreads) {
    double total = 0.0;
    for (int g = 0; g < groups; ++g) total = __dadd_rn(total, partial[g * lanes + c / 8][c % 8]);
    out[c] = __double2float_rn(total / div);
  }
}

template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    ChunkSummaryKernel(const T* __restrict__ k, int64_t lk, int dim,
                       const int32_t* __restrict__ boundaries, const int32_t* __restrict__ count,
                       int64_t chunk_cap, bool sqrt_norm, float* __restrict__ kappa) {
  const int64_t j = blockIdx.x, h = blockIdx.y;
  if (j + 1 >= *count) return;  // Past the list (uniform exit).
  const int64_t a = boundaries[j], b = boundaries[j + 1];
  const T* kh = k + (h * lk + a) * dim;
  const double n = static_cast<double>(b - a);
  SumRows<T>(
      b - a, dim, [&](int64_t r) { return kh + r * dim; }, sqrt_norm ? sqrt(n) : n,
      kappa + (h * chunk_cap + j) * dim);
}

template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    QueryBlockSummaryKernel(const T* __restrict__ q, int64_t hq, int64_t hkv, int64_t lq,
                            int64_t lk, int dim, int64_t q_block, int64_t first_block,
                            int64_t num_blocks, bool sqrt_norm, float* __restrict__ rho) {
  const int64_t i = blockIdx.x, h = blockIdx.y, group = hq / hkv, t0 = lk - lq;
  const int64_t block = first_block + i;
  const int64_t a = block * q_block > t0 ? block * q_block : t0;
  const int64_t b = (block + 1) * q_block < lk ? (block + 1) * q_block : lk;
  const int64_t rows = b - a;  // Per head; rows of the group: head-major.
  const double n = static_cast<double>(rows);
  const double div = static_cast<double>(group) * (sqrt_norm ? sqrt(n) : n);
  float* out = rho + (h * num_blocks + i) * dim;
  if (group * rows <= INT32_MAX) {  // 32-bit division: row r is row r % rows of head r / rows.
    const uint32_t urows = static_cast<uint32_t>(rows);
    SumRows<T>(
        group * rows, dim,
        [&](int64_t r) {
          const uint32_t head = static_cast<uint32_t>(r) / urows;
          const uint32_t row = static_cast<uint32_t>(r) - head * urows;
          return q + ((h * group + head) * lq + (a - t0) + row) * dim;
        },
        div, out);
  } else {
    SumRows<T>(
        group * rows, dim,
        [&](int64_t r) { return q + ((h * group + r / rows) * lq + (a - t0) + r % rows) * dim; },
        div, out);
  }
}

}  // namespace

cudaError_t LaunchChunkSummaries(DType dtype, const void* k, int64_t hkv, int64_t lk, int64_t dim,
                                 const int32_t* boundaries, const int32_t* count, int64_t chunk_cap,
                                 bool sqrt_norm, float* kappa, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(chunk_cap), static_cast<unsigned>(hkv));
  if (dtype == DType::kBF16) {
    ChunkSummaryKernel<<<grid, kSumThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(k), lk,
                                                         static_cast<int>(dim), boundaries, count,
                                                         chunk_cap, sqrt_norm, kappa);
  } else {
    ChunkSummaryKernel<<<grid, kSumThreads, 0, stream>>>(static_cast<const __half*>(k), lk,
                                                         static_cast<int>(dim), boundaries, count,
                                                         chunk_cap, sqrt_norm, kappa);
  }
  return cudaGetLastError();
}

cudaError_t LaunchQueryBlockSummaries(DType dtype, const void* q, int64_t hq, int64_t hkv,
                                      int64_t lq, int64_t lk, int64_t dim, int64_t q_block,
                                      int64_t first_block, int64_t num_blocks, bool sqrt_norm,
                                      float* rho, cudaStream_t stream) {
  static_assert(kMaxDim / 8 <= kSumThreads, "a row must fit the block");
  const dim3 grid(static_cast<unsigned>(num_blocks), static_cast<unsigned>(hkv));
  if (dtype == DType::kBF16) {
    QueryBlockSummaryKernel<<<grid, kSumThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(q), hq, hkv, lq, lk, static_cast<int>(dim), q_block,
        first_block, num_blocks, sqrt_norm, rho);
  } else {
    QueryBlockSummaryKernel<<<grid, kSumThreads, 0, stream>>>(
        static_cast<const __half*>(q), hq, hkv, lq, lk, static_cast<int>(dim), q_block, first_block,
        num_blocks, sqrt_norm, rho);
  }
  return cudaGetLastError();
}

}  // namespace selection_kernel
}  // namespace dhsa
