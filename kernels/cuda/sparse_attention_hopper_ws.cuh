// The Hopper sparse attention kernel, warp-specialized (sm_90a); kHopper runs it with the TMA
// producer (kTma, LaunchDefault below). One producer warpgroup gathers
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

#include <cuda.h>  // CUtensorMap and the driver's tensor-map encoder type (no libcuda link).
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled.

#include <cstring>
#include <type_traits>

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

// Options of the warp-specialized kernel (its kOptions, a bit set).
// kBoxEights (with kTma): box heights 1-7 and the multiples of 8 up to 128 (23 maps) instead of the
// powers of 2 (8 maps): a run takes at most 2 boxes (a multiple of 8, then the rest) instead of
// up to 8 (its binary digits).
inline constexpr int kBoxEights = 1;
// kBoxSixteens (with kTma, instead of kBoxEights): heights 1-16 and the multiples of 16 up to 128
// (23 maps): a run of up to 16 keys in one box, a longer one in at most 2.
inline constexpr int kBoxSixteens = 4;
// kStreaming: Q loaded and O, LSE stored with the L2 evict-first policy (read or written once), so
// that they push fewer K/V lines (read by every row tile of a selection block) out of L2.
inline constexpr int kStreaming = 2;
// kWarpFull (with kTma): one arrival per producer warp on the full barriers (the warp's bytes
// summed, announced before any of its copies), instead of one per producer thread.
inline constexpr int kWarpFull = 8;
// kWarpEmpty (without kCluster): one arrival per consumer warp on the empty barriers, instead of
// one per consumer thread.
inline constexpr int kWarpEmpty = 16;
// kWarpEntry: the CTA's packed key range is found by warp 0 probing 32 spans at a time (2 dependent
// loads for up to 1024 spans) instead of thread 0's binary search (~log2(spans) dependent loads),
// which every CTA waits for before its first copy.
inline constexpr int kWarpEntry = 32;
// kEarlyK (with kTma): tile 0's K copies are issued before Q's cp.async copies have landed (the
// bytes announced by mbarrier.expect_tx first, the arrival once Q is in), not after.
inline constexpr int kEarlyK = 64;

// Box heights of a box set: index i < BoxCount.
template <int kOptions>
struct BoxSet {
  static constexpr bool kEights = (kOptions & kBoxEights) != 0;
  static constexpr bool kSixteens = (kOptions & kBoxSixteens) != 0;
  static constexpr int kCount = kEights || kSixteens ? 23 : 8;
  static constexpr __host__ __device__ int Height(int i) {
    return kSixteens ? (i < 16 ? i + 1 : 16 * (i - 14))
                     : (kEights ? (i < 7 ? i + 1 : 8 * (i - 6)) : 1 << i);
  }
  // The box for the next piece of a run of `left` (1..128) keys.
  static __device__ __forceinline__ int Pick(int left) {
    if constexpr (kSixteens) {
      return left > 16 ? 14 + (left >> 4) : left - 1;
    } else if constexpr (kEights) {
      return left >= 8 ? 6 + (left >> 3) : left - 1;
    } else {
      return 31 - __clz(left);
    }
  }
};

// The kernel's argument: the call's params and, for kTma, tensor maps of K and V viewed as one
// [hkv * lk, kDim] matrix, box kBoxWidth columns (128 bytes, the 128-byte swizzle) by
// BoxSet::Height(i) rows (k_maps[i], v_maps[i]): a packed run of keys is copied as a few boxes,
// each once per 64-column block.
inline constexpr int kMaxBoxHeights = 23;
inline constexpr int kBoxWidth = 64;  // Elements: 128 bytes of a 2-byte type.
struct WsArgs {
  CUtensorMap k_maps[kMaxBoxHeights];
  CUtensorMap v_maps[kMaxBoxHeights];
  SparseAttentionCudaParams p;
};

// TMA: box (columns [c0, c0 + 64), rows [c1, c1 + height)) of `map` into shared memory at `dst`
// (128-byte rows, swizzled by the address bits: dst is a row of a 1024-aligned tile, so row r
// lands as SwizzledOffset places it), completing `bytes` on the mbarrier `bar`.
__device__ __forceinline__ void TmaLoad2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
// The same box into the shared memory of every CTA of the cluster in `mask`, at the same offsets,
// completing on each one's mbarrier at `bar`'s offset.
__device__ __forceinline__ void TmaLoad2dMulticast(uint32_t dst, const CUtensorMap* map, int c0,
                                                   int c1, uint32_t bar, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
      : "memory");
}
__device__ __forceinline__ uint32_t ClusterRank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
// Arrival on the mbarrier at `bar`'s offset in the shared memory of cluster CTA `rank`.
__device__ __forceinline__ void BarrierArriveCluster(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
// Every thread of every CTA of the cluster (mbarrier initialisations before it visible after).
__device__ __forceinline__ void ClusterSync() {
  asm volatile(
      "fence.mbarrier_init.release.cluster;\n"
      "barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
}
// This thread's arrival on `bar`, announcing `bytes` of copies that complete on it.
// Adds `bytes` to the transaction count of the barrier's current phase, without arriving.
__device__ __forceinline__ void BarrierExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void BarrierArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// kProducerRegisters: 24, the gathers unrolled once; above, unrolled 4 times (more copies in flight
// per producer thread, fewer registers for the consumers). kLoads = false (a diagnostic for tuning,
// wrong results): the producer gathers Q and tile 0 only and then just signals each tile, which
// times the consumers alone. kTma: the producer copies K and V by the tensor memory accelerator
// instead of 16-byte cp.async per thread (see the producer below). kCluster > 1 (with kTma): the
// kCluster CTAs of a thread block cluster are consecutive row tiles of one selection block; they
// take the keys of the union of their rows (the causal mask drops the extra keys per row), so
// their K/V tiles are equal, and each tile is read from L2 once and multicast into all of them
// (each run of keys copied by one CTA's producer; a stage is refilled once the consumers of every
// CTA of the cluster released it).
template <typename T, int kDim, bool kPingPong, int kProducerRegisters = 24, bool kLoads = true,
          bool kTma = false, int kCluster = 1, int kOptions = 0>
__global__ void __launch_bounds__(kWsThreads, 1)
    HopperWsSparseAttentionKernel(const __grid_constant__ WsArgs args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const SparseAttentionCudaParams& p = args.p;
  static_assert(kDim == 64 || kDim == 128, "head dim 64 or 128");
  using Layout = WsSmemLayout<kDim>;
  constexpr int kChunks = kDim / 8;  // 16-byte pieces per row.
  constexpr int kS = kKeyTile / 2;   // S accumulators per thread (64 x kKeyTile per warpgroup).
  constexpr int kO = kDim / 2;       // O accumulators per thread (64 x kDim per warpgroup).
  constexpr bool kWarpFullArrivals = kTma && (kOptions & kWarpFull) != 0;
  constexpr bool kWarpEmptyArrivals = kCluster == 1 && (kOptions & kWarpEmpty) != 0;
  constexpr bool kEarlyFirstK =
      kTma && kCluster == 1 && !kWarpFullArrivals && (kOptions & kEarlyK) != 0;
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
  // The rows whose keys this CTA takes: its own, or its cluster's (the same for all of it).
  const int64_t first_tile = (blockIdx.x % tiles_per_block) / kCluster * kCluster;
  const int64_t keys_row_end =
      kCluster > 1 ? Min64(block_begin + (first_tile + kCluster) * rows_per_head, block_end)
                   : row_end;
  // The block has fewer rows than its tiles (uniform exit: of the whole cluster with kCluster).
  if (kCluster > 1 ? block_begin + first_tile * rows_per_head >= keys_row_end
                   : row_begin >= row_end) {
    return;
  }

  auto row_valid = [&](int local) {
    return local / rows_per_head < group && row_begin + local % rows_per_head < row_end;
  };

  const int64_t entry_index = kv_head * p.num_blocks + block;
  const int64_t first_span =
      p.entry_counts != nullptr ? entry_index * p.span_stride : p.entry_offsets[entry_index];
  const int64_t end_span = p.entry_counts != nullptr ? first_span + p.entry_counts[entry_index]
                                                     : p.entry_offsets[entry_index + 1];
  constexpr bool kWarpEntrySearch = (kOptions & kWarpEntry) != 0;
  if (kWarpEntrySearch ? tid < 32 : tid == 0) {
    // Keys k_offset <= key < min(k_offset + lk, row_end): held, and not after the last row.
    const int64_t key_lo = p.k_offset, key_hi = Min64(p.k_offset + p.lk, keys_row_end);
    const int64_t total = end_span > first_span
                              ? p.span_starts[end_span - 1] +
                                    (p.spans[end_span - 1].end - p.spans[end_span - 1].begin)
                              : 0;
    // The first span in [first_span, end_span) that ends after `key` (end_span if none).
    auto span_after = [&](int64_t key) {
      int64_t lo = first_span, hi = end_span;
      if constexpr (kWarpEntrySearch) {
        // Span ends increase, so "ends after key" is false then true over [lo, hi): each round
        // probes 32 evenly spaced spans and keeps the stretch where it turns true.
        while (hi > lo) {
          const int64_t stride = (hi - lo + 31) / 32;
          const int64_t probe = lo + lane * stride;
          const bool after = probe < hi && p.spans[probe].end > key;
          const uint32_t mask = __ballot_sync(0xffffffffu, after);
          if (mask == 0) {
            // False at every probe: the answer is after the last probe inside [lo, hi).
            lo = Min64(hi, lo + ((hi - lo - 1) / stride) * stride + 1);
          } else {
            const int first = __ffs(mask) - 1;
            if (first == 0 || stride == 1) return lo + first * stride;
            hi = lo + first * stride;  // True there (the answer if nothing before it is).
            lo = lo + (first - 1) * stride + 1;
            if (hi == lo) return hi;
          }
        }
        return lo;
      }
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
    const int64_t end =
        key_hi > key_lo ? Max64(begin, packed_below(span_after(key_hi), key_hi)) : begin;
    if (!kWarpEntrySearch || lane == 0) {
      entry[0] = begin;
      entry[1] = end;
      entry[2] = lo_span;
    }
#pragma unroll
    for (int s = 0; s < kStages && (!kWarpEntrySearch || lane == 0); ++s) {
      // Every producer thread (with kTma and kWarpFull: warp), once its copies landed.
      BarrierInit(full_k + 8 * s, kWarpFullArrivals ? 4 : 128);
      BarrierInit(full_v + 8 * s, kWarpFullArrivals ? 4 : 128);
      // Every consumer thread once done with the stage; with kCluster, every consumer warp of
      // every CTA of the cluster; with kWarpEmpty, every consumer warp.
      BarrierInit(empty_k + 8 * s, kCluster > 1 ? 8 * kCluster : (kWarpEmptyArrivals ? 8 : 256));
      BarrierInit(empty_v + 8 * s, kCluster > 1 ? 8 * kCluster : (kWarpEmptyArrivals ? 8 : 256));
    }
  }
  // The range and the initialised barriers are visible (with kCluster, to the whole cluster).
  if constexpr (kCluster > 1) {
    ClusterSync();
  } else {
    __syncthreads();
  }
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
        if constexpr ((kOptions & kStreaming) != 0) {
          CopyAsync16EvictFirst(q_smem + SwizzledOffset<kRows>(local, chunk), src, valid);
        } else {
          CopyAsync16(q_smem + SwizzledOffset<kRows>(local, chunk), src, valid);
        }
      }
    }
    int64_t cursor = entry[2];
    if constexpr (kTma) {
      // Thread j owns slot j of every tile: it looks up the slot's key position (before waiting
      // for the stage), and when the slot starts a run of consecutive keys (the first slot of the
      // tile or the first key of a span) it copies the run, clipped to the tile and to the packed
      // range, with at most 8 TMA boxes per 64-column block (the binary digits of its length).
      // Slots past the packed range are zeroed by plain stores (a stale V row could hold NaN bits,
      // and 0 * NaN would reach O). Each thread arrives once per stage and barrier; an issuing
      // thread announces its bytes with its arrival, before its copies.
      const int64_t key_row0 = kv_head * p.lk - p.k_offset;  // Matrix row of key position 0.
      constexpr uint32_t kRowBytes = kDim * 2;
      for (int tile = 0; tile < num_tiles; ++tile) {
        const int stage = tile % kStages;
        const uint32_t parity = ((tile / kStages) + 1) & 1;  // Phase of tile - kStages's release.
        const int64_t tile_first = packed_begin + static_cast<int64_t>(tile) * kKeyTile;
        const int64_t packed = tile_first + tid;
        int32_t pos = kNoKey;
        int run = 0;
        if (packed < packed_end) {
          while (cursor + 1 < end_span && p.span_starts[cursor + 1] <= packed) ++cursor;
          const int64_t start = p.span_starts[cursor];
          const CudaSpan span = p.spans[cursor];
          pos = span.begin + static_cast<int32_t>(packed - start);
          if (tid == 0 || packed == start) {
            run = static_cast<int>(
                Min64(start + (span.end - span.begin), Min64(tile_first + kKeyTile, packed_end)) -
                packed);
          }
        }
        const uint32_t buffer = stage * Layout::kTile;
        // kCluster: the run's K is copied by cluster CTA k_owner, its V by v_owner (spread over
        // the CTAs by warp), into every CTA of the cluster.
        const int k_owner = (tid / 32) % kCluster, v_owner = (tid / 32 + kCluster / 2) % kCluster;
        auto copy_run = [&](uint32_t tile_smem, const CUtensorMap* maps, uint32_t bar, int owner) {
          if (kCluster > 1 && static_cast<int>(ClusterRank()) != owner) return;
          int slot = tid, left = run;
          int row = static_cast<int>(key_row0 + pos);
          while (left > 0) {
            const int bits = BoxSet<kOptions>::Pick(left);  // A box of at most `left` rows.
            const int height = BoxSet<kOptions>::Height(bits);
#pragma unroll
            for (int b = 0; b < kDim / kBoxWidth; ++b) {
              const uint32_t dst = tile_smem + buffer + b * (kKeyTile * 128) + slot * 128;
              if constexpr (kCluster > 1) {
                TmaLoad2dMulticast(dst, &maps[bits], b * kBoxWidth, row, bar,
                                   static_cast<uint16_t>((1u << kCluster) - 1));
              } else {
                TmaLoad2d(dst, &maps[bits], b * kBoxWidth, row, bar);
              }
            }
            slot += height;
            row += height;
            left -= height;
          }
        };
        auto zero_row = [&](uint32_t tile_offset) {
#pragma unroll
          for (int b = 0; b < kDim / kBoxWidth; ++b) {
            uint4* row = reinterpret_cast<uint4*>(smem + tile_offset + buffer +
                                                  b * (kKeyTile * 128) + tid * 128);
#pragma unroll
            for (int c = 0; c < 8; ++c) row[c] = make_uint4(0, 0, 0, 0);
          }
        };
        // K: the stage's K and positions released (softmax of tile - kStages done).
        if (tile >= kStages) BarrierWait(empty_k + 8 * stage, parity);
        key_pos[stage * kKeyTile + tid] = pos;
        if (pos == kNoKey) zero_row(Layout::kK);
        const bool wait_q = tile == 0 && !kEarlyFirstK;  // kEarlyFirstK: after the K copies.
        if (wait_q) {
          CopyAsyncCommit();
          CopyAsyncWait<0>();  // Q has landed.
        }
        if (wait_q || pos == kNoKey) FenceProxyAsync();  // Q and zeros, visible to wgmma.
        // This thread's (kWarpFullArrivals: its warp's) arrival, announcing the bytes of its
        // copies before it issues them. With kWarpFullArrivals the warp's plain stores and fences
        // above are ordered before lane 0's arrival by __syncwarp.
        auto arrive_and_copy = [&](uint32_t tile_smem, const CUtensorMap* maps, uint32_t bar,
                                   int owner, int copy) {
          if constexpr (kWarpFullArrivals) {
            __syncwarp();
            const uint32_t bytes =
                __reduce_add_sync(0xffffffffu, static_cast<uint32_t>(copy) * kRowBytes);
            if (lane == 0) {
              if (bytes > 0) {
                BarrierArriveExpectTx(bar, bytes);
              } else {
                BarrierArrive(bar);
              }
            }
            __syncwarp();
            if (copy > 0) copy_run(tile_smem, maps, bar, owner);
          } else if (copy > 0) {
            BarrierArriveExpectTx(bar, copy * kRowBytes);
            copy_run(tile_smem, maps, bar, owner);
          } else {
            BarrierArrive(bar);
          }
        };
        if (kEarlyFirstK && tile == 0) {
          // The K copies first (their bytes announced before they are issued), then Q; the
          // arrival once Q has landed.
          if (run > 0) {
            BarrierExpectTx(full_k, run * kRowBytes);
            copy_run(k_smem, args.k_maps, full_k, k_owner);
          }
          CopyAsyncCommit();
          CopyAsyncWait<0>();  // Q has landed.
          FenceProxyAsync();   // Q, visible to wgmma.
          BarrierArrive(full_k);
        } else {
          arrive_and_copy(k_smem, args.k_maps, full_k + 8 * stage, k_owner, run);
        }
        // V: the stage's V released (O += P V of tile - kStages done).
        if (tile >= kStages) BarrierWait(empty_v + 8 * stage, parity);
        if (pos == kNoKey) {
          zero_row(Layout::kV);
          FenceProxyAsync();
        }
        arrive_and_copy(v_smem, args.v_maps, full_v + 8 * stage, v_owner,
                        kLoads || tile == 0 ? run : 0);
      }
    }
    for (int tile = 0; !kTma && tile < num_tiles; ++tile) {
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

    // A stage released: this thread's arrival, or with kCluster this warp's on the stage's empty
    // barrier in every CTA of the cluster.
    auto release = [&](uint32_t bar) {
      if constexpr (kCluster > 1) {
        __syncwarp();
        if (lane == 0) {
#pragma unroll
          for (int r = 0; r < kCluster; ++r) BarrierArriveCluster(bar, r);
        }
      } else if constexpr (kWarpEmptyArrivals) {
        __syncwarp();
        if (lane == 0) BarrierArrive(bar);
      } else {
        BarrierArrive(bar);
      }
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
      release(empty_k);
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
        release(empty_k + 8 * stage);  // K and positions of this tile are free.
        WgmmaWait<0>();         // O += P V of the previous tile is done: its V is free, P and O may
        FenceRegisters(o_acc);  // change.
        release(empty_v + 8 * previous);
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
        const float2 value =
            make_float2(o_acc[n * 4 + 2 * i] * inv, o_acc[n * 4 + 2 * i + 1] * inv);
        if constexpr ((kOptions & kStreaming) != 0) {
          __stcs(reinterpret_cast<float2*>(o + n * 8), value);
        } else {
          *reinterpret_cast<float2*>(o + n * 8) = value;
        }
      }
      if (lane % 4 == 0) {
        const float lse = sum > 0.0f ? (row_max[i] + __log2f(sum)) * kLn2 : kNegInf;
        if constexpr ((kOptions & kStreaming) != 0) {
          __stcs(p.lse + head * p.lq + row, lse);
        } else {
          p.lse[head * p.lq + row] = lse;
        }
      }
    }
  }
  // No CTA of a cluster exits while another may still copy into it or arrive on its barriers.
  if constexpr (kCluster > 1) ClusterSync();
#endif  // sm_90a
}

// The driver's cuTensorMapEncodeTiled, found through the runtime (no link to libcuda); null when
// the driver has none.
inline PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// Fills args->k_maps and v_maps (WsArgs) for the params' K and V. False when the driver cannot
// encode them (no encoder, or rows past 2^31 - 1: TMA coordinates are 32-bit).
template <typename T, int kDim, int kOptions>
bool EncodeKvMaps(const SparseAttentionCudaParams& p, WsArgs* args) {
  std::memset(args->k_maps, 0, sizeof(args->k_maps));
  std::memset(args->v_maps, 0, sizeof(args->v_maps));
  if (p.lk == 0) return true;  // No tile: the maps are never read.
  const int64_t rows = p.hkv * p.lk;
  if (rows > 0x7fffffff) return false;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = TensorMapEncoder();
  if (encode == nullptr) return false;
  const CUtensorMapDataType type = std::is_same<T, __half>::value
                                       ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kDim), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kDim) * 2};
  const cuuint32_t element_strides[2] = {1, 1};
  for (int i = 0; i < BoxSet<kOptions>::kCount; ++i) {
    const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBoxWidth),
                               static_cast<cuuint32_t>(BoxSet<kOptions>::Height(i))};
    for (int kv = 0; kv < 2; ++kv) {
      CUtensorMap* map = kv == 0 ? &args->k_maps[i] : &args->v_maps[i];
      if (encode(map, type, 2, const_cast<void*>(kv == 0 ? p.k : p.v), dims, strides, box,
                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
        return false;
      }
    }
  }
  return true;
}

// Launches the warp-specialized kernel for (T, kDim) on `stream`; the params passed CanImplement.
// kTma where the maps cannot be encoded, or kCluster not dividing a selection block's row tiles:
// cudaErrorNotSupported (the caller may fall back).
template <typename T, int kDim, bool kPingPong = false, int kProducerRegisters = 24,
          bool kLoads = true, bool kTma = false, int kCluster = 1, int kOptions = 0>
cudaError_t LaunchWs(const SparseAttentionCudaParams& p, cudaStream_t stream) {
  static_assert(kCluster == 1 || kTma, "clusters share tiles by TMA multicast");
  const int64_t rows_per_head = kRows / (p.hq / p.hkv);
  const int64_t tiles_per_block = (p.block_size + rows_per_head - 1) / rows_per_head;
  if (tiles_per_block % kCluster != 0) return cudaErrorNotSupported;
  const dim3 grid(static_cast<unsigned>(p.num_blocks * tiles_per_block),
                  static_cast<unsigned>(p.hkv));
  constexpr size_t kSmem = WsSmemLayout<kDim>::kBytes;
  auto* kernel = HopperWsSparseAttentionKernel<T, kDim, kPingPong, kProducerRegisters, kLoads, kTma,
                                               kCluster, kOptions>;
  const cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  WsArgs args;
  if (kTma) {
    if (!EncodeKvMaps<T, kDim, kOptions>(p, &args)) return cudaErrorNotSupported;
  }
  args.p = p;
  if constexpr (kCluster > 1) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(kWsThreads);
    config.dynamicSmemBytes = kSmem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = kCluster;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, args);
  } else {
    kernel<<<grid, kWsThreads, kSmem, stream>>>(args);
    return cudaGetLastError();
  }
}

// The Hopper kernel that kHopper runs: warp-specialized with the TMA producer (at most 2 boxes a
// run), the consumers' ping-pong, the key range found by a warp and tile 0's K copied before Q has
// landed (variant ws_tma_pp_h2ek), or the lock-step `early` kernel
// (sparse_attention_hopper.cuh) where the tensor maps cannot be encoded.
template <typename T, int kDim>
cudaError_t LaunchDefault(const SparseAttentionCudaParams& p, cudaStream_t stream) {
  const cudaError_t error =
      LaunchWs<T, kDim, true, 24, true, true, 1, kBoxEights | kWarpEntry | kEarlyK>(p, stream);
  if (error != cudaErrorNotSupported) return error;
  return Launch<T, kDim, true, true>(p, stream);
}

}  // namespace sparse_attention_hopper
}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SPARSE_ATTENTION_HOPPER_WS_CUH_
