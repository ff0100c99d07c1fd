// Steps 1-4 of spec/DHSA.md on the device: chunk boundaries, chunk and query-block summaries,
// chunk scores and the top-chunk selection under the token budget, for the policy `dhsa`. Every
// step runs on the GPU, enqueued on one stream with no host round trip: sizes that depend on the
// data (how many chunks) stay on the device, and the host sizes the workspace from bounds.
//
// The function is the reference's (kernels/{boundaries,summaries,selection}/reference.cc), not an
// approximation of it:
// - gap dissimilarities in fp64 (each gap computed from its own window only, so equal windows give
//   equal values and ties break as the reference's stable sort does: lower position first);
// - greedy NMS in priority order (radix-sorted gaps; each gap's greedy decision found by parallel
//   rounds of local decisions, the stop at the wanted-th accepted gap by a count in priority order,
//   and one warp deciding in order whatever the rounds left undecided before that stop);
// - summaries summed in fp64 and rounded once to fp32, as the reference;
// - the paper's scores rho . kappa as fp64 sums in the reference's order (multiply and add rounded
//   separately, no fused multiply-add), rounded to fp32;
// - the mass score (ChunkScore::kMass, docs/fidelity.md) in fp32, as the CPU backend computes it:
//   piece means per query head (fp64 sums, as the reference), logits against the chunk means,
//   per-piece softmax, shares summed per chunk (selection_mass.cu);
// - the budget cut as an exact weighted radix select on (score, chunk index) keys.
// So with the paper's score the selection equals the reference's, bar scores that round
// differently in the last fp32 bit (in practice: never on the tests' inputs;
// tests/gpu/selection_cuda_test.cc checks as sets and explains any difference by a near-tie); with
// the mass score it equals it up to chunks whose scores tie with the cut within
// kMassScoreTolerance (tests/gpu/selection_mass_cuda_test.cc).
//
// What it does not implement it declines (DeviceSelectionSupported): other policies, shared_heads,
// decode (the tail chunk's growth), float32 storage, and sizes past its shared-memory plans.
#ifndef DHSA_KERNELS_CUDA_SELECTION_CUDA_H_
#define DHSA_KERNELS_CUDA_SELECTION_CUDA_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/dtype.h"
#include "kernels/common/inputs.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/sparse_attention_cuda.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"

namespace dhsa {

// OK when the device pipeline computes `config`'s selection for `shape` in `dtype`; Unimplemented
// naming what it lacks otherwise (the CPU backends compute every config). `decode` is the
// AttendOptions flag.
absl::Status DeviceSelectionSupported(const DhsaConfig& config, const AttentionShape& shape,
                                      DType dtype, bool decode = false);

// Events Run records on its stream after Step 1 (boundaries) and after Step 2 (summaries), for
// benchmarks that time the steps apart; within Step 1, after the last segment's gap
// dissimilarities and after its sort (dynamic boundaries only; the NMS and split follow).
struct SelectionStageEvents {
  cudaEvent_t boundaries_done = nullptr;
  cudaEvent_t summaries_done = nullptr;
  cudaEvent_t kappa_done = nullptr;  // After the chunk summaries (before the query-block ones).
  cudaEvent_t gaps_done = nullptr;
  cudaEvent_t sort_done = nullptr;
};

class DeviceDhsaSelection {
 public:
  DeviceDhsaSelection() = default;
  DeviceDhsaSelection(DeviceDhsaSelection&&) = default;
  DeviceDhsaSelection& operator=(DeviceDhsaSelection&&) = default;

  // Checks DeviceSelectionSupported and allocates the workspace for calls of `shape`. With
  // `prior_chunks` > 0 the calls pass that many prior chunks (boundaries of keys [0, t0)).
  static absl::StatusOr<DeviceDhsaSelection> Create(const DhsaConfig& config,
                                                    const AttentionShape& shape, DType dtype,
                                                    int64_t prior_chunks = 0);

  // Enqueues Steps 1-4 on `stream`. q [hq, lq, d] (positions t0 = lk - lq ..) and k [hkv, lk, d]
  // are device tensors in the dtype of Create. `prior_boundaries` (0 .. t0, prior_chunks + 1
  // entries) are the stored keys' boundaries, as AttendOptions::prior_boundaries; null segments
  // [0, t0) and [t0, lk) on their own, as the reference does.
  absl::Status Run(const void* q, const void* k, cudaStream_t stream,
                   const std::vector<int64_t>* prior_boundaries = nullptr,
                   const SelectionStageEvents* events = nullptr);

  // With `legacy`, Run computes the gap dissimilarities with the first gap kernel (each gap's
  // window sums read from shared memory) instead of the windowed one (deltas equal to rounding),
  // for benchmarks and tests that compare the two.
  void set_legacy_gap_kernel(bool legacy) { legacy_gaps_ = legacy; }
  // With `warp_norms` (boundary window 4; other windows ignore it), the windowed gap kernel's
  // warps compute the inverse norms of their own rows (no block-wide norm phase): the same deltas.
  // On by default (H200, 128K, budget 4096: gaps 0.496 -> 0.383 ms, every selection test bit-equal;
  // bench/results/2026-11-28-h200-selection-variants.md).
  void set_gap_warp_norms(bool warp_norms) { gap_warp_norms_ = warp_norms; }

  // With `parallel` (min_chunk up to kernel::kMaxParallelNmsMinChunk), the boundary NMS decides
  // the gaps in parallel rounds and leaves the serial warp only what they leave undecided before
  // the stop; without, one warp decides every gap in priority order. The same boundaries. On by
  // default. `max_rounds` (tests) bounds the rounds (0: the serial warp decides everything).
  void set_parallel_nms(bool parallel, int32_t max_rounds = 64) {
    parallel_nms_ = parallel;
    nms_max_rounds_ = max_rounds;
  }

  // With `overlap`, Run computes the query-block summaries (rho: a read of all of q, which does
  // not depend on the boundaries) on a second stream of its own, forked from the caller's stream
  // after the last gap kernel is enqueued and joined back by events, so that they run beside the
  // rest of Step 1 and the chunk summaries; the results are the same. On by default (H200, 128K,
  // budget 4096: whole selection 2.527 -> 2.398 ms by the events;
  // bench/results/2026-11-29-h200-selection-nms.md).
  void set_overlap_query_summaries(bool overlap) { overlap_rho_ = overlap; }

  // With `batched`, the scores (Step 3) are computed two chunks a thread with 32 features of kappa
  // loaded before they are used (more loads in flight); the same sums in the same order. On by
  // default (H200, 128K, budget 4096: choose 1.541 -> 1.278 ms, same results).
  void set_batched_scores(bool batched) { batched_scores_ = batched; }

  // With `tiled` (the paper's score), the scores (Step 3) are computed first, for a wave of query
  // blocks at a time, by a register-tiled fp64 product (each chunk's features read once per tile
  // of 128 query blocks, not once per thread block of 4), then the cut reads them (shared-memory
  // copies, or in place with `global`); without, SelectKernel computes each thread block's scores
  // itself. The same fused multiply-add chains: the same scores and selection. Tiled, read in
  // place, by default: H200, 128K, budget 4096, choose (Steps 3-4) 1.115 ms in the cut kernel,
  // 0.989 tiled with shared-memory copies, 0.815 tiled in place (64K: 0.386 / 0.306 / 0.284; 8K:
  // 0.032 / 0.064 / 0.065); bench/results/2026-11-29-h200-selection-nms.md, call 3, whose main
  // table ran the shared-memory copies (the default then).
  void set_paper_tiled_scores(bool tiled, bool global = true) {
    paper_tiled_scores_ = tiled;
    paper_global_scores_ = global;
  }
  // With `only`, Run with the mass score stops after the scores (no selection is written), for
  // benchmarks that time the scores apart from the cut.
  void set_mass_scores_only(bool only) { mass_scores_only_ = only; }
  // With `tensor`, the mass score's products run on the tensor cores in 3xTF32 (about fp32's
  // accuracy; selection_mass.cu) instead of fp32 fused multiply-adds (head dims up to 128; larger
  // ones keep the fused multiply-adds). On by default (H200, 128K, budget 4096: mass scores 67.9
  // -> 63.5 ms, every mass selection test passing with each; bench/results/
  // 2026-11-28-h200-mass-selection.md).
  void set_mass_tensor_cores(bool tensor) { mass_tensor_cores_ = tensor; }
  // With `tiled` (and the tensor cores on), the mass scores take the tiled kernel (128 rows a
  // thread block, 32 x 32 warp tiles, sweep 1 in registers; selection_mass.cu; head dims multiple
  // of 8 up to 128, others keep the first kernel). On by default (bench/results/
  // 2026-11-28-h200-mass-selection.md).
  void set_mass_tiled(bool tiled) { mass_tiled_ = tiled; }
  // With `short_split` the tiled kernel splits each operand x into x itself (the tensor cores read
  // its top 19 bits: x truncated to TF32) and x - trunc(x) (2 instructions, not 4; the products'
  // error about 2^-20 relative instead of 2^-22). Off by default: every mass test passes with it
  // (H200), but its speed is not measured yet.
  void set_mass_short_split(bool short_split) { mass_short_split_ = short_split; }
  // With `global`, the cut reads the mass scores and the boundaries from global memory instead of
  // shared-memory copies (many more thread blocks an SM). On by default.
  void set_select_global_scores(bool global) { select_global_scores_ = global; }
  // With `early`, the cut's radix select stops at the first digit that leaves one ranked chunk
  // (the same selection). On by default.
  void set_select_early_exit(bool early) { select_early_exit_ = early; }
  // With `aggregate`, the cut's histogram adds are summed per warp and digit first (fewer atomics
  // on the same bin; the same histograms). Off by default: slower on an H200 (128K/4096: cut
  // about 10.7 -> 15.9 ms; bench/results/2026-11-28-h200-mass-selection.md).
  void set_select_aggregate(bool aggregate) { select_aggregate_ = aggregate; }
  // With `uniform`, the cut's histogram adds are summed per warp when a warp's chunks all fall in
  // one bin (one atomic; else one a chunk): the same histograms, without __match_any_sync. Off by
  // default: no gain measured (H200, 128K, budget 4096, paper score: choose 1.250 -> 1.242 ms).
  void set_select_uniform_aggregate(bool uniform) { select_uniform_aggregate_ = uniform; }
  // With `heavy_first`, the selection's thread blocks take the query blocks last to first (the
  // ones with the most eligible chunks start first). The same results. On by default (H200,
  // 128K, budget 4096: choose 1.250 -> 1.117 ms; bench/results/2026-11-29-h200-selection-nms.md).
  void set_select_heavy_first(bool heavy_first) { select_heavy_first_ = heavy_first; }
  // Diagnostic for benchmarks: with `skip`, Steps 3-4 compute the scores but make no cut (every
  // entry keeps its sink and local window only: not the selection), to time the scores apart.
  void set_select_skip_cut(bool skip) { select_skip_cut_ = skip; }
  // Mass score: query blocks per wave (scores of a wave are written, then its selection), at most
  // what Create sized the scores buffer for (256 MiB of scores); tests use small waves.
  void set_mass_wave_blocks(int64_t blocks) {
    score_blocks_ = std::max<int64_t>(1, std::min(blocks, score_capacity_));
  }

  // Points the attention's selection fields at the result (valid until the next Run).
  absl::Status Attach(SparseAttentionCudaParams* params) const;

  // Synchronous downloads of the last Run's results (they synchronise the device).
  absl::StatusOr<std::vector<int64_t>> Boundaries() const;
  absl::StatusOr<Summaries> Kappa() const;
  absl::StatusOr<Summaries> Rho() const;
  // ToSelection packs the entries' spans on the device (a strided copy of each entry's first
  // max-count spans, not span_cap), downloads them into a pinned buffer kept for the next call,
  // and unpacks each entry into a vector of exactly its size (over `ranges`' threads when given);
  // `times` (optional) gets the two parts. Not thread-safe (the packing buffers are the object's).
  // ToSelectionReference is the first version (every entry at span_cap stride into pageable
  // memory), kept for the tests that compare the two bit for bit.
  struct SelectionTimes {
    double download_seconds = 0;  // Counts, packing and the download.
    double unpack_seconds = 0;    // Into the Selection's vectors.
  };
  // Runs body(begin, end) over ranges covering [0, n), on the caller's threads.
  using RangeRunner =
      std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)>;
  absl::StatusOr<Selection> ToSelection(SelectionTimes* times = nullptr,
                                        const RangeRunner* ranges = nullptr) const;
  absl::StatusOr<Selection> ToSelectionReference() const;

  // Fills every result buffer with 0xFF bytes (NaN summaries, -1 counts and positions): tests
  // poison before Run so that anything Run does not write shows.
  absl::Status Poison();

  size_t workspace_bytes() const { return workspace_bytes_; }
  int64_t chunk_capacity() const { return chunk_cap_; }

 private:
  DhsaConfig config_;
  AttentionShape shape_;
  DType dtype_ = DType::kBF16;
  int64_t prior_chunks_ = 0;
  int64_t chunk_cap_ = 0;      // Upper bound of the chunk count.
  int64_t gap_cap_ = 0;        // Most gaps in one segment.
  int64_t span_cap_ = 0;       // Spans per selection entry.
  int64_t first_block_ = 0;    // t0 / q_block.
  int64_t num_blocks_ = 0;     // Query blocks.
  int entries_per_block_ = 1;  // Selection entries one thread block handles.
  size_t sort_bytes_ = 0;
  bool legacy_gaps_ = false;
  bool gap_warp_norms_ = true;
  bool parallel_nms_ = true;
  int32_t nms_max_rounds_ = 64;
  bool overlap_rho_ = true;
  bool batched_scores_ = true;
  bool paper_tiled_scores_ = true;
  bool paper_global_scores_ = true;
  bool mass_scores_only_ = false;
  bool mass_tensor_cores_ = true;
  bool mass_tiled_ = true;
  bool mass_short_split_ = false;
  bool select_global_scores_ = true;
  bool select_early_exit_ = true;
  bool select_aggregate_ = false;
  bool select_uniform_aggregate_ = false;
  bool select_heavy_first_ = true;
  bool select_skip_cut_ = false;
  int64_t pieces_ = 0;          // Mass score: score_rows-row pieces of the queries.
  int64_t score_blocks_ = 0;    // Mass score: query blocks a wave scores.
  int64_t score_capacity_ = 0;  // Mass score: query blocks the scores buffer holds.
  struct StreamDeleter {
    void operator()(cudaStream_t s) const;
  };
  struct EventDeleter {
    void operator()(cudaEvent_t e) const;
  };
  std::unique_ptr<CUstream_st, StreamDeleter> aux_stream_;  // Created on first overlapped Run.
  std::unique_ptr<CUevent_st, EventDeleter> fork_, join_;
  size_t workspace_bytes_ = 0;
  DeviceBuffer boundaries_;  // int32 [chunk_cap + 1], then int32 count (number of boundaries).
  DeviceBuffer delta_, delta_sorted_, gap_pos_, gap_pos_sorted_, nms_, sort_temp_;
  DeviceBuffer nms_rank_, nms_state_, nms_sorted_state_;  // The parallel NMS's workspace.
  DeviceBuffer kappa_;                                    // float [hkv, chunk_cap, d]
  DeviceBuffer rho_;     // float [hkv, num_blocks, d]; mass: [hq, pieces, d]
  DeviceBuffer scores_;  // float [hkv, score_blocks, chunk_cap]: a wave's scores
  DeviceBuffer spans_;   // CudaSpan [hkv * num_blocks, span_cap]
  DeviceBuffer starts_;  // int32, same shape: packed offset of each span within its entry
  DeviceBuffer counts_;  // int32 [hkv * num_blocks]: spans per entry
  std::vector<int32_t> prior_host_;
  // ToSelection's packed spans on the device and their pinned host copy (grown as needed).
  struct PinnedDeleter {
    void operator()(void* p) const;
  };
  mutable DeviceBuffer packed_;
  mutable std::unique_ptr<void, PinnedDeleter> packed_host_;
  mutable size_t packed_host_bytes_ = 0;
};

// The LSE merge (spec "Partial results and the merge") on the device: parts' o [rows, dim] and
// lse [rows] and the outputs are device pointers. Enqueued on `stream`, then synchronised to report
// a +inf or NaN partial lse as InvalidArgument (as MergePartialsReference does).
absl::Status MergePartialsCuda(const std::vector<const float*>& part_o,
                               const std::vector<const float*>& part_lse, int64_t rows, int64_t dim,
                               float* o, float* lse, cudaStream_t stream);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_SELECTION_CUDA_H_
