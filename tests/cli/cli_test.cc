// Runs the real `dhsa` binary: results equal the library, and bad input exits 2 writing nothing.
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dhsa.h"
#include "kernels/io/npy.h"
#include "kernels/io/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct CliRun {
  int exit_code;
  std::string out;  // stdout and stderr together.
};

CliRun Dhsa(const std::string& args) {
  const std::string command = std::string(DHSA_CLI_PATH) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  std::string out;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) out.append(buffer, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = testing::FreshSeed();
    dir_ = fs::temp_directory_path() / ("dhsa_cli_test_" + std::to_string(seed_));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  uint64_t seed_;
  fs::path dir_;
};

TEST_F(CliTest, AttendWritesWhatTheLibraryComputes) {
  SCOPED_TRACE(seed_);
  CliRun gen =
      Dhsa("gen --out " + Path("w") + " --len 1500 --hq 4 --hkv 2 --dim 64 --needles 2 --seed " +
           std::to_string(seed_ % 1000000));
  ASSERT_EQ(gen.exit_code, 0) << gen.out;
  CliRun run =
      Dhsa("attend --q " + Path("w/q.npy") + " --k " + Path("w/k.npy") + " --v " + Path("w/v.npy") +
           " --out " + Path("o.npy") + " --lse-out " + Path("lse.npy") + " --selection-out " +
           Path("sel.json") +
           " --budget 512 --sink 32 --local 128 --q-block 64 --check-rows 8 --backend reference");
  ASSERT_EQ(run.exit_code, 0) << run.out;
  EXPECT_THAT(run.out, HasSubstr("attention recall, mean"));

  DhsaConfig config;
  config.budget = 512;
  config.sink = 32;
  config.local = 128;
  config.q_block = 64;
  auto want = AttendReference(*ReadNpy(Path("w/q.npy")), *ReadNpy(Path("w/k.npy")),
                              *ReadNpy(Path("w/v.npy")), config);
  ASSERT_TRUE(want.ok());
  auto o = ReadNpy(Path("o.npy"));
  auto lse = ReadNpy(Path("lse.npy"));
  ASSERT_TRUE(o.ok() && lse.ok());
  EXPECT_EQ(o->shape, (std::vector<int64_t>{4, 1500, 64}));
  EXPECT_EQ(lse->shape, (std::vector<int64_t>{4, 1500}));
  EXPECT_EQ(o->bytes, want->o.bytes);
  EXPECT_EQ(lse->bytes, want->lse.bytes);

  std::ifstream in(Path("sel.json"));
  const nlohmann::json sel = nlohmann::json::parse(in);
  EXPECT_EQ(sel["q_block"], 64);
  EXPECT_EQ(sel["boundaries"].get<std::vector<int64_t>>(), want->boundaries);
  ASSERT_EQ(sel["selection"].size(), 2u * 24u);  // 2 KV heads x ceil(1500 / 64) blocks.
  for (const auto& entry : sel["selection"]) {
    const int64_t h = entry["kv_head"], b = entry["block"];
    const std::vector<Span>& spans = want->selection.At(h, b);
    ASSERT_EQ(entry["spans"].size(), spans.size());
    for (size_t i = 0; i < spans.size(); ++i) {
      EXPECT_EQ(entry["spans"][i][0], spans[i].begin);
      EXPECT_EQ(entry["spans"][i][1], spans[i].end);
    }
  }
}

// --preset paper is the spec's method (PaperConfig()); flags given explicitly override it; without
// a preset the flags' defaults are DhsaConfig{}'s.
TEST_F(CliTest, PresetPaperIsTheSpecsMethodAndFlagsOverrideIt) {
  SCOPED_TRACE(seed_);
  std::mt19937_64 rng(seed_);
  const Tensor q = testing::RandomTensor(rng, 4, 900, 32);
  const Tensor k = testing::SegmentedTensor(rng, 2, 900, 32);
  const Tensor v = testing::RandomTensor(rng, 2, 900, 32);
  ASSERT_TRUE(WriteNpy(Path("q.npy"), q).ok());
  ASSERT_TRUE(WriteNpy(Path("k.npy"), k).ok());
  ASSERT_TRUE(WriteNpy(Path("v.npy"), v).ok());
  const std::string io = "attend --q " + Path("q.npy") + " --k " + Path("k.npy") + " --v " +
                         Path("v.npy") + " --out " + Path("o.npy") +
                         " --budget 512 --sink 32 --local 128 --backend reference";
  struct Case {
    std::string flags;
    DhsaConfig want;
  };
  DhsaConfig paper_q64 = PaperConfig();
  paper_q64.q_block = 64;
  DhsaConfig paper_mass = PaperConfig();
  paper_mass.chunk_score = ChunkScore::kMass;
  for (Case c :
       {Case{"", DhsaConfig{}}, Case{" --preset default", DhsaConfig{}},
        Case{" --preset paper", PaperConfig()}, Case{" --preset paper --q-block 64", paper_q64},
        Case{" --chunk-score mass --preset paper", paper_mass}}) {
    SCOPED_TRACE(c.flags);
    c.want.budget = 512;
    c.want.sink = 32;
    c.want.local = 128;
    CliRun run = Dhsa(io + c.flags);
    ASSERT_EQ(run.exit_code, 0) << run.out;
    auto want = AttendReference(q, k, v, c.want);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(ReadNpy(Path("o.npy"))->bytes, want->o.bytes);
  }
  // The two presets select differently here (else the comparisons above could not tell them apart).
  DhsaConfig paper = PaperConfig(), mass;
  paper.budget = mass.budget = 512;
  paper.sink = mass.sink = 32;
  paper.local = mass.local = 128;
  EXPECT_NE(AttendReference(q, k, v, paper)->o.bytes, AttendReference(q, k, v, mass)->o.bytes);
  CliRun bad = Dhsa(io + " --preset spec");
  EXPECT_EQ(bad.exit_code, 2) << bad.out;
  EXPECT_THAT(bad.out, HasSubstr("preset"));
}

TEST_F(CliTest, SafetensorsInputsWithBFloat16) {
  SCOPED_TRACE(seed_);
  std::mt19937_64 rng(seed_);
  SafetensorsFile f;
  f.tensors["q"] = testing::RandomTensor(rng, 2, 100, 64).ConvertTo(DType::kBF16);
  f.tensors["k"] = testing::SegmentedTensor(rng, 1, 300, 64).ConvertTo(DType::kBF16);
  f.tensors["v"] = testing::RandomTensor(rng, 1, 300, 64).ConvertTo(DType::kBF16);
  ASSERT_TRUE(WriteSafetensors(Path("in.safetensors"), f).ok());
  const std::string in = Path("in.safetensors");
  CliRun run = Dhsa("attend --q " + in + " --k " + in + " --v " + in + " --out " + Path("o.npy") +
                    " --policy dense --json --backend reference");
  ASSERT_EQ(run.exit_code, 0) << run.out;
  EXPECT_EQ(nlohmann::json::parse(run.out)["density"], 1.0);
  DhsaConfig dense;
  dense.policy = Policy::kDense;
  auto want = AttendReference(f.tensors["q"], f.tensors["k"], f.tensors["v"], dense);
  EXPECT_EQ(ReadNpy(Path("o.npy"))->bytes, want->o.bytes);
}

TEST_F(CliTest, BadInputExitsTwoWithOneLineAndWritesNothing) {
  SCOPED_TRACE(seed_);
  std::mt19937_64 rng(seed_);
  ASSERT_TRUE(WriteNpy(Path("q.npy"), testing::RandomTensor(rng, 4, 10, 16)).ok());
  ASSERT_TRUE(WriteNpy(Path("k.npy"), testing::RandomTensor(rng, 3, 10, 16)).ok());
  ASSERT_TRUE(WriteNpy(Path("v.npy"), testing::RandomTensor(rng, 3, 10, 16)).ok());
  {
    std::ofstream bad(Path("bad.npy"));
    bad << "\x93NUMPY garbage";
  }
  const std::string outputs = " --out " + Path("o.npy") + " --lse-out " + Path("lse.npy") +
                              " --selection-out " + Path("s.json");
  struct Case {
    std::string args, message;
  };
  const std::vector<Case> cases = {
      {"--q " + Path("q.npy") + " --k " + Path("k.npy") + " --v " + Path("v.npy"),
       "multiple of KV heads"},
      {"--q " + Path("bad.npy") + " --k " + Path("k.npy") + " --v " + Path("v.npy"), "bad.npy"},
      {"--q " + Path("missing.npy") + " --k " + Path("k.npy") + " --v " + Path("v.npy"),
       "missing.npy"},
      {"--q " + Path("q.npy") + " --k " + Path("k.npy"), "--v is required"},
      {"--q " + Path("q.npy") + " --k " + Path("k.npy") + " --v " + Path("v.npy") + " --budget x",
       "--budget needs an integer"},
      {"--q " + Path("q.npy") + " --k " + Path("k.npy") + " --v " + Path("v.npy") + " --frobnicate",
       "unknown flag --frobnicate"},
      {"--q " + Path("q.npy") + " --k " + Path("k.npy") + " --v " + Path("v.npy") +
           " --policy magic",
       "unknown policy"},
      {"--q " + Path("q.npy") + " --k " + Path("k.npy") + " --v " + Path("v.npy") + " --local 8",
       "q_block"},  // Below the default q_block (16).
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    CliRun run = Dhsa("attend " + c.args + outputs);
    EXPECT_EQ(run.exit_code, 2) << run.out;
    EXPECT_THAT(run.out, HasSubstr(c.message));
    EXPECT_EQ(std::count(run.out.begin(), run.out.end(), '\n'), 1) << run.out;
    EXPECT_FALSE(fs::exists(Path("o.npy")));
    EXPECT_FALSE(fs::exists(Path("lse.npy")));
    EXPECT_FALSE(fs::exists(Path("s.json")));
  }
  EXPECT_EQ(Dhsa("no-such-command").exit_code, 2);
}

TEST_F(CliTest, HelpListsFlagsAndExamples) {
  for (const char* command : {"attend", "gen"}) {
    CliRun run = Dhsa(std::string(command) + " --help");
    EXPECT_EQ(run.exit_code, 0);
    EXPECT_THAT(run.out, HasSubstr("examples:"));
    EXPECT_THAT(run.out, HasSubstr("--"));
  }
  EXPECT_EQ(Dhsa("--help").exit_code, 0);
}

}  // namespace
}  // namespace dhsa
