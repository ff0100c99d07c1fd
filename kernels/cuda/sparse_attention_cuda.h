// Step 5 of spec/DHSA.md on an NVIDIA GPU: exact softmax attention over the selected key spans,
// O and LSE per query row and head, as SparseAttentionReference (kernels/attention) computes them.
//
// Host API in the CUTLASS style: fill one flat SparseAttentionCudaParams of device pointers,
// CanImplement says whether this kernel serves it, SparseAttentionCuda enqueues it on a stream (no
// workspace). The selection travels in CSR form: kernels/cuda/selection_csr.h builds and uploads
// it from a Selection.
#ifndef DHSA_KERNELS_CUDA_SPARSE_ATTENTION_CUDA_H_
#define DHSA_KERNELS_CUDA_SPARSE_ATTENTION_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"

namespace dhsa {

// Selected keys [begin, end), absolute positions (int32: sequences shorter than 2^31 tokens).
struct CudaSpan {
  int32_t begin;
  int32_t end;
};

// Query rows one thread block computes, over all heads of a KV group: G heads x (128 / G) rows
// (register-resident accumulators for 16 rows per warp, 8 warps). Groups of up to 128 heads.
inline constexpr int kSparseAttentionCudaRowsPerBlock = 128;

// Which kernel serves a call. kPortable: mma.sync (sm_80+), every GPU and build. kHopper: warpgroup
// MMA (wgmma, sm_90a), warp-specialized with a TMA producer (sparse_attention_hopper_ws.cuh;
// the lock-step sparse_attention_hopper.cuh kernel where the driver cannot encode the tensor maps),
// present when the build has sm_90a code and the device is sm_90 (H100, H200). kAuto picks kHopper
// where it can run (it passed the GPU tests on an H200 and runs ~2x the portable kernel's rate
// there), else kPortable. kHopperSerial: the lock-step Hopper kernel without its softmax /
// O += P V overlap (bf16, head dim 128 only; a reference point for tuning and tests).
enum class SparseAttentionCudaKernel { kAuto, kPortable, kHopper, kHopperSerial };

// Everything one call reads and writes. Pointers are device memory; tensors are dense row-major.
struct SparseAttentionCudaParams {
  DType dtype = DType::kBF16;  // Storage of q, k, v: kBF16 or kF16 (accumulation is fp32).
  const void* q = nullptr;     // [hq, lq, head_dim]; row r is absolute position q_offset + r.
  const void* k = nullptr;     // [hkv, lk, head_dim]; row r is absolute position k_offset + r
                               // (all keys, or one stripe of them).
  const void* v = nullptr;     // [hkv, lk, head_dim], positions as k.
  float* o = nullptr;          // [hq, lq, head_dim] fp32 output; 0 where a row saw no key.
  float* lse = nullptr;        // [hq, lq] fp32, natural log; -inf where a row saw no key.
  int64_t hq = 0;              // Query heads; query head g belongs to KV head g / (hq / hkv).
  int64_t hkv = 0;             // KV heads.
  int64_t head_dim = 0;        // d: 64 or 128.
  int64_t lq = 0;              // Query rows (>= 1): t0 = q_offset, decode has lq = 1.
  int64_t lk = 0;              // Key rows held (>= 0).
  int64_t q_offset = 0;        // Absolute position of query row 0 (t0).
  int64_t k_offset = 0;        // Absolute position of key row 0.
  float scale = 0.0f;          // Softmax scale (> 0), usually 1/sqrt(d).

  // The selection (SelectionUnit::kKvHeadBlock), entry e = kv_head * num_blocks + b for absolute
  // query block first_block + b, which covers positions [block * block_size, (block + 1) *
  // block_size). Its spans are sorted, disjoint and non-empty; keys outside [k_offset, k_offset +
  // lk) are skipped and causality (key <= query position) is applied per row.
  int64_t block_size = 0;                  // Query rows per selection block (the config's q_block).
  int64_t first_block = 0;                 // q_offset / block_size.
  int64_t num_blocks = 0;                  // Blocks up to the one holding q_offset + lq - 1.
  const int64_t* entry_offsets = nullptr;  // [hkv * num_blocks + 1]: entry e owns spans
                                           // [entry_offsets[e], entry_offsets[e + 1]).
  const CudaSpan* spans = nullptr;         // [entry_offsets[hkv * num_blocks]].
  const int32_t* span_starts = nullptr;    // Per span: keys in the entry's earlier spans (the
                                           // exclusive prefix sum of span sizes within the entry).
  // The device selection's layout (kernels/cuda/selection_cuda.h) instead of entry_offsets: when
  // entry_counts is set, entry e owns spans [e * span_stride, e * span_stride + entry_counts[e]).
  const int32_t* entry_counts = nullptr;  // [hkv * num_blocks]
  int64_t span_stride = 0;

  SparseAttentionCudaKernel kernel = SparseAttentionCudaKernel::kAuto;
};

// OK when the kernels serve `params`: Unimplemented for a dtype, head dim or group size without a
// kernel (or kHopper asked where that kernel is not built or the device is not sm_90),
// InvalidArgument for inconsistent shapes, offsets, selection geometry or pointers. Reads no device
// memory (it asks the current device's compute capability).
absl::Status CanImplement(const SparseAttentionCudaParams& params);

// Whether kHopper (and kHopperSerial) can run: built for sm_90a and the current device is sm_90.
bool SparseAttentionCudaHopperAvailable();

// The kernel a call with `params` runs (kAuto resolved).
SparseAttentionCudaKernel ChosenKernel(const SparseAttentionCudaParams& params);

// Enqueues the attention on `stream` (after CanImplement). Returns launch errors; errors of the
// kernel's execution surface at the next synchronisation.
absl::Status SparseAttentionCuda(const SparseAttentionCudaParams& params, cudaStream_t stream);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SPARSE_ATTENTION_CUDA_H_
