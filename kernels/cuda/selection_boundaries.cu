// Step 1 on the device: gap dissimilarities, their sort, the greedy NMS and the split of long
// chunks (kernels/boundaries/reference.cc is the function computed).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/selection_cuda_launch.h"

namespace dhsa {
namespace selection_kernel {
namespace {

__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }

__global__ void InitBoundariesKernel(int32_t* boundaries, int32_t* count, int32_t n,
                                     bool first_zero) {
  if (first_zero) boundaries[0] = 0;
  *count = n;
}

constexpr int kGapTile = 32;  // Gaps per thread block.
constexpr int kGapParts = 8;  // Threads per gap (each a strided slice of the features).
constexpr int kGapThreads = kGapTile * kGapParts;

// One block per kGapTile consecutive gaps; the keys they read ([g0 - w, g0 + kGapTile + w) within
// [begin, end)) are normalised per head into shared memory as fp64, one head at a time. Each gap's
// left and right sums are added in position order from its own window (the reference's order), so
// equal windows give bit-equal deltas; the dot products over features are summed per thread then
// by a fixed shuffle tree.
template <typename T>
__global__ void __launch_bounds__(kGapThreads)
    GapKernel(const T* __restrict__ k, int64_t hkv, int64_t lk, int dim, int32_t begin, int32_t end,
              int32_t window, double* __restrict__ delta, int32_t* __restrict__ pos) {
  extern __shared__ __align__(16) unsigned char smem[];
  double* rows = reinterpret_cast<double*>(smem);  // [rows_cap][dim]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t g0 = int64_t{begin} + 1 + int64_t{blockIdx.x} * kGapTile;  // First gap.
  const int64_t r0 = g0 - window > begin ? g0 - window : begin;            // First row held.
  const int64_t r_end_raw = g0 + kGapTile - 1 + window;
  const int64_t r1 = r_end_raw < end ? r_end_raw : end;  // One past the last row held.
  const int num_rows = static_cast<int>(r1 - r0);
  const int gi = tid / kGapParts, part = tid % kGapParts;
  const int64_t t = g0 + gi;  // This thread's gap.
  const bool active = t < end;
  const int64_t left_lo = t - window > begin ? t - window : begin;
  const int64_t right_hi = t + window < end ? t + window : end;
  double dot = 0.0, nl = 0.0, nr = 0.0;
  for (int64_t h = 0; h < hkv; ++h) {
    const T* kh = k + h * lk * dim;
    // One warp per row: L2 norm in fp64, then the normalised row (zero row: zeros, as the
    // reference's skipping it).
    for (int r = warp; r < num_rows; r += kGapThreads / 32) {
      const T* src = kh + (r0 + r) * dim;
      double norm2 = 0.0;
      for (int c = lane; c < dim; c += 32) {
        const double x = ToFloat(src[c]);
        norm2 = __dadd_rn(norm2, __dmul_rn(x, x));
      }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) norm2 += __shfl_xor_sync(0xffffffffu, norm2, o);
      const double inv = norm2 == 0.0 ? 0.0 : 1.0 / sqrt(norm2);
      for (int c = lane; c < dim; c += 32) {
        rows[r * dim + c] = __dmul_rn(static_cast<double>(ToFloat(src[c])), inv);
      }
    }
    __syncthreads();
    if (active) {
      for (int c = part; c < dim; c += kGapParts) {
        double l = 0.0, rr = 0.0;
        for (int64_t s = left_lo; s < t; ++s) l = __dadd_rn(l, rows[(s - r0) * dim + c]);
        for (int64_t s = t; s < right_hi; ++s) rr = __dadd_rn(rr, rows[(s - r0) * dim + c]);
        dot = __dadd_rn(dot, __dmul_rn(l, rr));
        nl = __dadd_rn(nl, __dmul_rn(l, l));
        nr = __dadd_rn(nr, __dmul_rn(rr, rr));
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int o = kGapParts / 2; o > 0; o /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, o);
    nl += __shfl_xor_sync(0xffffffffu, nl, o);
    nr += __shfl_xor_sync(0xffffffffu, nr, o);
  }
  if (active && part == 0) {
    const int64_t i = t - begin - 1;
    delta[i] = nl == 0.0 || nr == 0.0 ? 0.0 : 1.0 - dot / sqrt(nl * nr);
    pos[i] = static_cast<int32_t>(t);
  }
}

// The windowed gap kernel (windows of W <= kMaxFastWindow keys, the spec's default 4): one block
// per kFastTile consecutive gaps, one warp per kFastRun of them, lane l holding features l, l + 32,
// ... of each head. A head's raw rows [g0 - W, g0 + kFastTile + W - 1) are staged into shared
// memory with cp.async (zero-filled outside [begin, end), the next head's staging in flight during
// this head's sums), their inverse norms computed warp per row; each lane then keeps its feature of
// the kFastRun + 2W - 1 rows its gaps read in registers and forms every window sum once,
// 0 + x_s + ... + x_{s+W-1} in position order: a window clipped by the segment's ends adds +0.0
// for the missing rows, which leaves the reference's sum over the rows held unchanged (a sum that
// starts at +0.0 is never -0.0). Gap t's left sum is the window starting at t - W, its right sum
// the one starting at t. Features are summed per lane (heads, then features in order), then by a
// fixed shuffle tree: each delta is a function of its window's keys alone, as in GapKernel.
constexpr int kFastTile = 64;
constexpr int kFastRun = 8;
constexpr int kFastThreads = kFastTile / kFastRun * 32;
constexpr int kMaxFastWindow = kMaxGapRegisterWindow;

__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void CopyAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// One step of the transposed butterfly sum over 16 rows, with M (16, 8, 4, 2) values held: lanes
// l and l ^ M pair up; the lane whose bit M is clear keeps the lower M / 2 rows, the other the
// upper ones, each adding its partner's values of the rows it keeps (own value first, as the
// butterfly's `x += shfl_xor(x, M)`).
template <int M>
__device__ __forceinline__ void TransposedSumStep(double (&v)[16], int lane) {
  const bool upper = (lane & M) != 0;
#pragma unroll
  for (int i = 0; i < M / 2; ++i) {
    const double send = upper ? v[i] : v[i + M / 2];
    const double keep = upper ? v[i + M / 2] : v[i];
    v[i] = __dadd_rn(keep, __shfl_xor_sync(0xffffffffu, send, M));
  }
}

// kWarpNorms: each warp computes the inverse norms of the rows it reads itself (the same sums in
// the same order: lane partials over features l, l + 32, ..., then the same shuffle tree, done
// transposed), all of its rows at once, instead of the block's warp-per-row phase and its second
// barrier a head; and squares each window sum once for the two gaps that use it.
template <typename T, int W, bool kWarpNorms = false>
__global__ void __launch_bounds__(kFastThreads)
    WindowedGapKernel(const T* __restrict__ k, int64_t hkv, int64_t lk, int dim, int32_t begin,
                      int32_t end, double* __restrict__ delta, int32_t* __restrict__ pos) {
  constexpr int kRows = kFastTile + 2 * W - 1;  // Rows of positions g0 - W + r.
  constexpr int kHeld = kFastRun + 2 * W - 1;   // Rows one warp's gaps read.
  constexpr int kWindows = kFastRun + W;        // Windows starting at its first gap - W, ...
  extern __shared__ __align__(16) unsigned char smem[];
  double* inv = reinterpret_cast<double*>(smem);              // [kRows]
  T* raw = reinterpret_cast<T*>(smem + sizeof(double) * 80);  // [2][kRows][dim]
  static_assert(kRows <= 80, "inverse norms' room");
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t g0 = int64_t{begin} + 1 + int64_t{blockIdx.x} * kFastTile;
  const int64_t p0 = g0 - W;  // Position of row 0.
  const int first = warp * kFastRun;
  const int vecs = dim / 8;  // 16-byte pieces of a row.

  auto stage = [&](int64_t h, T* dst) {
    const T* kh = k + h * lk * dim;
    for (int i = tid; i < kRows * vecs; i += kFastThreads) {
      const int r = i / vecs, v = i % vecs;
      const int64_t p = p0 + r;
      const bool valid = p >= begin && p < end;
      CopyAsync16(dst + r * dim + v * 8, kh + (valid ? p : int64_t{begin}) * dim + v * 8, valid);
    }
    CopyAsyncCommit();
  };

  double dot[kFastRun], nl[kFastRun], nr[kFastRun];
#pragma unroll
  for (int g = 0; g < kFastRun; ++g) dot[g] = nl[g] = nr[g] = 0.0;
  stage(0, raw);
  for (int64_t h = 0; h < hkv; ++h) {
    const T* rows = raw + (h & 1) * kRows * dim;
    if (h + 1 < hkv) {
      stage(h + 1, raw + ((h + 1) & 1) * kRows * dim);
      CopyAsyncWait<1>();
    } else {
      CopyAsyncWait<0>();
    }
    __syncthreads();
    double inv_held[kHeld];
    if constexpr (kWarpNorms) {
      static_assert(kHeld <= 16, "the transposed reduction holds 16 rows");
      double v[16];  // Lane partials of the squared norms of rows first .. first + kHeld - 1.
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = 0.0;
      for (int c = lane; c < dim; c += 32) {
#pragma unroll
        for (int i = 0; i < kHeld; ++i) {
          const double x = ToFloat(rows[(first + i) * dim + c]);
          v[i] = __dadd_rn(v[i], __dmul_rn(x, x));
        }
      }
      // The butterfly's sums (lane l adds lane l ^ o, o = 16, 8, 4, 2, 1), transposed: at each
      // step a lane keeps half of its rows and adds its partner's values of them, so the 16 rows
      // take 16 double shuffles and adds, not 80; each row's sum is the butterfly's, term for term.
      // Lane l ends with row l >> 1.
      TransposedSumStep<16>(v, lane);
      TransposedSumStep<8>(v, lane);
      TransposedSumStep<4>(v, lane);
      TransposedSumStep<2>(v, lane);
      v[0] = __dadd_rn(v[0], __shfl_xor_sync(0xffffffffu, v[0], 1));
      const double inverse = v[0] == 0.0 ? 0.0 : 1.0 / sqrt(v[0]);
#pragma unroll
      for (int i = 0; i < kHeld; ++i) inv_held[i] = __shfl_sync(0xffffffffu, inverse, 2 * i);
    } else {
      // Inverse L2 norms in fp64, warp per row (a zero row, or one outside the segment: 0).
      for (int r = warp; r < kRows; r += kFastThreads / 32) {
        double norm2 = 0.0;
        for (int c = lane; c < dim; c += 32) {
          const double x = ToFloat(rows[r * dim + c]);
          norm2 = __dadd_rn(norm2, __dmul_rn(x, x));
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) norm2 += __shfl_xor_sync(0xffffffffu, norm2, o);
        if (lane == 0) inv[r] = norm2 == 0.0 ? 0.0 : 1.0 / sqrt(norm2);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kHeld; ++i) inv_held[i] = inv[first + i];
    }
    for (int c = lane; c < dim; c += 32) {
      double x[kHeld];
#pragma unroll
      for (int i = 0; i < kHeld; ++i) {
        x[i] = __dmul_rn(static_cast<double>(ToFloat(rows[(first + i) * dim + c])), inv_held[i]);
      }
      double win[kWindows];
#pragma unroll
      for (int i = 0; i < kWindows; ++i) {
        double s = 0.0;
#pragma unroll
        for (int u = 0; u < W; ++u) s = __dadd_rn(s, x[i + u]);
        win[i] = s;
      }
      if constexpr (kWarpNorms) {
        // Each window's square once: it is gap g's right and gap g + W's left (the same values).
        double sq[kWindows];
#pragma unroll
        for (int i = 0; i < kWindows; ++i) sq[i] = __dmul_rn(win[i], win[i]);
#pragma unroll
        for (int g = 0; g < kFastRun; ++g) {
          dot[g] = __dadd_rn(dot[g], __dmul_rn(win[g], win[g + W]));
          nl[g] = __dadd_rn(nl[g], sq[g]);
          nr[g] = __dadd_rn(nr[g], sq[g + W]);
        }
      } else {
#pragma unroll
        for (int g = 0; g < kFastRun; ++g) {
          const double l = win[g], r = win[g + W];
          dot[g] = __dadd_rn(dot[g], __dmul_rn(l, r));
          nl[g] = __dadd_rn(nl[g], __dmul_rn(l, l));
          nr[g] = __dadd_rn(nr[g], __dmul_rn(r, r));
        }
      }
    }
    __syncthreads();  // The buffer read here is staged into two heads on.
  }
#pragma unroll
  for (int g = 0; g < kFastRun; ++g) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
      nl[g] += __shfl_xor_sync(0xffffffffu, nl[g], o);
      nr[g] += __shfl_xor_sync(0xffffffffu, nr[g], o);
    }
  }
  if (lane < kFastRun) {
    double d = 0.0, a = 0.0, b = 0.0;  // Lane g writes gap g (registers indexed statically).
#pragma unroll
    for (int g = 0; g < kFastRun; ++g) {
      if (g == lane) {
        d = dot[g];
        a = nl[g];
        b = nr[g];
      }
    }
    const int64_t t = g0 + first + lane;
    if (t < end) {
      const int64_t i = t - begin - 1;
      delta[i] = a == 0.0 || b == 0.0 ? 0.0 : 1.0 - d / sqrt(a * b);
      pos[i] = static_cast<int32_t>(t);
    }
  }
}

size_t WindowedGapSharedBytes(int window, int64_t dim, size_t elem) {
  return sizeof(double) * 80 + 2 * elem * static_cast<size_t>((kFastTile + 2 * window - 1) * dim);
}

template <typename T, int W, bool kWarpNorms = false>
cudaError_t LaunchWindowed(const T* k, int64_t hkv, int64_t lk, int64_t dim, int32_t begin,
                           int32_t end, double* delta, int32_t* pos, cudaStream_t stream) {
  const int64_t gaps = int64_t{end} - begin - 1;
  const unsigned blocks = static_cast<unsigned>((gaps + kFastTile - 1) / kFastTile);
  const size_t smem = WindowedGapSharedBytes(W, dim, sizeof(T));
  auto kernel = WindowedGapKernel<T, W, kWarpNorms>;
  const cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  kernel<<<blocks, kFastThreads, smem, stream>>>(k, hkv, lk, static_cast<int>(dim), begin, end,
                                                 delta, pos);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchWindowedFor(int window, const T* k, int64_t hkv, int64_t lk, int64_t dim,
                              int32_t begin, int32_t end, double* delta, int32_t* pos,
                              cudaStream_t stream) {
  switch (window) {
    case 1:
      return LaunchWindowed<T, 1>(k, hkv, lk, dim, begin, end, delta, pos, stream);
    case 2:
      return LaunchWindowed<T, 2>(k, hkv, lk, dim, begin, end, delta, pos, stream);
    case 3:
      return LaunchWindowed<T, 3>(k, hkv, lk, dim, begin, end, delta, pos, stream);
    case 4:
      return LaunchWindowed<T, 4>(k, hkv, lk, dim, begin, end, delta, pos, stream);
    case 5:
      return LaunchWindowed<T, 5>(k, hkv, lk, dim, begin, end, delta, pos, stream);
    case 6:
      return LaunchWindowed<T, 6>(k, hkv, lk, dim, begin, end, delta, pos, stream);
    case 7:
      return LaunchWindowed<T, 7>(k, hkv, lk, dim, begin, end, delta, pos, stream);
    case 8:
      return LaunchWindowed<T, 8>(k, hkv, lk, dim, begin, end, delta, pos, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

constexpr int kNmsThreads = 1024;

// True when a bit of [lo, hi] (positions relative to the segment, clipped to [0, n]) is set.
__device__ __forceinline__ bool AnyBit(const uint32_t* bits, int64_t lo, int64_t hi, int64_t n) {
  if (lo < 0) lo = 0;
  if (hi > n) hi = n;
  for (int64_t w = lo / 32; w <= hi / 32 && lo <= hi; ++w) {
    uint32_t word = bits[w];
    const int64_t first = w * 32;
    if (lo > first) word &= ~0u << (lo - first);
    if (hi < first + 31) word &= ~0u >> (first + 31 - hi);
    if (word != 0) return true;
  }
  return false;
}

// The parallel NMS's gap states (kNmsAccepted / kNmsRejected are final; kNmsUndecided is left to
// the serial warp).
constexpr uint8_t kNmsUndecided = 0, kNmsAccepted = 1, kNmsRejected = 2;

// rank[sorted_pos[s] - begin - 1] = s: each gap's place in priority order.
__global__ void NmsRankKernel(const int32_t* __restrict__ sorted_pos, int32_t n_gaps, int32_t begin,
                              int32_t* __restrict__ rank) {
  const int32_t s = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (s < n_gaps) rank[sorted_pos[s] - begin - 1] = s;
}

// sorted_state[s] = state[sorted_pos[s] - begin - 1]: the decisions in priority order.
__global__ void NmsGatherKernel(const int32_t* __restrict__ sorted_pos, int32_t n_gaps,
                                int32_t begin, const uint8_t* __restrict__ state,
                                uint8_t* __restrict__ sorted_state) {
  const int32_t s = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (s < n_gaps) sorted_state[s] = state[sorted_pos[s] - begin - 1];
}

constexpr int kRoundThreads = 1024;
constexpr int kRoundCore = 1024;  // Gaps a thread block decides.
constexpr int kRoundItems = 2;    // Gaps a thread holds: the core and halos fit 2 * 1024.
static_assert(kMaxParallelNmsMinChunk <= 33, "a gap's neighbours fit a 64-bit mask");

// Gaps held either side of a block's own: 16 neighbourhoods, at most what the threads hold.
int32_t NmsHalo(int32_t min_chunk) {
  return std::min(16 * (min_chunk - 1), (kRoundThreads * kRoundItems - kRoundCore) / 2);
}

// The greedy NMS's decisions, found in parallel rounds. Greedy (gaps in priority order, each
// accepted when no accepted gap lies within min_chunk - 1, and it is min_chunk from both ends)
// means exactly: gap i is accepted iff it is eligible and every gap of higher priority within
// min_chunk - 1 of it is rejected; it is rejected iff it is not eligible or such a gap is accepted.
// Each round applies that rule to the undecided gaps, in place: a decision rests only on decided
// neighbours, so every decision made equals the greedy's whatever the order of the updates. A
// thread block holds its kRoundCore gaps and `halo` gaps either side (states in shared memory; each
// thread the masks of the higher-priority neighbours of its gaps in registers); a gap beyond what
// it holds counts as undecided (it blocks an acceptance, it never causes a rejection), so the
// block's decisions are exact, and the halo only makes more of them. Only gaps ranked below
// `relevant` are decided (the stopped greedy never looks further, and a gap's decision depends on
// higher-priority gaps only); the others stay undecided. Rounds stop when none of the block's own
// relevant gaps is left undecided or a round changed nothing (or after max_rounds); the gaps left
// undecided go to the serial warp of NmsKernel.
__global__ void __launch_bounds__(kRoundThreads)
    NmsRoundsKernel(const int32_t* __restrict__ rank, int32_t n_gaps, int32_t n, int32_t min_chunk,
                    int32_t halo, int32_t max_rounds, int32_t relevant,
                    uint8_t* __restrict__ state) {
  __shared__ int32_t rank_s[kRoundThreads * kRoundItems];
  __shared__ uint8_t st_s[kRoundThreads * kRoundItems];
  volatile uint8_t* st = st_s;
  const int32_t core0 = static_cast<int32_t>(blockIdx.x) * kRoundCore;
  const int32_t core1 = min(core0 + kRoundCore, n_gaps);
  const int32_t lo = max(core0 - halo, 0), hi = min(core1 + halo, n_gaps);  // Gaps held.
  const int32_t held = hi - lo;
  const int tid = threadIdx.x;
  for (int32_t x = tid; x < held; x += kRoundThreads) {
    const int32_t rel = lo + x + 1;  // Position relative to the segment's begin.
    rank_s[x] = rank[lo + x];
    st[x] = rel >= min_chunk && n - rel >= min_chunk ? kNmsUndecided : kNmsRejected;
  }
  __syncthreads();
  // Bit d - 1 of mask: the gap d before is of higher priority; bit reach + d - 1: d after.
  const int32_t reach = min_chunk - 1;
  uint64_t mask[kRoundItems];
  bool live[kRoundItems], unknown[kRoundItems];
#pragma unroll
  for (int k = 0; k < kRoundItems; ++k) {
    const int32_t x = tid + k * kRoundThreads, i = lo + x;
    mask[k] = 0;
    unknown[k] = false;
    live[k] = x < held && rank_s[x] < relevant && st[x] == kNmsUndecided;
    if (!live[k]) continue;
    const int32_t r = rank_s[x];
    for (int32_t d = 1; d <= reach; ++d) {
      const int32_t before = i - d, after = i + d;
      if (before >= 0) {
        if (before < lo) {
          unknown[k] = true;
        } else if (rank_s[before - lo] < r) {
          mask[k] |= uint64_t{1} << (d - 1);
        }
      }
      if (after < n_gaps) {
        if (after >= hi) {
          unknown[k] = true;
        } else if (rank_s[after - lo] < r) {
          mask[k] |= uint64_t{1} << (reach + d - 1);
        }
      }
    }
  }
  for (int32_t round = 0; round < max_rounds; ++round) {
    int changed = 0, open = 0;
#pragma unroll
    for (int k = 0; k < kRoundItems; ++k) {
      if (!live[k]) continue;
      const int32_t x = tid + k * kRoundThreads;
      bool blocked = unknown[k], reject = false;
      uint64_t m = mask[k];
      if (reach <= 8) {
        // Up to 16 neighbours: every state read issued before any is used.
#pragma unroll
        for (int b = 0; b < 16; ++b) {
          if ((m >> b) & 1) {
            const uint8_t s = st[b < reach ? x - (b + 1) : x + (b - reach + 1)];
            reject |= s == kNmsAccepted;
            blocked |= s == kNmsUndecided;
          }
        }
      } else {
        while (m != 0) {
          const int b = __ffsll(static_cast<long long>(m)) - 1;
          m &= m - 1;
          const int32_t j = b < reach ? x - (b + 1) : x + (b - reach + 1);
          const uint8_t s = st[j];
          if (s == kNmsAccepted) {
            reject = true;
            break;
          }
          if (s == kNmsUndecided) blocked = true;
        }
      }
      if (reject || !blocked) {
        st[x] = reject ? kNmsRejected : kNmsAccepted;
        live[k] = false;
        changed = 1;
      } else if (lo + x >= core0 && lo + x < core1) {
        open = 1;
      }
    }
    // A gap left open may have been decided later in this round: the next round sees it. Stop
    // when a round changes nothing, or when nothing of the block's own gaps was left open.
    if (!__syncthreads_or(changed)) break;
    if (!__syncthreads_or(open)) break;
  }
  __syncthreads();
  for (int32_t i = core0 + tid; i < core1; i += kRoundThreads) state[i] = st[i - lo];
}

// Greedy NMS then the split of long chunks, appending to the boundary list. Without `state`: warp
// 0 decides the gaps in priority order, 32 at a time (a gap passes if no accepted gap lies within
// min_chunk; among the passing ones the first is accepted and the ones it conflicts with are
// dropped, until none is left). With `state` (NmsRoundsKernel's decisions by gap): the whole block
// reads the states in priority order, counts the accepted ones and finds where the wanted-th is
// (the stop); when no undecided gap comes before it, the accepted gaps before the stop are the
// stopped greedy's set. Otherwise the block marks the accepted gaps before the first undecided one,
// and warp 0 goes on serially from there (skipping AnyBit for decided gaps). Then the whole block
// lists the accepted gaps in position order and splits long chunks.
__global__ void __launch_bounds__(kNmsThreads)
    NmsKernel(const int32_t* __restrict__ sorted_pos, int32_t n_gaps, int32_t begin, int32_t end,
              int32_t min_chunk, int32_t max_chunk, int32_t wanted,
              const uint8_t* __restrict__ state, const uint8_t* __restrict__ sorted_state,
              int32_t* __restrict__ scratch, int32_t* __restrict__ boundaries,
              int32_t* __restrict__ count) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* bits = reinterpret_cast<uint32_t*>(smem);  // Accepted gaps, relative to begin.
  using Scan = cub::BlockScan<int32_t, kNmsThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int32_t shared_accepted, shared_base, shared_carry, shared_first_open, shared_stop;
  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t n = int64_t{end} - begin;
  const int64_t words = n / 32 + 1;
  for (int64_t w = tid; w < words; w += kNmsThreads) bits[w] = 0;
  if (tid == 0) {
    shared_base = *count;
    shared_first_open = n_gaps;
    shared_stop = wanted > 0 ? n_gaps : 0;
  }
  __syncthreads();

  int64_t serial_from = 0;  // Sorted index where warp 0's serial decisions start.
  int32_t accepted_before = 0;
  if (state != nullptr) {
    // Thread tid holds sorted indices [s0, s1), read 16 states a load.
    const int32_t per = ((n_gaps + kNmsThreads - 1) / kNmsThreads + 15) / 16 * 16;
    const int32_t s0 = min(tid * per, n_gaps), s1 = min(s0 + per, n_gaps);
    int32_t mine = 0, open = n_gaps;
    for (int32_t v = s0; v < s1; v += 16) {
      const uint4 raw = *reinterpret_cast<const uint4*>(sorted_state + v);
      const uint8_t* g = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
      for (int u = 0; u < 16; ++u) {
        if (v + u < s1) {
          mine += g[u] == kNmsAccepted;
          if (g[u] == kNmsUndecided && open == n_gaps) open = v + u;
        }
      }
    }
    int32_t before = 0;
    Scan(scan_storage).ExclusiveSum(mine, before);
    if (open < n_gaps) atomicMin(&shared_first_open, open);
    if (wanted > 0 && before < wanted && before + mine >= wanted) {
      int32_t c = before;  // The wanted-th accepted gap is in this range.
      for (int32_t v = s0; v < s1 && c < wanted; v += 16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(sorted_state + v);
        const uint8_t* g = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
        for (int u = 0; u < 16; ++u) {
          if (v + u < s1 && c < wanted) {
            c += g[u] == kNmsAccepted;
            if (c == wanted) shared_stop = v + u + 1;
          }
        }
      }
    }
    __syncthreads();
    // Gaps [0, limit) of the priority order are decided and the greedy's.
    const int32_t limit = min(shared_first_open, shared_stop);
    const int32_t s_end = min(s1, limit);
    int32_t marked = 0;
    for (int32_t v = s0; v < s_end; v += 16) {
      const uint4 raw = *reinterpret_cast<const uint4*>(sorted_state + v);
      const uint8_t* g = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
      for (int u = 0; u < 16; ++u) {
        if (v + u < s_end && g[u] == kNmsAccepted) {
          const int32_t rel = sorted_pos[v + u] - begin;
          atomicOr(&bits[rel / 32], 1u << (rel % 32));
          ++marked;
        }
      }
    }
    __syncthreads();  // scan_storage is reused.
    int32_t total = 0;
    Scan(scan_storage).ExclusiveSum(marked, before, total);
    accepted_before = total;
    serial_from = shared_first_open < shared_stop ? shared_first_open : n_gaps;
    if (tid == 0) shared_accepted = total;
    __syncthreads();
  }

  if (tid < 32 && serial_from < n_gaps) {
    int32_t accepted = accepted_before;
    constexpr int kDepth = 8;  // Loads in flight per lane.
    // The next 32 * kDepth sorted gaps are loaded while these are decided.
    int32_t next[kDepth];
#pragma unroll
    for (int m = 0; m < kDepth; ++m) {
      const int64_t idx = serial_from + m * 32 + lane;
      next[m] = idx < n_gaps ? sorted_pos[idx] : -1;
    }
    for (int64_t base = serial_from; base < n_gaps && accepted < wanted; base += 32 * kDepth) {
      int32_t t[kDepth];
#pragma unroll
      for (int m = 0; m < kDepth; ++m) {
        t[m] = next[m];
        const int64_t idx = base + 32 * kDepth + m * 32 + lane;
        next[m] = idx < n_gaps ? sorted_pos[idx] : -1;
      }
#pragma unroll
      for (int m = 0; m < kDepth; ++m) {
        if (accepted >= wanted) break;
        const int64_t rel = int64_t{t[m]} - begin;
        bool ok = false;
        if (t[m] >= 0) {
          const uint8_t g = state != nullptr ? state[rel - 1] : kNmsUndecided;
          ok = g == kNmsAccepted ||
               (g == kNmsUndecided && rel >= min_chunk && n - rel >= min_chunk &&
                !AnyBit(bits, rel - min_chunk + 1, rel + min_chunk - 1, n));
        }
        uint32_t mask = __ballot_sync(0xffffffffu, ok);
        while (mask != 0 && accepted < wanted) {
          const int leader = __ffs(mask) - 1;
          const int32_t tl = __shfl_sync(0xffffffffu, t[m], leader);
          if (lane == leader) bits[rel / 32] |= 1u << (rel % 32);
          ++accepted;
          const int64_t dist = int64_t{t[m]} - tl;
          const uint32_t conflict =
              __ballot_sync(0xffffffffu, ok && dist < min_chunk && -dist < min_chunk);
          mask &= ~conflict;
        }
        __syncwarp();
      }
    }
    if (lane == 0) shared_accepted = accepted;
  } else if (tid == 0 && state == nullptr) {
    shared_accepted = 0;
  }
  __syncthreads();

  // The accepted gaps in position order: scratch = begin, gaps..., end.
  const int64_t per_thread = (words + kNmsThreads - 1) / kNmsThreads;
  const int64_t w0 = tid * per_thread, w1 = w0 + per_thread < words ? w0 + per_thread : words;
  int32_t mine = 0;
  for (int64_t w = w0; w < w1; ++w) mine += __popc(bits[w]);
  int32_t offset = 0;
  Scan(scan_storage).ExclusiveSum(mine, offset);
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t word = bits[w];
    while (word != 0) {
      const int b = __ffs(word) - 1;
      word &= word - 1;
      scratch[1 + offset++] = static_cast<int32_t>(begin + w * 32 + b);
    }
  }
  const int32_t accepted = shared_accepted;
  if (tid == 0) {
    scratch[0] = begin;
    scratch[accepted + 1] = end;
    shared_carry = 0;
  }
  __syncthreads();

  // Split: chunk j = [scratch[j], scratch[j + 1]) becomes ceil(len / max_chunk) equal parts whose
  // ends b_j + p * len / parts (p = 1 .. parts) are appended.
  const int32_t chunks = accepted + 1;
  const int32_t base = shared_base;
  for (int32_t tile = 0; tile < chunks; tile += kNmsThreads) {
    const int32_t j = tile + tid;
    int64_t a = 0, len = 0;
    int32_t parts = 0;
    if (j < chunks) {
      a = scratch[j];
      len = int64_t{scratch[j + 1]} - a;
      parts = static_cast<int32_t>((len + max_chunk - 1) / max_chunk);
    }
    int32_t first = 0, total = 0;
    Scan(scan_storage).ExclusiveSum(parts, first, total);
    const int32_t carry = shared_carry;
    for (int32_t p = 1; p <= parts; ++p) {
      boundaries[base + carry + first + p - 1] = static_cast<int32_t>(a + p * len / parts);
    }
    __syncthreads();
    if (tid == 0) shared_carry = carry + total;
    __syncthreads();
  }
  if (tid == 0) *count = base + shared_carry;
}

__global__ void FixedKernel(int32_t begin, int32_t end, int32_t chunk, int32_t* boundaries,
                            int32_t* count) {
  const int32_t base = *count;
  const int64_t first = (int64_t{begin} / chunk + 1) * chunk;
  const int64_t multiples = first < end ? (end - first + chunk - 1) / chunk : 0;
  for (int64_t i = threadIdx.x; i <= multiples; i += blockDim.x) {
    boundaries[base + i] = static_cast<int32_t>(i < multiples ? first + i * chunk : end);
  }
  __syncthreads();
  if (threadIdx.x == 0) *count = static_cast<int32_t>(base + multiples + 1);
}

}  // namespace

cudaError_t LaunchInitBoundaries(int32_t* boundaries, int32_t* count, int32_t n, bool first_zero,
                                 cudaStream_t stream) {
  InitBoundariesKernel<<<1, 1, 0, stream>>>(boundaries, count, n, first_zero);
  return cudaGetLastError();
}

cudaError_t LaunchGapDissimilarity(DType dtype, const void* k, int64_t hkv, int64_t lk, int64_t dim,
                                   int32_t begin, int32_t end, int32_t window, double* delta,
                                   int32_t* pos, bool legacy, bool warp_norms,
                                   cudaStream_t stream) {
  const int64_t gaps = int64_t{end} - begin - 1;
  if (gaps <= 0) return cudaSuccess;
  if (!legacy && warp_norms && window == 4) {  // The variant is built for the spec's window.
    if (dtype == DType::kBF16) {
      return LaunchWindowed<__nv_bfloat16, 4, true>(static_cast<const __nv_bfloat16*>(k), hkv, lk,
                                                    dim, begin, end, delta, pos, stream);
    }
    return LaunchWindowed<__half, 4, true>(static_cast<const __half*>(k), hkv, lk, dim, begin, end,
                                           delta, pos, stream);
  }
  if (!legacy && window >= 1 && window <= kMaxFastWindow) {
    if (dtype == DType::kBF16) {
      return LaunchWindowedFor(window, static_cast<const __nv_bfloat16*>(k), hkv, lk, dim, begin,
                               end, delta, pos, stream);
    }
    return LaunchWindowedFor(window, static_cast<const __half*>(k), hkv, lk, dim, begin, end, delta,
                             pos, stream);
  }
  const unsigned blocks = static_cast<unsigned>((gaps + kGapTile - 1) / kGapTile);
  const size_t smem = sizeof(double) * static_cast<size_t>((kGapTile + 2 * window) * dim);
  cudaError_t error;
  if (dtype == DType::kBF16) {
    error = cudaFuncSetAttribute(GapKernel<__nv_bfloat16>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (error != cudaSuccess) return error;
    GapKernel<<<blocks, kGapThreads, smem, stream>>>(static_cast<const __nv_bfloat16*>(k), hkv, lk,
                                                     static_cast<int>(dim), begin, end, window,
                                                     delta, pos);
  } else {
    error =
        cudaFuncSetAttribute(GapKernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (error != cudaSuccess) return error;
    GapKernel<<<blocks, kGapThreads, smem, stream>>>(static_cast<const __half*>(k), hkv, lk,
                                                     static_cast<int>(dim), begin, end, window,
                                                     delta, pos);
  }
  return cudaGetLastError();
}

size_t SortGapsTempBytes(int64_t n) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairsDescending(
      nullptr, bytes, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n);
  return bytes;
}

cudaError_t SortGaps(void* temp, size_t temp_bytes, const double* delta, double* delta_sorted,
                     const int32_t* pos, int32_t* pos_sorted, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return cub::DeviceRadixSort::SortPairsDescending(temp, temp_bytes, delta, delta_sorted, pos,
                                                   pos_sorted, n, 0, 64, stream);
}

size_t NmsSharedBytes(int64_t len) { return sizeof(uint32_t) * static_cast<size_t>(len / 32 + 1); }

bool NmsParallelSupported(int32_t min_chunk) {
  return min_chunk >= 1 && min_chunk <= kMaxParallelNmsMinChunk;
}

cudaError_t LaunchNmsAndSplit(const int32_t* sorted_pos, int32_t n_gaps, int32_t begin, int32_t end,
                              int32_t min_chunk, int32_t max_chunk, int32_t wanted,
                              const NmsWorkspace* parallel, int32_t* scratch, int32_t* boundaries,
                              int32_t* count, cudaStream_t stream) {
  const uint8_t* state = nullptr;
  const uint8_t* sorted_state = nullptr;
  if (parallel != nullptr && n_gaps > 0 && NmsParallelSupported(min_chunk)) {
    const unsigned spread = static_cast<unsigned>((n_gaps + 255) / 256);
    NmsRankKernel<<<spread, 256, 0, stream>>>(sorted_pos, n_gaps, begin, parallel->rank);
    const unsigned blocks = static_cast<unsigned>((n_gaps + kRoundCore - 1) / kRoundCore);
    const int32_t n = end - begin;
    // The stopped greedy stops within the first wanted * (2 min_chunk - 1) + 2 (min_chunk - 1)
    // gaps of the priority order: each is accepted, one of the 2 (min_chunk - 1) gaps too near an
    // end, or rejected by one of the accepted gaps before it, each rejecting at most
    // 2 (min_chunk - 1) neighbours. Gaps ranked past that are never looked at.
    const int64_t bound =
        int64_t{std::max(wanted, 0)} * (2 * int64_t{min_chunk} - 1) + 2 * (int64_t{min_chunk} - 1);
    const int32_t relevant = static_cast<int32_t>(std::min<int64_t>(n_gaps, bound));
    NmsRoundsKernel<<<blocks, kRoundThreads, 0, stream>>>(parallel->rank, n_gaps, n, min_chunk,
                                                          NmsHalo(min_chunk), parallel->max_rounds,
                                                          relevant, parallel->state);
    NmsGatherKernel<<<spread, 256, 0, stream>>>(sorted_pos, n_gaps, begin, parallel->state,
                                                parallel->sorted_state);
    state = parallel->state;
    sorted_state = parallel->sorted_state;
  }
  const size_t smem = NmsSharedBytes(int64_t{end} - begin);
  const cudaError_t error =
      cudaFuncSetAttribute(NmsKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  NmsKernel<<<1, kNmsThreads, smem, stream>>>(sorted_pos, n_gaps, begin, end, min_chunk, max_chunk,
                                              wanted, state, sorted_state, scratch, boundaries,
                                              count);
  return cudaGetLastError();
}

cudaError_t LaunchFixedBoundaries(int32_t begin, int32_t end, int32_t chunk, int32_t* boundaries,
                                  int32_t* count, cudaStream_t stream) {
  FixedKernel<<<1, 256, 0, stream>>>(begin, end, chunk, boundaries, count);
  return cudaGetLastError();
}

}  // namespace selection_kernel
}  // namespace dhsa
