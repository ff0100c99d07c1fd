// The Hopper sparse attention kernel, warp-specialized (sm_90a): one producer warpgroup gathers
// the selected keys' K and V rows and two consumer warpgroups compute, decoupled by mbarriers, so
// the gathers and the key lookups (dependent loads through the span lists) leave the consumers'
// path and the two consumer warpgroups need not run in step. The math of a consumer warpgroup is
// the overlapped kernel's of sparse_attention_hopper.cuh (same tiles, layouts, wgmma shapes and
// online softmax; O += P V of tile t - 1 runs while the softmax of tile t runs).
//
// Threads 0-127: the producer (setmaxnreg down to kProducerRegisters). Per tile t, stage
// t % kStages: once the consumers released the stage's K and positions (mbarrier `empty_k`, after
// their softmax of tile t - kStages) thread j looks up the position of packed key t * 128 + j (a
// cursor walking forward through the spans), then the 128 threads gather the tile's K rows with
// cp.async (Q too, with tile 0) and arrive on `full_k` when their copies land
// (cp.async.mbarrier.arrive.noinc: the producer never blocks on a copy); once the stage's V is
// released (`empty_v`, after O += P V of tile t - kStages) the same for V (`full_v`). K of tile t
// is needed by S of tile t, V only by O += P V one tile later, so both load 2-3 tiles ahead.
// Threads 128-383: consumer warpgroups 0 and 1 (setmaxnreg up to kConsumerRegisters), local rows
// [64c, 64c + 64), as the overlapped kernel. Per tile: wait `full_k` of t and `full_v` of t - 1,
// S = Q K^T of t and O += P V of t - 1 issued, softmax (then K of t released), O += P V done (V of
// t - 1 released). kPingPong: the two consumer warpgroups take turns issuing their wgmmas (named
// barriers, as FlashAttention 3), so one's softmax runs while the other's matrix products do.
#ifndef DHSA_KERNELS_CUDA_SPARSE_ATTENTION_HOPPER_WS_CUH_
#define DHSA_KERNELS_CUDA_SPARSE_ATTENTION_HOPPER_WS_CUH_

#include "kernels/cuda/sparse_attention_hopper.cuh"

namespace dhsa {
namespace sparse_attention_hopper {

inline constexpr int kWsThreads = 384;
inline constexpr int kStages = 3;
// The block's registers at launch are 168 per thread (65536 / 384, rounded down to 8): what the
// producer gives up (kProducerRegisters, 24 by default) the consumers take, half each:
// 24 -> 240, 40 -> 232 (128 x 144 = 256 x 72; 128 x 128 = 256 x 64).
inline constexpr int kLaunchRegisters = 168;
template <int kProducerRegisters>
inline constexpr int kConsumerRegisters = kLaunchRegisters +
                                          (kLaunchRegisters - kProducerRegisters) / 2 / 8 * 8;

// Dynamic shared memory from a 1024-aligned base: Q, [stages] K, [stages] V, key positions
// [stages][kKeyTile], then the mbarriers full_k, full_v, empty_k, empty_v [stages] each, then the
// packed key range.
template <int kDim>
struct WsSmemLayout {
  static constexpr int kQ = kRows * kDim * 2;
  static constexpr int kTile = kKeyTile * kDim * 2;
  static constexpr int kK = kQ;
  static constexpr int kV = kK + kStages * kTile;
  static constexpr int kPos = kV + kStages * kTile;
  static constexpr int kBarriers = kPos + kStages * kKeyTile * 4;  // full_k at + 0, full_v at
  static constexpr int kEntry = kBarriers + 4 * kStages * 8;       // + 24, empty_k, empty_v.
  static constexpr int kEnd = kEntry + 3 * 8;
  static constexpr size_t kBytes = kEnd + 1024;
};

__device__ __forceinline__ void BarrierInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrives on `bar` when every cp.async this thread issued so far has landed (the barrier's count
// includes this arrival: .noinc).
__device__ __forceinline__ void BarrierArriveOnCopies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void BarrierArrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
// Waits until the barrier's phase with parity `parity` has completed. (A bounded wait that traps
// on a pipeline bug made ptxas spill the consumers' registers; the tests catch hangs by timeout.)
__device__ __forceinline__ void BarrierWait(uint32_t bar, uint32_t parity) {
  for (;;) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done) return;
  }
}
// Named barrier `id` (1..15) over `threads` threads (a multiple of 32).
__device__ __forceinline__ void NamedBarrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int kRegisters>
__device__ __forceinline__ void SetMaxRegistersDown() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void SetMaxRegistersUp() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// kProducerRegisters: 24, the gathers unrolled once; above, unrolled 4 times (more copies in flight
// per producer thread, fewer registers for the consumers). kLoads = false (a diagnostic for tuning,
// wrong results): the producer gathers Q and tile 0 only and then just signals each tile, which
// times the consumers alone.
template <typename T, int kDim, bool kPingPong, int kProducerRegisters = 24, bool kLoads = true>
__global__ void __launch_bounds__(kWsThreads, 1)
    HopperWsSparseAttentionKernel(const __grid_constant__ SparseAttentionCudaParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(kDim == 64 || kDim == 128, "head dim 64 or 128");
  using Layout = WsSmemLayout<kDim>;
  constexpr int kChunks = kDim / 8;  // 16-byte pieces per row.
  constexpr int kS = kKeyTile / 2;   // S accumulators per thread (64 x kKeyTile per warpgroup).
  constexpr int kO = kDim / 2;       // O accumulators per thread (64 x kDim per warpgroup).
  const float kNegInf = -INFINITY;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = SharedAddress(smem_raw);
  unsigned char* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
  const uint32_t base = SharedAddress(smem);
  const uint32_t q_smem = base, k_smem = base + Layout::kK, v_smem = base + Layout::kV;
  int32_t* key_pos = reinterpret_cast<int32_t*>(smem + Layout::kPos);
  const uint32_t full_k = base + Layout::kBarriers, full_v = full_k + 8 * kStages,
                 empty_k = full_v + 8 * kStages, empty_v = empty_k + 8 * kStages;
  int64_t* entry = reinterpret_cast<int64_t*>(smem + Layout::kEntry);

  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32;
  const int group = static_cast<int>(p.hq / p.hkv);
  const int rows_per_head = kRows / group;
  const int tiles_per_block = static_cast<int>((p.block_size + rows_per_head - 1) / rows_per_head);
  const int64_t block = blockIdx.x / tiles_per_block;  // Selection block, relative.
  const int64_t kv_head = blockIdx.y;
  const int64_t block_first = p.first_block + block;
  const int64_t block_begin = Max64(block_first * p.block_size, p.q_offset);
  const int64_t block_end = Min64((block_first + 1) * p.block_size, p.q_offset + p.lq);
  const int64_t row_begin = block_begin + (blockIdx.x % tiles_per_block) * rows_per_head;
  const int64_t row_end = Min64(row_begin + rows_per_head, block_end);
  if (row_begin >= row_end) return;  // The block has fewer rows than its tiles (uniform exit).

  auto row_valid = [&](int local) {
    return local / rows_per_head < group && row_begin + local % rows_per_head < row_end;
  };

  const int64_t entry_index = kv_head * p.num_blocks + block;
  const int64_t first_span =
      p.entry_counts != nullptr ? entry_index * p.span_stride : p.entry_offsets[entry_index];
  const int64_t end_span = p.entry_counts != nullptr ? first_span + p.entry_counts[entry_index]
                                                     : p.entry_offsets[entry_index + 1];
  if (tid == 0) {
    // Keys k_offset <= key < min(k_offset + lk, row_end): held, and not after the last row.
    const int64_t key_lo = p.k_offset, key_hi = Min64(p.k_offset + p.lk, row_end);
    const int64_t total = end_span > first_span
                              ? p.span_starts[end_span - 1] +
                                    (p.spans[end_span - 1].end - p.spans[end_span - 1].begin)
                              : 0;
    auto span_after = [&](int64_t key) {
      int64_t lo = first_span, hi = end_span;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (p.spans[mid].end > key) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      return lo;
    };
    auto packed_below = [&](int64_t span, int64_t key) -> int64_t {
      if (span == end_span) return total;
      return p.span_starts[span] + Max64(0, key - p.spans[span].begin);
    };
    const int64_t lo_span = span_after(key_lo);
    const int64_t begin = packed_below(lo_span, key_lo);
    entry[0] = begin;
    entry[1] = key_hi > key_lo ? Max64(begin, packed_below(span_after(key_hi), key_hi)) : begin;
    entry[2] = lo_span;
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      BarrierInit(full_k + 8 * s, 128);  // Every producer thread, once its copies landed.
      BarrierInit(full_v + 8 * s, 128);
      BarrierInit(empty_k + 8 * s, 256);  // Every consumer thread, once done with the stage.
      BarrierInit(empty_v + 8 * s, 256);
    }
  }
  __syncthreads();  // The range and the initialised barriers are visible.
  const int64_t packed_begin = entry[0], packed_end = entry[1];
  const int num_tiles = static_cast<int>((packed_end - packed_begin + kKeyTile - 1) / kKeyTile);

  if (wg == 0) {
    // ---------------- Producer ----------------
    SetMaxRegistersDown<kProducerRegisters>();
    constexpr int kGatherUnroll = kProducerRegisters > 24 ? 4 : 1;
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k) + kv_head * p.lk * kDim;
    const T* v = static_cast<const T*>(p.v) + kv_head * p.lk * kDim;
    if (num_tiles > 0) {
      // Q, committed with tile 0's group (the consumers wait for tile 0 before reading Q).
      for (int i = tid; i < kRows * kChunks; i += 128) {
        const int local = i / kChunks, chunk = i % kChunks;
        const bool valid = row_valid(local);
        const int64_t head = kv_head * group + local / rows_per_head;
        const int64_t row = row_begin + local % rows_per_head - p.q_offset;
        const T* src = valid ? q + (head * p.lq + row) * kDim + chunk * 8 : q;
        CopyAsync16(q_smem + SwizzledOffset<kRows>(local, chunk), src, valid);
      }
    }
    int64_t cursor = entry[2];
    for (int tile = 0; tile < num_tiles; ++tile) {
      const int stage = tile % kStages;
      const uint32_t parity = ((tile / kStages) + 1) & 1;  // Phase of tile - kStages's release.
      // K: the stage's K and positions released (softmax of tile - kStages done).
      if (tile >= kStages) BarrierWait(empty_k + 8 * stage, parity);
      if (kLoads || tile == 0) {
        const int64_t packed = packed_begin + static_cast<int64_t>(tile) * kKeyTile + tid;
        int32_t pos = kNoKey;
        if (packed < packed_end) {
          while (cursor + 1 < end_span && p.span_starts[cursor + 1] <= packed) ++cursor;
          pos = p.spans[cursor].begin + static_cast<int32_t>(packed - p.span_starts[cursor]);
        }
        key_pos[stage * kKeyTile + tid] = pos;
      }
      NamedBarrier(1, 128);  // The tile's positions are visible to every producer thread.
      const uint32_t buffer = stage * Layout::kTile;
      const int32_t* pos = key_pos + stage * kKeyTile;
      auto gather = [&](uint32_t dst_base, const T* src_base) {
#pragma unroll kGatherUnroll
        for (int it = 0; it < kKeyTile * kChunks / 128; ++it) {
          const int i = tid + it * 128;
          const int slot = i / kChunks, chunk = i % kChunks;
          const int32_t key = pos[slot];
          const bool valid = key != kNoKey;
          const int64_t offset = (valid ? key - p.k_offset : 0) * kDim + chunk * 8;
          CopyAsync16(dst_base + buffer + SwizzledOffset<kKeyTile>(slot, chunk), src_base + offset,
                      valid);
        }
      };
      if (kLoads || tile == 0) gather(k_smem, k);
      BarrierArriveOnCopies(full_k + 8 * stage);  // With tile 0: Q's copies too.
      // V: the stage's V released (O += P V of tile - kStages done).
      if (tile >= kStages) BarrierWait(empty_v + 8 * stage, parity);
      if (kLoads || tile == 0) gather(v_smem, v);
      BarrierArriveOnCopies(full_v + 8 * stage);
    }
  } else {
    // ---------------- Consumers ----------------
    SetMaxRegistersUp<kConsumerRegisters<kProducerRegisters>>();
    const int cw = wg - 1;              // Consumer warpgroup: local rows [64 cw, 64 cw + 64).
    const int warp = (tid - 128) / 32;  // Consumer warp 0..7: local rows [16 warp, 16 warp + 16).
    int64_t row_pos[2];
    bool row_ok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int local = warp * 16 + lane / 4 + 8 * i;
      row_ok[i] = row_valid(local);
      row_pos[i] = row_begin + local % rows_per_head;
    }
    const float scale_log2 = p.scale * 1.4426950408889634f;

    float o_acc[kO];
#pragma unroll
    for (int i = 0; i < kO; ++i) o_acc[i] = 0.0f;
    float row_max[2] = {kNegInf, kNegInf};
    float row_sum[2] = {0.0f, 0.0f};
    float s[kS];
    uint32_t pa[kKeyTile / 16][4];
    float correction[2];

    auto issue_s = [&](uint32_t buffer) {
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        const uint32_t step = (kk % 4) * 32;
        const uint64_t a =
            Descriptor(q_smem + (kk / 4) * (kRows * 128) + cw * 64 * 128 + step, 16, 1024);
        const uint64_t b =
            Descriptor(k_smem + buffer + (kk / 4) * (kKeyTile * 128) + step, 16, 1024);
        Wgmma<T, kKeyTile>::SS(s, a, b, kk > 0 ? 1 : 0);
      }
      WgmmaCommit();
    };
    auto softmax = [&](const int32_t* pos) {
      const bool masked = pos[kKeyTile - 1] > row_begin;
#pragma unroll
      for (int n = 0; n < kKeyTile / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float& x = s[n * 4 + e];
          x *= scale_log2;
          if (masked && pos[n * 8 + (lane % 4) * 2 + (e % 2)] > row_pos[e / 2]) x = kNegInf;
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float m = row_max[i];
#pragma unroll
        for (int n = 0; n < kKeyTile / 8; ++n) {
          m = fmaxf(m, fmaxf(s[n * 4 + 2 * i], s[n * 4 + 2 * i + 1]));
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        const float base_m = m == kNegInf ? 0.0f : m;
        correction[i] = FastExp2(row_max[i] - base_m);
        row_max[i] = m;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kKeyTile / 8; ++n) {
          s[n * 4 + 2 * i] = FastExp2(s[n * 4 + 2 * i] - base_m);
          s[n * 4 + 2 * i + 1] = FastExp2(s[n * 4 + 2 * i + 1] - base_m);
          sum += s[n * 4 + 2 * i] + s[n * 4 + 2 * i + 1];
        }
        row_sum[i] = row_sum[i] * correction[i] + sum;
      }
    };
    auto pack_and_rescale = [&] {
#pragma unroll
      for (int kk = 0; kk < kKeyTile / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) pa[kk][r] = Pack<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
      }
#pragma unroll
      for (int n = 0; n < kDim / 8; ++n) {
        o_acc[n * 4 + 0] *= correction[0];
        o_acc[n * 4 + 1] *= correction[0];
        o_acc[n * 4 + 2] *= correction[1];
        o_acc[n * 4 + 3] *= correction[1];
      }
    };
    auto issue_pv = [&](uint32_t buffer) {
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kKeyTile / 16; ++kk) {
        const uint64_t b = Descriptor(v_smem + buffer + kk * 16 * 128, kKeyTile * 128, 1024);
        Wgmma<T, kDim>::RS(o_acc, pa[kk], b);
      }
      WgmmaCommit();
    };

    // kPingPong: warpgroup c issues its wgmmas after named barrier 2 + c, then lets the other one
    // issue (barrier 3 - c); warpgroup 1 lets warpgroup 0 go first and skips its last hand-over,
    // so both barriers see as many arrivals as waits.
    auto turn_begin = [&] {
      if (kPingPong) NamedBarrier(2 + cw, 256);
    };
    auto turn_end = [&](bool last) {
      if (kPingPong && !(last && cw == 1)) NamedBarrierArrive(3 - cw, 256);
    };
    if (num_tiles > 0) {
      if (kPingPong && cw == 1) NamedBarrierArrive(2, 256);
      // Tile 0: S and softmax only (no previous tile).
      BarrierWait(full_k, 0);
      FenceProxyAsync();
      turn_begin();
      issue_s(0);
      turn_end(false);
      WgmmaWait<0>();
      FenceRegisters(s);
      softmax(key_pos);
      BarrierArrive(empty_k);
      pack_and_rescale();
      for (int tile = 1; tile < num_tiles; ++tile) {
        const int stage = tile % kStages, previous = (tile - 1) % kStages;
        BarrierWait(full_k + 8 * stage, (tile / kStages) & 1);
        BarrierWait(full_v + 8 * previous, ((tile - 1) / kStages) & 1);
        FenceProxyAsync();
        turn_begin();
        issue_s(stage * Layout::kTile);
        issue_pv(previous * Layout::kTile);
        turn_end(false);
        WgmmaWait<1>();  // S of this tile is done.
        FenceRegisters(s);
        softmax(key_pos + stage * kKeyTile);
        BarrierArrive(empty_k + 8 * stage);  // K and positions of this tile are free.
        WgmmaWait<0>();         // O += P V of the previous tile is done: its V is free, P and O may
        FenceRegisters(o_acc);  // change.
        BarrierArrive(empty_v + 8 * previous);
        pack_and_rescale();
      }
      const int last = (num_tiles - 1) % kStages;
      BarrierWait(full_v + 8 * last, ((num_tiles - 1) / kStages) & 1);
      FenceProxyAsync();
      turn_begin();
      issue_pv(last * Layout::kTile);
      turn_end(true);
      WgmmaWait<0>();
      FenceRegisters(o_acc);
    }

    // Epilogue: the row sums over the 4 threads of each row; O / sum and the LSE in natural log.
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float sum = row_sum[i];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (!row_ok[i]) continue;
      const int local = warp * 16 + lane / 4 + 8 * i;
      const int64_t head = kv_head * group + local / rows_per_head;
      const int64_t row = row_pos[i] - p.q_offset;
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      float* o = p.o + (head * p.lq + row) * kDim + (lane % 4) * 2;
#pragma unroll
      for (int n = 0; n < kDim / 8; ++n) {
        *reinterpret_cast<float2*>(o + n * 8) =
            make_float2(o_acc[n * 4 + 2 * i] * inv, o_acc[n * 4 + 2 * i + 1] * inv);
      }
      if (lane % 4 == 0) {
        p.lse[head * p.lq + row] = sum > 0.0f ? (row_max[i] + __log2f(sum)) * kLn2 : kNegInf;
      }
    }
  }
#endif  // sm_90a
}

// Launches the warp-specialized kernel for (T, kDim) on `stream`; the params passed CanImplement.
template <typename T, int kDim, bool kPingPong = false, int kProducerRegisters = 24,
          bool kLoads = true>
cudaError_t LaunchWs(const SparseAttentionCudaParams& p, cudaStream_t stream) {
  const int64_t rows_per_head = kRows / (p.hq / p.hkv);
  const int64_t tiles_per_block = (p.block_size + rows_per_head - 1) / rows_per_head;
  const dim3 grid(static_cast<unsigned>(p.num_blocks * tiles_per_block),
                  static_cast<unsigned>(p.hkv));
  constexpr size_t kSmem = WsSmemLayout<kDim>::kBytes;
  const cudaError_t error = cudaFuncSetAttribute(
      HopperWsSparseAttentionKernel<T, kDim, kPingPong, kProducerRegisters, kLoads>,
      cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  HopperWsSparseAttentionKernel<T, kDim, kPingPong, kProducerRegisters, kLoads>
      <<<grid, kWsThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sparse_attention_hopper
}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SPARSE_ATTENTION_HOPPER_WS_CUH_
