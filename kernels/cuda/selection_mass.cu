// Step 3 on the device for dhsa's mass chunk score (ChunkScore::kMass; docs/fidelity.md; the
// function of kernels/selection/reference.cc MassScoresReference, in fp32 as the CPU backend's
// kernels/cpu/selection.cc computes it).
//
// One thread block per KV head and a few consecutive query blocks (as many as fit 64 rows of the
// product; at least one). Its rows: for a block with at least score_rows rows, one per query head
// of the group and score_rows-row piece (the piece means rho, head after head, pieces in order);
// for a block with fewer rows (decode-like), one mean query over the group's heads and the block's
// rows (formed in fp64 from the piece means, as the reference), whose scores are its logits.
// Rows are taken 64 at a time; for each tile of rows, two sweeps over the chunks 64 at a time:
//   1. logits l = scale * q.k + log(len) of the chunks visible to the row's block (starting before
//      its end), each row's running maximum and sum of exp(l - max) (online, per thread, then
//      combined over the row's four threads);
//   2. the logits again (recomputed: storing them would take rows x chunks floats), the shares
//      exp(l - max) / sum of the block's eligible chunks, summed over the block's rows per chunk
//      and written to the scores buffer (added to what an earlier tile of the same block wrote).
// The product: q rows and chunk means transposed in shared memory, each thread a 4 x 4 tile of
// (row, chunk) dot products in fp32 registers (fused multiply-adds), or with `tensor_cores` each
// warp a 16 x 32 tile on the tensor cores in 3xTF32 (every fp32 operand split into a TF32 part
// and a TF32 remainder, big*big + big*small + small*big accumulated in fp32: about fp32's
// accuracy; the remainders' product, below 2^-22 of the product, is dropped); then through shared
// memory to the epilogue, where thread (row r, quarter q) takes chunks q, q + 4, ... of row r.
// The tiled kernel below (MassParams::tiled, the default for head dims multiple of 8 up to 128)
// computes the same two sweeps with 128-row tiles, 32 x 32 warp tiles in 3xTF32 and sweep 1's
// running maximum and sum kept in registers (H200, 128K, budget 4096: scores 63.1 -> 40.6 ms in
// waves of 825 query blocks, 35.0 ms in waves of whole rounds; bench/results/
// 2026-11-28-h200-mass-selection.md).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/selection_cuda_launch.h"

namespace dhsa {
namespace selection_kernel {
namespace {

constexpr int kMassThreads = 256;
constexpr int kTile = 64;       // Rows and chunks per tile.
constexpr int kLd = kTile + 4;  // Row stride of the shared tiles in floats (16-byte rows).
constexpr int kMaxMassEntries = kTile;

// x split for 3xTF32: big = x rounded to TF32 (10 mantissa bits, to nearest), small = the rest
// (exact in fp32) truncated to TF32: |x - big - small| <= 2^-22 |x|.
__device__ __forceinline__ void SplitTf32(float x, uint32_t& big, uint32_t& small) {
  big = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
  small = __float_as_uint(x - __uint_as_float(big)) & 0xffffe000u;
}

// c += a b, a 16 x 8 (row), b 8 x 8 (col), TF32 in, fp32 accumulate.
__device__ __forceinline__ void MmaTf32(float (&c)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__host__ __device__ inline int MassEntriesPerBlock(int64_t group, int64_t q_block,
                                                   int64_t score_rows) {
  const int64_t rows = group * (q_block / score_rows);
  const int64_t per = rows >= kTile ? 1 : kTile / rows;
  return static_cast<int>(per < kMaxMassEntries ? per : kMaxMassEntries);
}

struct MassEntry {
  int64_t rel;        // Query block, relative to first_block.
  int64_t row_begin;  // Its first row (position).
  int64_t end;        // One past its last row.
  int64_t p_begin;    // Its first piece (absolute: position / score_rows).
  int32_t pieces;     // Its pieces.
  int32_t few;        // Fewer rows than a piece: one mean query, scores are its logits.
  int32_t rows;       // Rows of the product: group * pieces, 1 (few) or 0 (not scored).
  int32_t row_off;    // Its first row in the thread block's list.
  int32_t visible;    // Chunks starting before `end`.
  int32_t eligible;   // Chunks ending at or before the block's first position.
};

// The thread block's query blocks first_rel .. first_rel + per - 1 (those before end_rel): their
// rows, pieces and chunk ranges, and each one's first row in the block's list of rows.
__device__ void SetupEntries(const MassParams& p, int per, int64_t first_rel, int64_t end_rel,
                             MassEntry* ent, int32_t* total_rows) {
  const int32_t nb = *p.count;
  const int32_t chunks = nb - 1;
  const int64_t rows_per_piece = p.score_rows;
  const int tid = threadIdx.x;
  if (tid < per) {
    MassEntry& x = ent[tid];
    x.rel = first_rel + tid;
    x.rows = 0;
    x.visible = 0;
    x.eligible = 0;
    x.few = 0;
    x.pieces = 0;
    x.p_begin = 0;
    x.row_begin = 0;
    x.end = 0;
    if (x.rel < end_rel) {
      const int64_t block = p.first_block + x.rel;
      x.end = (block + 1) * p.q_block < p.lk ? (block + 1) * p.q_block : p.lk;
      x.row_begin = block * p.q_block > p.t0 ? block * p.q_block : p.t0;
      if (x.end > p.budget) {
        x.p_begin = x.row_begin / rows_per_piece;
        x.pieces = static_cast<int32_t>((x.end - 1) / rows_per_piece + 1 - x.p_begin);
        x.few = x.end - x.row_begin < rows_per_piece;
        x.rows = x.few ? 1 : p.group * x.pieces;
        // Eligible: the first index in [1, nb) with boundaries[index] > block * q_block, less 1.
        const int64_t first_row = block * p.q_block;
        int32_t lo = 1, hi = nb;
        while (lo < hi) {
          const int32_t mid = (lo + hi) / 2;
          if (p.boundaries[mid] <= first_row) {
            lo = mid + 1;
          } else {
            hi = mid;
          }
        }
        x.eligible = lo - 1;
        // Visible: the first chunk in [0, chunks) starting at or after the end.
        lo = 0;
        hi = chunks;
        while (lo < hi) {
          const int32_t mid = (lo + hi) / 2;
          if (p.boundaries[mid] < x.end) {
            lo = mid + 1;
          } else {
            hi = mid;
          }
        }
        x.visible = lo;
      }
    }
  }
  __syncthreads();
  if (tid == 0) {
    int32_t off = 0;
    for (int e = 0; e < per; ++e) {
      ent[e].row_off = off;
      off += ent[e].rows;
    }
    *total_rows = off;
  }
  __syncthreads();
}

// Feature k of row `row` (the thread block's list) of entry x: a piece mean, or for a block with
// fewer rows than a piece the mean query of the group's heads over the block's rows.
__device__ float RowValue(const MassParams& p, const MassEntry& x, int64_t h, int32_t row, int k) {
  const int64_t rows_per_piece = p.score_rows;
  const int64_t first_piece = p.t0 / rows_per_piece;
  const int dim = p.dim;
  if (x.few) {
    // The pieces' means weighted by their rows in the block, over the group's heads (fp64, in the
    // reference's order), divided by group * rows.
    double mean = 0.0;
    for (int64_t g = h * p.group; g < (h + 1) * p.group; ++g) {
      for (int64_t piece = x.p_begin; piece < x.p_begin + x.pieces; ++piece) {
        const int64_t hi =
            (piece + 1) * rows_per_piece < x.end ? (piece + 1) * rows_per_piece : x.end;
        const int64_t lo =
            piece * rows_per_piece > x.row_begin ? piece * rows_per_piece : x.row_begin;
        mean += static_cast<double>(p.rho[(g * p.pieces + piece - first_piece) * dim + k]) *
                static_cast<double>(hi - lo);
      }
    }
    return static_cast<float>(mean / static_cast<double>(p.group * (x.end - x.row_begin)));
  }
  const int32_t i = row - x.row_off;
  const int64_t g = h * p.group + i / x.pieces, piece = x.p_begin + i % x.pieces;
  return p.rho[(g * p.pieces + piece - first_piece) * dim + k];
}

template <bool kTensor>
__global__ void __launch_bounds__(kMassThreads)
    MassScoreKernel(const __grid_constant__ MassParams p) {
  extern __shared__ __align__(16) float smem[];
  const int dim = p.dim;
  float* qt = smem;  // [dim][kLd]: the tile's rows, transposed.
  float* kt =
      qt + dim * kLd;  // [dim][kLd]: 64 chunk means (kTensor: their TF32 parts), transposed.
  float* ks = kt + dim * kLd;  // kTensor: [dim][kLd], the chunk means' TF32 remainders.
  float* ls = ks;              // [kTile][kLd]: dot products, then shares (after the product).
  __shared__ MassEntry ent[kMaxMassEntries];
  __shared__ int32_t row_entry[kTile];
  __shared__ float row_max[kTile], row_inv[kTile], log_len[kTile];
  __shared__ int32_t total_rows;

  const int tid = threadIdx.x;
  const int64_t h = blockIdx.y;
  const int32_t chunks = *p.count - 1;
  const int per = MassEntriesPerBlock(p.group, p.q_block, p.score_rows);
  // The last blocks (most chunks) first.
  const int64_t first_rel = p.block_begin + int64_t{gridDim.x - 1 - blockIdx.x} * per;
  const int64_t end_rel = p.block_begin + p.blocks;
  SetupEntries(p, per, first_rel, end_rel, ent, &total_rows);

  const int ty = tid / 16, tx = tid % 16;  // Product: rows 4 ty .. 4 ty + 3, chunks 4 tx ...
  const int er = tid / 4, eq = tid % 4;    // Epilogue: row er, chunks eq + 4 i.

  // Dot products of the tile's rows with chunks j0 .. j0 + 63 into ls, log(len) into log_len.
  auto product = [&](int32_t j0) {
    for (int idx = tid; idx < kTile * (dim / 4); idx += kMassThreads) {
      const int c = idx % kTile, k4 = idx / kTile;
      const int32_t j = j0 + c;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (j < chunks) {
        v = *reinterpret_cast<const float4*>(p.kappa + (h * p.chunk_cap + j) * dim + 4 * k4);
      }
      if constexpr (kTensor) {
        const float x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          uint32_t big, small;
          SplitTf32(x[u], big, small);
          kt[(4 * k4 + u) * kLd + c] = __uint_as_float(big);
          ks[(4 * k4 + u) * kLd + c] = __uint_as_float(small);
        }
      } else {
        kt[(4 * k4) * kLd + c] = v.x;
        kt[(4 * k4 + 1) * kLd + c] = v.y;
        kt[(4 * k4 + 2) * kLd + c] = v.z;
        kt[(4 * k4 + 3) * kLd + c] = v.w;
      }
    }
    if (tid < kTile) {
      const int32_t j = j0 + tid;
      log_len[tid] =
          j < chunks ? logf(static_cast<float>(p.boundaries[j + 1] - p.boundaries[j])) : 0.0f;
    }
    __syncthreads();
    if constexpr (kTensor) {
      // Warp w: rows 16 (w % 4) .., chunks 32 (w / 4) .. in four 8-chunk tiles.
      const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
      const int r0 = (warp % 4) * 16, n0 = (warp / 4) * 32;
      float c[4][4];
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int u = 0; u < 4; ++u) c[s][u] = 0.0f;
      }
      for (int k0 = 0; k0 < dim; k0 += 8) {
        const float a[4] = {qt[(k0 + t) * kLd + r0 + g], qt[(k0 + t) * kLd + r0 + g + 8],
                            qt[(k0 + t + 4) * kLd + r0 + g], qt[(k0 + t + 4) * kLd + r0 + g + 8]};
        uint32_t ab[4], as[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) SplitTf32(a[u], ab[u], as[u]);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const int n = n0 + 8 * s + g;
          const uint32_t bb[2] = {__float_as_uint(kt[(k0 + t) * kLd + n]),
                                  __float_as_uint(kt[(k0 + t + 4) * kLd + n])};
          const uint32_t bs[2] = {__float_as_uint(ks[(k0 + t) * kLd + n]),
                                  __float_as_uint(ks[(k0 + t + 4) * kLd + n])};
          MmaTf32(c[s], as, bb);
          MmaTf32(c[s], ab, bs);
          MmaTf32(c[s], ab, bb);
        }
      }
      __syncthreads();  // ls overwrites ks.
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int n = n0 + 8 * s + 2 * t;
        ls[(r0 + g) * kLd + n] = c[s][0];
        ls[(r0 + g) * kLd + n + 1] = c[s][1];
        ls[(r0 + g + 8) * kLd + n] = c[s][2];
        ls[(r0 + g + 8) * kLd + n + 1] = c[s][3];
      }
    } else {
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[i][u] = 0.0f;
      }
#pragma unroll 4
      for (int k = 0; k < dim; ++k) {
        const float4 a = *reinterpret_cast<const float4*>(qt + k * kLd + ty * 4);
        const float4 b = *reinterpret_cast<const float4*>(kt + k * kLd + tx * 4);
        const float av[4] = {a.x, a.y, a.z, a.w};
        const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int u = 0; u < 4; ++u) acc[i][u] = fmaf(av[i], bv[u], acc[i][u]);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        *reinterpret_cast<float4*>(ls + (ty * 4 + i) * kLd + tx * 4) =
            make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      }
    }
    __syncthreads();
  };

  const int32_t total = total_rows;
  for (int32_t tile = 0; tile < total; tile += kTile) {
    if (tid < kTile) {
      const int32_t r = tile + tid;
      int32_t owner = -1;
      for (int e = 0; e < per; ++e) {
        if (r < total && ent[e].rows > 0 && r >= ent[e].row_off &&
            r < ent[e].row_off + ent[e].rows) {
          owner = e;
        }
      }
      row_entry[tid] = owner;
    }
    __syncthreads();
    // The tile's rows, transposed.
    for (int idx = tid; idx < kTile * dim; idx += kMassThreads) {
      const int r = idx / dim, k = idx % dim;
      const int e = row_entry[r];
      float v = 0.0f;
      if (e >= 0) v = RowValue(p, ent[e], h, tile + r, k);
      qt[k * kLd + r] = v;
    }
    // The tile's blocks [e_lo, e_hi] and how far its sweeps go.
    int e_lo = per, e_hi = -1;
    int32_t max_visible = 0, max_eligible = 0;
    for (int e = 0; e < per; ++e) {
      const MassEntry& x = ent[e];
      if (x.rows == 0 || x.row_off >= tile + kTile || x.row_off + x.rows <= tile) continue;
      e_lo = e < e_lo ? e : e_lo;
      e_hi = e;
      if (!x.few) max_visible = x.visible > max_visible ? x.visible : max_visible;
      max_eligible = x.eligible > max_eligible ? x.eligible : max_eligible;
    }
    __syncthreads();

    const int e_r = row_entry[er];
    const bool soft = e_r >= 0 && !ent[e_r].few;
    const int32_t visible_r = soft ? ent[e_r].visible : 0;
    // Sweep 1: each softmax row's maximum and sum of exponentials over its visible chunks.
    float m = -INFINITY, z = 0.0f;
    for (int32_t j0 = 0; j0 < max_visible; j0 += kTile) {
      product(j0);
      if (soft) {
        float l[kTile / 4];
        float top = -INFINITY;
#pragma unroll
        for (int i = 0; i < kTile / 4; ++i) {
          const int c = eq + 4 * i;
          l[i] = j0 + c < visible_r ? fmaf(p.scale, ls[er * kLd + c], log_len[c]) : -INFINITY;
          top = fmaxf(top, l[i]);
        }
        if (top > -INFINITY) {
          const float m_new = fmaxf(m, top);
          float sum = 0.0f;
#pragma unroll
          for (int i = 0; i < kTile / 4; ++i) sum += expf(l[i] - m_new);
          z = z * expf(m - m_new) + sum;
          m = m_new;
        }
      }
      __syncthreads();  // The next product rewrites kt and ls.
    }
#pragma unroll
    for (int o = 1; o < 4; o *= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float z2 = __shfl_xor_sync(0xffffffffu, z, o);
      const float m_new = fmaxf(m, m2);
      if (m_new > -INFINITY) z = z * expf(m - m_new) + z2 * expf(m2 - m_new);
      m = m_new;
    }
    if (eq == 0) {
      row_max[er] = m;
      row_inv[er] = z > 0.0f ? 1.0f / z : 0.0f;
    }
    __syncthreads();

    // Sweep 2: shares of the eligible chunks, summed per block.
    for (int32_t j0 = 0; j0 < max_eligible; j0 += kTile) {
      product(j0);
      if (e_r >= 0) {
        const int32_t eligible = ent[e_r].eligible;
        const bool few = ent[e_r].few;
        const float top = row_max[er], inv = row_inv[er];
#pragma unroll
        for (int i = 0; i < kTile / 4; ++i) {
          const int c = eq + 4 * i;
          float v = 0.0f;
          if (j0 + c < eligible) {
            const float l = fmaf(p.scale, ls[er * kLd + c], log_len[c]);
            v = few ? l : expf(l - top) * inv;
          }
          ls[er * kLd + c] = v;
        }
      }
      __syncthreads();
      for (int idx = tid; idx < (e_hi - e_lo + 1) * kTile; idx += kMassThreads) {
        const MassEntry& x = ent[e_lo + idx / kTile];
        const int c = idx % kTile;
        const int32_t j = j0 + c;
        if (x.rows == 0 || j >= x.eligible) continue;
        const int32_t r_begin = (x.row_off > tile ? x.row_off : tile) - tile;
        const int32_t r_end =
            (x.row_off + x.rows < tile + kTile ? x.row_off + x.rows : tile + kTile) - tile;
        float sum = 0.0f;
        for (int32_t r = r_begin; r < r_end; ++r) sum += ls[r * kLd + c];
        float* out = p.scores + (h * p.score_blocks + (x.rel - p.block_begin)) * p.chunk_cap + j;
        *out = x.row_off >= tile ? sum : *out + sum;
      }
      __syncthreads();
    }
  }
}

// The tiled kernel (MassParams::tiled): 128 rows a tile, 64 chunks a step, 3xTF32 on the tensor
// cores; rows and chunk means row-major in shared memory (row stride dim + 4 floats: the
// fragments' loads hit 32 distinct banks) and split into TF32 parts as they are loaded into
// registers; warp w a 32-row x 32-chunk tile (rows 32 (w % 4) .., chunks 32 (w / 4) ..). Sweep 1
// keeps each row's running maximum and exponential sum in the registers that hold the products
// (no shared-memory round trip); sweep 2 writes the shares to shared memory (over the chunk
// means, once the product is done) for the per-block column sums.
constexpr int kTRows = 128;
constexpr int kTChunks = 64;
constexpr int kTLdS = kTChunks + 8;  // Shares' row stride: the fragments' 8-byte stores spread.
constexpr int kTMaxEntries = 32;

__host__ __device__ inline int TiledEntriesPerBlock(int64_t group, int64_t q_block,
                                                    int64_t score_rows) {
  const int64_t rows = group * (q_block / score_rows);
  const int64_t per = rows >= kTRows ? 1 : kTRows / rows;
  return static_cast<int>(per < kTMaxEntries ? per : kTMaxEntries);
}

// x split for 3xTF32 in two instructions: big = x (the tensor cores read its top 19 bits, x
// truncated to TF32), small = x - trunc(x) (exact; read truncated too): |x - big - small| below
// 2^-20 |x|.
__device__ __forceinline__ void SplitTf32Short(float x, uint32_t& big, uint32_t& small) {
  big = __float_as_uint(x);
  small = __float_as_uint(x - __uint_as_float(big & 0xffffe000u));
}

template <bool kShort>
__global__ void __launch_bounds__(kMassThreads, 2)
    MassTiledKernel(const __grid_constant__ MassParams p) {
  extern __shared__ __align__(16) float smem[];
  const int dim = p.dim, ldq = dim + 4;
  float* qs = smem;               // [kTRows][ldq]: the tile's rows.
  float* ks = qs + kTRows * ldq;  // [kTChunks][ldq]: chunk means.
  float* ls = ks;                 // [kTRows][kTLdS]: shares (after the product).
  __shared__ MassEntry ent[kTMaxEntries];
  __shared__ int32_t row_entry[kTRows], row_vis[kTRows];
  __shared__ float row_max[kTRows], row_inv[kTRows], log_len[kTChunks];
  __shared__ float part_m[2][kTRows], part_z[2][kTRows];
  __shared__ int32_t total_rows;

  const int tid = threadIdx.x;
  const int64_t h = blockIdx.y;
  const int32_t chunks = *p.count - 1;
  const int per = TiledEntriesPerBlock(p.group, p.q_block, p.score_rows);
  const int64_t first_rel = p.block_begin + int64_t{gridDim.x - 1 - blockIdx.x} * per;
  const int64_t end_rel = p.block_begin + p.blocks;
  SetupEntries(p, per, first_rel, end_rel, ent, &total_rows);

  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int wr = warp % 4, wc = warp / 4;
  const float* kappa = p.kappa + h * p.chunk_cap * dim;

  // Chunk means j0 .. j0 + 63 into ks, log(len) into log_len.
  auto load = [&](int32_t j0) {
    const int d4 = dim / 4;
    for (int idx = tid; idx < kTChunks * d4; idx += kMassThreads) {
      const int c = idx / d4, k4 = idx % d4;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (j0 + c < chunks) v = *reinterpret_cast<const float4*>(kappa + (j0 + c) * dim + 4 * k4);
      *reinterpret_cast<float4*>(ks + c * ldq + 4 * k4) = v;
    }
    if (tid < kTChunks) {
      const int32_t j = j0 + tid;
      log_len[tid] =
          j < chunks ? logf(static_cast<float>(p.boundaries[j + 1] - p.boundaries[j])) : 0.0f;
    }
  };
  // The warp's 32 x 32 products: acc[m][s] the m16n8 tile of rows 32 wr + 16 m, chunks
  // 32 wc + 8 s.
  float acc[2][4][4];
  auto split = [](float x, uint32_t& big, uint32_t& small) {
    if constexpr (kShort) {
      SplitTf32Short(x, big, small);
    } else {
      SplitTf32(x, big, small);
    }
  };
  auto product = [&]() {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[m][s][u] = 0.0f;
      }
    }
    const float* qa = qs + (32 * wr + g) * ldq + t;
    const float* kb = ks + (32 * wc + g) * ldq + t;
#pragma unroll 2
    for (int k0 = 0; k0 < dim; k0 += 8) {
      uint32_t ab[2][4], as[2][4];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const float* q = qa + 16 * m * ldq + k0;
        split(q[0], ab[m][0], as[m][0]);
        split(q[8 * ldq], ab[m][1], as[m][1]);
        split(q[4], ab[m][2], as[m][2]);
        split(q[8 * ldq + 4], ab[m][3], as[m][3]);
      }
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const float* k = kb + 8 * s * ldq + k0;
        uint32_t bb[2], bs[2];
        split(k[0], bb[0], bs[0]);
        split(k[4], bb[1], bs[1]);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          MmaTf32(acc[m][s], as[m], bb);
          MmaTf32(acc[m][s], ab[m], bs);
          MmaTf32(acc[m][s], ab[m], bb);
        }
      }
    }
  };

  const int32_t total = total_rows;
  for (int32_t tile = 0; tile < total; tile += kTRows) {
    if (tid < kTRows) {
      const int32_t r = tile + tid;
      int32_t owner = -1;
      for (int e = 0; e < per; ++e) {
        if (r < total && ent[e].rows > 0 && r >= ent[e].row_off &&
            r < ent[e].row_off + ent[e].rows) {
          owner = e;
        }
      }
      row_entry[tid] = owner;
      row_vis[tid] = owner >= 0 && !ent[owner].few ? ent[owner].visible : 0;
    }
    __syncthreads();
    for (int idx = tid; idx < kTRows * dim; idx += kMassThreads) {
      const int r = idx / dim, k = idx % dim;
      const int e = row_entry[r];
      qs[r * ldq + k] = e >= 0 ? RowValue(p, ent[e], h, tile + r, k) : 0.0f;
    }
    int e_lo = per, e_hi = -1;
    int32_t max_visible = 0, max_eligible = 0;
    for (int e = 0; e < per; ++e) {
      const MassEntry& x = ent[e];
      if (x.rows == 0 || x.row_off >= tile + kTRows || x.row_off + x.rows <= tile) continue;
      e_lo = e < e_lo ? e : e_lo;
      e_hi = e;
      if (!x.few) max_visible = x.visible > max_visible ? x.visible : max_visible;
      max_eligible = x.eligible > max_eligible ? x.eligible : max_eligible;
    }
    // This thread's rows: 32 wr + 16 m + g + 8 half.
    int32_t vis[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) vis[m][half] = row_vis[32 * wr + 16 * m + g + 8 * half];
    }

    // Sweep 1: each softmax row's maximum and sum of exponentials over its visible chunks.
    float mx[2][2], z[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        mx[m][half] = -INFINITY;
        z[m][half] = 0.0f;
      }
    }
    for (int32_t j0 = 0; j0 < max_visible; j0 += kTChunks) {
      __syncthreads();  // The last step's product is done with ks; qs is written (first step).
      load(j0);
      __syncthreads();
      product();
#pragma unroll
      for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float l[8];
          float top = -INFINITY;
#pragma unroll
          for (int s = 0; s < 4; ++s) {
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const int c = 32 * wc + 8 * s + 2 * t + u;
              l[2 * s + u] = j0 + c < vis[m][half]
                                 ? fmaf(p.scale, acc[m][s][2 * half + u], log_len[c])
                                 : -INFINITY;
              top = fmaxf(top, l[2 * s + u]);
            }
          }
          if (top > -INFINITY) {
            const float m_new = fmaxf(mx[m][half], top);
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) sum += expf(l[i] - m_new);
            z[m][half] = z[m][half] * expf(mx[m][half] - m_new) + sum;
            mx[m][half] = m_new;
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float a = mx[m][half], za = z[m][half];
#pragma unroll
        for (int o = 1; o < 4; o *= 2) {
          const float m2 = __shfl_xor_sync(0xffffffffu, a, o);
          const float z2 = __shfl_xor_sync(0xffffffffu, za, o);
          const float m_new = fmaxf(a, m2);
          if (m_new > -INFINITY) za = za * expf(a - m_new) + z2 * expf(m2 - m_new);
          a = m_new;
        }
        if (t == 0) {
          part_m[wc][32 * wr + 16 * m + g + 8 * half] = a;
          part_z[wc][32 * wr + 16 * m + g + 8 * half] = za;
        }
      }
    }
    __syncthreads();
    if (tid < kTRows) {
      const float m0 = part_m[0][tid], m1 = part_m[1][tid];
      const float top = fmaxf(m0, m1);
      float sum = 0.0f;
      if (top > -INFINITY) {
        sum = part_z[0][tid] * expf(m0 - top) + part_z[1][tid] * expf(m1 - top);
      }
      row_max[tid] = top;
      row_inv[tid] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }

    // Sweep 2: shares of the eligible chunks, summed per block.
    for (int32_t j0 = 0; j0 < max_eligible; j0 += kTChunks) {
      __syncthreads();  // ks is free (last step's sums are done); row_max is written.
      load(j0);
      __syncthreads();
      product();
      __syncthreads();  // ls overwrites ks.
#pragma unroll
      for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = 32 * wr + 16 * m + g + 8 * half;
          const int e_r = row_entry[r];
          const int32_t eligible = e_r >= 0 ? ent[e_r].eligible : 0;
          const bool few = e_r >= 0 && ent[e_r].few;
          const float top = row_max[r], inv = row_inv[r];
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            const int c = 32 * wc + 8 * s + 2 * t;
            float v[2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              v[u] = 0.0f;
              if (j0 + c + u < eligible) {
                const float l = fmaf(p.scale, acc[m][s][2 * half + u], log_len[c + u]);
                v[u] = few ? l : expf(l - top) * inv;
              }
            }
            *reinterpret_cast<float2*>(ls + r * kTLdS + c) = make_float2(v[0], v[1]);
          }
        }
      }
      __syncthreads();
      for (int idx = tid; idx < (e_hi - e_lo + 1) * kTChunks; idx += kMassThreads) {
        const MassEntry& x = ent[e_lo + idx / kTChunks];
        const int c = idx % kTChunks;
        const int32_t j = j0 + c;
        if (x.rows == 0 || j >= x.eligible) continue;
        const int32_t r_begin = (x.row_off > tile ? x.row_off : tile) - tile;
        const int32_t r_end =
            (x.row_off + x.rows < tile + kTRows ? x.row_off + x.rows : tile + kTRows) - tile;
        float sum = 0.0f;
        for (int32_t r = r_begin; r < r_end; ++r) sum += ls[r * kTLdS + c];
        float* out = p.scores + (h * p.score_blocks + (x.rel - p.block_begin)) * p.chunk_cap + j;
        *out = x.row_off >= tile ? sum : *out + sum;
      }
    }
    __syncthreads();  // The next tile rewrites qs, row_entry and the shares.
  }
}
}  // namespace

size_t MassSharedBytes(int64_t dim, bool tensor_cores) {
  // q rows and chunk means, then the chunk means' remainders (tensor cores) or only the 64 x 64
  // products (which overwrite the remainders once the product is done).
  const int64_t third = tensor_cores && dim > kTile ? dim : kTile;
  return sizeof(float) * static_cast<size_t>((2 * dim + third) * kLd);
}

bool MassTiledSupported(int64_t dim) { return dim % 8 == 0 && dim <= 128; }

int MassTiledBlocks(int64_t group, int64_t q_block, int64_t score_rows) {
  return TiledEntriesPerBlock(group, q_block, score_rows);
}

size_t MassTiledSharedBytes(int64_t dim) {
  const int64_t ldq = dim + 4;
  const int64_t second = kTChunks * ldq > kTRows * kTLdS ? kTChunks * ldq : kTRows * kTLdS;
  return sizeof(float) * static_cast<size_t>(kTRows * ldq + second);
}

cudaError_t LaunchMassScores(const MassParams& p, cudaStream_t stream) {
  if (p.blocks <= 0) return cudaSuccess;
  if (p.tiled) {
    if (!MassTiledSupported(p.dim)) return cudaErrorInvalidValue;
    const int per = TiledEntriesPerBlock(p.group, p.q_block, p.score_rows);
    const size_t smem = MassTiledSharedBytes(p.dim);
    auto kernel = p.short_split ? MassTiledKernel<true> : MassTiledKernel<false>;
    const cudaError_t error = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (error != cudaSuccess) return error;
    const dim3 grid(static_cast<unsigned>((p.blocks + per - 1) / per),
                    static_cast<unsigned>(p.hkv));
    kernel<<<grid, kMassThreads, smem, stream>>>(p);
    return cudaGetLastError();
  }
  const int per = MassEntriesPerBlock(p.group, p.q_block, p.score_rows);
  const size_t smem = MassSharedBytes(p.dim, p.tensor_cores);
  auto kernel = p.tensor_cores ? MassScoreKernel<true> : MassScoreKernel<false>;
  const cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>((p.blocks + per - 1) / per), static_cast<unsigned>(p.hkv));
  kernel<<<grid, kMassThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace selection_kernel
}  // namespace dhsa
