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

// The router's /metrics page on 127.0.0.1:`port` (empty if it does not answer).
std::string ScrapeMetrics(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  std::string page;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
      char buffer[4096];
      ssize_t n;
      while ((n = read(fd, buffer, sizeof(buffer))) > 0) page.append(buffer, n);
    }
  }
  close(fd);
  return page;
}

// The sum of dhsa_inflight_requests over its labels on a /metrics page.
double InflightRequests(const std::string& page) {
  double sum = 0;
  std::istringstream lines(page);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("dhsa_inflight_requests{", 0) != 0) continue;
    sum += std::stod(line.substr(line.rfind(' ') + 1));
  }
  return sum;
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

// The call is held in flight deterministically: the worker is stopped (SIGSTOP) before the prefill
// starts, the test waits until the router's /metrics counts the call in progress, sends SIGTERM,
// and only then lets the worker go on. The drain must let that call finish and exit 0.
TEST(RouterBinaryTest, SigtermLetsTheCallInFlightFinishAndExitsZero) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int worker_port = FreePort(), router_port = FreePort(), metrics_port = FreePort();
  const std::string dir = ::testing::TempDir();
  const pid_t worker =
      Spawn({DHSA_WORKER_BINARY, "--listen", "127.0.0.1:" + std::to_string(worker_port),
             "--capacity-bytes", "100000000", "--threads", "1"},
            dir + "/worker.err");
  const pid_t router =
      Spawn({DHSA_ROUTER_BINARY, "--listen", "127.0.0.1:" + std::to_string(router_port),
             "--workers", "127.0.0.1:" + std::to_string(worker_port), "--threads", "2",
             "--drain-seconds", "60", "--worker-call-timeout", "60", "--transport", "grpc",
             "--metrics-port", std::to_string(metrics_port)},
            dir + "/router.err");
  // Shared memory off: the prefill is then one stream, the only call the router has in flight.
  ClientOptions client_options;
  client_options.shared_memory = false;
  auto client = Client::Connect("127.0.0.1:" + std::to_string(router_port), client_options);
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
  // The router counts a call out in its OnDone, which may run after the client has the answer
  // (seen under TSan): wait until the calls before this one are counted out.
  int before = -1;
  for (int i = 0; i < 200 && before != 0; ++i) {
    before = InflightRequests(ScrapeMetrics(metrics_port));
    if (before != 0) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_EQ(before, 0) << ScrapeMetrics(metrics_port);
  ASSERT_EQ(kill(worker, SIGSTOP), 0);
  absl::StatusOr<PrefillOutput> got = absl::UnknownError("not run");
  std::thread call([&] { got = seq->Prefill(0, in.q, in.k, in.v); });
  bool in_flight = false;
  for (int i = 0; i < 3000 && !in_flight; ++i) {
    in_flight = InflightRequests(ScrapeMetrics(metrics_port)) >= 1;
    if (!in_flight) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(in_flight) << "the router never counted the prefill in flight";
  kill(router, SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  kill(worker, SIGCONT);
  call.join();
  EXPECT_TRUE(got.ok()) << got.status() << ReadFile(dir + "/router.err");
  EXPECT_EQ(WaitExit(router, std::chrono::seconds(60)), 0) << ReadFile(dir + "/router.err");
  kill(worker, SIGTERM);
  EXPECT_EQ(WaitExit(worker, std::chrono::seconds(30)), 0) << ReadFile(dir + "/worker.err");
}

}  // namespace
}  // namespace dhsa::router_test
