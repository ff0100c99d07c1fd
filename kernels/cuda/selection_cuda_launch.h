// Launchers of the device selection's kernels (selection_*.cu); selection_cuda.cc drives them.
// Positions are int32 (sequences shorter than 2^31 tokens); every launcher enqueues on `stream`
// and returns the launch error.
#ifndef DHSA_KERNELS_CUDA_SELECTION_CUDA_LAUNCH_H_
#define DHSA_KERNELS_CUDA_SELECTION_CUDA_LAUNCH_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/common/dtype.h"
#include "kernels/cuda/sparse_attention_cuda.h"

namespace dhsa {
namespace selection_kernel {

// The boundary list lives in `boundaries` [capacity] with its length in *count.
// Sets *count = n; with `first_zero`, boundaries[0] = 0 (a fresh list {0}).
cudaError_t LaunchInitBoundaries(int32_t* boundaries, int32_t* count, int32_t n, bool first_zero,
                                 cudaStream_t stream);

// Gap dissimilarity of keys [begin, end) (spec Step 1): delta[t - begin - 1] for gaps
// t = begin + 1 .. end - 1, in fp64, and pos[i] = begin + 1 + i. k is [hkv, lk, dim], 16-byte
// aligned. Windows up to kMaxGapRegisterWindow keys take the windowed kernel (window sums in
// registers, formed once per position) unless `legacy`; wider ones (or `legacy`) the first
// kernel (each gap's sums from shared memory). Each kernel's delta is a function of the
// gap's window alone; the two add the features in different orders (equal to rounding).
// `warp_norms` (window 4 only; else ignored): the windowed kernel with each warp computing the
// inverse norms of its rows itself, the same deltas bit for bit.
inline constexpr int kMaxGapRegisterWindow = 8;
cudaError_t LaunchGapDissimilarity(DType dtype, const void* k, int64_t hkv, int64_t lk, int64_t dim,
                                   int32_t begin, int32_t end, int32_t window, double* delta,
                                   int32_t* pos, bool legacy, bool warp_norms, cudaStream_t stream);

// Temporary bytes of SortGaps for up to `n` gaps.
size_t SortGapsTempBytes(int64_t n);
// Sorts (delta, pos) by descending delta, stably (ties keep the lower position first).
cudaError_t SortGaps(void* temp, size_t temp_bytes, const double* delta, double* delta_sorted,
                     const int32_t* pos, int32_t* pos_sorted, int64_t n, cudaStream_t stream);

// Workspace of the parallel NMS: rank and state hold n_gaps entries, sorted_state n_gaps rounded
// up to a multiple of 16 (it is read 16 bytes a load; 16-byte aligned).
struct NmsWorkspace {
  int32_t* rank = nullptr;
  uint8_t* state = nullptr;
  uint8_t* sorted_state = nullptr;
  // Rounds of local decisions before the serial warp takes what is left (0: all of it; tests
  // use small counts to send most gaps to the serial warp).
  int32_t max_rounds = 64;
};
// The parallel NMS serves min_chunk 1 .. kMaxParallelNmsMinChunk (its work grows with min_chunk);
// wider ones take the serial warp alone.
inline constexpr int32_t kMaxParallelNmsMinChunk = 33;
bool NmsParallelSupported(int32_t min_chunk);

// Greedy NMS over the sorted gaps of [begin, end) then the split of chunks longer than max_chunk;
// appends the boundaries after `begin` (which must be the list's last) to the list. `scratch`
// holds wanted + 2 int32. Without `parallel` (or with a min_chunk it does not serve) one warp
// decides the gaps in priority order, 32 at a time; with it, rounds of local decisions over the
// whole segment (each gap's exact greedy decision: accepted iff eligible and every higher-priority
// gap within min_chunk - 1 is rejected), a count in priority order to stop at the wanted-th
// accepted gap, and the serial warp only from the first undecided gap before that stop. The same
// boundaries either way. The last kernel is one thread block with shared memory
// (end - begin) / 8 + 4 bytes.
cudaError_t LaunchNmsAndSplit(const int32_t* sorted_pos, int32_t n_gaps, int32_t begin, int32_t end,
                              int32_t min_chunk, int32_t max_chunk, int32_t wanted,
                              const NmsWorkspace* parallel, int32_t* scratch, int32_t* boundaries,
                              int32_t* count, cudaStream_t stream);
// Shared memory LaunchNmsAndSplit needs for a segment of `len` keys.
size_t NmsSharedBytes(int64_t len);

// `fixed` boundaries of [begin, end) (multiples of `chunk`, then end) appended to the list.
cudaError_t LaunchFixedBoundaries(int32_t begin, int32_t end, int32_t chunk, int32_t* boundaries,
                                  int32_t* count, cudaStream_t stream);

// kappa [hkv, chunk_cap, dim]: chunk j of the list summed over its keys (fp64), divided by
// sqrt(len) (sqrt_norm) or len, rounded to fp32. Chunks past the list's count are left alone.
cudaError_t LaunchChunkSummaries(DType dtype, const void* k, int64_t hkv, int64_t lk, int64_t dim,
                                 const int32_t* boundaries, const int32_t* count, int64_t chunk_cap,
                                 bool sqrt_norm, float* kappa, cudaStream_t stream);

// rho [hkv, num_blocks, dim]: query block first_block + i of the group of KV head h, summed over
// the group's heads and the block's rows (fp64), divided by group * sqrt(rows) or group * rows.
cudaError_t LaunchQueryBlockSummaries(DType dtype, const void* q, int64_t hq, int64_t hkv,
                                      int64_t lq, int64_t lk, int64_t dim, int64_t q_block,
                                      int64_t first_block, int64_t num_blocks, bool sqrt_norm,
                                      float* rho, cudaStream_t stream);

struct SelectParams {
  const int32_t* boundaries = nullptr;  // The chunk list, 0 .. lk.
  const int32_t* count = nullptr;       // Its length.
  const float* kappa = nullptr;         // [hkv, chunk_cap, dim]
  const float* rho = nullptr;           // [hkv, num_blocks, dim]
  // Scores computed beforehand (the mass score, LaunchMassScores): entry (h, block_begin + i) at
  // scores[(h * score_blocks + i) * chunk_cap + j] for its eligible chunks j. Null: the paper's
  // score rho . kappa, computed here.
  const float* scores = nullptr;
  int64_t score_blocks = 0;
  // Query blocks [block_begin, block_begin + blocks) (relative to first_block) of this launch.
  int64_t block_begin = 0;
  int64_t blocks = 0;
  int32_t hkv = 0;
  int32_t dim = 0;
  int64_t chunk_cap = 0;
  int64_t first_block = 0;
  int64_t num_blocks = 0;
  int64_t lk = 0;
  int64_t q_block = 0;
  int64_t budget = 0;
  int64_t sink = 0;
  int64_t local = 0;
  int32_t entries_per_block = 1;  // 1 .. kMaxEntriesPerBlock, query blocks per thread block.
  bool batched_scores = false;    // Two chunks a thread, 32 features of loads in flight.
  // With precomputed scores: read them (and the boundaries) from global memory instead of copies
  // in shared memory (more thread blocks an SM; SelectSharedBytes with global_scores).
  bool global_scores = false;
  // The cut's radix select stops at the first digit whose bin holds one ranked chunk (that chunk
  // is the cut; the same result).
  bool early_exit = false;
  // The cut's histograms take one atomic add per digit per warp (lanes with the same digit
  // summed first, __match_any_sync and __reduce_add_sync); the same histograms.
  bool aggregate = false;
  // The cut's histograms take one atomic add per bin a warp when all of a warp's chunks share the
  // bin (__reduce_add_sync; no __match_any_sync), else one per chunk; the same histograms.
  bool uniform_aggregate = false;
  // The thread blocks take the query blocks from the last (most eligible chunks) to the first: the
  // longest ones do not start last. The same results.
  bool heavy_first = false;
  // Diagnostic (benchmarks only): no cut; every scored entry keeps only its sink and local window.
  bool skip_cut = false;
  CudaSpan* spans = nullptr;  // [hkv * num_blocks, span_cap]
  int32_t* span_starts = nullptr;
  int32_t* counts = nullptr;  // [hkv * num_blocks]
  int64_t span_cap = 0;
};
inline constexpr int kMaxEntriesPerBlock = 4;

// The mass chunk score (ChunkScore::kMass, kernels/selection/reference.cc MassScoresReference)
// of the query blocks [block_begin, block_begin + blocks) (relative to first_block) of every KV
// head, written to `scores` as SelectParams::scores reads them. fp32: per thread block, the rows
// (one mean query per query head of the group and score_rows-row piece, or one mean query of the
// group for a block with fewer rows than a piece) of a few consecutive blocks of one KV head, in
// tiles of 64 rows; per tile the logits scale * q.k + log(len) against 64 chunks at a time (a
// register-tiled product in shared memory), a first sweep over the visible chunks for each row's
// maximum and exponential sum, a second that recomputes the logits and sums each block's shares
// per chunk.
struct MassParams {
  const int32_t* boundaries = nullptr;
  const int32_t* count = nullptr;
  const float* kappa = nullptr;  // [hkv, chunk_cap, dim]: chunk means.
  const float* rho = nullptr;    // [hq, pieces, dim]: piece means, pieces from t0 / score_rows.
  int32_t hkv = 0;
  int32_t group = 0;
  int32_t dim = 0;
  int64_t chunk_cap = 0;
  int64_t pieces = 0;
  int64_t first_block = 0;
  int64_t num_blocks = 0;
  int64_t lk = 0;
  int64_t t0 = 0;
  int64_t q_block = 0;
  int64_t score_rows = 0;
  int64_t budget = 0;
  float scale = 0;
  int64_t block_begin = 0;
  int64_t blocks = 0;
  float* scores = nullptr;  // As SelectParams::scores.
  int64_t score_blocks = 0;
  bool tensor_cores = false;  // The product in 3xTF32 on the tensor cores (else fp32 FMA).
  // The tiled kernel (3xTF32, 128 rows a thread block, sweep 1 in registers; head dims multiple
  // of 8 up to 128, MassTiledSupported); tensor_cores is then ignored.
  bool tiled = false;
  // Tiled kernel: operands split as x (truncated by the tensor cores) and x - trunc(x), not
  // round(x) and trunc(x - round(x)).
  bool short_split = false;
};
// Shared memory of LaunchMassScores at head dim `dim` (the first kernel's, or the tiled one's).
size_t MassSharedBytes(int64_t dim, bool tensor_cores);
bool MassTiledSupported(int64_t dim);
// Query blocks of one KV head a thread block of the tiled kernel scores.
int MassTiledBlocks(int64_t group, int64_t q_block, int64_t score_rows);
size_t MassTiledSharedBytes(int64_t dim);
cudaError_t LaunchMassScores(const MassParams& params, cudaStream_t stream);

// The paper's chunk scores (Step 3: rho . kappa, fp64 fused multiply-adds over the features in
// order, rounded to fp32, as SelectKernel computes them) of the query blocks [block_begin,
// block_begin + blocks) (relative to first_block) of every KV head, written where
// SelectParams::scores reads them: scores[(h * score_blocks + i - block_begin) * chunk_cap + j].
// Chunks a block does not score may be written too (never read). A register-tiled product.
struct PaperScoreParams {
  const int32_t* boundaries = nullptr;
  const int32_t* count = nullptr;
  const float* kappa = nullptr;  // [hkv, chunk_cap, dim]
  const float* rho = nullptr;    // [hkv, num_blocks, dim]
  int32_t hkv = 0;
  int32_t dim = 0;
  int64_t chunk_cap = 0;
  int64_t first_block = 0;
  int64_t num_blocks = 0;
  int64_t q_block = 0;
  int64_t block_begin = 0;
  int64_t blocks = 0;
  float* scores = nullptr;
  int64_t score_blocks = 0;
};
cudaError_t LaunchPaperScores(const PaperScoreParams& params, cudaStream_t stream);

// Shared memory of LaunchSelect for `entries` entries per block.
size_t SelectSharedBytes(int64_t chunk_cap, int64_t dim, int entries, bool global_scores = false);
// Scores (Step 3) and the selection under the budget (Step 4) of every (KV head, query block).
cudaError_t LaunchSelect(const SelectParams& params, cudaStream_t stream);

// Merge of `parts` partial results (arrays of device pointers, on the device).
cudaError_t LaunchMerge(const float* const* part_o, const float* const* part_lse, int32_t parts,
                        int64_t rows, int64_t dim, float* o, float* lse, int32_t* error,
                        cudaStream_t stream);

}  // namespace selection_kernel
}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SELECTION_CUDA_LAUNCH_H_
