#include "services/common/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

namespace dhsa {
namespace {

using ::testing::HasSubstr;

// A JSON file with `text` that is removed when the test ends.
class TempJson {
 public:
  explicit TempJson(const std::string& text) {
    char name[] = "/tmp/dhsa_config_test_XXXXXX";
    const int fd = mkstemp(name);
    EXPECT_GE(fd, 0);
    close(fd);
    path_ = name;
    std::ofstream(path_) << text;
  }
  ~TempJson() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(LoadServiceConfigJson, ReadsValidJson) {
  TempJson file(R"({
    "listenAddress": "0.0.0.0:50061",
    "workerAddresses": ["a:1", "b:2"],
    "maxMessageBytes": "65536",
    "capacity_bytes": 1048576,
    "threads": 3,
    "backend": "cpu",
    "drainSeconds": 2.5,
    "defaultParams": {"policy": "POLICY_STREAMING", "budget": 1024}
  })");
  absl::StatusOr<v1::ServiceConfig> c = LoadServiceConfigJson(file.path());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->listen_address(), "0.0.0.0:50061");
  EXPECT_EQ(c->worker_addresses_size(), 2);
  EXPECT_EQ(c->max_message_bytes(), 65536);
  EXPECT_EQ(c->capacity_bytes(), 1048576);
  EXPECT_EQ(c->threads(), 3);
  EXPECT_DOUBLE_EQ(c->drain_seconds(), 2.5);
  EXPECT_EQ(c->default_params().policy(), v1::POLICY_STREAMING);
  EXPECT_EQ(c->default_params().budget(), 1024);
}

TEST(LoadServiceConfigJson, EmptyPathIsTheDefault) {
  absl::StatusOr<v1::ServiceConfig> c = LoadServiceConfigJson("");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->ByteSizeLong(), 0u);
}

TEST(LoadServiceConfigJson, UnknownFieldIsAnError) {
  TempJson file(R"({"threads": 2, "thread_count": 4})");
  const absl::Status s = LoadServiceConfigJson(file.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr(file.path()));
  EXPECT_THAT(std::string(s.message()), HasSubstr("thread_count"));
}

TEST(LoadServiceConfigJson, BadValuesAreErrors) {
  for (const char* text : {R"({"threads": "many"})", R"({"defaultParams": {"policy": "FASTEST"}})",
                           R"({"threads": 2)", "[]"}) {
    SCOPED_TRACE(text);
    TempJson file(text);
    EXPECT_EQ(LoadServiceConfigJson(file.path()).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(LoadServiceConfigJson("/nonexistent/dhsa.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(DhsaConfigFromProto, ZeroFieldsTakeTheDefaults) {
  DhsaConfig defaults;
  defaults.budget = 4096;
  defaults.policy = Policy::kBlockTopk;
  absl::StatusOr<DhsaConfig> c = DhsaConfigFromProto(v1::DhsaParams(), defaults);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->budget, 4096);
  EXPECT_EQ(c->policy, Policy::kBlockTopk);
  EXPECT_EQ(c->q_block, 16);
  EXPECT_EQ(c->chunk_score, ChunkScore::kMass);
  EXPECT_EQ(c->summary_norm, SummaryNorm::kSqrt);
}

TEST(DhsaConfigFromProto, PresetsReplaceTheirKnobsAndSetFieldsOverrideThem) {
  DhsaConfig defaults;
  defaults.budget = 4096;
  v1::DhsaParams p;
  p.set_preset(v1::PRESET_PAPER);
  absl::StatusOr<DhsaConfig> c = DhsaConfigFromProto(p, defaults);
  ASSERT_TRUE(c.ok()) << c.status();
  DhsaConfig want = PaperConfig();
  want.budget = 4096;  // Not a preset knob: the server's default stays.
  v1::DhsaParams got_proto, want_proto;
  DhsaConfigToProto(*c, &got_proto);
  DhsaConfigToProto(want, &want_proto);
  EXPECT_EQ(got_proto.SerializeAsString(), want_proto.SerializeAsString());
  EXPECT_EQ(c->chunk_score, ChunkScore::kPaper);
  EXPECT_EQ(c->q_block, 128);
  EXPECT_EQ(c->chunk_min, 8);
  EXPECT_EQ(c->chunk_max, 128);
  // A field set explicitly wins over the preset.
  p.set_q_block(64);
  p.set_chunk_score(v1::CHUNK_SCORE_MASS);
  c = DhsaConfigFromProto(p, defaults);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->q_block, 64);
  EXPECT_EQ(c->chunk_score, ChunkScore::kMass);
  EXPECT_EQ(c->chunk_max, 128);
  // PRESET_DEFAULT restores the library's knobs over a server whose defaults are the paper's;
  // unspecified keeps the server's.
  p.Clear();
  p.set_preset(v1::PRESET_DEFAULT);
  c = DhsaConfigFromProto(p, PaperConfig());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->q_block, DhsaConfig{}.q_block);
  EXPECT_EQ(c->chunk_score, ChunkScore::kMass);
  EXPECT_EQ(c->score_rows, DhsaConfig{}.score_rows);
  c = DhsaConfigFromProto(v1::DhsaParams(), PaperConfig());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->q_block, 128);
  p.set_preset(static_cast<v1::Preset>(9));
  EXPECT_EQ(DhsaConfigFromProto(p, defaults).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DhsaConfigFromProto, SetFieldsWinAndRoundTrip) {
  v1::DhsaParams p;
  p.set_policy(v1::POLICY_DHSA);
  p.set_budget(1024);
  p.set_sink(64);
  p.set_local(128);
  p.set_q_block(64);
  p.set_boundary_mode(v1::BOUNDARY_MODE_FIXED);
  p.set_chunk_mean(16);
  p.set_chunk_min(4);
  p.set_chunk_max(64);
  p.set_boundary_window(2);
  p.set_block(32);
  p.set_shared_heads(true);
  p.set_mean_summaries(true);
  p.set_scale(0.125f);
  p.set_chunk_score(v1::CHUNK_SCORE_MASS);
  p.set_score_rows(8);
  absl::StatusOr<DhsaConfig> c = DhsaConfigFromProto(p, DhsaConfig());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->budget, 1024);
  EXPECT_EQ(c->boundary_mode, BoundaryMode::kFixed);
  EXPECT_TRUE(c->shared_heads);
  EXPECT_EQ(c->summary_norm, SummaryNorm::kMean);
  EXPECT_FLOAT_EQ(c->scale, 0.125f);
  EXPECT_EQ(c->chunk_score, ChunkScore::kMass);
  EXPECT_EQ(c->score_rows, 8);
  v1::DhsaParams back;
  DhsaConfigToProto(*c, &back);
  EXPECT_EQ(back.SerializeAsString(), p.SerializeAsString());

  DhsaConfig oracle;
  oracle.policy = Policy::kOracleTopk;
  DhsaConfigToProto(oracle, &back);
  EXPECT_EQ(back.policy(), v1::POLICY_ORACLE_TOPK);
}

TEST(DhsaConfigFromProto, InvalidConfigsAreRejected) {
  v1::DhsaParams p;
  p.set_local(8);  // < q_block 16.
  EXPECT_EQ(DhsaConfigFromProto(p, DhsaConfig()).status().code(),
            absl::StatusCode::kInvalidArgument);
  p.Clear();
  p.set_budget(-5);
  EXPECT_EQ(DhsaConfigFromProto(p, DhsaConfig()).status().code(),
            absl::StatusCode::kInvalidArgument);
  p.Clear();
  p.set_policy(static_cast<v1::Policy>(77));
  EXPECT_EQ(DhsaConfigFromProto(p, DhsaConfig()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A header for rows [40, 70) of Hq 4, Hkv 2 with blocks of 16 (blocks 2..4).
v1::AttendHeader HeaderWithSelection() {
  Selection sel;
  sel.block_size = 16;
  sel.first_block = 2;
  sel.num_blocks = 3;
  sel.num_heads = 2;
  sel.group = 2;
  sel.spans = {{{0, 5}, {9, 12}}, {}, {{3, 4}}, {{0, 70}}, {{10, 20}, {20, 30}}, {{1, 2}}};
  v1::AttendHeader h;
  h.set_q_begin(40);
  h.set_num_rows(30);
  SelectionToAttendHeader(sel, &h);
  return h;
}

TEST(SelectionAttendHeader, RoundTrips) {
  const v1::AttendHeader h = HeaderWithSelection();
  EXPECT_EQ(h.q_heads(), 4);
  EXPECT_EQ(h.kv_heads(), 2);
  absl::StatusOr<Selection> sel = SelectionFromAttendHeader(h);
  ASSERT_TRUE(sel.ok()) << sel.status();
  EXPECT_EQ(sel->unit, SelectionUnit::kKvHeadBlock);
  EXPECT_EQ(sel->group, 2);
  EXPECT_EQ(sel->num_heads, 2);
  EXPECT_EQ(sel->first_block, 2);
  ASSERT_EQ(sel->spans.size(), 6u);
  EXPECT_TRUE(sel->spans[1].empty());
  EXPECT_EQ(sel->At(1, 1), (std::vector<Span>{{10, 20}, {20, 30}}));
  v1::AttendHeader again;
  SelectionToAttendHeader(*sel, &again);
  again.set_q_begin(40);
  again.set_num_rows(30);
  EXPECT_EQ(again.SerializeAsString(), h.SerializeAsString());
}

TEST(SelectionAttendHeader, RejectsInconsistentSelections) {
  auto expect_invalid = [](const v1::AttendHeader& h, const std::string& needle) {
    const absl::Status s = SelectionFromAttendHeader(h).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_THAT(std::string(s.message()), HasSubstr(needle));
  };
  v1::AttendHeader h = HeaderWithSelection();
  h.mutable_entries()->RemoveLast();
  expect_invalid(h, "5 entries");

  h = HeaderWithSelection();
  h.mutable_entries(0)->add_begin(50);
  expect_invalid(h, "entry 0");

  h = HeaderWithSelection();
  h.mutable_entries(0)->set_begin(1, 3);  // [3, 12) overlaps [0, 5).
  expect_invalid(h, "entry 0");

  h = HeaderWithSelection();
  h.mutable_entries(2)->set_begin(0, -1);
  expect_invalid(h, "entry 2");

  h = HeaderWithSelection();
  h.mutable_entries(3)->set_end(0, 0);  // Empty span.
  expect_invalid(h, "entry 3");

  h = HeaderWithSelection();
  h.set_num_rows(50);  // Rows up to 89 need block 5.
  expect_invalid(h, "do not cover");

  h = HeaderWithSelection();
  h.set_q_heads(3);
  expect_invalid(h, "multiple");
}

}  // namespace
}  // namespace dhsa
