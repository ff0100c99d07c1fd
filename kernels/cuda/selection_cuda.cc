#include "kernels/cuda/selection_cuda.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/selection_cuda_launch.h"

namespace dhsa {
namespace {

namespace kernel = selection_kernel;

// Dynamic shared memory one block may take (an H100/H200 block gets up to 227 KB; some is left
// for the kernels' static shared memory).
constexpr size_t kSharedLimit = 200 * 1024;
constexpr int kGapTile = 32;  // selection_boundaries.cu's gaps per block.

struct Segment {
  int64_t begin;
  int64_t end;
};

// The key ranges the call segments on their own (spec Step 1: appended keys never move old
// boundaries).
std::vector<Segment> Segments(const AttentionShape& shape, bool have_prior) {
  const int64_t t0 = shape.t0();
  if (have_prior || t0 == 0) return {{t0, shape.lk}};
  return {{0, t0}, {t0, shape.lk}};
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Most chunks one segment of `n` keys can give: ceil(n / mean) NMS chunks (at most
// ceil(n / mean) - 1 gaps), each split into at most len / max + 1 parts; fixed: n / chunk + 2.
int64_t ChunkBound(int64_t n, const DhsaConfig& c) {
  return CeilDiv(n, c.chunk_mean) + CeilDiv(n, c.chunk_max) + 2;
}

size_t GapSharedBytes(const DhsaConfig& c, int64_t dim) {
  return sizeof(double) * static_cast<size_t>((kGapTile + 2 * c.boundary_window) * dim);
}

int64_t ChunkCapacity(const DhsaConfig& c, const AttentionShape& shape, int64_t prior_chunks) {
  int64_t cap = prior_chunks + 1;
  for (const Segment& s : Segments(shape, prior_chunks > 0)) cap += ChunkBound(s.end - s.begin, c);
  return cap;
}

// Selection entries (spans) one entry may need. Output spans are the sink, the local window and
// maximal runs of taken chunk parts. A run that holds a whole chunk of at least `shortest` keys,
// neither the cut one nor one the sink or the local window cut short, spends that many of the
// budget: at most budget / shortest such runs. Every other run holds one of the cut chunk, the two
// cut short, or a chunk shorter than `shortest`. Within a segment of this call's keys, NMS keeps
// boundaries chunk_min apart and from the segment's ends, and splits cut a chunk longer than
// chunk_max into parts of at least chunk_max / 2 keys, so only a segment shorter than chunk_min is
// shorter (fixed chunks: the first and last of a segment); prior chunks may be any length. Also
// at most every other eligible chunk starts a run, and a run has at least one key.
int64_t SpanCapacity(const DhsaConfig& c, const AttentionShape& shape, int64_t prior_chunks,
                     int64_t chunk_cap) {
  const int64_t segments = static_cast<int64_t>(Segments(shape, prior_chunks > 0).size());
  const bool fixed = c.boundary_mode == BoundaryMode::kFixed;
  const int64_t shortest =
      fixed ? c.chunk_mean : std::max<int64_t>(1, std::min(c.chunk_min, c.chunk_max / 2));
  const int64_t short_chunks = prior_chunks + (fixed ? 2 : 1) * segments;
  const int64_t by_length = 2 + 3 + short_chunks + c.budget / shortest;
  return std::max<int64_t>(1, std::min({c.budget, (chunk_cap + 4) / 2 + 2, by_length}));
}

// Bytes of mass scores one wave of query blocks may hold (the mass kernel writes a wave's scores,
// the selection reads them; waves follow each other on the stream).
constexpr size_t kMassScoreBytes = size_t{256} << 20;

bool MassScore(const DhsaConfig& c) {
  return c.policy == Policy::kDhsa && c.chunk_score == ChunkScore::kMass;
}

int EntriesPerBlock(int64_t chunk_cap, int64_t dim) {
  for (int e = kernel::kMaxEntriesPerBlock; e >= 1; --e) {
    if (kernel::SelectSharedBytes(chunk_cap, dim, e) <= kSharedLimit) return e;
  }
  return 0;
}

absl::Status Supported(const DhsaConfig& config, const AttentionShape& shape, DType dtype,
                       bool decode, int64_t prior_chunks) {
  DHSA_RETURN_IF_ERROR(ValidateConfig(config));
  if (config.policy != Policy::kDhsa) {
    return absl::UnimplementedError(
        absl::StrCat("the device selection implements the policy dhsa; ", PolicyName(config.policy),
                     " selects on the CPU backends"));
  }
  if (config.shared_heads) {
    return absl::UnimplementedError(
        "the device selection selects per KV head; shared_heads selects on the CPU backends");
  }
  if (decode) {
    return absl::UnimplementedError(
        "the device selection serves prefill (fresh or chunked); decode selects on the CPU "
        "backends");
  }
  if (dtype != DType::kBF16 && dtype != DType::kF16) {
    return absl::UnimplementedError(absl::StrCat(
        "the device selection reads bfloat16 or float16 tensors; got ", DTypeName(dtype)));
  }
  if (shape.dim % 8 != 0 || shape.dim > 256 || 256 % (shape.dim / 8) != 0) {
    return absl::UnimplementedError(absl::StrCat(
        "the device selection has head dims 8, 16, 32, 64, 128 and 256; got ", shape.dim));
  }
  if (shape.hq <= 0 || shape.hkv <= 0 || shape.hq % shape.hkv != 0 || shape.lq < 1 ||
      shape.lq > shape.lk) {
    return absl::InvalidArgumentError(absl::StrCat("bad shape: hq ", shape.hq, ", hkv ", shape.hkv,
                                                   ", lq ", shape.lq, ", lk ", shape.lk));
  }
  if (shape.lk >= std::numeric_limits<int32_t>::max() / 2 || shape.hkv > 65535) {
    return absl::UnimplementedError(
        "the device selection takes fewer than 2^30 keys and at most 65535 KV heads");
  }
  if (MassScore(config) && kernel::MassSharedBytes(shape.dim, false) > kSharedLimit) {
    return absl::UnimplementedError(
        absl::StrCat("the device mass score takes head dims up to 256; got ", shape.dim));
  }
  if (GapSharedBytes(config, shape.dim) > kSharedLimit) {
    return absl::UnimplementedError(
        absl::StrCat("boundary window ", config.boundary_window,
                     " is too wide for the device selection at d = ", shape.dim));
  }
  for (const Segment& s : Segments(shape, prior_chunks > 0)) {
    if (config.boundary_mode == BoundaryMode::kDynamic &&
        kernel::NmsSharedBytes(s.end - s.begin) > kSharedLimit) {
      return absl::UnimplementedError(
          absl::StrCat("the device selection segments at most ", kSharedLimit * 8 - 64,
                       " keys at once; this call has ", s.end - s.begin));
    }
  }
  const int64_t cap = ChunkCapacity(config, shape, prior_chunks);
  if (cap >= (int64_t{1} << 24) || EntriesPerBlock(cap, shape.dim) == 0) {
    return absl::UnimplementedError(absl::StrCat("up to ", cap,
                                                 " chunks do not fit the device selection's "
                                                 "shared memory; use a CPU backend"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status DeviceSelectionSupported(const DhsaConfig& config, const AttentionShape& shape,
                                      DType dtype, bool decode) {
  return Supported(config, shape, dtype, decode, 0);
}

absl::StatusOr<DeviceDhsaSelection> DeviceDhsaSelection::Create(const DhsaConfig& config,
                                                                const AttentionShape& shape,
                                                                DType dtype, int64_t prior_chunks) {
  DHSA_RETURN_IF_ERROR(Supported(config, shape, dtype, false, prior_chunks));
  DeviceDhsaSelection s;
  s.config_ = config;
  s.shape_ = shape;
  s.dtype_ = dtype;
  s.prior_chunks_ = prior_chunks;
  s.chunk_cap_ = ChunkCapacity(config, shape, prior_chunks);
  for (const Segment& seg : Segments(shape, prior_chunks > 0)) {
    s.gap_cap_ = std::max(s.gap_cap_, seg.end - seg.begin - 1);
  }
  s.first_block_ = shape.t0() / config.q_block;
  s.num_blocks_ = (shape.lk - 1) / config.q_block - s.first_block_ + 1;
  s.span_cap_ = SpanCapacity(config, shape, prior_chunks, s.chunk_cap_);
  // Scores of a wave of query blocks (the mass score; the paper score's tiled product).
  const size_t per_block = sizeof(float) * static_cast<size_t>(shape.hkv * s.chunk_cap_);
  s.score_blocks_ = std::max<int64_t>(
      1, std::min<int64_t>(s.num_blocks_, static_cast<int64_t>(kMassScoreBytes / per_block)));
  s.score_capacity_ = s.score_blocks_;
  if (MassScore(config)) {
    s.pieces_ = (shape.lk - 1) / config.score_rows - shape.t0() / config.score_rows + 1;
    // A wave of whole rounds of the tiled kernel (two thread blocks an SM, each
    // MassTiledBlocks query blocks of one KV head): the last round of a wave is not left part
    // idle before the wave's cut.
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) == cudaSuccess &&
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        sms > 0) {
      const int64_t unit = std::max<int64_t>(
          1, 2 * sms * kernel::MassTiledBlocks(shape.group(), config.q_block, config.score_rows) /
                 shape.hkv);
      if (s.score_blocks_ > unit && s.score_blocks_ < s.num_blocks_) {
        s.score_blocks_ = s.score_blocks_ / unit * unit;
      }
    }
  }
  s.entries_per_block_ = EntriesPerBlock(s.chunk_cap_, shape.dim);
  s.sort_bytes_ = kernel::SortGapsTempBytes(std::max<int64_t>(1, s.gap_cap_));

  const int64_t gaps = std::max<int64_t>(1, s.gap_cap_);
  const int64_t entries = shape.hkv * s.num_blocks_;
  auto allocate = [&](DeviceBuffer* buffer, size_t bytes) -> absl::Status {
    DHSA_ASSIGN_OR_RETURN(*buffer, DeviceBuffer::Allocate(bytes));
    s.workspace_bytes_ += bytes;
    return absl::OkStatus();
  };
  DHSA_RETURN_IF_ERROR(allocate(&s.boundaries_, sizeof(int32_t) * (s.chunk_cap_ + 2)));
  DHSA_RETURN_IF_ERROR(allocate(&s.delta_, sizeof(double) * gaps));
  DHSA_RETURN_IF_ERROR(allocate(&s.delta_sorted_, sizeof(double) * gaps));
  DHSA_RETURN_IF_ERROR(allocate(&s.gap_pos_, sizeof(int32_t) * gaps));
  DHSA_RETURN_IF_ERROR(allocate(&s.gap_pos_sorted_, sizeof(int32_t) * gaps));
  DHSA_RETURN_IF_ERROR(allocate(&s.nms_, sizeof(int32_t) * (s.chunk_cap_ + 2)));
  DHSA_RETURN_IF_ERROR(allocate(&s.nms_rank_, sizeof(int32_t) * gaps));
  DHSA_RETURN_IF_ERROR(allocate(&s.nms_state_, static_cast<size_t>(gaps)));
  DHSA_RETURN_IF_ERROR(allocate(&s.nms_sorted_state_, static_cast<size_t>(CeilDiv(gaps, 16) * 16)));
  DHSA_RETURN_IF_ERROR(allocate(&s.sort_temp_, std::max<size_t>(16, s.sort_bytes_)));
  DHSA_RETURN_IF_ERROR(allocate(&s.kappa_, sizeof(float) * shape.hkv * s.chunk_cap_ * shape.dim));
  DHSA_RETURN_IF_ERROR(allocate(
      &s.rho_, sizeof(float) * (MassScore(config) ? shape.hq * s.pieces_ : entries) * shape.dim));
  DHSA_RETURN_IF_ERROR(
      allocate(&s.scores_,
               sizeof(float) * static_cast<size_t>(shape.hkv * s.score_capacity_ * s.chunk_cap_)));
  DHSA_RETURN_IF_ERROR(allocate(&s.spans_, sizeof(CudaSpan) * entries * s.span_cap_));
  DHSA_RETURN_IF_ERROR(allocate(&s.starts_, sizeof(int32_t) * entries * s.span_cap_));
  DHSA_RETURN_IF_ERROR(allocate(&s.counts_, sizeof(int32_t) * entries));
  return s;
}

void DeviceDhsaSelection::StreamDeleter::operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
void DeviceDhsaSelection::EventDeleter::operator()(cudaEvent_t e) const { cudaEventDestroy(e); }

absl::Status DeviceDhsaSelection::Run(const void* q, const void* k, cudaStream_t stream,
                                      const std::vector<int64_t>* prior_boundaries,
                                      const SelectionStageEvents* events) {
  if (boundaries_.data() == nullptr) {
    return absl::FailedPreconditionError("device selection used before Create");
  }
  if (q == nullptr || k == nullptr) return absl::InvalidArgumentError("null q or k");
  const int64_t t0 = shape_.t0();
  int32_t* list = boundaries_.as<int32_t>();
  int32_t* count = list + chunk_cap_ + 1;
  const bool have_prior = prior_chunks_ > 0;
  if (have_prior != (prior_boundaries != nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the selection was created for ", prior_chunks_, " prior chunks; Run got ",
                     prior_boundaries == nullptr ? std::string("none")
                                                 : absl::StrCat(prior_boundaries->size() - 1)));
  }
  if (have_prior) {
    const std::vector<int64_t>& prior = *prior_boundaries;
    if (static_cast<int64_t>(prior.size()) != prior_chunks_ + 1 || prior.front() != 0 ||
        prior.back() != t0 || !std::is_sorted(prior.begin(), prior.end()) ||
        std::adjacent_find(prior.begin(), prior.end()) != prior.end()) {
      return absl::InvalidArgumentError(absl::StrCat("prior boundaries must be ", prior_chunks_ + 1,
                                                     " positions rising from 0 to t0 = ", t0));
    }
    prior_host_.assign(prior.begin(), prior.end());
    DHSA_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(list, prior_host_.data(), sizeof(int32_t) * prior_host_.size(),
                                   cudaMemcpyHostToDevice, stream),
                   "prior boundaries upload"));
    DHSA_RETURN_IF_ERROR(
        CudaStatus(kernel::LaunchInitBoundaries(
                       list, count, static_cast<int32_t>(prior_host_.size()), false, stream),
                   "boundary list"));
  } else {
    DHSA_RETURN_IF_ERROR(
        CudaStatus(kernel::LaunchInitBoundaries(list, count, 1, true, stream), "boundary list"));
  }

  const DhsaConfig& c = config_;
  const bool mass = MassScore(c);
  const bool sqrt_norm = ChunkSummaryNorm(c) == SummaryNorm::kSqrt;
  auto query_summaries = [&](cudaStream_t on) {
    if (mass) {
      // Piece means per query head (ScoreQuerySummariesReference): one "KV head" per query head.
      return CudaStatus(
          kernel::LaunchQueryBlockSummaries(dtype_, q, shape_.hq, shape_.hq, shape_.lq, shape_.lk,
                                            shape_.dim, c.score_rows, shape_.t0() / c.score_rows,
                                            pieces_, false, rho_.as<float>(), on),
          "query piece summaries");
    }
    return CudaStatus(kernel::LaunchQueryBlockSummaries(
                          dtype_, q, shape_.hq, shape_.hkv, shape_.lq, shape_.lk, shape_.dim,
                          c.q_block, first_block_, num_blocks_, sqrt_norm, rho_.as<float>(), on),
                      "query block summaries");
  };
  // The query summaries on the second stream (overlap_rho_): it waits for what the caller's stream
  // holds before Step 1, and the summaries are enqueued on it after the last segment's gap kernel,
  // so that the gap kernel's thread blocks are dispatched first and the summaries fill the SMs
  // beside it, as it drains, and during the sort and the NMS.
  if (overlap_rho_) {
    if (aux_stream_ == nullptr) {
      cudaStream_t aux = nullptr;
      cudaEvent_t fork = nullptr, join = nullptr;
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&aux, cudaStreamNonBlocking),
                                      "selection's second stream"));
      aux_stream_.reset(aux);
      DHSA_RETURN_IF_ERROR(
          CudaStatus(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "event"));
      fork_.reset(fork);
      DHSA_RETURN_IF_ERROR(
          CudaStatus(cudaEventCreateWithFlags(&join, cudaEventDisableTiming), "event"));
      join_.reset(join);
    }
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(fork_.get(), stream), "fork"));
    DHSA_RETURN_IF_ERROR(
        CudaStatus(cudaStreamWaitEvent(aux_stream_.get(), fork_.get(), 0), "fork wait"));
  }
  bool forked = false;
  auto fork_rho = [&]() -> absl::Status {
    if (!overlap_rho_ || forked) return absl::OkStatus();
    forked = true;
    DHSA_RETURN_IF_ERROR(query_summaries(aux_stream_.get()));
    return CudaStatus(cudaEventRecord(join_.get(), aux_stream_.get()), "join");
  };
  for (const Segment& seg : Segments(shape_, have_prior)) {
    const int32_t begin = static_cast<int32_t>(seg.begin), end = static_cast<int32_t>(seg.end);
    if (c.boundary_mode == BoundaryMode::kFixed) {
      DHSA_RETURN_IF_ERROR(
          CudaStatus(kernel::LaunchFixedBoundaries(begin, end, static_cast<int32_t>(c.chunk_mean),
                                                   list, count, stream),
                     "fixed boundaries"));
      continue;
    }
    const int64_t n = seg.end - seg.begin, gaps = n - 1;
    DHSA_RETURN_IF_ERROR(CudaStatus(
        kernel::LaunchGapDissimilarity(dtype_, k, shape_.hkv, shape_.lk, shape_.dim, begin, end,
                                       static_cast<int32_t>(c.boundary_window), delta_.as<double>(),
                                       gap_pos_.as<int32_t>(), legacy_gaps_, gap_warp_norms_,
                                       stream),
        "gap dissimilarity"));
    if (seg.end == shape_.lk) DHSA_RETURN_IF_ERROR(fork_rho());
    if (events != nullptr && events->gaps_done != nullptr) {
      DHSA_RETURN_IF_ERROR(
          CudaStatus(cudaEventRecord(events->gaps_done, stream), "cudaEventRecord"));
    }
    DHSA_RETURN_IF_ERROR(
        CudaStatus(kernel::SortGaps(sort_temp_.data(), sort_bytes_, delta_.as<double>(),
                                    delta_sorted_.as<double>(), gap_pos_.as<int32_t>(),
                                    gap_pos_sorted_.as<int32_t>(), gaps, stream),
                   "gap sort"));
    if (events != nullptr && events->sort_done != nullptr) {
      DHSA_RETURN_IF_ERROR(
          CudaStatus(cudaEventRecord(events->sort_done, stream), "cudaEventRecord"));
    }
    const int64_t wanted = CeilDiv(n, c.chunk_mean) - 1;
    kernel::NmsWorkspace parallel;
    parallel.rank = nms_rank_.as<int32_t>();
    parallel.state = nms_state_.as<uint8_t>();
    parallel.sorted_state = nms_sorted_state_.as<uint8_t>();
    parallel.max_rounds = nms_max_rounds_;
    DHSA_RETURN_IF_ERROR(CudaStatus(
        kernel::LaunchNmsAndSplit(
            gap_pos_sorted_.as<int32_t>(), static_cast<int32_t>(std::max<int64_t>(0, gaps)), begin,
            end, static_cast<int32_t>(c.chunk_min), static_cast<int32_t>(c.chunk_max),
            static_cast<int32_t>(wanted), parallel_nms_ ? &parallel : nullptr, nms_.as<int32_t>(),
            list, count, stream),
        "boundary NMS"));
  }

  DHSA_RETURN_IF_ERROR(fork_rho());  // Fixed boundaries: no gap kernel.
  if (events != nullptr && events->boundaries_done != nullptr) {
    DHSA_RETURN_IF_ERROR(
        CudaStatus(cudaEventRecord(events->boundaries_done, stream), "cudaEventRecord"));
  }
  DHSA_RETURN_IF_ERROR(CudaStatus(
      kernel::LaunchChunkSummaries(dtype_, k, shape_.hkv, shape_.lk, shape_.dim, list, count,
                                   chunk_cap_, sqrt_norm, kappa_.as<float>(), stream),
      "chunk summaries"));
  if (events != nullptr && events->kappa_done != nullptr) {
    DHSA_RETURN_IF_ERROR(
        CudaStatus(cudaEventRecord(events->kappa_done, stream), "cudaEventRecord"));
  }
  if (overlap_rho_) {
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(stream, join_.get(), 0), "join wait"));
  } else {
    DHSA_RETURN_IF_ERROR(query_summaries(stream));
  }

  if (events != nullptr && events->summaries_done != nullptr) {
    DHSA_RETURN_IF_ERROR(
        CudaStatus(cudaEventRecord(events->summaries_done, stream), "cudaEventRecord"));
  }
  kernel::SelectParams p;
  p.boundaries = list;
  p.count = count;
  p.kappa = kappa_.as<float>();
  p.rho = rho_.as<float>();
  p.hkv = static_cast<int32_t>(shape_.hkv);
  p.dim = static_cast<int32_t>(shape_.dim);
  p.chunk_cap = chunk_cap_;
  p.first_block = first_block_;
  p.num_blocks = num_blocks_;
  p.lk = shape_.lk;
  p.q_block = c.q_block;
  p.budget = c.budget;
  p.sink = c.sink;
  p.local = c.local;
  p.entries_per_block = entries_per_block_;
  p.batched_scores = batched_scores_;
  p.early_exit = select_early_exit_;
  p.aggregate = select_aggregate_;
  p.uniform_aggregate = select_uniform_aggregate_;
  p.heavy_first = select_heavy_first_;
  p.skip_cut = select_skip_cut_;
  p.spans = spans_.as<CudaSpan>();
  p.span_starts = starts_.as<int32_t>();
  p.counts = counts_.as<int32_t>();
  p.span_cap = span_cap_;
  if (!mass && !paper_tiled_scores_) {
    p.block_begin = 0;
    p.blocks = num_blocks_;
    return CudaStatus(kernel::LaunchSelect(p, stream), "chunk selection");
  }
  if (!mass) {
    // Wave after wave of query blocks: their scores by the tiled product, then their selection.
    kernel::PaperScoreParams ps;
    ps.boundaries = list;
    ps.count = count;
    ps.kappa = kappa_.as<float>();
    ps.rho = rho_.as<float>();
    ps.hkv = static_cast<int32_t>(shape_.hkv);
    ps.dim = static_cast<int32_t>(shape_.dim);
    ps.chunk_cap = chunk_cap_;
    ps.first_block = first_block_;
    ps.num_blocks = num_blocks_;
    ps.q_block = c.q_block;
    ps.scores = scores_.as<float>();
    ps.score_blocks = score_blocks_;
    p.scores = scores_.as<float>();
    p.score_blocks = score_blocks_;
    p.global_scores = paper_global_scores_;
    if (p.global_scores) p.entries_per_block = kernel::kMaxEntriesPerBlock;
    for (int64_t begin = 0; begin < num_blocks_; begin += score_blocks_) {
      ps.block_begin = p.block_begin = begin;
      ps.blocks = p.blocks = std::min(score_blocks_, num_blocks_ - begin);
      DHSA_RETURN_IF_ERROR(CudaStatus(kernel::LaunchPaperScores(ps, stream), "chunk scores"));
      DHSA_RETURN_IF_ERROR(CudaStatus(kernel::LaunchSelect(p, stream), "chunk selection"));
    }
    return absl::OkStatus();
  }
  kernel::MassParams m;
  m.boundaries = list;
  m.count = count;
  m.kappa = kappa_.as<float>();
  m.rho = rho_.as<float>();
  m.hkv = static_cast<int32_t>(shape_.hkv);
  m.group = static_cast<int32_t>(shape_.group());
  m.dim = static_cast<int32_t>(shape_.dim);
  m.chunk_cap = chunk_cap_;
  m.pieces = pieces_;
  m.first_block = first_block_;
  m.num_blocks = num_blocks_;
  m.lk = shape_.lk;
  m.t0 = shape_.t0();
  m.q_block = c.q_block;
  m.score_rows = c.score_rows;
  m.budget = c.budget;
  m.scale = EffectiveScale(c, shape_.dim);
  m.scores = scores_.as<float>();
  m.score_blocks = score_blocks_;
  // The tensor-core product keeps the chunk means' remainders too: head dims up to 128 fit.
  m.tensor_cores = mass_tensor_cores_ && kernel::MassSharedBytes(shape_.dim, true) <= kSharedLimit;
  m.tiled = m.tensor_cores && mass_tiled_ && kernel::MassTiledSupported(shape_.dim) &&
            kernel::MassTiledSharedBytes(shape_.dim) <= kSharedLimit;
  m.short_split = mass_short_split_;
  p.scores = scores_.as<float>();
  p.score_blocks = score_blocks_;
  p.global_scores = select_global_scores_;
  if (p.global_scores) p.entries_per_block = kernel::kMaxEntriesPerBlock;
  // Wave after wave of query blocks: their mass scores, then their selection.
  for (int64_t begin = 0; begin < num_blocks_; begin += score_blocks_) {
    m.block_begin = p.block_begin = begin;
    m.blocks = p.blocks = std::min(score_blocks_, num_blocks_ - begin);
    DHSA_RETURN_IF_ERROR(CudaStatus(kernel::LaunchMassScores(m, stream), "mass chunk scores"));
    if (mass_scores_only_) continue;
    DHSA_RETURN_IF_ERROR(CudaStatus(kernel::LaunchSelect(p, stream), "chunk selection"));
  }
  return absl::OkStatus();
}

absl::Status DeviceDhsaSelection::Poison() {
  for (DeviceBuffer* b : {&boundaries_, &kappa_, &rho_, &spans_, &starts_, &counts_, &scores_}) {
    if (b->data() != nullptr) DHSA_RETURN_IF_ERROR(b->Fill(0xFF));
  }
  return absl::OkStatus();
}

absl::Status DeviceDhsaSelection::Attach(SparseAttentionCudaParams* params) const {
  if (params->hkv != shape_.hkv) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection has ", shape_.hkv, " KV heads; the call has ", params->hkv));
  }
  params->block_size = config_.q_block;
  params->first_block = first_block_;
  params->num_blocks = num_blocks_;
  params->entry_offsets = nullptr;
  params->entry_counts = counts_.as<int32_t>();
  params->span_stride = span_cap_;
  params->spans = spans_.as<CudaSpan>();
  params->span_starts = starts_.as<int32_t>();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> DeviceDhsaSelection::Boundaries() const {
  std::vector<int32_t> list(static_cast<size_t>(chunk_cap_ + 2));
  DHSA_RETURN_IF_ERROR(boundaries_.CopyToHost(list.data(), list.size() * sizeof(int32_t)));
  const int32_t count = list.back();
  if (count < 2 || count > chunk_cap_ + 1) {
    return absl::InternalError(absl::StrCat("device boundary list has ", count, " entries"));
  }
  return std::vector<int64_t>(list.begin(), list.begin() + count);
}

absl::StatusOr<Summaries> DeviceDhsaSelection::Kappa() const {
  DHSA_ASSIGN_OR_RETURN(std::vector<int64_t> b, Boundaries());
  Summaries s;
  s.heads = shape_.hkv;
  s.count = static_cast<int64_t>(b.size()) - 1;
  s.dim = shape_.dim;
  s.data.resize(static_cast<size_t>(s.heads * s.count * s.dim));
  // Each head's first `count` chunks only (a row of the copy per head), not chunk_cap of them.
  const size_t row = sizeof(float) * static_cast<size_t>(s.count * s.dim);
  if (row > 0) {
    DHSA_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpy2D(s.data.data(), row, kappa_.data(), sizeof(float) * chunk_cap_ * s.dim, row,
                     static_cast<size_t>(s.heads), cudaMemcpyDeviceToHost),
        "kappa download"));
  }
  return s;
}

absl::StatusOr<Summaries> DeviceDhsaSelection::Rho() const {
  Summaries s;
  const bool mass = MassScore(config_);
  s.heads = mass ? shape_.hq : shape_.hkv;
  s.count = mass ? pieces_ : num_blocks_;
  s.dim = shape_.dim;
  s.data.resize(static_cast<size_t>(s.heads * s.count * s.dim));
  DHSA_RETURN_IF_ERROR(rho_.CopyToHost(s.data.data(), s.data.size() * sizeof(float)));
  return s;
}

void DeviceDhsaSelection::PinnedDeleter::operator()(void* p) const { cudaFreeHost(p); }

absl::StatusOr<Selection> DeviceDhsaSelection::ToSelection(SelectionTimes* times,
                                                           const RangeRunner* ranges) const {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const int64_t entries = shape_.hkv * num_blocks_;
  std::vector<int32_t> counts(static_cast<size_t>(entries));
  DHSA_RETURN_IF_ERROR(counts_.CopyToHost(counts.data(), counts.size() * sizeof(int32_t)));
  int32_t widest = 0;
  for (int64_t e = 0; e < entries; ++e) {
    const int32_t n = counts[static_cast<size_t>(e)];
    if (n < 0 || n > span_cap_) {
      return absl::InternalError(absl::StrCat("device selection entry ", e, " has ", n, " spans"));
    }
    widest = std::max(widest, n);
  }
  // Each entry's first `widest` spans, packed on the device (rows of widest, not span_cap, spans),
  // then one download into pinned memory.
  const size_t row = sizeof(CudaSpan) * static_cast<size_t>(widest);
  const size_t bytes = row * static_cast<size_t>(entries);
  const CudaSpan* packed = nullptr;
  if (bytes > 0) {
    if (packed_.size() < bytes) {
      packed_ = DeviceBuffer();
      DHSA_ASSIGN_OR_RETURN(packed_, DeviceBuffer::Allocate(bytes));
    }
    if (packed_host_bytes_ < bytes) {
      packed_host_.reset();
      packed_host_bytes_ = 0;
      void* host = nullptr;
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaMallocHost(&host, bytes), "pinned selection buffer"));
      packed_host_.reset(host);
      packed_host_bytes_ = bytes;
    }
    DHSA_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpy2D(packed_.data(), row, spans_.data(), sizeof(CudaSpan) * span_cap_,
                                row, static_cast<size_t>(entries), cudaMemcpyDeviceToDevice),
                   "packing the selection"));
    DHSA_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpy(packed_host_.get(), packed_.data(), bytes, cudaMemcpyDeviceToHost),
                   "selection download"));
    packed = static_cast<const CudaSpan*>(packed_host_.get());
  }
  const auto downloaded = Clock::now();
  Selection sel;
  sel.unit = SelectionUnit::kKvHeadBlock;
  sel.block_size = config_.q_block;
  sel.first_block = first_block_;
  sel.num_blocks = num_blocks_;
  sel.num_heads = shape_.hkv;
  sel.group = shape_.group();
  sel.spans.resize(static_cast<size_t>(entries));
  auto unpack = [&](int64_t from, int64_t to) {
    for (int64_t e = from; e < to; ++e) {
      const int32_t n = counts[static_cast<size_t>(e)];
      std::vector<Span>& out = sel.spans[static_cast<size_t>(e)];
      out.reserve(static_cast<size_t>(n));
      const CudaSpan* in = packed + static_cast<size_t>(e) * static_cast<size_t>(widest);
      for (int32_t i = 0; i < n; ++i) out.push_back({in[i].begin, in[i].end});
    }
  };
  if (ranges != nullptr && *ranges) {
    (*ranges)(entries, unpack);
  } else {
    unpack(0, entries);
  }
  if (times != nullptr) {
    times->download_seconds = std::chrono::duration<double>(downloaded - start).count();
    times->unpack_seconds = std::chrono::duration<double>(Clock::now() - downloaded).count();
  }
  return sel;
}

absl::StatusOr<Selection> DeviceDhsaSelection::ToSelectionReference() const {
  const int64_t entries = shape_.hkv * num_blocks_;
  std::vector<int32_t> counts(static_cast<size_t>(entries));
  std::vector<CudaSpan> spans(static_cast<size_t>(entries * span_cap_));
  DHSA_RETURN_IF_ERROR(counts_.CopyToHost(counts.data(), counts.size() * sizeof(int32_t)));
  DHSA_RETURN_IF_ERROR(spans_.CopyToHost(spans.data(), spans.size() * sizeof(CudaSpan)));
  Selection sel;
  sel.unit = SelectionUnit::kKvHeadBlock;
  sel.block_size = config_.q_block;
  sel.first_block = first_block_;
  sel.num_blocks = num_blocks_;
  sel.num_heads = shape_.hkv;
  sel.group = shape_.group();
  sel.spans.resize(static_cast<size_t>(entries));
  for (int64_t e = 0; e < entries; ++e) {
    const int32_t n = counts[static_cast<size_t>(e)];
    if (n < 0 || n > span_cap_) {
      return absl::InternalError(absl::StrCat("device selection entry ", e, " has ", n, " spans"));
    }
    for (int32_t i = 0; i < n; ++i) {
      const CudaSpan& s = spans[static_cast<size_t>(e * span_cap_ + i)];
      sel.spans[static_cast<size_t>(e)].push_back({s.begin, s.end});
    }
  }
  return sel;
}

absl::Status MergePartialsCuda(const std::vector<const float*>& part_o,
                               const std::vector<const float*>& part_lse, int64_t rows, int64_t dim,
                               float* o, float* lse, cudaStream_t stream) {
  if (part_o.size() != part_lse.size() || part_o.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("merge needs as many o as lse partials (",
                                                   part_o.size(), " vs ", part_lse.size(),
                                                   "), at least one"));
  }
  if (rows < 0 || dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("merge of ", rows, " rows of dim ", dim));
  }
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer o_ptrs,
                        DeviceBuffer::FromHost(part_o.data(), part_o.size() * sizeof(float*)));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer lse_ptrs,
                        DeviceBuffer::FromHost(part_lse.data(), part_lse.size() * sizeof(float*)));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer error, DeviceBuffer::Allocate(sizeof(int32_t)));
  DHSA_RETURN_IF_ERROR(error.Fill(0));
  DHSA_RETURN_IF_ERROR(CudaStatus(
      kernel::LaunchMerge(o_ptrs.as<const float* const>(), lse_ptrs.as<const float* const>(),
                          static_cast<int32_t>(part_o.size()), rows, dim, o, lse,
                          error.as<int32_t>(), stream),
      "merge launch"));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "merge"));
  int32_t flag = 0;
  DHSA_RETURN_IF_ERROR(error.CopyToHost(&flag, sizeof(flag)));
  if (flag != 0) {
    return absl::InvalidArgumentError(
        "a partial lse is +inf or NaN; expected finite or -inf (spec: treat it as an error)");
  }
  return absl::OkStatus();
}

}  // namespace dhsa
