// Steps 3 and 4 on the device for the policy dhsa (kernels/selection/reference.cc,
// SelectDhsaBlock): chunk scores and the top chunks under the token budget, per (KV head, query
// block).
//
// One thread block per KV head and `entries_per_block` consecutive query blocks (they share the
// reads of kappa). Scores: each thread scores a chunk for every entry, fp64 in the reference's
// order (fused multiply-adds: exact products of floats), rounded to fp32, kept in shared memory.
// Budget cut: ranking chunks by descending score, ties to the later chunk, is ranking the 64-bit
// keys (ordered score bits, chunk index) in descending order; the chunk where the running sum of
// the chunks' new tokens reaches the budget left is found by a weighted radix select over those
// keys (8 bits a pass, histograms of tokens in shared memory). Emission: warp e lists entry e's
// spans in position order (sink, the taken part of each chunk, local), merging adjacent intervals,
// with each span's packed offset.
#include <cstdint>

#include "kernels/cuda/selection_cuda_launch.h"

namespace dhsa {
namespace selection_kernel {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;
static_assert(kMaxEntriesPerBlock <= kSelectWarps, "one warp emits one entry");

// Orders floats as unsigned integers (+0 and -0 equal, as the reference's comparison has them).
__device__ __forceinline__ uint64_t RankKey(float score, int32_t chunk) {
  uint32_t bits = __float_as_uint(score == 0.0f ? 0.0f : score);
  bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (uint64_t{bits} << 32) | static_cast<uint32_t>(chunk);
}

struct EntryInfo {
  int64_t end;        // e: one past the block's last row (and its last key).
  int32_t eligible;   // Chunks ending at or before the block's first row.
  int32_t scored;     // e > budget: chunks are ranked (else the dense row block).
  int32_t lo, hi;     // Chunks' new tokens lie in [lo, hi) (after sink, before local).
  int32_t remaining;  // Budget left for chunks.
  int32_t mode;       // 0: none taken, 1: all taken, 2: cut at `key`.
  int32_t need;       // Tokens taken from the cut chunk.
  uint64_t key;       // Rank key of the cut chunk.
};

__device__ __forceinline__ int32_t Weight(const int32_t* bnd, int32_t j, int32_t lo, int32_t hi) {
  const int32_t a = bnd[j] > lo ? bnd[j] : lo;
  const int32_t z = bnd[j + 1] < hi ? bnd[j + 1] : hi;
  return z > a ? z - a : 0;
}

template <bool kBatched>
__global__ void __launch_bounds__(kSelectThreads)
    SelectKernel(const __grid_constant__ SelectParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int entries = p.entries_per_block, dim = p.dim;
  // global_scores: the precomputed scores and the boundaries are read where they are (global
  // memory, through the caches), so that many thread blocks fit an SM.
  const bool global = p.global_scores && p.scores != nullptr;
  double* rho_s = reinterpret_cast<double*>(smem);                     // [entries][dim]
  int32_t* bnd_s = reinterpret_cast<int32_t*>(rho_s + entries * dim);  // [chunk_cap + 1]
  float* scores = reinterpret_cast<float*>(bnd_s + p.chunk_cap + 1);   // [entries][chunk_cap]
  const int32_t* bnd = global ? p.boundaries : bnd_s;
  __shared__ EntryInfo info[kMaxEntriesPerBlock];
  __shared__ uint32_t hist[256], hist_count[256];
  __shared__ int32_t total_weight, unique_cut;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // heavy_first: the last query blocks (the most eligible chunks) go to the first thread blocks.
  const int64_t slot = p.heavy_first ? int64_t{gridDim.x} - 1 - blockIdx.x : int64_t{blockIdx.x};
  const int64_t h = blockIdx.y, b0 = p.block_begin + slot * entries;
  const int64_t b_end = p.block_begin + p.blocks;  // This launch's blocks end (<= num_blocks).
  const int32_t nb = *p.count;
  if (!global) {
    for (int32_t i = tid; i < nb; i += kSelectThreads) bnd_s[i] = p.boundaries[i];
  }
  if (p.scores == nullptr) {
    for (int i = tid; i < entries * dim; i += kSelectThreads) {
      const int64_t rel = b0 + i / dim;
      rho_s[i] = rel < b_end ? p.rho[(h * p.num_blocks + rel) * dim + i % dim] : 0.0;
    }
  }
  __syncthreads();
  if (tid < entries) {
    EntryInfo& in = info[tid];
    const int64_t rel = b0 + tid;
    const int64_t block = p.first_block + rel;
    in.end = (block + 1) * p.q_block < p.lk ? (block + 1) * p.q_block : p.lk;
    in.scored = rel < b_end && in.end > p.budget;
    in.eligible = 0;
    in.mode = 0;
    if (in.scored) {
      // Chunks ending at or before block * q_block: bnd[j + 1] <= first row.
      const int64_t first_row = block * p.q_block;
      int32_t lo = 1, hi = nb;  // First index in [1, nb) with bnd[index] > first_row.
      while (lo < hi) {
        const int32_t mid = (lo + hi) / 2;
        if (bnd[mid] <= first_row) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      in.eligible = lo - 1;
      const int64_t sink_end = p.sink < in.end ? p.sink : in.end;
      const int64_t local_begin = in.end - p.local > 0 ? in.end - p.local : 0;
      const int64_t overlap = sink_end - local_begin > 0 ? sink_end - local_begin : 0;
      const int64_t kept = sink_end + (in.end - local_begin) - overlap;
      in.lo = static_cast<int32_t>(sink_end);
      in.hi = static_cast<int32_t>(local_begin);
      in.remaining = static_cast<int32_t>(p.budget - kept);
    }
  }
  __syncthreads();

  // Step 3: scores, fp64 in the reference's order (c ascending, products and sums rounded apart),
  // or the precomputed (mass) scores copied in.
  int32_t max_eligible = 0;
  for (int e = 0; e < entries; ++e) max_eligible = max(max_eligible, info[e].eligible);
  if (p.scores != nullptr && !global) {
    for (int e = 0; e < entries; ++e) {
      const float* src = p.scores + (h * p.score_blocks + (b0 + e - p.block_begin)) * p.chunk_cap;
      for (int32_t j = tid; j < info[e].eligible; j += kSelectThreads) {
        scores[e * p.chunk_cap + j] = src[j];
      }
    }
    max_eligible = 0;  // Skips the paper's score loops below.
  }
  if (global) max_eligible = 0;
  if (kBatched) {
    // The same sums, with more loads in flight: a thread scores two chunks (j and j + threads) at
    // once, loads 32 features of both rows before using them, and reads rho two features a load.
    for (int32_t j0 = tid; j0 < max_eligible; j0 += 2 * kSelectThreads) {
      const int32_t j1 = j0 + kSelectThreads;
      const bool two = j1 < max_eligible;
      const float* kr0 = p.kappa + (h * p.chunk_cap + j0) * dim;
      const float* kr1 = p.kappa + (h * p.chunk_cap + (two ? j1 : j0)) * dim;
      double acc0[kMaxEntriesPerBlock] = {0.0, 0.0, 0.0, 0.0};
      double acc1[kMaxEntriesPerBlock] = {0.0, 0.0, 0.0, 0.0};
      for (int c0 = 0; c0 < dim; c0 += 32) {
        float4 k0[8], k1[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int c = c0 + 4 * i;
          if (c < dim) {
            k0[i] = *reinterpret_cast<const float4*>(kr0 + c);
            k1[i] = *reinterpret_cast<const float4*>(kr1 + c);
          }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int c = c0 + 4 * i;
          if (c >= dim) break;
          const double a[4] = {k0[i].x, k0[i].y, k0[i].z, k0[i].w};
          const double b[4] = {k1[i].x, k1[i].y, k1[i].z, k1[i].w};
#pragma unroll
          for (int e = 0; e < kMaxEntriesPerBlock; ++e) {
            if (e >= entries) break;
            const double2 r01 = *reinterpret_cast<const double2*>(rho_s + e * dim + c);
            const double2 r23 = *reinterpret_cast<const double2*>(rho_s + e * dim + c + 2);
            const double r[4] = {r01.x, r01.y, r23.x, r23.y};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              acc0[e] = __fma_rn(r[u], a[u], acc0[e]);
              acc1[e] = __fma_rn(r[u], b[u], acc1[e]);
            }
          }
        }
      }
#pragma unroll
      for (int e = 0; e < kMaxEntriesPerBlock; ++e) {
        if (e < entries && j0 < info[e].eligible) {
          scores[e * p.chunk_cap + j0] = __double2float_rn(acc0[e]);
        }
        if (e < entries && two && j1 < info[e].eligible) {
          scores[e * p.chunk_cap + j1] = __double2float_rn(acc1[e]);
        }
      }
    }
  }
  for (int32_t j = kBatched ? max_eligible : tid; j < max_eligible; j += kSelectThreads) {
    const float* kr = p.kappa + (h * p.chunk_cap + j) * dim;
    double acc[kMaxEntriesPerBlock] = {0.0, 0.0, 0.0, 0.0};
    for (int c = 0; c < dim; c += 4) {
      const float4 k4 = *reinterpret_cast<const float4*>(kr + c);
      const double kc[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int e = 0; e < kMaxEntriesPerBlock; ++e) {
          // One fused multiply-add is the reference's product then sum: the product of two
          // floats is exact in fp64 (24 + 24 significant bits), so only the sum rounds.
          if (e < entries) acc[e] = __fma_rn(rho_s[e * dim + c + u], kc[u], acc[e]);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < kMaxEntriesPerBlock; ++e) {
      if (e < entries && j < info[e].eligible) {
        scores[e * p.chunk_cap + j] = __double2float_rn(acc[e]);
      }
    }
  }
  __syncthreads();

  // Step 4: the cut, entry by entry.
  for (int e = 0; e < entries; ++e) {
    if (!info[e].scored || p.skip_cut) continue;  // Uniform.
    const int32_t eligible = info[e].eligible, lo = info[e].lo, hi = info[e].hi;
    const float* sc = global
                          ? p.scores + (h * p.score_blocks + (b0 + e - p.block_begin)) * p.chunk_cap
                          : scores + e * p.chunk_cap;
    int32_t mine = 0;
    for (int32_t j = tid; j < eligible; j += kSelectThreads) mine += Weight(bnd, j, lo, hi);
    if (tid == 0) total_weight = 0;
    __syncthreads();
    atomicAdd(&total_weight, mine);
    __syncthreads();
    const int32_t remaining = info[e].remaining;
    if (remaining <= 0 || total_weight <= remaining) {
      if (tid == 0) info[e].mode = remaining <= 0 ? 0 : 1;
      __syncthreads();
      continue;
    }
    uint64_t prefix = 0;
    int32_t need = remaining;
    // Digits of the key from the top; chunk indices are below 2^24, so bits 24..31 are zero.
    for (int shift = 56; shift >= 0; shift -= 8) {
      if (shift == 24) continue;
      const uint64_t high = shift == 56 ? 0 : ~uint64_t{0} << (shift + 8);
      for (int i = tid; i < 256; i += kSelectThreads) {
        hist[i] = 0;
        hist_count[i] = 0;
      }
      if (tid == 0) unique_cut = 0;
      __syncthreads();
      if (p.aggregate) {
        // Lanes of a warp with the same digit add their tokens first (one atomic a digit a warp:
        // the top digits gather most chunks in a few bins). Whole warps run every iteration.
        for (int32_t j0 = 0; j0 < eligible; j0 += kSelectThreads) {
          const int32_t j = j0 + tid;
          uint32_t w = 0;
          int bin = -1;
          if (j < eligible) {
            w = static_cast<uint32_t>(Weight(bnd, j, lo, hi));
            if (w != 0) {
              const uint64_t key = RankKey(sc[j], j);
              if ((key & high) == (prefix & high)) bin = static_cast<int>((key >> shift) & 255);
            }
          }
          const unsigned peers = __match_any_sync(0xffffffffu, bin);
          const uint32_t sum = __reduce_add_sync(peers, w);
          if (bin >= 0 && lane == __ffs(peers) - 1) {
            atomicAdd(&hist[bin], sum);
            atomicAdd(&hist_count[bin], static_cast<uint32_t>(__popc(peers)));
          }
        }
      } else if (p.uniform_aggregate) {
        // A warp whose chunks all fall in one bin (the top digits: a few bins hold most chunks)
        // adds their tokens and count in one atomic each; other warps add lane by lane. The
        // same histograms. Whole warps run every iteration.
        for (int32_t j0 = 0; j0 < eligible; j0 += kSelectThreads) {
          const int32_t j = j0 + tid;
          uint32_t w = 0;
          int bin = -1;
          if (j < eligible) {
            w = static_cast<uint32_t>(Weight(bnd, j, lo, hi));
            if (w != 0) {
              const uint64_t key = RankKey(sc[j], j);
              if ((key & high) == (prefix & high)) bin = static_cast<int>((key >> shift) & 255);
            }
          }
          const unsigned valid = __ballot_sync(0xffffffffu, bin >= 0);
          if (valid == 0) continue;  // Uniform.
          const int lead = __ffs(valid) - 1;
          const int lead_bin = __shfl_sync(0xffffffffu, bin, lead);
          if (__all_sync(0xffffffffu, bin < 0 || bin == lead_bin)) {
            const uint32_t sum = __reduce_add_sync(0xffffffffu, bin >= 0 ? w : 0u);
            if (lane == lead) {
              atomicAdd(&hist[lead_bin], sum);
              atomicAdd(&hist_count[lead_bin], static_cast<uint32_t>(__popc(valid)));
            }
          } else if (bin >= 0) {
            atomicAdd(&hist[bin], w);
            atomicAdd(&hist_count[bin], 1u);
          }
        }
      } else {
        for (int32_t j = tid; j < eligible; j += kSelectThreads) {
          const int32_t w = Weight(bnd, j, lo, hi);
          if (w == 0) continue;
          const uint64_t key = RankKey(sc[j], j);
          if ((key & high) != (prefix & high)) continue;
          atomicAdd(&hist[(key >> shift) & 255], static_cast<uint32_t>(w));
          if (p.early_exit) atomicAdd(&hist_count[(key >> shift) & 255], 1u);
        }
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l holds bins 255 - 8l down to 248 - 8l; the running sum goes from the top bin down.
        uint32_t sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) sum += hist[255 - 8 * lane - i];
        uint32_t inclusive = sum;
#pragma unroll
        for (int o = 1; o < 32; o *= 2) {
          const uint32_t up = __shfl_up_sync(0xffffffffu, inclusive, o);
          if (lane >= o) inclusive += up;
        }
        const uint32_t before = inclusive - sum;
        const uint32_t found =
            __ballot_sync(0xffffffffu, before < static_cast<uint32_t>(need) &&
                                           inclusive >= static_cast<uint32_t>(need));
        const int owner = __ffs(found) - 1;
        if (lane == owner) {
          uint32_t cum = before;
          for (int i = 0; i < 8; ++i) {
            const int bin = 255 - 8 * lane - i;
            if (cum + hist[bin] >= static_cast<uint32_t>(need)) {
              info[e].key = prefix | (uint64_t(bin) << shift);
              info[e].need = need - static_cast<int32_t>(cum);
              // One chunk left with these digits: it is the cut chunk (found below).
              unique_cut = p.early_exit && hist_count[bin] == 1;
              break;
            }
            cum += hist[bin];
          }
        }
      }
      __syncthreads();
      prefix = info[e].key;
      need = info[e].need;
      if (unique_cut) {   // Uniform.
        __syncthreads();  // Every thread has read the prefix.
        // The one ranked chunk whose key's digits down to this one are the prefix's.
        const uint64_t done = ~uint64_t{0} << shift;
        for (int32_t j = tid; j < eligible; j += kSelectThreads) {
          if (Weight(bnd, j, lo, hi) == 0) continue;
          const uint64_t key = RankKey(sc[j], j);
          if ((key & done) == (prefix & done)) info[e].key = key;
        }
        __syncthreads();
        break;
      }
      __syncthreads();
    }
    if (tid == 0) info[e].mode = 2;
    __syncthreads();
  }

  // Emission: warp e lists entry e.
  if (warp < entries && b0 + warp < b_end) {
    const EntryInfo in = info[warp];
    const int64_t entry = h * p.num_blocks + b0 + warp;
    CudaSpan* spans = p.spans + entry * p.span_cap;
    int32_t* starts = p.span_starts + entry * p.span_cap;
    if (!in.scored) {
      if (lane == 0) {
        spans[0] = CudaSpan{0, static_cast<int32_t>(in.end)};
        starts[0] = 0;
        p.counts[entry] = 1;
      }
      return;
    }
    const float* sc =
        global ? p.scores + (h * p.score_blocks + (b0 + warp - p.block_begin)) * p.chunk_cap
               : scores + warp * p.chunk_cap;
    const int32_t items = in.eligible + 2;  // Sink, the eligible chunks, local.
    int32_t carry_end = -1, carry_tokens = 0, carry_spans = 0;
    const uint32_t below = (1u << lane) - 1;
    for (int32_t base = 0; base < items; base += 32) {
      const int32_t i = base + lane;
      int32_t a = 0, z = 0;
      if (i == 0) {
        z = in.lo;  // Sink [0, min(S, e)).
      } else if (i <= in.eligible) {
        const int32_t j = i - 1;
        const int32_t w = Weight(bnd, j, in.lo, in.hi);
        a = bnd[j] > in.lo ? bnd[j] : in.lo;
        int32_t take = 0;
        if (w > 0) {
          if (in.mode == 1) {
            take = w;
          } else if (in.mode == 2) {
            const uint64_t key = RankKey(sc[j], j);
            take = key > in.key ? w : key == in.key ? in.need : 0;
          }
        }
        z = a + take;
      } else if (i == items - 1) {
        a = in.hi > in.lo ? in.hi : in.lo;  // Local [max(0, e - W), e), after the sink.
        z = static_cast<int32_t>(in.end);
      }
      const bool nonempty = z > a;
      // End of the last non-empty interval before this one.
      int32_t last = nonempty ? z : -1;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int32_t up = __shfl_up_sync(0xffffffffu, last, o);
        if (lane >= o) last = max(last, up);
      }
      int32_t prev = __shfl_up_sync(0xffffffffu, last, 1);
      prev = lane == 0 ? carry_end : max(prev, carry_end);
      const bool start = nonempty && prev != a;
      int32_t tokens = nonempty ? z - a : 0;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int32_t up = __shfl_up_sync(0xffffffffu, tokens, o);
        if (lane >= o) tokens += up;
      }
      const int32_t packed = carry_tokens + tokens - (nonempty ? z - a : 0);
      const uint32_t starts_mask = __ballot_sync(0xffffffffu, start);
      if (start) {
        // At most span_cap spans (selection_cuda.cc's SpanCapacity bounds them); past it the
        // count says so (ToSelection reports it) and nothing outside the entry is written.
        const int32_t k = carry_spans + __popc(starts_mask & below);
        if (k < p.span_cap) {
          spans[k].begin = a;
          starts[k] = packed;
        }
      }
      carry_end = max(carry_end, __shfl_sync(0xffffffffu, last, 31));
      carry_tokens += __shfl_sync(0xffffffffu, tokens, 31);
      carry_spans += __popc(starts_mask);
    }
    __syncwarp();
    // Span k ends where its tokens run out: the next span's packed offset, or the total.
    const int32_t written =
        carry_spans < p.span_cap ? carry_spans : static_cast<int32_t>(p.span_cap);
    for (int32_t k = lane; k < written; k += 32) {
      const int32_t next = k + 1 < written ? starts[k + 1] : carry_tokens;
      spans[k].end = spans[k].begin + (next - starts[k]);
    }
    if (lane == 0) p.counts[entry] = carry_spans;
  }
}

// The paper's scores rho . kappa as a register-tiled product: a thread block computes a tile of
// kScoreRows query blocks by kScoreCols chunks of one KV head, each thread kScoreRows / 16 by
// kScoreCols / 16 of them (rows ty + 16 r, columns tx + 16 c), features staged kScoreK at a time
// in shared memory as fp64. Each score is the same fused multiply-add chain as SelectKernel's:
// acc = fma(rho_c, kappa_c, acc) for c = 0, 1, ..., dim - 1 from +0, rounded once to fp32. Tiles
// whose first chunk no query block of the tile may score (it ends after the tile's last block's
// first row) are skipped; scores of chunks a block may not score are written but never read.
constexpr int kScoreRows = 128, kScoreCols = 64, kScoreK = 16, kScoreThreads = 256;
constexpr int kScoreR = kScoreRows / 16, kScoreC = kScoreCols / 16;

__global__ void __launch_bounds__(kScoreThreads)
    PaperScoresKernel(const __grid_constant__ PaperScoreParams p) {
  __shared__ double a_s[kScoreK][kScoreRows];  // rho, feature-major.
  __shared__ double b_s[kScoreK][kScoreCols];  // kappa, feature-major.
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t h = blockIdx.z;
  const int64_t i0 = p.block_begin + int64_t{blockIdx.y} * kScoreRows;  // Relative query block.
  const int64_t i_end = min(i0 + kScoreRows, p.block_begin + p.blocks);
  const int32_t j0 = static_cast<int32_t>(blockIdx.x) * kScoreCols;
  const int32_t chunks = *p.count - 1;
  if (j0 >= chunks || i0 >= i_end) return;
  // Chunk j0 is scored by block i when it ends at or before the block's first row.
  if (p.boundaries[j0 + 1] > (p.first_block + i_end - 1) * p.q_block) return;
  const int dim = p.dim;
  double acc[kScoreR][kScoreC];
#pragma unroll
  for (int r = 0; r < kScoreR; ++r) {
#pragma unroll
    for (int c = 0; c < kScoreC; ++c) acc[r][c] = 0.0;
  }
  for (int k0 = 0; k0 < dim; k0 += kScoreK) {
    const int kn = min(kScoreK, dim - k0);
    for (int x = tid; x < kScoreRows * kScoreK; x += kScoreThreads) {
      const int row = x / kScoreK, kk = x % kScoreK;
      const int64_t i = i0 + row;
      a_s[kk][row] = i < i_end && kk < kn
                         ? static_cast<double>(p.rho[(h * p.num_blocks + i) * dim + k0 + kk])
                         : 0.0;
    }
    for (int x = tid; x < kScoreCols * kScoreK; x += kScoreThreads) {
      const int col = x / kScoreK, kk = x % kScoreK;
      const int32_t j = j0 + col;
      b_s[kk][col] = j < chunks && kk < kn
                         ? static_cast<double>(p.kappa[(h * p.chunk_cap + j) * dim + k0 + kk])
                         : 0.0;
    }
    __syncthreads();
    for (int kk = 0; kk < kn; ++kk) {
      double a[kScoreR], b[kScoreC];
#pragma unroll
      for (int r = 0; r < kScoreR; ++r) a[r] = a_s[kk][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < kScoreC; ++c) b[c] = b_s[kk][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < kScoreR; ++r) {
#pragma unroll
        for (int c = 0; c < kScoreC; ++c) acc[r][c] = __fma_rn(a[r], b[c], acc[r][c]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kScoreR; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    if (i >= i_end) continue;
    float* out = p.scores + (h * p.score_blocks + (i - p.block_begin)) * p.chunk_cap;
#pragma unroll
    for (int c = 0; c < kScoreC; ++c) {
      const int32_t j = j0 + tx + 16 * c;
      if (j < chunks) out[j] = __double2float_rn(acc[r][c]);
    }
  }
}

}  // namespace

cudaError_t LaunchPaperScores(const PaperScoreParams& p, cudaStream_t stream) {
  if (p.blocks <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((p.chunk_cap + kScoreCols - 1) / kScoreCols),
                  static_cast<unsigned>((p.blocks + kScoreRows - 1) / kScoreRows),
                  static_cast<unsigned>(p.hkv));
  PaperScoresKernel<<<grid, kScoreThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

size_t SelectSharedBytes(int64_t chunk_cap, int64_t dim, int entries, bool global_scores) {
  if (global_scores) return sizeof(double) * static_cast<size_t>(entries * dim) + 16;
  return sizeof(double) * static_cast<size_t>(entries * dim) +
         sizeof(int32_t) * static_cast<size_t>(chunk_cap + 1) +
         sizeof(float) * static_cast<size_t>(entries * chunk_cap) + 16;
}

cudaError_t LaunchSelect(const SelectParams& p, cudaStream_t stream) {
  if (p.blocks <= 0) return cudaSuccess;
  const size_t smem = SelectSharedBytes(p.chunk_cap, p.dim, p.entries_per_block,
                                        p.global_scores && p.scores != nullptr);
  // Precomputed (mass) scores skip the score loops: the unbatched kernel, which holds 40
  // registers a thread to the batched one's 128 (more thread blocks an SM for the cut).
  auto kernel = p.batched_scores && p.scores == nullptr ? SelectKernel<true> : SelectKernel<false>;
  const cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>((p.blocks + p.entries_per_block - 1) / p.entries_per_block),
                  static_cast<unsigned>(p.hkv));
  kernel<<<grid, kSelectThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace selection_kernel
}  // namespace dhsa
