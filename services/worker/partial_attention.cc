#include "services/worker/partial_attention.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/sparse_attention.h"

namespace dhsa {
namespace {

// Index of the first stripe that ends after `pos` (stripes are sorted and disjoint).
size_t FirstStripeEndingAfter(const LayerSnapshot& keys, int64_t pos) {
  const auto it = std::upper_bound(keys.stripes.begin(), keys.stripes.end(), pos,
                                   [](int64_t p, const StripeSnapshot& s) { return p < s.end(); });
  return static_cast<size_t>(it - keys.stripes.begin());
}

std::string HeldRanges(const LayerSnapshot& keys) {
  std::string out;
  for (size_t i = 0; i < keys.stripes.size(); ++i) {
    if (i == 8) {
      absl::StrAppend(&out, ", ... (", keys.stripes.size(), " stripes)");
      break;
    }
    absl::StrAppend(&out, i == 0 ? "" : ", ", "[", keys.stripes[i].begin, ", ",
                    keys.stripes[i].end(), ")");
  }
  return out;
}

// Stripes that some span touches at a position some query row can see (<= last_pos).
std::vector<bool> TouchedStripes(const Selection& selection, const LayerSnapshot& keys,
                                 int64_t last_pos) {
  std::vector<bool> touched(keys.stripes.size(), false);
  for (const std::vector<Span>& spans : selection.spans) {
    for (const Span& span : spans) {
      const int64_t end = std::min(span.end, last_pos + 1);
      if (end <= span.begin) continue;
      for (size_t i = FirstStripeEndingAfter(keys, span.begin);
           i < keys.stripes.size() && keys.stripes[i].begin < end; ++i) {
        touched[i] = true;
      }
    }
  }
  return touched;
}

}  // namespace

absl::Status CheckSpansHeld(const Selection& selection, const LayerSnapshot& keys,
                            const std::string& sequence_id, int32_t layer) {
  for (size_t n = 0; n < selection.spans.size(); ++n) {
    for (const Span& span : selection.spans[n]) {
      // Walk the stripes from the one holding span.begin while they continue without a gap.
      int64_t covered = span.begin;
      for (size_t i = FirstStripeEndingAfter(keys, span.begin);
           i < keys.stripes.size() && keys.stripes[i].begin <= covered && covered < span.end; ++i) {
        covered = keys.stripes[i].end();
      }
      if (covered < span.end) {
        const size_t next = FirstStripeEndingAfter(keys, covered);
        const int64_t gap_end =
            next < keys.stripes.size() ? std::min(span.end, keys.stripes[next].begin) : span.end;
        return absl::FailedPreconditionError(
            absl::StrCat("span [", span.begin, ", ", span.end, ") of selection entry ", n,
                         " (head ", static_cast<int64_t>(n) / selection.num_blocks, ", block ",
                         selection.first_block + static_cast<int64_t>(n) % selection.num_blocks,
                         ") needs keys [", covered, ", ", gap_end,
                         ") that this worker does not hold for sequence '", sequence_id, "' layer ",
                         layer, " (it holds ", HeldRanges(keys), ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<PartialAttention> ComputePartialAttention(const PartialAttentionInputs& in) {
  const auto start = std::chrono::steady_clock::now();
  if (in.q_device != nullptr || in.outputs_on_device) {
    return absl::InvalidArgumentError(
        "tensors on a device (q_device, outputs_on_device) need the cuda backend; this is the "
        "host kernel");
  }
  if ((in.o_host == nullptr) != (in.lse_host == nullptr)) {
    return absl::InvalidArgumentError("o_host and lse_host go together");
  }
  HeadsView q;
  if (in.q_host != nullptr) {
    if (in.q->shape.size() != 3) {
      return absl::InvalidArgumentError(
          absl::StrCat("q must be 3-D [heads, len, dim]; got shape ", ShapeString(in.q->shape)));
    }
    q.data = in.q_host;
    q.dtype = in.q->dtype;
    q.heads = in.q->shape[0];
    q.len = in.q->shape[1];
    q.dim = in.q->shape[2];
  } else {
    DHSA_ASSIGN_OR_RETURN(q, HeadsView::Of(*in.q, "q"));
  }
  q.offset = in.q_begin;
  const int64_t hq = q.heads, lq = q.len, d = q.dim;
  const int64_t rows = hq * lq;

  const LayerSnapshot& keys = *in.keys;
  if (in.cancelled && in.cancelled()) {
    return absl::CancelledError("Attend cancelled by the client before it started");
  }
  // One pass over every stripe some span touches, each stripe a run of keys of its own.
  const std::vector<bool> touched = TouchedStripes(*in.selection, keys, in.q_begin + lq - 1);
  const bool any = std::find(touched.begin(), touched.end(), true) != touched.end();
  // The kernel writes every row; without a held key every row is o = 0, lse = -inf.
  PartialAttention out;
  float* o = in.o_host;
  float* lse = in.lse_host;
  if (o == nullptr) {
    out.o = Tensor::Uninitialized(DType::kF32, {hq, lq, d});
    out.lse = Tensor::Uninitialized(DType::kF32, {hq, lq});
    o = static_cast<float*>(out.o.data());
    lse = static_cast<float*>(out.lse.data());
  }
  if (!any) {
    std::fill(o, o + rows * d, 0.0f);
    std::fill(lse, lse + rows, -std::numeric_limits<float>::infinity());
  }
  SparseAttentionParams p;
  p.q = q;
  p.selection = in.selection;
  p.scale = in.scale;
  p.o = OutputView{o, hq, lq, d};
  p.lse = OutputView{lse, hq, lq, 1};
  p.num_threads = in.num_threads;
  p.cancelled = in.cancelled;
  bool first = true;
  for (size_t i = 0; i < keys.stripes.size(); ++i) {
    if (!touched[i]) continue;
    if (first) {
      p.k = keys.Keys(i);
      p.v = keys.Values(i);
      first = false;
    } else {
      p.more_kv.push_back({keys.Keys(i), keys.Values(i)});
    }
  }
  if (any) {
    const absl::Status status = SparseAttentionCpu(p);
    if (absl::IsCancelled(status)) return absl::CancelledError("Attend cancelled by the client");
    DHSA_RETURN_IF_ERROR(status);
  }
  AttentionShape shape;
  shape.hq = hq;
  shape.hkv = keys.kv_heads;
  shape.dim = d;
  shape.lq = lq;
  shape.lk = in.q_begin + lq;
  out.computed_pairs = CountComputedPairs(*in.selection, shape);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

Selection SelectionForStripe(const Selection& selection, int64_t first_block, int64_t num_blocks,
                             int64_t lo, int64_t hi, bool* any) {
  Selection cut;
  cut.unit = selection.unit;
  cut.block_size = selection.block_size;
  cut.first_block = first_block;
  cut.num_blocks = num_blocks;
  cut.num_heads = selection.num_heads;
  cut.group = selection.group;
  cut.spans.resize(static_cast<size_t>(cut.num_heads * num_blocks));
  *any = false;
  for (int64_t h = 0; h < cut.num_heads; ++h) {
    for (int64_t b = 0; b < num_blocks; ++b) {
      std::vector<Span>& out = cut.At(h, b);
      for (const Span& s : selection.At(h, first_block - selection.first_block + b)) {
        const int64_t begin = std::max(s.begin, lo), end = std::min(s.end, hi);
        if (begin < end) out.push_back({begin, end});
      }
      *any = *any || !out.empty();
    }
  }
  return cut;
}

}  // namespace dhsa
