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
using sparse_attention_hopper::kBoxEights;
using sparse_attention_hopper::kBoxSixteens;
using sparse_attention_hopper::kEarlyK;
using sparse_attention_hopper::kStreaming;
using sparse_attention_hopper::kWarpEmpty;
using sparse_attention_hopper::kWarpEntry;
using sparse_attention_hopper::kWarpFull;
using sparse_attention_hopper::Launch;
using sparse_attention_hopper::LaunchWs;

template <int kCluster>
cudaError_t ClusterOrPlain(const SparseAttentionCudaParams& p, cudaStream_t stream) {
  const cudaError_t error =
      LaunchWs<__nv_bfloat16, 128, false, 24, true, true, kCluster>(p, stream);
  if (error != cudaErrorNotSupported) return error;
  return LaunchWs<__nv_bfloat16, 128, false, 24, true, true>(p, stream);
}

constexpr Variant kVariants[] = {
    {"serial", &Launch<__nv_bfloat16, 128, false, false>},
    {"overlap", &Launch<__nv_bfloat16, 128, true, false>},
    {"early", &Launch<__nv_bfloat16, 128, true, true>},
    {"ws", &LaunchWs<__nv_bfloat16, 128, false>},
    {"ws_pp", &LaunchWs<__nv_bfloat16, 128, true>},
    // The producer at 40 registers with its gathers unrolled.
    {"ws_r40", &LaunchWs<__nv_bfloat16, 128, false, 40>},
    // The producer copying K and V by TMA boxes (one thread per run of consecutive keys), at 24
    // and 40 producer registers, and with the consumers' ping-pong.
    {"ws_tma", &LaunchWs<__nv_bfloat16, 128, false, 24, true, true>},
    {"ws_tma_r40", &LaunchWs<__nv_bfloat16, 128, false, 40, true, true>},
    {"ws_tma_pp", &LaunchWs<__nv_bfloat16, 128, true, 24, true, true>},
    // ws_tma_pp with at most 2 boxes a run (kBoxEights), with Q, O and LSE streamed past L2
    // (kStreaming), with both.
    {"ws_tma_pp_h2", &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxEights>},
    {"ws_tma_pp_cs", &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kStreaming>},
    {"ws_tma_pp_h2cs",
     &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxEights | kStreaming>},
    // ws_tma_pp_h2 with one arrival per warp instead of per thread: on the full barriers
    // (producer warps, kWarpFull), on the empty barriers (consumer warps, kWarpEmpty), on both.
    {"ws_tma_pp_h2wf",
     &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxEights | kWarpFull>},
    {"ws_tma_pp_h2we",
     &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxEights | kWarpEmpty>},
    {"ws_tma_pp_h2w",
     &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxEights | kWarpFull | kWarpEmpty>},
    // ws_tma_pp_h2 with the CTA's key range found by a warp (kWarpEntry), with tile 0's K copied
    // before Q has landed (kEarlyK), with both.
    {"ws_tma_pp_h2e",
     &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxEights | kWarpEntry>},
    {"ws_tma_pp_h2k", &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxEights | kEarlyK>},
    {"ws_tma_pp_h2ek",
     &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxEights | kWarpEntry | kEarlyK>},
    // ws_tma_pp with runs of up to 16 keys in one box (kBoxSixteens).
    {"ws_tma_pp_h16", &LaunchWs<__nv_bfloat16, 128, true, 24, true, true, 1, kBoxSixteens>},
    // ws_tma in clusters of 2 CTAs (row tiles of one selection block) sharing each K/V tile by
    // TMA multicast: half the L2 reads (ws_tma where 2 does not divide a block's row tiles).
    {"ws_tma_c2", &ClusterOrPlain<2>},
    // Diagnostic (wrong results): ws_tma_pp loading V for tile 0 only (half the bytes and boxes).
    {"diag_tma_pp_konly", &LaunchWs<__nv_bfloat16, 128, true, 24, false, true>},
    // Diagnostic (wrong results): ws_pp without the loads after tile 0 (the ping-pong consumers
    // alone).
    {"diag_ws_pp_noload", &LaunchWs<__nv_bfloat16, 128, true, 24, false>},
    // Diagnostic (wrong results): "early" without the K/V loads after tile 0.
    {"diag_noload", &Launch<__nv_bfloat16, 128, true, true, false>},
    // Diagnostic (wrong results): "ws" without the loads after tile 0.
    {"diag_ws_noload", &LaunchWs<__nv_bfloat16, 128, false, 24, false>},
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
