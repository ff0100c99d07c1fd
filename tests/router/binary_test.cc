// The dhsa-router binary: flags, and SIGTERM while a call is in flight (the call completes, the
// process exits 0).
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "gtest/gtest.h"
#include "services/router/router.h"
#include "tests/router/service_test_util.h"

extern char** environ;

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;

// A port that was free a moment ago.
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// Starts `argv` with stderr sent to `stderr_path`.
pid_t Spawn(const std::vector<std::string>& args, const std::string& stderr_path) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 2, stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0644);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  EXPECT_EQ(posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

// Exit status of `pid`, or -1 if it did not exit within `timeout` (then it is killed).
int WaitExit(pid_t pid, std::chrono::seconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  while (std::chrono::steady_clock::now() < end) {
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(RouterBinaryTest, AnUnknownFlagIsOneLineAndExitStatus2) {
  const std::string err = ::testing::TempDir() + "/router_flag.err";
  const pid_t pid = Spawn({DHSA_ROUTER_BINARY, "--workers", "127.0.0.1:1", "--bogus"}, err);
  EXPECT_EQ(WaitExit(pid, std::chrono::seconds(10)), 2);
  const std::string text = ReadFile(err);
  EXPECT_NE(text.find("unknown flag '--bogus'"), std::string::npos) << text;
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 1) << text;
}

TEST(RouterBinaryTest, SigtermLetsTheCallInFlightFinishAndExitsZero) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int worker_port = FreePort(), router_port = FreePort();
  const std::string dir = ::testing::TempDir();
  const pid_t worker =
      Spawn({DHSA_WORKER_BINARY, "--listen", "127.0.0.1:" + std::to_string(worker_port),
             "--capacity-bytes", "100000000", "--threads", "1"},
            dir + "/worker.err");
  const pid_t router = Spawn(
      {DHSA_ROUTER_BINARY, "--listen", "127.0.0.1:" + std::to_string(router_port), "--workers",
       "127.0.0.1:" + std::to_string(worker_port), "--threads", "2", "--drain-seconds", "20"},
      dir + "/router.err");
  auto client = Client::Connect("127.0.0.1:" + std::to_string(router_port));
  ASSERT_TRUE(client.ok()) << client.status() << ReadFile(dir + "/router.err");
  // Ready once the router has reached its worker.
  int ready = 0;
  for (int i = 0; i < 200 && ready != 1; ++i) {
    ready = HealthStatus(client->channel(), router::kAttentionServiceName);
    if (ready != 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(ready, 1) << ReadFile(dir + "/router.err") << ReadFile(dir + "/worker.err");

  SequenceOptions options;
  options.q_heads = 4;
  options.kv_heads = 2;
  options.head_dim = 32;
  options.config = SmallConfig(Policy::kDense);
  auto seq = client->CreateSequence(options);
  ASSERT_TRUE(seq.ok()) << seq.status();
  const Inputs in = MakeInputs(rng, 4, 2, 2500, 32);
  absl::StatusOr<PrefillOutput> got = absl::UnknownError("not run");
  std::thread call([&] { got = seq->Prefill(0, in.q, in.k, in.v); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  kill(router, SIGTERM);
  call.join();
  EXPECT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(WaitExit(router, std::chrono::seconds(30)), 0) << ReadFile(dir + "/router.err");
  kill(worker, SIGTERM);
  EXPECT_EQ(WaitExit(worker, std::chrono::seconds(30)), 0) << ReadFile(dir + "/worker.err");
}

}  // namespace
}  // namespace dhsa::router_test
