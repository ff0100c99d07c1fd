// Structured synthetic long-context Q/K/V for fidelity benchmarks (spec/DHSA.md, "How fidelity is
// measured"): attention that is genuinely sparse and structured, unlike plain Gaussian noise.
//
// Model of one layer of one freshly prefilled sequence (Lq = Lk = len):
// - The tokens are cut into topic segments with log-normal lengths. Per KV head every segment has a
//   random unit topic direction u; its keys are `topic_strength*sqrt(dim)*u + noise*N(0, I)`.
// - The queries of a segment mix the topic directions of `retrieve` earlier segments (as a question
//   shares its passage) and of their own segment (`query_locality`), scaled so that, with softmax
//   scale 1/sqrt(dim), a targeted topic's keys get a logit of about `query_focus` times its mixing
//   weight while unrelated keys stay near 0. Mixing weights vary per KV head (log-normal, sigma
//   `head_spread`) and again per query head of a group (sigma head_spread/2), so per-head selection
//   matters; every query row adds its own Gaussian noise.
// - Key 0 is an attention sink: its own direction, which every query likes (logit ~sink_strength).
// - Needles: a run of 4 keys with a unique direction at a random depth, and a later run of 8 query
//   tokens aimed at it (logit ~needle_strength; those queries keep half their usual mix).
// - Values: N(0, I) plus `value_topic*sqrt(dim)` times the key's direction (topic, sink or needle),
//   so outputs differ when the selection differs.
// - Rotary embeddings (halves layout, base 10000, position = token index) are applied to the first
//   `rope_dims` dims of q and k after they are built, so the logits quoted above hold before RoPE.
//   Content directions (topic, sink, needle; all topic and needle directions are orthogonal to the
//   sink's) live in the non-RoPE dims and the lowest-frequency quarter of the RoPE pairs, as in
//   trained models, so RoPE changes long-range logits by a bounded part (~8% at dim 128) and
//   otherwise rotates noise.
// Deterministic for a seed: std::mt19937_64 streams and our own normal sampler (no std::
// distributions). Memory: the outputs plus O(len) (per-segment topic directions and bookkeeping).
#ifndef DHSA_BENCH_WORKLOAD_WORKLOAD_H_
#define DHSA_BENCH_WORKLOAD_WORKLOAD_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"

namespace dhsa {

struct WorkloadConfig {
  // Sequence length: Lk = Lq = len (prefill of a fresh sequence, t0 = 0).
  int64_t len = 32768;
  // Query heads (8), KV heads (2; hq % hkv == 0) and head dim (128; >= 2).
  int64_t hq = 8;
  int64_t hkv = 2;
  int64_t dim = 128;
  // Seed of every random stream (1).
  uint64_t seed = 1;
  // Topic segment lengths are log-normal with this mean in tokens (48) and this sigma of the log
  // (0.6); at least 1 token, the last one cut at len.
  double segment_mean = 48;
  double segment_sigma = 0.6;
  // Key = topic_strength*sqrt(dim) * (unit topic direction) + noise * N(0, I) per element: the
  // topic part (1.0) against per-element Gaussian noise (0.5) sets how clear segment boundaries
  // are.
  double topic_strength = 1.0;
  double noise = 0.5;
  // The queries of a segment attend to this many distinct earlier segments (3; fewer when there are
  // fewer earlier segments), chosen uniformly among all earlier ones.
  int retrieve = 3;
  // Pre-RoPE scaled logit (q.k/sqrt(dim)) that a query gives to keys of a topic it fully targets
  // (14); it is split over the query's topics by their mixing weights (L2-normalised).
  double query_focus = 14.0;
  // Share (of the squared mixing weights) of the query's own segment topic (0.25); the rest goes to
  // its retrieved segments.
  double query_locality = 0.25;
  // Sigma of the log mixing weights of retrieved topics across KV heads (1.0); the query heads of a
  // group add half of it on top, so heads look at the same segments with different emphasis.
  double head_spread = 1.0;
  // Per-element standard deviation of each query row's Gaussian noise (0.5).
  double query_noise = 0.5;
  // Pre-RoPE scaled logit every query gives to the sink key 0 (11: about 5-10% of each row's
  // weight).
  double sink_strength = 11.0;
  // Rotary embedding on the first rope_dims dims of q and k (32; even, <= dim; 0 disables), halves
  // layout: pairs (i, i + rope_dims/2), angle position * rope_base^(-2i/rope_dims).
  int64_t rope_dims = 32;
  double rope_base = 10000.0;
  // Number of needles (8): each is a run of 4 keys with a unique direction at a uniformly random
  // depth and a later run of 8 query tokens that asks for it; runs of different needles never
  // overlap and never touch key 0.
  int needles = 8;
  // Pre-RoPE scaled logit a needle's query run gives to its keys (14).
  double needle_strength = 14.0;
  // Values: N(0, I) + value_topic*sqrt(dim) * the key's direction (0.5).
  double value_topic = 0.5;
  // Storage type of q, k and v (float32). bfloat16 can be generated but not written to .npy.
  DType dtype = DType::kF32;
};

// Needle runs: 4 keys and 8 queries.
inline constexpr int64_t kNeedleKeys = 4;
inline constexpr int64_t kNeedleQueries = 8;

// Topic segment: token positions [begin, end).
struct Segment {
  int64_t begin = 0;
  int64_t end = 0;
};

// Planted needle: keys [key_begin, key_end) and the queries [query_begin, query_end) that ask for
// them; key_end <= query_begin.
struct Needle {
  int64_t key_begin = 0;
  int64_t key_end = 0;
  int64_t query_begin = 0;
  int64_t query_end = 0;
};

struct Workload {
  WorkloadConfig config;
  Tensor q;                       // [hq, len, dim], config.dtype, RoPE applied.
  Tensor k;                       // [hkv, len, dim], config.dtype, RoPE applied.
  Tensor v;                       // [hkv, len, dim], config.dtype.
  std::vector<Segment> segments;  // In order, covering [0, len).
  std::vector<Needle> needles;    // Sorted by key_begin.
  // Per segment: ascending indices of the earlier segments its queries look at.
  std::vector<std::vector<int>> retrieved;
};

// OK, or InvalidArgument naming the offending field.
absl::Status ValidateWorkloadConfig(const WorkloadConfig& config);

// Validates `config` and builds the workload.
absl::StatusOr<Workload> GenerateWorkload(const WorkloadConfig& config);

// JSON object {"config": {...}, "shapes": {...}, "segments": [[b, e], ...], "needles":
// [{"key_begin", "key_end", "query_begin", "query_end"}, ...], "retrieved": [[...], ...]}.
std::string WorkloadMetaJson(const Workload& w);

// Creates `dir` (and parents) and writes q.npy, k.npy, v.npy and meta.json into it, each
// atomically. bfloat16 workloads -> InvalidArgument (npy has no bfloat16), nothing written.
absl::Status WriteWorkload(const Workload& w, const std::string& dir);

}  // namespace dhsa

#endif  // DHSA_BENCH_WORKLOAD_WORKLOAD_H_
