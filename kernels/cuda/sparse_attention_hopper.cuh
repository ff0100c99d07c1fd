// The sparse attention kernel on Hopper (sm_90a): warpgroup MMA (wgmma) with K/V tiles in shared
// memory in the 128-byte swizzled layout wgmma reads. Included by one .cu file per (dtype, head
// dim) instantiation; the portable mma.sync kernel (sparse_attention_kernel.cuh) stays the path for
// every other GPU and build.
//
// Work split as the portable kernel: one thread block per (KV head h, tile of query rows): the rows
// [row_begin, row_end) of one selection block for all G query heads of h, local row
// g * (128 / G) + r, so every K/V tile loaded serves the whole group. Two warpgroups (8 warps);
// warpgroup w owns local rows [64w, 64w + 64), and within it warp i the rows 64w + 16i + [0, 16),
// the accumulator layout of wgmma m64nN (the same per-warp layout as mma.sync m16n8).
// The selected keys (spans clipped to the keys held and to the last row) are packed densely into
// 128-key tiles; each tile's K and V rows are gathered with cp.async (16 bytes a copy, rows are not
// contiguous) into one of 3 buffers while the previous tile is computed.
// Per tile and warpgroup: S = Q K^T (wgmma, A = Q and B = K from shared memory, both K-major), the
// causal / bounds mask only on tiles whose last key lies after the first row, online softmax in
// fp32 registers (exp2, scale folded in), P rounded to the storage type in registers and
// O += P V (wgmma, A = P from registers, B = V from shared memory, MN-major). The O += P V of tile
// t - 1 runs on the tensor cores while the softmax of tile t runs (FA3's intra-warpgroup overlap).
//
// Shared memory layout of a [rows][dim] tile (2-byte elements): column blocks of 64 elements (128
// bytes); block b holds rows 0..rows-1 at b * rows * 128 + row * 128 bytes, and the 16-byte chunk c
// of a row is stored at chunk c ^ (row % 8) (wgmma's 128-byte swizzle; tiles 1024-byte aligned).
#ifndef DHSA_KERNELS_CUDA_SPARSE_ATTENTION_HOPPER_CUH_
#define DHSA_KERNELS_CUDA_SPARSE_ATTENTION_HOPPER_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/sparse_attention_cuda.h"
#include "kernels/cuda/sparse_attention_wgmma.cuh"

namespace dhsa {
namespace sparse_attention_hopper {

inline constexpr int kRows = kSparseAttentionCudaRowsPerBlock;  // 2 warpgroups x 64 rows.
inline constexpr int kThreads = 256;
inline constexpr int kKeyTile = 128;           // Keys per K/V tile.
inline constexpr int32_t kNoKey = 0x7fffffff;  // Slot past the last selected key.

// Dynamic shared memory, in bytes from a 1024-aligned base: Q, then [3 buffers] of K and V, then
// key positions [3 buffers][kKeyTile] (the tile being computed, the one in flight, and the next one
// being looked up), then the block's packed key range.
template <int kDim>
struct SmemLayout {
  static constexpr int kQ = kRows * kDim * 2;
  static constexpr int kTile = kKeyTile * kDim * 2;
  static constexpr int kK = kQ;
  static constexpr int kV = kK + 3 * kTile;
  static constexpr int kPos = kV + 3 * kTile;
  static constexpr int kEntry = kPos + 3 * kKeyTile * 4;
  static constexpr int kEnd = kEntry + 3 * 8;
  static constexpr size_t kBytes = kEnd + 1024;  // Slack to align the base to 1024 bytes.
};

// Byte offset of 16-byte chunk `chunk` (of kDim / 8) of row `row` in a swizzled [rows][kDim] tile.
template <int kRowsInTile>
__device__ __forceinline__ uint32_t SwizzledOffset(int row, int chunk) {
  return (chunk / 8) * (kRowsInTile * 128) + row * 128 + (((chunk % 8) ^ (row % 8)) * 16);
}

// wgmma shared-memory matrix descriptor: start address, leading and stride byte offsets, 128-byte
// swizzle.
__device__ __forceinline__ uint64_t Descriptor(uint32_t address, uint32_t leading,
                                               uint32_t stride) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>(leading >> 4) << 16) | (static_cast<uint64_t>(stride >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving reads or writes of accumulators across the wgmma waits.
template <int kN>
__device__ __forceinline__ void FenceRegisters(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// Shared memory written through the generic proxy (cp.async, stores), read next by wgmma.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zeros when !valid (src is then not read).
__device__ __forceinline__ void CopyAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
// As CopyAsync16, with the L2 evict-first policy (data read once).
__device__ __forceinline__ void CopyAsync16EvictFirst(uint32_t dst, const void* src, bool valid) {
  asm volatile(
      "{\n.reg .b64 policy;\ncreatepolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
      "cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, policy;\n}\n" ::"r"(dst),
      "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CopyAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t Max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ uint32_t Pack(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t Pack<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t Pack<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// kOverlap: O += P V of tile t - 1 runs while the softmax of tile t runs. kEarly (with kOverlap):
// the key positions of tile t + 2 are looked up while tile t's S = Q K^T runs (their global
// loads off the critical path), by half the threads of each warpgroup, and one barrier per tile.
// kLoads = false (with kEarly; a diagnostic for tuning, wrong results): only tile 0 is loaded and
// every later tile computes on whatever its buffers hold, which times the math without the loads.
template <typename T, int kDim, bool kOverlap, bool kEarly = false, bool kLoads = true>
__global__ void __launch_bounds__(kThreads, 1)
    HopperSparseAttentionKernel(const __grid_constant__ SparseAttentionCudaParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(kDim == 64 || kDim == 128, "head dim 64 or 128");
  using Layout = SmemLayout<kDim>;
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
  int64_t* entry = reinterpret_cast<int64_t*>(smem + Layout::kEntry);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = tid / 128;
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
    // First span ending after `key` (binary search; spans are sorted and disjoint).
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
    // Packed index of the first selected key >= key (= number of selected keys below it).
    auto packed_below = [&](int64_t span, int64_t key) -> int64_t {
      if (span == end_span) return total;
      return p.span_starts[span] + Max64(0, key - p.spans[span].begin);
    };
    const int64_t lo_span = span_after(key_lo);
    const int64_t begin = packed_below(lo_span, key_lo);
    entry[0] = begin;
    entry[1] = key_hi > key_lo ? Max64(begin, packed_below(span_after(key_hi), key_hi)) : begin;
    entry[2] = lo_span;
  }
  __syncthreads();
  const int64_t packed_begin = entry[0], packed_end = entry[1];
  const int num_tiles = static_cast<int>((packed_end - packed_begin + kKeyTile - 1) / kKeyTile);

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k) + kv_head * p.lk * kDim;
  const T* v = static_cast<const T*>(p.v) + kv_head * p.lk * kDim;

  // Threads 0..kKeyTile-1 each own one slot of a tile: the position of packed key
  // tile * kKeyTile + tid, found by a cursor that only moves forward through the spans.
  // With kEarly the slots are owned by threads 0..63 of each warpgroup (slot = 64 wg + tid % 128),
  // so that both warpgroups wait equally for the lookups.
  int64_t cursor = entry[2];
  const bool owns_slot = kEarly ? tid % 128 < kKeyTile / 2 : tid < kKeyTile;
  const int slot = kEarly ? wg * (kKeyTile / 2) + tid % 128 : tid;
  auto find_positions = [&](int tile) {
    if (owns_slot) {
      const int64_t packed = packed_begin + static_cast<int64_t>(tile) * kKeyTile + slot;
      int32_t pos = kNoKey;
      if (packed < packed_end) {
        while (cursor + 1 < end_span && p.span_starts[cursor + 1] <= packed) ++cursor;
        pos = p.spans[cursor].begin + static_cast<int32_t>(packed - p.span_starts[cursor]);
      }
      key_pos[(tile % 3) * kKeyTile + slot] = pos;
    }
  };
  auto load_tile = [&](int tile) {
    const uint32_t buffer = (tile % 3) * Layout::kTile;
    const int32_t* pos = key_pos + (tile % 3) * kKeyTile;
#pragma unroll
    for (int it = 0; it < kKeyTile * kChunks / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int slot = i / kChunks, chunk = i % kChunks;
      const int32_t key = pos[slot];
      const bool valid = key != kNoKey;
      const int64_t offset = (valid ? key - p.k_offset : 0) * kDim + chunk * 8;
      const uint32_t dst = buffer + SwizzledOffset<kKeyTile>(slot, chunk);
      CopyAsync16(k_smem + dst, k + offset, valid);
      CopyAsync16(v_smem + dst, v + offset, valid);
    }
  };

  // This thread's two accumulator rows (lane / 4 and lane / 4 + 8 of the warp's 16).
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
  float row_max[2] = {kNegInf, kNegInf};  // Running max of scale * log2(e) * q.k.
  float row_sum[2] = {0.0f, 0.0f};        // This thread's part of the running sum of exp2.

  // V buffer 2 (read as "tile -1") zero, visible to wgmma before any is issued.
  for (int i = tid; i < Layout::kTile / 16; i += kThreads) {
    reinterpret_cast<uint4*>(smem + Layout::kV + 2 * Layout::kTile)[i] = make_uint4(0, 0, 0, 0);
  }
  FenceProxyAsync();
  __syncthreads();

  if (num_tiles > 0) {
#pragma unroll
    for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int local = i / kChunks, chunk = i % kChunks;
      const bool valid = row_valid(local);
      const int64_t head = kv_head * group + local / rows_per_head;
      const int64_t row = row_begin + local % rows_per_head - p.q_offset;
      const T* src = valid ? q + (head * p.lq + row) * kDim + chunk * 8 : q;
      CopyAsync16(q_smem + SwizzledOffset<kRows>(local, chunk), src, valid);
    }
    find_positions(0);
    __syncthreads();
    load_tile(0);
    CopyAsyncCommit();
    // kEarly: tile 1's positions, visible after the first barrier of the loop.
    if (kEarly && num_tiles > 1) find_positions(1);
  }

  if constexpr (kOverlap) {
    // Per tile: S = Q K^T (wgmma from shared memory) ...
    float s[kS];
    auto issue_s = [&](uint32_t buffer) {
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        const uint32_t step = (kk % 4) * 32;  // 16 elements along the swizzled row.
        const uint64_t a =
            Descriptor(q_smem + (kk / 4) * (kRows * 128) + wg * 64 * 128 + step, 16, 1024);
        const uint64_t b =
            Descriptor(k_smem + buffer + (kk / 4) * (kKeyTile * 128) + step, 16, 1024);
        Wgmma<T, kKeyTile>::SS(s, a, b, kk > 0 ? 1 : 0);
      }
      WgmmaCommit();
    };
    // ... softmax into P (pa, the storage type, as wgmma A fragments) ...
    uint32_t pa[kKeyTile / 16][4];
    float correction[2];
    auto softmax = [&](const int32_t* pos) {
      // Scale into log2 units; mask keys after the row's position and slots past the last key
      // (position kNoKey) only when the tile's last key lies after the first row's position.
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
      // New running max per row (over the 4 threads holding the row), exp2, running sums.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float m = row_max[i];
#pragma unroll
        for (int n = 0; n < kKeyTile / 8; ++n) {
          m = fmaxf(m, fmaxf(s[n * 4 + 2 * i], s[n * 4 + 2 * i + 1]));
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        // A row with no key so far keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
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
    // ... P packed (the S accumulators of key groups 2kk and 2kk + 1 are the A fragment of keys
    // [16kk, 16kk + 16)) and O rescaled, once the previous O += P V has completed ...
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
    // ... and O += P V (wgmma, A = P from registers, B = V read MN-major from its tile).
    auto issue_pv = [&](uint32_t buffer) {
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kKeyTile / 16; ++kk) {
        const uint64_t b = Descriptor(v_smem + buffer + kk * 16 * 128, kKeyTile * 128, 1024);
        Wgmma<T, kDim>::RS(o_acc, pa[kk], b);
      }
      WgmmaCommit();
    };
    // P = 0 and zero V tiles make the O += P V of "tile -1" (issued with tile 0) a no-op, so that
    // every wgmma is issued on a path without branches (ptxas serializes wgmma on divergent paths).
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) pa[kk][r] = 0;
    }

    // Tile t lives in buffer t % 3: while tile t's S and softmax run, O += P V of tile t - 1 reads
    // buffer (t - 1) % 3 and tile t + 1 is loaded into buffer (t + 1) % 3.
    if constexpr (kEarly) {
      // Per tile: one barrier (tile t landed and visible; every warpgroup done with tile t - 2's
      // buffers and with the positions of tile t - 1, whose slots tile t + 2 takes), S of t and
      // O += P V of t - 1 issued, the loads of tile t + 1 (positions looked up one tile ago) and
      // the lookup of tile t + 2 while they run, then softmax.
      for (int tile = 0; tile < num_tiles; ++tile) {
        CopyAsyncWait<0>();  // This tile's group (and Q, committed with tile 0) has landed.
        FenceProxyAsync();   // ... and is visible to wgmma (the async proxy), as are the zeros.
        __syncthreads();
        issue_s((tile % 3) * Layout::kTile);
        issue_pv(((tile + 2) % 3) * Layout::kTile);  // Tile t - 1 (a no-op for t = 0).
        if (kLoads && tile + 1 < num_tiles) load_tile(tile + 1);
        CopyAsyncCommit();
        if (kLoads && tile + 2 < num_tiles) find_positions(tile + 2);
        WgmmaWait<1>();  // S of this tile is done.
        FenceRegisters(s);
        softmax(key_pos + (tile % 3) * kKeyTile);
        WgmmaWait<0>();  // O += P V of the previous tile is done: P and O may change.
        FenceRegisters(o_acc);
        pack_and_rescale();
      }
    } else {
      for (int tile = 0; tile < num_tiles; ++tile) {
        const bool prefetch = tile + 1 < num_tiles;
        if (prefetch) find_positions(tile + 1);
        // The next positions are visible, and every warpgroup is done with tile t - 2's buffer.
        __syncthreads();
        if (prefetch) load_tile(tile + 1);
        CopyAsyncCommit();
        CopyAsyncWait<1>();  // This tile's group (and Q, committed with tile 0) has landed.
        FenceProxyAsync();  // ... and is visible to wgmma (the async proxy), as are the zero tiles.
        __syncthreads();
        issue_s((tile % 3) * Layout::kTile);
        issue_pv(((tile + 2) % 3) * Layout::kTile);  // Tile t - 1 (a no-op for t = 0).
        WgmmaWait<1>();                              // S of this tile is done.
        FenceRegisters(s);
        softmax(key_pos + (tile % 3) * kKeyTile);
        WgmmaWait<0>();  // O += P V of the previous tile is done: P and O may change.
        FenceRegisters(o_acc);
        pack_and_rescale();
      }
    }
    // O += P V of the last tile (a no-op when there was no tile: P = 0, V zero).
    issue_pv(((num_tiles + 2) % 3) * Layout::kTile);
    WgmmaWait<0>();
    FenceRegisters(o_acc);

  } else {
    // The same steps without overlap (a reference point for tuning): S, softmax, O += P V, each
    // waited for; tile t in buffer t % 3 as above.
    for (int tile = 0; tile < num_tiles; ++tile) {
      const uint32_t buffer = (tile % 3) * Layout::kTile;
      const bool prefetch = tile + 1 < num_tiles;
      if (prefetch) find_positions(tile + 1);
      // The next positions are visible, and every warpgroup is done with the buffer they will fill.
      __syncthreads();
      if (prefetch) load_tile(tile + 1);
      CopyAsyncCommit();
      CopyAsyncWait<1>();  // This tile's group (and Q, committed with tile 0) has landed.
      FenceProxyAsync();   // ... and is visible to wgmma (the async proxy).
      __syncthreads();
      // Every warpgroup computes, also one without a valid row (zero Q, outputs not stored): a
      // branch around wgmma makes ptxas serialize the wgmma instructions.
      const int32_t* pos = key_pos + (tile % 3) * kKeyTile;

      // S = Q K^T: 64 rows x kKeyTile keys per warpgroup.
      float s[kS];
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        const uint32_t step = (kk % 4) * 32;  // 16 elements along the swizzled row.
        const uint64_t a =
            Descriptor(q_smem + (kk / 4) * (kRows * 128) + wg * 64 * 128 + step, 16, 1024);
        const uint64_t b =
            Descriptor(k_smem + buffer + (kk / 4) * (kKeyTile * 128) + step, 16, 1024);
        Wgmma<T, kKeyTile>::SS(s, a, b, kk > 0 ? 1 : 0);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegisters(s);

      // Scale into log2 units; mask keys after the row's position and slots past the last key
      // (their position is kNoKey) only when the tile's last key lies after the first row's
      // position.
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

      // Online softmax: new running max per row (over the 4 threads holding the row), rescale.
      float correction[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float m = row_max[i];
#pragma unroll
        for (int n = 0; n < kKeyTile / 8; ++n) {
          m = fmaxf(m, fmaxf(s[n * 4 + 2 * i], s[n * 4 + 2 * i + 1]));
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        // A row with no key so far keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
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
#pragma unroll
      for (int n = 0; n < kDim / 8; ++n) {
        o_acc[n * 4 + 0] *= correction[0];
        o_acc[n * 4 + 1] *= correction[0];
        o_acc[n * 4 + 2] *= correction[1];
        o_acc[n * 4 + 3] *= correction[1];
      }

      // O += P V: the S accumulators of key groups 2kk and 2kk + 1 are the A fragment of keys
      // [16kk, 16kk + 16); V is the B operand read MN-major (dims contiguous) from its tile.
      // All of P is packed before the first wgmma (registers written between wgmmas would make
      // ptxas wait for the earlier ones).
      uint32_t pa[kKeyTile / 16][4];
#pragma unroll
      for (int kk = 0; kk < kKeyTile / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) pa[kk][r] = Pack<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
      }
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kKeyTile / 16; ++kk) {
        const uint64_t b = Descriptor(v_smem + buffer + kk * 16 * 128, kKeyTile * 128, 1024);
        Wgmma<T, kDim>::RS(o_acc, pa[kk], b);
      }
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegisters(o_acc);
    }
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
#endif  // sm_90a
}

// Launches the kernel for (T, kDim, kOverlap) on `stream`; the params passed CanImplement.
template <typename T, int kDim, bool kOverlap = true, bool kEarly = false, bool kLoads = true>
cudaError_t Launch(const SparseAttentionCudaParams& p, cudaStream_t stream) {
  const int64_t rows_per_head = kRows / (p.hq / p.hkv);
  const int64_t tiles_per_block = (p.block_size + rows_per_head - 1) / rows_per_head;
  const dim3 grid(static_cast<unsigned>(p.num_blocks * tiles_per_block),
                  static_cast<unsigned>(p.hkv));
  constexpr size_t kSmem = SmemLayout<kDim>::kBytes;
  const cudaError_t error =
      cudaFuncSetAttribute(HopperSparseAttentionKernel<T, kDim, kOverlap, kEarly, kLoads>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  HopperSparseAttentionKernel<T, kDim, kOverlap, kEarly, kLoads>
      <<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sparse_attention_hopper
}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SPARSE_ATTENTION_HOPPER_CUH_
