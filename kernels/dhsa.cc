#include "kernels/dhsa.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/boundaries.h"
#include "kernels/cpu/inputs.h"
#include "kernels/cpu/selection.h"
#include "kernels/cpu/sparse_attention.h"
#include "kernels/cpu/summaries.h"

namespace dhsa {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Tensor::Zeros, asking Linux for transparent huge pages first when the tensor is large: zeroing
// fresh 4 KB pages one fault at a time can cost more than the attention that fills them (about
// 1.2 s for the 256 MB output at 64K tokens on a VM measured, 0.04 s with 2 MB pages).
Tensor LargeZeros(std::vector<int64_t> shape) {
  Tensor t;
  t.dtype = DType::kF32;
  t.shape = std::move(shape);
  const size_t bytes = static_cast<size_t>(t.NumElements()) * sizeof(float);
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  t.bytes.reserve(bytes);  // Allocated, not yet touched.
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.bytes.data());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  t.bytes.resize(bytes);
  return t;
}

// The step functions of one backend.
struct Steps {
  bool cpu = false;
  int threads = 1;

  absl::StatusOr<std::vector<int64_t>> Segment(const HeadsView& k, int64_t begin, int64_t end,
                                               const DhsaConfig& c) const {
    return cpu ? SegmentKeysCpu(k, begin, end, c, threads) : SegmentKeysReference(k, begin, end, c);
  }
  absl::StatusOr<std::vector<int64_t>> AppendPrefill(const HeadsView& k,
                                                     const std::vector<int64_t>& old, int64_t end,
                                                     const DhsaConfig& c) const {
    return cpu ? AppendPrefillBoundariesCpu(k, old, end, c, threads)
               : AppendPrefillBoundariesReference(k, old, end, c);
  }
  absl::StatusOr<std::vector<int64_t>> AppendDecode(const HeadsView& k,
                                                    const std::vector<int64_t>& old, int64_t end,
                                                    const DhsaConfig& c) const {
    return cpu ? AppendDecodeBoundariesCpu(k, old, end, c, threads)
               : AppendDecodeBoundariesReference(k, old, end, c);
  }
  Summaries Chunks(const HeadsView& k, const std::vector<int64_t>& b, SummaryNorm norm) const {
    return cpu ? ChunkSummariesCpu(k, b, norm, threads) : ChunkSummariesReference(k, b, norm);
  }
  Summaries Queries(const HeadsView& q, int64_t kv_heads, const DhsaConfig& c) const {
    return cpu ? ScoreQuerySummariesCpu(q, kv_heads, c, threads)
               : ScoreQuerySummariesReference(q, kv_heads, c);
  }
};

absl::Status CheckPrior(const AttendOptions& options, const AttentionShape& shape) {
  if (options.prior_boundaries != nullptr) {
    const std::vector<int64_t>& prior = *options.prior_boundaries;
    if (prior.empty() || prior.front() != 0 || prior.back() != shape.t0() ||
        !std::is_sorted(prior.begin(), prior.end()) ||
        std::adjacent_find(prior.begin(), prior.end()) != prior.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("prior boundaries must rise strictly from 0 to t0 = ", shape.t0(),
                       " (the keys stored before)"));
    }
  }
  if (options.prior_kappa != nullptr) {
    const Summaries& kappa = *options.prior_kappa;
    if (options.prior_boundaries == nullptr) {
      return absl::InvalidArgumentError("prior kappa needs the prior boundaries it summarises");
    }
    const int64_t chunks = static_cast<int64_t>(options.prior_boundaries->size()) - 1;
    if (kappa.heads != shape.hkv || kappa.dim != shape.dim || kappa.count != chunks ||
        kappa.data.size() != static_cast<size_t>(kappa.heads * kappa.count * kappa.dim)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prior kappa must hold [Hkv = ", shape.hkv, ", chunks = ", chunks, ", d = ", shape.dim,
          "] summaries; got [", kappa.heads, ", ", kappa.count, ", ", kappa.dim, "]"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> DhsaBoundaries(const Steps& steps, const HeadsView& k,
                                                    int64_t t0, const DhsaConfig& config,
                                                    const AttendOptions& options) {
  std::vector<int64_t> prior = {0};
  if (options.prior_boundaries != nullptr) {
    prior = *options.prior_boundaries;
  } else if (t0 > 0) {
    DHSA_ASSIGN_OR_RETURN(prior, steps.Segment(k, 0, t0, config));
  }
  if (options.decode) return steps.AppendDecode(k, prior, k.len, config);
  return steps.AppendPrefill(k, prior, k.len, config);
}

}  // namespace

absl::string_view BackendName(Backend backend) {
  return backend == Backend::kCpu ? "cpu" : "reference";
}

absl::StatusOr<Backend> ParseBackend(absl::string_view name) {
  if (name == "cpu") return Backend::kCpu;
  if (name == "reference") return Backend::kReference;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", name, "'; expected cpu or reference"));
}

absl::StatusOr<AttendResult> Attend(const Tensor& q_tensor, const Tensor& k_tensor,
                                    const Tensor& v_tensor, const DhsaConfig& config,
                                    const AttendOptions& options) {
  DHSA_RETURN_IF_ERROR(ValidateConfig(config));
  DHSA_ASSIGN_OR_RETURN(HeadsView q, HeadsView::Of(q_tensor, "Q"));
  DHSA_ASSIGN_OR_RETURN(HeadsView k, HeadsView::Of(k_tensor, "K"));
  DHSA_ASSIGN_OR_RETURN(HeadsView v, HeadsView::Of(v_tensor, "V"));
  DHSA_ASSIGN_OR_RETURN(AttentionShape shape, CheckShapes(q, k, v));
  DHSA_RETURN_IF_ERROR(CheckPrior(options, shape));
  Steps steps;
  steps.cpu = options.backend == Backend::kCpu;
  steps.threads = std::max(1, options.num_threads);
  if (options.check_finite) {
    const int64_t first_new = options.prior_boundaries != nullptr ? shape.t0() : 0;
    DHSA_RETURN_IF_ERROR(CheckFiniteCpu(q, "Q", steps.threads));
    DHSA_RETURN_IF_ERROR(CheckFiniteCpu(k, "K", steps.threads, first_new));
    DHSA_RETURN_IF_ERROR(CheckFiniteCpu(v, "V", steps.threads, first_new));
  }
  q.offset = shape.t0();

  AttendResult result;
  auto start = std::chrono::steady_clock::now();
  Summaries rho;
  SelectionInputs in;
  in.shape = shape;
  in.boundaries = &result.boundaries;
  in.kappa = &result.kappa;
  in.rho = &rho;
  switch (config.policy) {
    case Policy::kDhsa: {
      DHSA_ASSIGN_OR_RETURN(result.boundaries,
                            DhsaBoundaries(steps, k, shape.t0(), config, options));
      result.times.boundaries = SecondsSince(start);
      start = std::chrono::steady_clock::now();
      const SummaryNorm norm = ChunkSummaryNorm(config);
      if (steps.cpu && options.prior_kappa != nullptr) {
        result.kappa =
            UpdateChunkSummariesCpu(k, result.boundaries, norm, *options.prior_boundaries,
                                    *options.prior_kappa, steps.threads);
      } else {
        result.kappa = steps.Chunks(k, result.boundaries, norm);
      }
      rho = steps.Queries(q, shape.hkv, config);
      result.times.summaries = SecondsSince(start);
      break;
    }
    case Policy::kBlockTopk: {
      DhsaConfig blocks = config;
      blocks.boundary_mode = BoundaryMode::kFixed;
      blocks.chunk_mean = config.block;
      DHSA_ASSIGN_OR_RETURN(result.boundaries, steps.Segment(k, 0, shape.lk, blocks));
      result.times.boundaries = SecondsSince(start);
      start = std::chrono::steady_clock::now();
      result.kappa = steps.Chunks(k, result.boundaries, SummaryNorm::kMean);
      rho = steps.Queries(q, shape.hkv, config);
      result.times.summaries = SecondsSince(start);
      break;
    }
    default:
      result.boundaries = {0, shape.lk};
      break;
  }

  start = std::chrono::steady_clock::now();
  if (config.policy == Policy::kOracleTopk) {
    // Evaluation only, O(Lq * Lk) by definition: both backends use the reference.
    DHSA_ASSIGN_OR_RETURN(result.selection, SelectOracleTopkReference(q, k, config));
  } else if (steps.cpu) {
    DHSA_ASSIGN_OR_RETURN(result.selection, SelectSpansCpu(in, config, steps.threads));
  } else {
    DHSA_ASSIGN_OR_RETURN(result.selection, SelectSpansReference(in, config));
  }
  result.times.selection = SecondsSince(start);

  result.o = LargeZeros({shape.hq, shape.lq, shape.dim});
  result.lse = Tensor::Zeros(DType::kF32, {shape.hq, shape.lq});
  start = std::chrono::steady_clock::now();
  SparseAttentionParams params;
  params.q = q;
  params.k = k;
  params.v = v;
  params.selection = &result.selection;
  params.scale = EffectiveScale(config, shape.dim);
  params.o = {static_cast<float*>(result.o.data()), shape.hq, shape.lq, shape.dim};
  params.lse = {static_cast<float*>(result.lse.data()), shape.hq, shape.lq, 1};
  params.num_threads = steps.threads;
  DHSA_RETURN_IF_ERROR(steps.cpu ? SparseAttentionCpu(params) : SparseAttentionReference(params));
  result.times.attention = SecondsSince(start);

  result.computed_pairs = steps.cpu ? CountComputedPairsCpu(result.selection, shape)
                                    : CountComputedPairs(result.selection, shape);
  // Dense: sum over rows p in [t0, lk) of (p + 1), for each query head.
  result.causal_pairs =
      shape.hq * (shape.lk * (shape.lk + 1) / 2 - shape.t0() * (shape.t0() + 1) / 2);
  return result;
}

absl::StatusOr<AttendResult> AttendReference(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const DhsaConfig& config,
                                             const AttendOptions& options) {
  AttendOptions reference = options;
  reference.backend = Backend::kReference;
  return Attend(q, k, v, config, reference);
}

}  // namespace dhsa
