#include "kernels/cuda/selection_csr.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"

namespace dhsa {

absl::StatusOr<SelectionCsr> SelectionToCsr(const Selection& selection) {
  if (selection.unit != SelectionUnit::kKvHeadBlock) {
    return absl::InvalidArgumentError(
        "the CUDA kernels take per-(KV head, query block) selections, not per-row ones");
  }
  const int64_t entries = selection.num_heads * selection.num_blocks;
  if (selection.block_size <= 0 || selection.num_heads <= 0 || selection.num_blocks <= 0 ||
      selection.spans.size() != static_cast<size_t>(entries)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection of ", selection.num_heads, " heads x ", selection.num_blocks, " blocks of ",
        selection.block_size, " rows holds ", selection.spans.size(), " entries"));
  }
  constexpr int64_t kMaxPosition = std::numeric_limits<int32_t>::max();
  SelectionCsr csr;
  csr.block_size = selection.block_size;
  csr.first_block = selection.first_block;
  csr.num_blocks = selection.num_blocks;
  csr.num_heads = selection.num_heads;
  csr.entry_offsets.reserve(static_cast<size_t>(entries + 1));
  csr.entry_offsets.push_back(0);
  for (int64_t e = 0; e < entries; ++e) {
    int64_t packed = 0, previous_end = 0;
    for (const Span& s : selection.spans[static_cast<size_t>(e)]) {
      if (s.begin < previous_end || s.end < s.begin || s.end > kMaxPosition) {
        return absl::InvalidArgumentError(
            absl::StrCat("selection entry ", e, ": span [", s.begin, ", ", s.end,
                         ") is out of order, overlaps, or lies outside [0, 2^31 - 1)"));
      }
      previous_end = s.end;
      if (s.size() == 0) continue;
      csr.spans.push_back({static_cast<int32_t>(s.begin), static_cast<int32_t>(s.end)});
      csr.span_starts.push_back(static_cast<int32_t>(packed));
      packed += s.size();
    }
    csr.entry_offsets.push_back(static_cast<int64_t>(csr.spans.size()));
  }
  return csr;
}

absl::StatusOr<DeviceSelection> DeviceSelection::Upload(const SelectionCsr& csr) {
  DeviceSelection d;
  d.block_size_ = csr.block_size;
  d.first_block_ = csr.first_block;
  d.num_blocks_ = csr.num_blocks;
  d.num_heads_ = csr.num_heads;
  d.num_spans_ = static_cast<int64_t>(csr.spans.size());
  DHSA_ASSIGN_OR_RETURN(
      d.entry_offsets_,
      DeviceBuffer::FromHost(csr.entry_offsets.data(), csr.entry_offsets.size() * sizeof(int64_t)));
  DHSA_ASSIGN_OR_RETURN(
      d.spans_, DeviceBuffer::FromHost(csr.spans.data(), csr.spans.size() * sizeof(CudaSpan)));
  DHSA_ASSIGN_OR_RETURN(
      d.span_starts_,
      DeviceBuffer::FromHost(csr.span_starts.data(), csr.span_starts.size() * sizeof(int32_t)));
  return d;
}

absl::StatusOr<DeviceSelection> DeviceSelection::Upload(const Selection& selection) {
  DHSA_ASSIGN_OR_RETURN(SelectionCsr csr, SelectionToCsr(selection));
  return Upload(csr);
}

absl::Status DeviceSelection::Attach(SparseAttentionCudaParams* params) const {
  if (params->hkv != num_heads_) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection has ", num_heads_, " KV heads; the call has ", params->hkv));
  }
  params->block_size = block_size_;
  params->first_block = first_block_;
  params->num_blocks = num_blocks_;
  params->entry_offsets = entry_offsets_.as<int64_t>();
  params->spans = spans_.as<CudaSpan>();
  params->span_starts = span_starts_.as<int32_t>();
  return absl::OkStatus();
}

}  // namespace dhsa
