// A stalled worker (SIGSTOP, a real dhsa-worker process): calls that need it end within their
// deadline with UNAVAILABLE or DEADLINE_EXCEEDED, the router marks it not ready, a sequence that
// avoids it keeps working, and after SIGCONT it is ready again and serves new sequences correctly.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <regex>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "services/router/router.h"
#include "tests/router/service_test_util.h"

namespace dhsa::reliability_test {
namespace {

using ::dhsa::router_test::Inputs;
using ::dhsa::router_test::MakeInputs;
using ::dhsa::router_test::Rows;
using ::dhsa::router_test::SmallConfig;

// A dhsa-worker child process; its log holds the port it listens on.
class WorkerProcess {
 public:
  explicit WorkerProcess(const std::string& log) : log_(log) {
    pid_ = fork();
    if (pid_ == 0) {
      FILE* out = std::freopen(log.c_str(), "w", stdout);
      (void)out;
      dup2(fileno(stdout), fileno(stderr));
      const char* args[] = {DHSA_WORKER_BINARY, "--listen", "127.0.0.1:0", "--threads", "1",
                            "--capacity-bytes", "67108864", nullptr};
      execv(args[0], const_cast<char* const*>(args));
      _exit(127);
    }
  }
  ~WorkerProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    std::remove(log_.c_str());
  }
  int Port() const {
    const std::regex port("port (\\d+)");
    for (int i = 0; i < 200; ++i) {
      std::ifstream in(log_);
      const std::string text((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      std::smatch m;
      if (std::regex_search(text, m, port)) return std::stoi(m[1]);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return -1;
  }
  void Signal(int signal) { ::kill(pid_, signal); }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

// Waits up to 10 s for worker `w` to be (un)available in the router's view.
bool WaitAvailable(router::RouterServer& r, int w, bool available) {
  for (int i = 0; i < 100; ++i) {
    if (r.service().pool().Loads()[static_cast<size_t>(w)].available == available) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

TEST(StallTest, StoppedWorkerFailsFastIsMarkedNotReadyAndComesBack) {
  const uint64_t seed = ::dhsa::testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const std::string base = "/tmp/dhsa-stall-" + std::to_string(getpid());
  WorkerProcess w0(base + "-0.log"), w1(base + "-1.log");
  const int p0 = w0.Port(), p1 = w1.Port();
  ASSERT_GT(p0, 0);
  ASSERT_GT(p1, 0);
  router::RouterOptions o;
  o.listen_address = "127.0.0.1:0";
  o.worker_addresses = {"127.0.0.1:" + std::to_string(p0), "127.0.0.1:" + std::to_string(p1)};
  o.stripe_tokens = 128;
  o.threads = 2;
  o.probe_interval = std::chrono::milliseconds(200);
  o.worker_call_timeout = std::chrono::seconds(2);
  absl::StatusOr<std::unique_ptr<router::RouterServer>> r = router::RouterServer::Start(o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(WaitAvailable(**r, 0, true) && WaitAvailable(**r, 1, true));
  ClientOptions co;
  co.timeout = std::chrono::seconds(3);
  absl::StatusOr<Client> client = Client::Connect("127.0.0.1:" + std::to_string((*r)->port()), co);
  ASSERT_TRUE(client.ok());
  const DhsaConfig config = SmallConfig(Policy::kDense);
  SequenceOptions so;
  so.q_heads = 4;
  so.kv_heads = 2;
  so.head_dim = 32;
  so.config = config;
  so.id = "spans-both";
  absl::StatusOr<Sequence> both = client->CreateSequence(so);
  ASSERT_TRUE(both.ok());
  const Inputs in = MakeInputs(rng, 4, 2, 601, 32);
  ASSERT_TRUE(both->Prefill(0, Rows(in.q, 0, 600), Rows(in.k, 0, 600), Rows(in.v, 0, 600)).ok());
  ASSERT_EQ(both->Info()->workers_size(), 2);

  w1.Signal(SIGSTOP);
  const auto start = std::chrono::steady_clock::now();
  const absl::Status stalled =
      both->Decode(0, Rows(in.q, 600, 601), Rows(in.k, 600, 601), Rows(in.v, 600, 601)).status();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(stalled.code() == absl::StatusCode::kUnavailable ||
              stalled.code() == absl::StatusCode::kDeadlineExceeded)
      << stalled;
  EXPECT_LT(seconds, 3.5) << "the call outlived its 3 s deadline";
  EXPECT_TRUE(WaitAvailable(**r, 1, false)) << "the stopped worker still counts as ready";

  w1.Signal(SIGCONT);
  EXPECT_TRUE(WaitAvailable(**r, 1, true)) << "the worker was not accepted back";
  so.id = "after";
  absl::StatusOr<Sequence> after = client->CreateSequence(so);
  ASSERT_TRUE(after.ok());
  absl::StatusOr<PrefillOutput> got =
      after->Prefill(0, Rows(in.q, 0, 600), Rows(in.k, 0, 600), Rows(in.v, 0, 600), true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(after->Info()->workers_size(), 2);
  absl::StatusOr<AttendResult> want =
      AttendReference(Rows(in.q, 0, 600), Rows(in.k, 0, 600), Rows(in.v, 0, 600), config);
  ASSERT_TRUE(want.ok());
  router_test::ExpectMatches(*got, *want, true, "after SIGCONT");
}

}  // namespace
}  // namespace dhsa::reliability_test
