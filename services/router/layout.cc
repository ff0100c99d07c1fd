#include "services/router/layout.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/boundaries.h"
#include "kernels/cpu/summaries.h"

namespace dhsa::router {
namespace {

// Rows [begin, end) of the middle axis of a [heads, len, dim] tensor.
Tensor SliceRows(const Tensor& t, int64_t begin, int64_t end) {
  const int64_t heads = t.shape[0], len = t.shape[1], dim = t.shape[2];
  const size_t row_bytes = static_cast<size_t>(dim) * DTypeSize(t.dtype);
  Tensor out = Tensor::Zeros(t.dtype, {heads, end - begin, dim});
  for (int64_t h = 0; h < heads; ++h) {
    std::memcpy(out.bytes.data() + static_cast<size_t>(h * (end - begin)) * row_bytes,
                t.bytes.data() + static_cast<size_t>(h * len + begin) * row_bytes,
                static_cast<size_t>(end - begin) * row_bytes);
  }
  return out;
}

// `a` then `b` along the middle axis; `a` may be empty (no shape).
Tensor ConcatRows(const Tensor& a, const Tensor& b) {
  if (a.shape.empty() || a.shape[1] == 0) return b;
  const int64_t heads = b.shape[0], la = a.shape[1], lb = b.shape[1], dim = b.shape[2];
  const size_t row_bytes = static_cast<size_t>(dim) * DTypeSize(b.dtype);
  Tensor out = Tensor::Zeros(b.dtype, {heads, la + lb, dim});
  for (int64_t h = 0; h < heads; ++h) {
    uint8_t* dst = out.bytes.data() + static_cast<size_t>(h * (la + lb)) * row_bytes;
    std::memcpy(dst, a.bytes.data() + static_cast<size_t>(h * la) * row_bytes,
                static_cast<size_t>(la) * row_bytes);
    std::memcpy(dst + static_cast<size_t>(la) * row_bytes,
                b.bytes.data() + static_cast<size_t>(h * lb) * row_bytes,
                static_cast<size_t>(lb) * row_bytes);
  }
  return out;
}

}  // namespace

LayerLayout::LayerLayout(const DhsaConfig& config, int64_t kv_heads, int64_t head_dim, DType dtype)
    : config_(config),
      norm_(ChunkSummaryNorm(config)),
      chunked_(config.policy == Policy::kDhsa || config.policy == Policy::kBlockTopk),
      kv_heads_(kv_heads),
      head_dim_(head_dim),
      dtype_(dtype) {
  if (config.policy == Policy::kBlockTopk) {
    // Key blocks are `fixed` chunks of `block` keys, aligned to absolute positions.
    config_.boundary_mode = BoundaryMode::kFixed;
    config_.chunk_mean = config.block;
  }
}

absl::StatusOr<LayoutDelta> LayerLayout::Propose(const Tensor& new_keys, bool decode,
                                                 int num_threads) const {
  if (new_keys.shape.size() != 3 || new_keys.shape[0] != kv_heads_ || new_keys.shape[1] < 1 ||
      new_keys.shape[2] != head_dim_ || new_keys.dtype != dtype_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "new keys must be ", DTypeName(dtype_), " [", kv_heads_, ", n >= 1, ", head_dim_, "]; got ",
        DTypeName(new_keys.dtype), " ", ShapeString(new_keys.shape)));
  }
  if (decode && length_ == 0) {
    return absl::FailedPreconditionError("decode needs a prefilled layer");
  }
  LayoutDelta delta;
  delta.old_length = length_;
  delta.new_length = length_ + new_keys.shape[1];
  if (!chunked_) {
    delta.kept_chunks = 0;
    delta.boundaries = {delta.new_length};
    delta.tail_begin = delta.new_length;
    return delta;
  }

  // Keys [tail_begin_, new_length): every key a boundary or a changed summary can depend on.
  const Tensor keys = ConcatRows(tail_keys_, new_keys);
  DHSA_ASSIGN_OR_RETURN(HeadsView view, HeadsView::Of(keys, "K"));
  view.offset = tail_begin_;

  std::vector<int64_t> boundaries;
  if (config_.policy == Policy::kBlockTopk) {
    // Fixed blocks: the last (possibly partial) block is re-opened and cut again.
    boundaries.assign(boundaries_.begin(), boundaries_.end() - (boundaries_.size() > 1 ? 1 : 0));
    const int64_t open = boundaries.back();
    boundaries.pop_back();
    DHSA_ASSIGN_OR_RETURN(std::vector<int64_t> blocks,
                          SegmentKeysCpu(view, open, delta.new_length, config_, num_threads));
    boundaries.insert(boundaries.end(), blocks.begin(), blocks.end());
  } else if (decode) {
    DHSA_ASSIGN_OR_RETURN(boundaries, AppendDecodeBoundariesCpu(view, boundaries_, delta.new_length,
                                                                config_, num_threads));
  } else {
    DHSA_ASSIGN_OR_RETURN(
        boundaries,
        AppendPrefillBoundariesCpu(view, boundaries_, delta.new_length, config_, num_threads));
  }

  // Chunks whose two boundaries are unchanged keep their keys, hence their summaries.
  size_t same = 0;
  while (same < boundaries.size() && same < boundaries_.size() &&
         boundaries[same] == boundaries_[same]) {
    ++same;
  }
  delta.kept_chunks = same == 0 ? 0 : static_cast<int64_t>(same) - 1;
  const int64_t first_changed = boundaries[static_cast<size_t>(delta.kept_chunks)];
  if (first_changed < tail_begin_) {
    return absl::InternalError(absl::StrCat("layout: boundary ", first_changed,
                                            " before the kept tail keys at ", tail_begin_,
                                            " changed"));
  }
  const std::vector<int64_t> changed(boundaries.begin() + delta.kept_chunks, boundaries.end());
  const Summaries kappa = ChunkSummariesCpu(view, changed, norm_, num_threads);
  delta.kappa.resize(kappa.data.size());
  for (int64_t j = 0; j < kappa.count; ++j) {
    for (int64_t h = 0; h < kappa.heads; ++h) {
      std::copy_n(kappa.Row(h, j), head_dim_,
                  delta.kappa.begin() + (j * kappa.heads + h) * head_dim_);
    }
  }
  delta.boundaries.assign(changed.begin() + 1, changed.end());
  delta.tail_begin = boundaries[boundaries.size() - 2];
  delta.tail_keys = SliceRows(keys, delta.tail_begin - tail_begin_, delta.new_length - tail_begin_);
  return delta;
}

absl::StatusOr<LayoutDelta> LayerLayout::ProposeComputed(const Tensor& new_keys,
                                                         const std::vector<int64_t>& boundaries,
                                                         const Summaries& kappa) const {
  if (new_keys.shape.size() != 3 || new_keys.shape[0] != kv_heads_ || new_keys.shape[1] < 1 ||
      new_keys.shape[2] != head_dim_ || new_keys.dtype != dtype_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "new keys must be ", DTypeName(dtype_), " [", kv_heads_, ", n >= 1, ", head_dim_, "]; got ",
        DTypeName(new_keys.dtype), " ", ShapeString(new_keys.shape)));
  }
  if (length_ != 0 || !chunked_) {
    return absl::FailedPreconditionError(
        "computed boundaries and summaries serve only the first prefill of a chunked layout");
  }
  const int64_t n = new_keys.shape[1];
  const int64_t chunks = static_cast<int64_t>(boundaries.size()) - 1;
  bool increasing = chunks >= 1 && boundaries.front() == 0 && boundaries.back() == n;
  for (int64_t j = 0; increasing && j < chunks; ++j) {
    increasing = boundaries[static_cast<size_t>(j)] < boundaries[static_cast<size_t>(j + 1)];
  }
  if (!increasing) {
    return absl::InvalidArgumentError(
        absl::StrCat("computed boundaries must rise strictly from 0 to ", n, "; got ",
                     boundaries.size(), " of them"));
  }
  if (kappa.heads != kv_heads_ || kappa.count != chunks || kappa.dim != head_dim_ ||
      kappa.data.size() != static_cast<size_t>(kv_heads_ * chunks * head_dim_)) {
    return absl::InvalidArgumentError(absl::StrCat("computed summaries must be [", kv_heads_, ", ",
                                                   chunks, ", ", head_dim_, "]; got [", kappa.heads,
                                                   ", ", kappa.count, ", ", kappa.dim, "]"));
  }
  LayoutDelta delta;
  delta.old_length = 0;
  delta.new_length = n;
  delta.kept_chunks = 0;
  delta.boundaries.assign(boundaries.begin() + 1, boundaries.end());
  delta.kappa.resize(kappa.data.size());
  for (int64_t j = 0; j < chunks; ++j) {
    for (int64_t h = 0; h < kv_heads_; ++h) {
      std::copy_n(kappa.Row(h, j), head_dim_,
                  delta.kappa.begin() + (j * kv_heads_ + h) * head_dim_);
    }
  }
  delta.tail_begin = boundaries[boundaries.size() - 2];
  delta.tail_keys = SliceRows(new_keys, delta.tail_begin, n);
  return delta;
}

LayoutView LayerLayout::SelectionView(const LayoutDelta& delta) const {
  LayoutView out;
  out.boundaries.assign(boundaries_.begin(), boundaries_.begin() + delta.kept_chunks + 1);
  out.boundaries.insert(out.boundaries.end(), delta.boundaries.begin(), delta.boundaries.end());
  if (!chunked_) return out;
  const int64_t new_chunks = static_cast<int64_t>(delta.boundaries.size());
  Summaries& s = out.kappa;
  s.heads = kv_heads_;
  s.count = delta.kept_chunks + new_chunks;
  s.dim = head_dim_;
  s.data.resize(static_cast<size_t>(s.heads * s.count * s.dim));
  for (int64_t h = 0; h < s.heads; ++h) {
    float* dst = s.data.data() + h * s.count * s.dim;
    for (int64_t j = 0; j < delta.kept_chunks; ++j) {
      std::copy_n(kappa_.begin() + (j * kv_heads_ + h) * head_dim_, head_dim_, dst + j * s.dim);
    }
    for (int64_t j = 0; j < new_chunks; ++j) {
      std::copy_n(delta.kappa.begin() + (j * kv_heads_ + h) * head_dim_, head_dim_,
                  dst + (delta.kept_chunks + j) * s.dim);
    }
  }
  return out;
}

void LayerLayout::Commit(LayoutDelta delta) {
  length_ = delta.new_length;
  boundaries_.resize(static_cast<size_t>(delta.kept_chunks + 1));
  boundaries_.insert(boundaries_.end(), delta.boundaries.begin(), delta.boundaries.end());
  kappa_.resize(static_cast<size_t>(delta.kept_chunks * kv_heads_ * head_dim_));
  kappa_.insert(kappa_.end(), delta.kappa.begin(), delta.kappa.end());
  tail_begin_ = delta.tail_begin;
  tail_keys_ = std::move(delta.tail_keys);
}

}  // namespace dhsa::router
