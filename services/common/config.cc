#include "services/common/config.h"

#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "kernels/common/status_macros.h"

namespace dhsa {
namespace {

absl::StatusOr<Policy> PolicyFromProto(v1::Policy policy, Policy fallback) {
  switch (policy) {
    case v1::POLICY_UNSPECIFIED:
      return fallback;
    case v1::POLICY_DHSA:
      return Policy::kDhsa;
    case v1::POLICY_BLOCK_TOPK:
      return Policy::kBlockTopk;
    case v1::POLICY_STREAMING:
      return Policy::kStreaming;
    case v1::POLICY_DENSE:
      return Policy::kDense;
    case v1::POLICY_ORACLE_TOPK:
      return Policy::kOracleTopk;
    default:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown policy value ", static_cast<int>(policy)));
}

v1::Policy PolicyToProto(Policy policy) {
  switch (policy) {
    case Policy::kDhsa:
      return v1::POLICY_DHSA;
    case Policy::kBlockTopk:
      return v1::POLICY_BLOCK_TOPK;
    case Policy::kStreaming:
      return v1::POLICY_STREAMING;
    case Policy::kDense:
      return v1::POLICY_DENSE;
    case Policy::kOracleTopk:
      return v1::POLICY_ORACLE_TOPK;
  }
  return v1::POLICY_UNSPECIFIED;
}

absl::StatusOr<BoundaryMode> BoundaryModeFromProto(v1::BoundaryMode mode, BoundaryMode fallback) {
  switch (mode) {
    case v1::BOUNDARY_MODE_UNSPECIFIED:
      return fallback;
    case v1::BOUNDARY_MODE_DYNAMIC:
      return BoundaryMode::kDynamic;
    case v1::BOUNDARY_MODE_FIXED:
      return BoundaryMode::kFixed;
    default:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown boundary_mode value ", static_cast<int>(mode)));
}

int64_t OrDefault(int64_t value, int64_t fallback) { return value != 0 ? value : fallback; }

}  // namespace

absl::StatusOr<v1::ServiceConfig> LoadServiceConfigJson(const std::string& path_or_empty) {
  v1::ServiceConfig config;
  if (path_or_empty.empty()) return config;
  std::ifstream in(path_or_empty, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("cannot read service config file '", path_or_empty, "'"));
  }
  std::stringstream text;
  text << in.rdbuf();
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto status = google::protobuf::util::JsonStringToMessage(text.str(), &config, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "service config file '", path_or_empty, "' is not a valid dhsa.v1.ServiceConfig: ",
        std::string(status.message().data(), status.message().size())));
  }
  return config;
}

absl::StatusOr<DhsaConfig> DhsaConfigFromProto(const v1::DhsaParams& params,
                                               const DhsaConfig& defaults) {
  // A preset replaces its knobs of `defaults`; the fields set below override them.
  DhsaConfig base = defaults;
  switch (params.preset()) {
    case v1::PRESET_UNSPECIFIED:
      break;
    case v1::PRESET_DEFAULT:
      base = ApplyPreset(Preset::kDefault, base);
      break;
    case v1::PRESET_PAPER:
      base = ApplyPreset(Preset::kPaper, base);
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown preset ",
                                                     static_cast<int>(params.preset()),
                                                     "; expected PRESET_DEFAULT or PRESET_PAPER"));
  }
  DhsaConfig c = base;
  DHSA_ASSIGN_OR_RETURN(c.policy, PolicyFromProto(params.policy(), base.policy));
  DHSA_ASSIGN_OR_RETURN(c.boundary_mode,
                        BoundaryModeFromProto(params.boundary_mode(), base.boundary_mode));
  c.budget = OrDefault(params.budget(), base.budget);
  c.sink = OrDefault(params.sink(), base.sink);
  c.local = OrDefault(params.local(), base.local);
  c.q_block = OrDefault(params.q_block(), base.q_block);
  c.chunk_mean = OrDefault(params.chunk_mean(), base.chunk_mean);
  c.chunk_min = OrDefault(params.chunk_min(), base.chunk_min);
  c.chunk_max = OrDefault(params.chunk_max(), base.chunk_max);
  c.boundary_window = OrDefault(params.boundary_window(), base.boundary_window);
  c.block = OrDefault(params.block(), base.block);
  if (params.shared_heads()) c.shared_heads = true;
  if (params.mean_summaries()) c.summary_norm = SummaryNorm::kMean;
  if (params.scale() != 0.0f) c.scale = params.scale();
  if (params.chunk_score() == v1::CHUNK_SCORE_MASS) c.chunk_score = ChunkScore::kMass;
  if (params.chunk_score() == v1::CHUNK_SCORE_PAPER) c.chunk_score = ChunkScore::kPaper;
  c.score_rows = OrDefault(params.score_rows(), base.score_rows);
  DHSA_RETURN_IF_ERROR(ValidateConfig(c));
  return c;
}

void DhsaConfigToProto(const DhsaConfig& c, v1::DhsaParams* p) {
  p->set_policy(PolicyToProto(c.policy));
  p->set_budget(c.budget);
  p->set_sink(c.sink);
  p->set_local(c.local);
  p->set_q_block(c.q_block);
  p->set_boundary_mode(c.boundary_mode == BoundaryMode::kFixed ? v1::BOUNDARY_MODE_FIXED
                                                               : v1::BOUNDARY_MODE_DYNAMIC);
  p->set_chunk_mean(c.chunk_mean);
  p->set_chunk_min(c.chunk_min);
  p->set_chunk_max(c.chunk_max);
  p->set_boundary_window(c.boundary_window);
  p->set_block(c.block);
  p->set_shared_heads(c.shared_heads);
  p->set_mean_summaries(c.summary_norm == SummaryNorm::kMean);
  p->set_scale(c.scale);
  p->set_chunk_score(c.chunk_score == ChunkScore::kMass ? v1::CHUNK_SCORE_MASS
                                                        : v1::CHUNK_SCORE_PAPER);
  p->set_score_rows(c.score_rows);
}

void SelectionToAttendHeader(const Selection& selection, v1::AttendHeader* header) {
  const bool per_query_head = selection.unit == SelectionUnit::kQueryHeadRow;
  const int64_t group = selection.group > 0 ? selection.group : 1;
  header->set_q_heads(
      static_cast<int32_t>(per_query_head ? selection.num_heads : selection.num_heads * group));
  header->set_kv_heads(
      static_cast<int32_t>(per_query_head ? selection.num_heads / group : selection.num_heads));
  header->set_block_size(selection.block_size);
  header->set_first_block(selection.first_block);
  header->set_num_blocks(selection.num_blocks);
  header->set_per_query_head(per_query_head);
  header->clear_entries();
  header->mutable_entries()->Reserve(static_cast<int>(selection.spans.size()));
  for (const std::vector<Span>& spans : selection.spans) {
    v1::SpanList* list = header->add_entries();
    const int n = static_cast<int>(spans.size());
    list->mutable_begin()->Resize(n, 0);
    list->mutable_end()->Resize(n, 0);
    int64_t* begin = list->mutable_begin()->mutable_data();
    int64_t* end = list->mutable_end()->mutable_data();
    for (int i = 0; i < n; ++i) {
      begin[i] = spans[static_cast<size_t>(i)].begin;
      end[i] = spans[static_cast<size_t>(i)].end;
    }
  }
}

absl::StatusOr<Selection> SelectionFromAttendHeader(const v1::AttendHeader& h) {
  if (h.q_heads() <= 0 || h.kv_heads() <= 0 || h.q_heads() % h.kv_heads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("q_heads (", h.q_heads(),
                                                   ") must be a positive multiple of kv_heads (",
                                                   h.kv_heads(), ")"));
  }
  if (h.block_size() <= 0 || h.first_block() < 0 || h.num_blocks() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection needs block_size > 0, first_block >= 0 and num_blocks > 0; got block_size ",
        h.block_size(), ", first_block ", h.first_block(), ", num_blocks ", h.num_blocks()));
  }
  if (h.num_rows() <= 0 || h.q_begin() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_rows must be >= 1 and q_begin >= 0; got ",
                                                   h.num_rows(), " and ", h.q_begin()));
  }
  const int64_t first_row_block = h.q_begin() / h.block_size();
  const int64_t last_row_block = (h.q_begin() + h.num_rows() - 1) / h.block_size();
  if (first_row_block < h.first_block() || last_row_block - h.first_block() >= h.num_blocks()) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection blocks [", h.first_block(), ", ", h.first_block() + h.num_blocks(),
                     ") of ", h.block_size(), " rows do not cover query rows [", h.q_begin(), ", ",
                     h.q_begin() + h.num_rows(), ")"));
  }
  const int64_t heads = h.per_query_head() ? h.q_heads() : h.kv_heads();
  const int64_t entries = h.entries_size();
  if (entries % h.num_blocks() != 0 || entries / h.num_blocks() != heads) {
    return absl::InvalidArgumentError(absl::StrCat("selection has ", entries, " entries; expected ",
                                                   heads, " heads x ", h.num_blocks(), " blocks"));
  }
  Selection sel;
  sel.unit = h.per_query_head() ? SelectionUnit::kQueryHeadRow : SelectionUnit::kKvHeadBlock;
  sel.block_size = h.block_size();
  sel.first_block = h.first_block();
  sel.num_blocks = h.num_blocks();
  sel.num_heads = heads;
  sel.group = h.q_heads() / h.kv_heads();
  sel.spans.resize(static_cast<size_t>(entries));
  for (int64_t n = 0; n < entries; ++n) {
    const v1::SpanList& list = h.entries(static_cast<int>(n));
    if (list.begin_size() != list.end_size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "selection entry ", n, " (head ", n / h.num_blocks(), ", block ", n % h.num_blocks(),
          ") has ", list.begin_size(), " span begins but ", list.end_size(), " ends"));
    }
    std::vector<Span>& spans = sel.spans[static_cast<size_t>(n)];
    spans.reserve(static_cast<size_t>(list.begin_size()));
    int64_t prev_end = 0;
    for (int i = 0; i < list.begin_size(); ++i) {
      const Span s{list.begin(i), list.end(i)};
      if (s.begin < prev_end || s.begin >= s.end) {
        return absl::InvalidArgumentError(absl::StrCat(
            "selection entry ", n, " (head ", n / h.num_blocks(), ", block ", n % h.num_blocks(),
            ") has span [", s.begin, ", ", s.end,
            ") that is empty, negative or not after the previous span (ending at ", prev_end, ")"));
      }
      spans.push_back(s);
      prev_end = s.end;
    }
  }
  return sel;
}

}  // namespace dhsa
