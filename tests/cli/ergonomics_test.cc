// The `dhsa` CLI for people and machines: every subcommand's --help has flags and examples, --json
// prints parseable data, progress bars appear only when forced (tests have no terminal), and the
// exit codes tell bad input (2) from a failing or unreachable service (3).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dhsa {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

struct CliRun {
  int exit_code;
  std::string out, err;
};

// Runs `dhsa ARGS` with stdout and stderr captured apart (neither is a terminal).
CliRun Dhsa(const std::string& args, const fs::path& dir) {
  const std::string out = (dir / "stdout").string(), err = (dir / "stderr").string();
  const int status =
      std::system((std::string(DHSA_CLI_PATH) + " " + args + " >" + out + " 2>" + err).c_str());
  auto slurp = [](const std::string& path) {
    std::ifstream in(path);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  };
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
}

class ErgonomicsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dhsa_ergonomics_test_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    StopServer();
    fs::remove_all(dir_);
  }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  CliRun Run(const std::string& args) const { return Dhsa(args, dir_); }

  // `dhsa serve --workers 1` on a free port; returns its router address ("" if it did not start).
  std::string StartServer() {
    const std::string log = Path("serve.log");
    server_ = fork();
    if (server_ == 0) {
      FILE* f = std::freopen(log.c_str(), "w", stdout);
      (void)f;
      dup2(fileno(stdout), fileno(stderr));
      execl(DHSA_CLI_PATH, DHSA_CLI_PATH, "serve", "--workers", "1", "--listen", "127.0.0.1:0",
            "--threads", "1", static_cast<char*>(nullptr));
      _exit(127);
    }
    const std::regex address("router on (\\S+:\\d+)");
    for (int i = 0; i < 300; ++i) {
      std::ifstream in(log);
      const std::string text((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      std::smatch m;
      if (std::regex_search(text, m, address)) return m[1];
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return "";
  }
  void StopServer() {
    if (server_ > 0) {
      ::kill(server_, SIGKILL);
      waitpid(server_, nullptr, 0);
      server_ = -1;
    }
  }

  fs::path dir_;
  pid_t server_ = -1;
};

// The commands `dhsa --help` lists.
std::vector<std::string> Commands(const std::string& usage) {
  std::vector<std::string> commands;
  const std::regex line("\\n  ([a-z]+)  +");
  for (std::sregex_iterator it(usage.begin(), usage.end(), line), end; it != end; ++it) {
    commands.push_back((*it)[1]);
  }
  return commands;
}

TEST_F(ErgonomicsTest, EveryCommandsHelpListsItsFlagsWithExamples) {
  const CliRun usage = Run("--help");
  ASSERT_EQ(usage.exit_code, 0);
  EXPECT_THAT(usage.out, HasSubstr("exit codes"));
  const std::vector<std::string> commands = Commands(usage.out);
  for (const char* expected : {"attend", "bench", "gen", "serve", "demo", "eval"}) {
    EXPECT_THAT(commands, ::testing::Contains(expected)) << usage.out;
  }
  for (const std::string& command : commands) {
    SCOPED_TRACE(command);
    const CliRun help = Run(command + " --help");
    EXPECT_EQ(help.exit_code, 0) << help.err;
    EXPECT_THAT(help.out, HasSubstr("usage: dhsa " + command));
    EXPECT_THAT(help.out, HasSubstr("flags:\n  --"));
    const size_t examples = help.out.find("examples:\n  dhsa ");
    ASSERT_NE(examples, std::string::npos) << help.out;
    EXPECT_THAT(help.out.substr(examples), HasSubstr("\n  dhsa " + command + " ")) << help.out;
    EXPECT_EQ(help.err, "");
  }
}

TEST_F(ErgonomicsTest, DataCommandsPrintJsonAndTablesByDefault) {
  const CliRun gen =
      Run("gen --out " + Path("w") + " --len 700 --hq 4 --hkv 2 --dim 32 " + "--needles 2 --json");
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  const nlohmann::json g = nlohmann::json::parse(gen.out);
  EXPECT_EQ(g["q_shape"], (std::vector<int64_t>{4, 700, 32}));
  EXPECT_EQ(g["kv_shape"], (std::vector<int64_t>{2, 700, 32}));
  EXPECT_EQ(g["needles"], 2);
  EXPECT_EQ(g["bytes"], (4 + 2 + 2) * 700 * 32 * 4);
  for (const auto& file : g["files"]) EXPECT_TRUE(fs::exists(file.get<std::string>())) << file;

  const std::string inputs =
      " --q " + Path("w/q.npy") + " --k " + Path("w/k.npy") + " --v " + Path("w/v.npy");
  const CliRun table = Run("attend" + inputs + " --out " + Path("o.npy") + " --threads 1");
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_THAT(table.out, HasSubstr("stage"));
  EXPECT_THAT(table.out, HasSubstr("------"));
  const CliRun json =
      Run("attend" + inputs + " --out " + Path("o.npy") + " --threads 1 --budget 512 --json");
  ASSERT_EQ(json.exit_code, 0) << json.err;
  EXPECT_EQ(nlohmann::json::parse(json.out)["budget"], 512);

  const CliRun demo = Run("demo --len 600 --layers 2 --decode 2 --workers 1 --hq 2 --hkv 1 " +
                          std::string("--dim 32 --check-rows 4 --threads 1 --json"));
  ASSERT_EQ(demo.exit_code, 0) << demo.err;
  const nlohmann::json d = nlohmann::json::parse(demo.out);
  EXPECT_EQ(d["config"]["len"], 600);
  EXPECT_LT(d["max_abs_difference"].get<double>(), 1e-4);
  EXPECT_GT(d["service"]["prefill_seconds"].get<double>(), 0);
  EXPECT_EQ(d["service"]["workers"], 1);
  EXPECT_EQ(d["compared_decode_steps"], 4);  // Steps 0 and 1 of each layer.
  for (const char* side : {"service", "in_process"}) {
    const nlohmann::json& per_layer = d[side]["prefill_seconds_per_layer"];
    ASSERT_EQ(per_layer.size(), 2u) << side;
    EXPECT_NEAR(per_layer[0].get<double>() + per_layer[1].get<double>(),
                d[side]["prefill_seconds"].get<double>(), 1e-9)
        << side;
  }

  const CliRun bench =
      Run("bench --backend cpu --lengths 512 --reference=false --dense=false --repeats 1 "
          "--decode-tokens 2 --hq 2 --hkv 1 --dim 32 --threads 1 --json");
  ASSERT_EQ(bench.exit_code, 0) << bench.err;
  const nlohmann::json b = nlohmann::json::parse(bench.out);
  ASSERT_EQ(b["lengths"].size(), 1u);
  EXPECT_EQ(b["lengths"][0]["length"], 512);
  EXPECT_GT(b["lengths"][0]["cpu_dhsa"]["total_s"].get<double>(), 0);
}

TEST_F(ErgonomicsTest, ProgressBarsOnlyWhenATerminalOrForced) {
  const std::string gen =
      "gen --out " + Path("w") + " --len 600 --hq 2 --hkv 1 --dim 32 " + "--needles 1";
  const CliRun quiet = Run(gen);  // stderr is a file here: no bar.
  ASSERT_EQ(quiet.exit_code, 0) << quiet.err;
  EXPECT_EQ(quiet.err, "");
  const CliRun forced = Run(gen + " --progress on");
  ASSERT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_THAT(forced.err, HasSubstr("%"));
  EXPECT_THAT(forced.err, HasSubstr("writing"));
  EXPECT_THAT(forced.out, Not(HasSubstr("%  ")));  // The bar never mixes into stdout.

  const std::string inputs =
      " --q " + Path("w/q.npy") + " --k " + Path("w/k.npy") + " --v " + Path("w/v.npy");
  const CliRun attend =
      Run("attend" + inputs + " --out " + Path("o.npy") + " --threads 1 --progress on");
  ASSERT_EQ(attend.exit_code, 0) << attend.err;
  EXPECT_THAT(attend.err, HasSubstr("attention in process"));

  for (const std::string& command : {"gen --out " + Path("x"), std::string("bench --backend cpu"),
                                     std::string("demo"), "attend" + inputs + " --out o.npy"}) {
    const CliRun bad = Run(command + " --progress sometimes");
    EXPECT_EQ(bad.exit_code, 2) << command;
    EXPECT_THAT(bad.err, HasSubstr("--progress must be auto, on or off")) << command;
  }
}

TEST_F(ErgonomicsTest, ExitCodesTellBadInputFromServiceErrors) {
  ASSERT_EQ(
      Run("gen --out " + Path("w") + " --len 600 --hq 2 --hkv 1 --dim 32 --needles 1").exit_code,
      0);
  const std::string inputs = " --q " + Path("w/q.npy") + " --k " + Path("w/k.npy") + " --v " +
                             Path("w/v.npy") + " --out " + Path("o.npy");
  struct Case {
    std::string args, message;
    int exit_code;
  };
  // Bad input: 2, whatever the command.
  const std::vector<Case> bad_input = {
      {"gen --out " + Path("g") + " --dtype int8", "int8", 2},
      {"gen --out " + Path("g") + " --len -5", "len", 2},
      {"bench --backend gpu", "--backend gpu has no benchmark", 2},
      {"bench --backend cpu --lengths 1,x", "--lengths", 2},
      {"demo --len 0", "--len and --layers must be >= 1", 2},
      {"demo --policy oracle_topk", "evaluation only", 2},
      {"attend" + inputs + " --target 127.0.0.1:1 --check-rows 4", "--check-rows", 2},
      {"attend --q " + Path("none.npy") + " --k x --v y --out " + Path("o.npy"), "none.npy", 2},
  };
  for (const Case& c : bad_input) {
    SCOPED_TRACE(c.args);
    const CliRun run = Run(c.args);
    EXPECT_EQ(run.exit_code, c.exit_code) << run.err;
    EXPECT_THAT(run.err, HasSubstr(c.message));
  }

  // Nothing listening: 3, naming the address.
  const CliRun unreachable = Run("attend" + inputs + " --target 127.0.0.1:1 --timeout 2");
  EXPECT_EQ(unreachable.exit_code, 3) << unreachable.err;
  EXPECT_THAT(unreachable.err, HasSubstr("'127.0.0.1:1' did not answer"));
  const CliRun demo_unreachable = Run("demo --target 127.0.0.1:1 --len 600 --layers 1");
  EXPECT_EQ(demo_unreachable.exit_code, 3) << demo_unreachable.err;

  // The service answers with an error: 3, with its message; a good call through it: 0.
  const std::string target = StartServer();
  ASSERT_NE(target, "") << "dhsa serve did not start";
  const CliRun rejected = Run("attend" + inputs + " --target " + target + " --policy oracle_topk");
  EXPECT_EQ(rejected.exit_code, 3) << rejected.err;
  EXPECT_THAT(rejected.err, HasSubstr("oracle_topk is evaluation-only"));
  EXPECT_EQ(std::count(rejected.err.begin(), rejected.err.end(), '\n'), 1) << rejected.err;
  EXPECT_FALSE(fs::exists(Path("o.npy")));
  const CliRun ok = Run("attend" + inputs + " --target " + target + " --progress on");
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_THAT(ok.err, HasSubstr("prefill of 600 queries"));
  EXPECT_TRUE(fs::exists(Path("o.npy")));

  // The service dies: 3.
  StopServer();
  const CliRun died = Run("attend" + inputs + " --target " + target + " --timeout 2");
  EXPECT_EQ(died.exit_code, 3) << died.err;
}

}  // namespace
}  // namespace dhsa
