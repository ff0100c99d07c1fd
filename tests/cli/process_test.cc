// The service as separate processes on loopback: dhsa-worker x2 and dhsa-router, driven by
// `dhsa attend --target` and the C++ SDK.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <string>
#include <thread>

#include "clients/cpp/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dhsa.h"
#include "kernels/io/npy.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

namespace fs = std::filesystem;

// A child process whose stdout and stderr go to a file; the port it prints is read from there.
class Process {
 public:
  Process(const std::vector<std::string>& argv, const std::string& log) : log_(log) {
    pid_ = fork();
    if (pid_ == 0) {
      FILE* out = std::freopen(log.c_str(), "w", stdout);
      (void)out;
      dup2(fileno(stdout), fileno(stderr));
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
  }
  ~Process() { Kill(SIGKILL); }

  // Waits up to 20 s for "port N" in the output.
  int Port() const {
    const std::regex port("port (\\d+)");
    for (int i = 0; i < 200; ++i) {
      std::ifstream in(log_);
      std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      std::smatch m;
      if (std::regex_search(text, m, port)) return std::stoi(m[1]);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return -1;
  }
  void Kill(int signal) {
    if (pid_ > 0) {
      ::kill(pid_, signal);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

class ProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = testing::FreshSeed();
    dir_ = fs::temp_directory_path() / ("dhsa_process_test_" + std::to_string(seed_));
    fs::create_directories(dir_);
    for (int i = 0; i < 2; ++i) {
      workers_.push_back(std::make_unique<Process>(
          std::vector<std::string>{DHSA_WORKER_PATH, "--listen", "127.0.0.1:0", "--threads", "1"},
          (dir_ / ("worker" + std::to_string(i) + ".log")).string()));
    }
    std::string addresses;
    for (auto& w : workers_) {
      const int port = w->Port();
      ASSERT_GT(port, 0) << "a worker did not start";
      addresses +=
          (addresses.empty() ? "" : ",") + std::string("127.0.0.1:") + std::to_string(port);
    }
    router_ = std::make_unique<Process>(
        std::vector<std::string>{DHSA_ROUTER_PATH, "--listen", "127.0.0.1:0", "--workers",
                                 addresses, "--stripe-tokens", "512", "--threads", "2"},
        (dir_ / "router.log").string());
    const int port = router_->Port();
    ASSERT_GT(port, 0) << "the router did not start";
    target_ = "127.0.0.1:" + std::to_string(port);
  }
  void TearDown() override {
    router_.reset();
    workers_.clear();
    fs::remove_all(dir_);
  }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  uint64_t seed_;
  fs::path dir_;
  std::vector<std::unique_ptr<Process>> workers_;
  std::unique_ptr<Process> router_;
  std::string target_;
};

int Shell(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_F(ProcessTest, AttendThroughSeparateProcessesEqualsTheLibrary) {
  SCOPED_TRACE(seed_);
  std::mt19937_64 rng(seed_);
  const Tensor q = testing::RandomTensor(rng, 4, 700, 64);
  const Tensor k = testing::SegmentedTensor(rng, 2, 2100, 64);
  const Tensor v = testing::RandomTensor(rng, 2, 2100, 64);
  ASSERT_TRUE(WriteNpy(Path("q.npy"), q).ok());
  ASSERT_TRUE(WriteNpy(Path("k.npy"), k).ok());
  ASSERT_TRUE(WriteNpy(Path("v.npy"), v).ok());
  for (const char* policy : {"dhsa", "block_topk", "streaming", "dense"}) {
    SCOPED_TRACE(policy);
    const std::string out = Path(std::string("o_") + policy + ".npy");
    ASSERT_EQ(Shell(std::string(DHSA_CLI_PATH) + " attend --q " + Path("q.npy") + " --k " +
                    Path("k.npy") + " --v " + Path("v.npy") + " --out " + out + " --policy " +
                    policy + " --budget 768 --target " + target_ + " > /dev/null"),
              0);
    DhsaConfig config;
    config.policy = *ParsePolicy(policy);
    config.budget = 768;
    auto want = AttendReference(q, k, v, config);
    ASSERT_TRUE(want.ok());
    auto got = ReadNpy(out);
    ASSERT_TRUE(got.ok());
    EXPECT_LT(testing::MaxAbsDiff(*got, want->o), 1e-5);
  }
}

TEST_F(ProcessTest, AKilledWorkerMakesItsSequencesUnavailableWhileOthersWork) {
  SCOPED_TRACE(seed_);
  std::mt19937_64 rng(seed_);
  ClientOptions options;
  options.timeout = std::chrono::seconds(20);
  auto client = Client::Connect(target_, options);
  ASSERT_TRUE(client.ok()) << client.status();
  SequenceOptions so;
  so.q_heads = 2;
  so.kv_heads = 1;
  so.head_dim = 32;
  // Short sequences: one stripe each, on different workers (each sequence's zigzag starts at the
  // next worker).
  std::vector<Sequence> seqs;
  std::vector<std::string> holder;
  for (int i = 0; i < 2; ++i) {
    auto seq = client->CreateSequence(so);
    ASSERT_TRUE(seq.ok()) << seq.status();
    auto out = seq->Prefill(0, testing::RandomTensor(rng, 2, 300, 32),
                            testing::RandomTensor(rng, 1, 300, 32),
                            testing::RandomTensor(rng, 1, 300, 32));
    ASSERT_TRUE(out.ok()) << out.status();
    auto info = seq->Info();
    ASSERT_TRUE(info.ok());
    ASSERT_EQ(info->workers_size(), 1);
    holder.push_back(info->workers(0));
    seqs.push_back(*seq);
  }
  ASSERT_NE(holder[0], holder[1]);
  const int victim =
      holder[0].find(":" + std::to_string(workers_[0]->Port())) != std::string::npos ? 0 : 1;
  workers_[victim]->Kill(SIGKILL);
  auto decode = [&](const Sequence& s) {
    return s.Decode(0, testing::RandomTensor(rng, 2, 1, 32), testing::RandomTensor(rng, 1, 1, 32),
                    testing::RandomTensor(rng, 1, 1, 32));
  };
  const auto start = std::chrono::steady_clock::now();
  auto lost = decode(seqs[0]);
  EXPECT_EQ(lost.status().code(), absl::StatusCode::kUnavailable) << lost.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  auto kept = decode(seqs[1]);
  EXPECT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(kept->length, 301);
}

}  // namespace
}  // namespace dhsa
