// The sparse attention kernel (portable sm_80-style path: mma.sync m16n8k16, ldmatrix, cp.async),
// included by one .cu file per (dtype, head dim) instantiation.
//
// One thread block per (KV head h, tile of query rows): the rows [row_begin, row_end) of one
// selection block, for all G query heads of h at once, so every K/V tile loaded serves the group.
// The block's 128 query rows are (head g, row r) -> g * (128 / G) + r; warp w owns rows
// [16w, 16w + 16). The keys of the entry's spans, clipped to the keys held and to the last query
// position, are packed densely into 64-key tiles: packed key n is found from the span starts (a
// per-thread cursor walks the sorted spans), so a tile's rows need not be contiguous. K/V tiles
// are gathered with cp.async into a double buffer while the previous tile is computed.
// Per tile and warp: S = Q K^T on tensor cores (fp32 accumulators), a causal / bounds mask only on
// tiles whose last key lies after the first query position, online softmax in fp32 (running max
// and sum per row, exp2 with the scale folded in), P rounded to the storage type and O += P V.
// Memory beyond the outputs: none (no Lq x Lk matrix).
#ifndef DHSA_KERNELS_CUDA_SPARSE_ATTENTION_KERNEL_CUH_
#define DHSA_KERNELS_CUDA_SPARSE_ATTENTION_KERNEL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/sparse_attention_cuda.h"

namespace dhsa {
namespace sparse_attention_kernel {

inline constexpr int kWarps = kSparseAttentionCudaRowsPerBlock / 16;
inline constexpr int kThreads = 32 * kWarps;
inline constexpr int kRows = kSparseAttentionCudaRowsPerBlock;
inline constexpr int kKeyTile = 64;            // Keys per K/V tile.
inline constexpr int32_t kNoKey = 0x7fffffff;  // Slot past the last selected key.

// Shared memory, in elements of the 2-byte storage type: Q [kRows][stride], then K and V
// [2 buffers][kKeyTile][stride], then key positions [3 buffers][kKeyTile] (int32: the tile being
// computed, the one in flight, and the next one being looked up while a slow warp may still read
// the oldest). Rows are padded by 16 bytes so the 8 rows an ldmatrix phase reads fall in distinct
// banks.
template <int kDim>
struct SmemLayout {
  static constexpr int kStride = kDim + 8;
  static constexpr int kQ = kRows * kStride;
  static constexpr int kTile = kKeyTile * kStride;
  static constexpr int kElements = kQ + 4 * kTile;
  static constexpr size_t kBytes = 2 * kElements + sizeof(int32_t) * 3 * kKeyTile;
};

template <typename T>
struct StorageOps;

template <>
struct StorageOps<__nv_bfloat16> {
  // c += a (16x16, row) * b (16x8, col), fp32 accumulate.
  static __device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two floats rounded to nearest into one register, `lo` in the low half.
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

template <>
struct StorageOps<__half> {
  static __device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 2-byte elements; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row)));
}

// The same, each matrix transposed.
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row)));
}

// 16 bytes global -> shared, asynchronously; zeros when !valid (src is then not read).
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void CopyAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` committed groups are still in flight.
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

template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads, 1)
    SparseAttentionKernel(const __grid_constant__ SparseAttentionCudaParams p) {
  static_assert(kDim % 16 == 0, "head dim must be a multiple of 16");
  static_assert((kKeyTile * kDim / 8) % kThreads == 0 && (kRows * kDim / 8) % kThreads == 0,
                "tile loads must split evenly over the threads");
  using Layout = SmemLayout<kDim>;
  using Ops = StorageOps<T>;
  constexpr int kStride = Layout::kStride;
  constexpr int kChunks = kDim / 8;  // 16-byte pieces per row.
  const float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem[];
  T* q_smem = reinterpret_cast<T*>(smem);
  T* k_smem = q_smem + Layout::kQ;
  T* v_smem = k_smem + 2 * Layout::kTile;
  int32_t* key_pos = reinterpret_cast<int32_t*>(v_smem + 2 * Layout::kTile);
  __shared__ int64_t entry[3];  // Packed range [begin, end) of the keys to attend; first span.

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
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

  // Row r of query head g of the group <-> local row g * rows_per_head + r.
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

  // Threads 0..63 each own one slot of a tile: the position of packed key `tile * 64 + tid`, found
  // by a cursor that only moves forward through the spans.
  int64_t cursor = entry[2];
  auto find_positions = [&](int tile) {
    if (tid < kKeyTile) {
      const int64_t packed = packed_begin + static_cast<int64_t>(tile) * kKeyTile + tid;
      int32_t pos = kNoKey;
      if (packed < packed_end) {
        while (cursor + 1 < end_span && p.span_starts[cursor + 1] <= packed) ++cursor;
        pos = p.spans[cursor].begin + static_cast<int32_t>(packed - p.span_starts[cursor]);
      }
      key_pos[(tile % 3) * kKeyTile + tid] = pos;
    }
  };
  auto load_tile = [&](int tile) {
    const int buffer = tile % 2;
    const int32_t* pos = key_pos + (tile % 3) * kKeyTile;
    T* k_dst = k_smem + buffer * Layout::kTile;
    T* v_dst = v_smem + buffer * Layout::kTile;
#pragma unroll
    for (int it = 0; it < kKeyTile * kChunks / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int slot = i / kChunks, chunk = i % kChunks;
      const int32_t key = pos[slot];
      const bool valid = key != kNoKey;
      const int64_t offset = (valid ? key - p.k_offset : 0) * kDim + chunk * 8;
      CopyAsync16(k_dst + slot * kStride + chunk * 8, k + offset, valid);
      CopyAsync16(v_dst + slot * kStride + chunk * 8, v + offset, valid);
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
  const bool warp_active = __any_sync(0xffffffffu, row_valid(warp * 16 + lane % 16));
  const float scale_log2 = p.scale * 1.4426950408889634f;

  float o_acc[kDim / 8][4];
#pragma unroll
  for (int n = 0; n < kDim / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[n][e] = 0.0f;
  }
  float row_max[2] = {kNegInf, kNegInf};  // Running max of scale * log2(e) * q.k.
  float row_sum[2] = {0.0f, 0.0f};        // This thread's part of the running sum of exp2.
  uint32_t q_frag[kDim / 16][4];

  if (num_tiles > 0) {
#pragma unroll
    for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int local = i / kChunks, chunk = i % kChunks;
      const bool valid = row_valid(local);
      const int64_t head = kv_head * group + local / rows_per_head;
      const int64_t row = row_begin + local % rows_per_head - p.q_offset;
      const T* src = valid ? q + (head * p.lq + row) * kDim + chunk * 8 : q;
      CopyAsync16(q_smem + local * kStride + chunk * 8, src, valid);
    }
    find_positions(0);
    __syncthreads();
    load_tile(0);
    CopyAsyncCommit();
  }

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int buffer = tile % 2;
    const bool prefetch = tile + 1 < num_tiles;
    if (prefetch) find_positions(tile + 1);
    // The next positions are visible, and every warp is done with the K/V buffer they will fill.
    __syncthreads();
    if (prefetch) load_tile(tile + 1);
    CopyAsyncCommit();
    CopyAsyncWait<1>();  // This tile's group (and Q, committed with tile 0) has landed.
    __syncthreads();
    if (!warp_active) continue;
    if (tile == 0) {
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        LdMatrixX4(q_frag[kk],
                   q_smem + (warp * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
      }
    }
    const T* k_tile = k_smem + buffer * Layout::kTile;
    const T* v_tile = v_smem + buffer * Layout::kTile;
    const int32_t* pos = key_pos + (tile % 3) * kKeyTile;

    // S = Q K^T: 16 rows x 64 keys per warp, as 8 accumulators of 16x8.
    float s[kKeyTile / 8][4];
#pragma unroll
    for (int n = 0; n < kKeyTile / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk) {
#pragma unroll
      for (int pair = 0; pair < kKeyTile / 16; ++pair) {
        // Matrices: keys +0..7 / dims +0..7, keys +0..7 / dims +8..15, keys +8..15 / dims +0..7,
        // keys +8..15 / dims +8..15 -> b0, b1 of key group 2*pair, then of 2*pair + 1.
        uint32_t b[4];
        LdMatrixX4(b, k_tile + (pair * 16 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 +
                          ((lane / 8) % 2) * 8);
        Ops::Mma(s[2 * pair], q_frag[kk], b[0], b[1]);
        Ops::Mma(s[2 * pair + 1], q_frag[kk], b[2], b[3]);
      }
    }

    // Scale into log2 units; mask keys after the row's position and slots past the last key (their
    // position is kNoKey) only when the tile's last key lies after the first query position.
    const bool masked = pos[kKeyTile - 1] > row_begin;
#pragma unroll
    for (int n = 0; n < kKeyTile / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] *= scale_log2;
        if (masked && pos[n * 8 + (lane % 4) * 2 + (e % 2)] > row_pos[e / 2]) s[n][e] = kNegInf;
      }
    }

    // Online softmax: new running max per row (over the 4 threads holding the row), rescale.
    float correction[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float m = row_max[i];
#pragma unroll
      for (int n = 0; n < kKeyTile / 8; ++n) m = fmaxf(m, fmaxf(s[n][2 * i], s[n][2 * i + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      // A row with no key so far keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
      const float base = m == kNegInf ? 0.0f : m;
      correction[i] = FastExp2(row_max[i] - base);
      row_max[i] = m;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kKeyTile / 8; ++n) {
        s[n][2 * i] = FastExp2(s[n][2 * i] - base);
        s[n][2 * i + 1] = FastExp2(s[n][2 * i + 1] - base);
        sum += s[n][2 * i] + s[n][2 * i + 1];
      }
      row_sum[i] = row_sum[i] * correction[i] + sum;
    }
#pragma unroll
    for (int n = 0; n < kDim / 8; ++n) {
      o_acc[n][0] *= correction[0];
      o_acc[n][1] *= correction[0];
      o_acc[n][2] *= correction[1];
      o_acc[n][3] *= correction[1];
    }

    // O += P V: the accumulators of key groups 2kk and 2kk+1 are the A fragment of keys
    // [16kk, 16kk + 16); V's fragments come transposed from its [key][dim] tile.
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
      const uint32_t a[4] = {Ops::Pack(s[2 * kk][0], s[2 * kk][1]),
                             Ops::Pack(s[2 * kk][2], s[2 * kk][3]),
                             Ops::Pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Ops::Pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int pair = 0; pair < kDim / 16; ++pair) {
        // Matrices: keys +0..7 / dims +0..7, keys +8..15 / dims +0..7, keys +0..7 / dims +8..15,
        // keys +8..15 / dims +8..15 -> b0, b1 of dim group 2*pair, then of 2*pair + 1.
        uint32_t b[4];
        LdMatrixX4Trans(b, v_tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride +
                               pair * 16 + (lane / 16) * 8);
        Ops::Mma(o_acc[2 * pair], a, b[0], b[1]);
        Ops::Mma(o_acc[2 * pair + 1], a, b[2], b[3]);
      }
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
          make_float2(o_acc[n][2 * i] * inv, o_acc[n][2 * i + 1] * inv);
    }
    if (lane % 4 == 0) {
      p.lse[head * p.lq + row] = sum > 0.0f ? (row_max[i] + __log2f(sum)) * kLn2 : kNegInf;
    }
  }
}

// Launches the kernel for (T, kDim) on `stream`; the params passed CanImplement.
template <typename T, int kDim>
cudaError_t Launch(const SparseAttentionCudaParams& p, cudaStream_t stream) {
  const int64_t rows_per_head = kRows / (p.hq / p.hkv);
  const int64_t tiles_per_block = (p.block_size + rows_per_head - 1) / rows_per_head;
  const dim3 grid(static_cast<unsigned>(p.num_blocks * tiles_per_block),
                  static_cast<unsigned>(p.hkv));
  constexpr size_t kSmem = SmemLayout<kDim>::kBytes;
  const cudaError_t error = cudaFuncSetAttribute(
      SparseAttentionKernel<T, kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  SparseAttentionKernel<T, kDim><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sparse_attention_kernel
}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SPARSE_ATTENTION_KERNEL_CUH_
