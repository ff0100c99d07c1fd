#include "kernels/cuda/sparse_attention_cuda.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/sparse_attention_launch.h"

namespace dhsa {
namespace {

bool Aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// kAuto's choice on a device where the Hopper kernel can run: the Hopper kernel, which passed the
// GPU tests on an H200 and ran 1.45-1.5x the portable kernel's rate there
// (bench/results/2026-11-28-h200-hopper-kernel.md); with the TMA producer ~2x (450 against 220
// TFLOP/s at 128K, bench/results/2026-11-28-h200-tma-producer.md).
constexpr bool kHopperByDefault = true;

}  // namespace

bool SparseAttentionCudaHopperAvailable() {
#if defined(DHSA_CUDA_HOPPER_KERNELS)
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

absl::Status CanImplement(const SparseAttentionCudaParams& p) {
  if (p.dtype != DType::kBF16 && p.dtype != DType::kF16) {
    return absl::UnimplementedError(
        absl::StrCat("CUDA sparse attention stores bfloat16 or float16; "
                     "got ",
                     DTypeName(p.dtype)));
  }
  if (p.head_dim != 64 && p.head_dim != 128) {
    return absl::UnimplementedError(
        absl::StrCat("CUDA sparse attention has head dims 64 and 128; got ", p.head_dim));
  }
  if (p.hq <= 0 || p.hkv <= 0 || p.hq % p.hkv != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query heads (", p.hq, ") must be a positive multiple of KV heads (", p.hkv, ")"));
  }
  if (p.hq / p.hkv > kSparseAttentionCudaRowsPerBlock) {
    return absl::UnimplementedError(absl::StrCat("groups of up to ",
                                                 kSparseAttentionCudaRowsPerBlock,
                                                 " query heads per KV head; got ", p.hq / p.hkv));
  }
  if (p.hkv > 65535) {
    return absl::UnimplementedError(absl::StrCat("at most 65535 KV heads; got ", p.hkv));
  }
  if (p.lq < 1 || p.lk < 0 || p.q_offset < 0 || p.k_offset < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("need lq >= 1, lk >= 0 and offsets >= 0; got lq ", p.lq, ", lk ", p.lk,
                     ", q_offset ", p.q_offset, ", k_offset ", p.k_offset));
  }
  constexpr int64_t kMaxPosition = std::numeric_limits<int32_t>::max();
  if (p.q_offset + p.lq > kMaxPosition || p.k_offset + p.lk > kMaxPosition) {
    return absl::UnimplementedError("positions must stay below 2^31 - 1");
  }
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("softmax scale must be positive; got ", p.scale));
  }
  if (p.q == nullptr || p.o == nullptr || p.lse == nullptr ||
      (p.lk > 0 && (p.k == nullptr || p.v == nullptr))) {
    return absl::InvalidArgumentError("null tensor pointer");
  }
  // 16-byte copies of rows (d * 2 bytes, a multiple of 16), 8-byte stores of output pairs.
  if (!Aligned(p.q, 16) || !Aligned(p.k, 16) || !Aligned(p.v, 16) || !Aligned(p.o, 8) ||
      !Aligned(p.lse, 4)) {
    return absl::InvalidArgumentError("q, k, v must be 16-byte aligned, o 8-byte, lse 4-byte");
  }
  if (p.block_size <= 0 || p.first_block != p.q_offset / p.block_size ||
      p.first_block + p.num_blocks - 1 != (p.q_offset + p.lq - 1) / p.block_size) {
    return absl::InvalidArgumentError(absl::StrCat("selection blocks (size ", p.block_size,
                                                   ", first ", p.first_block, ", count ",
                                                   p.num_blocks, ") do not cover query positions [",
                                                   p.q_offset, ", ", p.q_offset + p.lq, ")"));
  }
  // spans and span_starts may be null when the selection holds no span at all.
  if (p.entry_offsets == nullptr && p.entry_counts == nullptr) {
    return absl::InvalidArgumentError("null selection offsets and counts");
  }
  if (p.entry_counts != nullptr && p.span_stride <= 0) {
    return absl::InvalidArgumentError("selection counts need a positive span stride");
  }
  const int64_t rows_per_head = kSparseAttentionCudaRowsPerBlock / (p.hq / p.hkv);
  const int64_t tiles = p.num_blocks * ((p.block_size + rows_per_head - 1) / rows_per_head);
  if (tiles > std::numeric_limits<int32_t>::max()) {
    return absl::UnimplementedError(absl::StrCat("too many query tiles (", tiles, ")"));
  }
  if (p.kernel == SparseAttentionCudaKernel::kHopperSerial &&
      (p.dtype != DType::kBF16 || p.head_dim != 128)) {
    return absl::UnimplementedError("the serial Hopper kernel has bfloat16, head dim 128 only");
  }
  if ((p.kernel == SparseAttentionCudaKernel::kHopper ||
       p.kernel == SparseAttentionCudaKernel::kHopperSerial) &&
      !SparseAttentionCudaHopperAvailable()) {
    return absl::UnimplementedError(
        "the Hopper (wgmma) attention kernel needs a build with sm_90a "
        "(DHSA_CUDA_ARCHITECTURES containing 90a) and an sm_90 device; use kAuto or kPortable");
  }
  return absl::OkStatus();
}

SparseAttentionCudaKernel ChosenKernel(const SparseAttentionCudaParams& p) {
  if (p.kernel != SparseAttentionCudaKernel::kAuto) return p.kernel;
  return kHopperByDefault && SparseAttentionCudaHopperAvailable()
             ? SparseAttentionCudaKernel::kHopper
             : SparseAttentionCudaKernel::kPortable;
}

absl::Status SparseAttentionCuda(const SparseAttentionCudaParams& p, cudaStream_t stream) {
  const absl::Status status = CanImplement(p);
  if (!status.ok()) return status;
  namespace kernel = sparse_attention_kernel;
  cudaError_t error;
  const SparseAttentionCudaKernel chosen = ChosenKernel(p);
  if (chosen == SparseAttentionCudaKernel::kHopperSerial) {
    error = kernel::LaunchHopperSerialBf16Dim128(p, stream);
  } else if (chosen == SparseAttentionCudaKernel::kHopper) {
    if (p.dtype == DType::kBF16) {
      error = p.head_dim == 64 ? kernel::LaunchHopperBf16Dim64(p, stream)
                               : kernel::LaunchHopperBf16Dim128(p, stream);
    } else {
      error = p.head_dim == 64 ? kernel::LaunchHopperF16Dim64(p, stream)
                               : kernel::LaunchHopperF16Dim128(p, stream);
    }
  } else if (p.dtype == DType::kBF16) {
    error =
        p.head_dim == 64 ? kernel::LaunchBf16Dim64(p, stream) : kernel::LaunchBf16Dim128(p, stream);
  } else {
    error =
        p.head_dim == 64 ? kernel::LaunchF16Dim64(p, stream) : kernel::LaunchF16Dim128(p, stream);
  }
  return CudaStatus(error, "sparse attention launch");
}

}  // namespace dhsa
