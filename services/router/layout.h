// What the router knows about the keys of one layer of one sequence without holding them: chunk
// boundaries over [0, length), one summary kappa per (chunk, KV head), and the keys of the tail
// chunk only (the one chunk that later calls may re-segment or extend).
//
// Appending is two-phase so that a failed call stores nothing: `Propose` computes a LayoutDelta
// from the new keys without touching the layout, `SelectionView` shows the layout as it would be
// after the delta (what SelectSpansReference needs), and `Commit` applies it once the call has
// succeeded.
#ifndef DHSA_SERVICES_ROUTER_LAYOUT_H_
#define DHSA_SERVICES_ROUTER_LAYOUT_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/tensor.h"
#include "kernels/summaries/summaries.h"

namespace dhsa::router {

// The change one call makes to a LayerLayout.
struct LayoutDelta {
  int64_t old_length = 0;
  int64_t new_length = 0;
  // Chunks [0, kept_chunks) and boundaries [0, kept_chunks] are unchanged; `boundaries` holds the
  // ones after (each > boundaries[kept_chunks], the last = new_length) and `kappa` the summaries
  // of chunks kept_chunks.. as [chunk, kv_head, dim] fp32.
  int64_t kept_chunks = 0;
  std::vector<int64_t> boundaries;
  std::vector<float> kappa;
  // Keys [tail_begin, new_length) of the new tail chunk, [kv_heads, n, dim] in storage dtype.
  int64_t tail_begin = 0;
  Tensor tail_keys;
};

// Boundaries and summaries as SelectionInputs wants them (head-major kappa).
struct LayoutView {
  std::vector<int64_t> boundaries;
  Summaries kappa;
};

class LayerLayout {
 public:
  // `config` is the sequence's validated DhsaConfig.
  LayerLayout(const DhsaConfig& config, int64_t kv_heads, int64_t head_dim, DType dtype);

  // Tokens stored.
  int64_t length() const { return length_; }
  // Boundaries over [0, length()) ({0} when empty). dhsa: its chunks; block_topk: fixed blocks;
  // streaming and dense: {0, length()} (no chunks are needed).
  const std::vector<int64_t>& boundaries() const { return boundaries_; }
  // Positions of the kept tail keys: [tail_begin(), length()).
  int64_t tail_begin() const { return tail_begin_; }

  // The layout after appending `new_keys` [kv_heads, n, dim] (storage dtype) at positions
  // [length(), length() + n): a prefill (the new keys are segmented on their own) or, with
  // `decode`, keys that grow the tail chunk (spec/DHSA.md "Decode"). Computed by the fast CPU
  // kernels on `num_threads` threads (the same result as the references).
  absl::StatusOr<LayoutDelta> Propose(const Tensor& new_keys, bool decode,
                                      int num_threads = 1) const;

  // The delta of a first prefill (an empty dhsa or block_topk layout) whose boundaries over
  // [0, n) and head-major summaries [kv_heads, chunks, dim] were computed elsewhere (the router's
  // device selection, selection_device.h): the same delta as Propose(new_keys, false) when they
  // are the ones Propose would compute. FailedPrecondition for a layout that holds keys or keeps
  // no chunks; InvalidArgument for boundaries that do not run strictly up from 0 to n or a kappa
  // of the wrong shape.
  absl::StatusOr<LayoutDelta> ProposeComputed(const Tensor& new_keys,
                                              const std::vector<int64_t>& boundaries,
                                              const Summaries& kappa) const;

  // Boundaries and kappa over [0, delta.new_length) as they will be after `delta`.
  LayoutView SelectionView(const LayoutDelta& delta) const;

  // Applies a delta made by Propose on the current state.
  void Commit(LayoutDelta delta);

  // Whether this policy keeps chunks at all (dhsa, block_topk).
  bool chunked() const { return chunked_; }

 private:
  DhsaConfig config_;  // For block_topk: fixed boundaries of `block` keys.
  SummaryNorm norm_;   // ChunkSummaryNorm(config).
  bool chunked_;
  int64_t kv_heads_;
  int64_t head_dim_;
  DType dtype_;
  int64_t length_ = 0;
  std::vector<int64_t> boundaries_ = {0};
  std::vector<float> kappa_;  // [chunk, kv_head, dim].
  int64_t tail_begin_ = 0;
  Tensor tail_keys_;  // [kv_heads, length_ - tail_begin_, dim].
};

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_LAYOUT_H_
