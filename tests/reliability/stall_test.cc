// A stalled worker (SIGSTOP, a real dhsa-worker process): calls that need it end within their
// deadline with UNAVAILABLE or DEADLINE_EXCEEDED, the router marks it not ready, sequences on the
// other worker keep being served while the stalled call is pending, and after SIGCONT it is ready
// again and serves new sequences correctly.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "services/router/router.h"
#include "tests/reliability/fault_util.h"
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
    // The first "port N" of the log (no <regex>: GCC 12 warns maybe-uninitialized inside it under
    // ASan at -O1, and the sanitizer builds keep -Werror).
    for (int i = 0; i < 200; ++i) {
      std::ifstream in(log_);
      const std::string text((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      for (size_t at = text.find("port "); at != std::string::npos;
           at = text.find("port ", at + 1)) {
        const size_t digits = at + 5;
        size_t end = digits;
        while (end < text.size() && end - digits < 6 && std::isdigit(text[end])) ++end;
        if (end > digits) return std::stoi(text.substr(digits, end - digits));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return -1;
  }
  void Signal(int signal) { ::kill(pid_, signal); }
  // SIGSTOP, then waits (up to 10 s) until every thread of the process is stopped: on a loaded
  // machine the stop can take effect after a call sent right after kill() was already served.
  bool Stop() {
    ::kill(pid_, SIGSTOP);
    const std::string tasks = "/proc/" + std::to_string(pid_) + "/task";
    for (int i = 0; i < 1000; ++i) {
      bool all = true;
      int seen = 0;
      for (const auto& task : std::filesystem::directory_iterator(tasks)) {
        std::ifstream in(task.path() / "stat");
        const std::string stat((std::istreambuf_iterator<char>(in)),
                               std::istreambuf_iterator<char>());
        const size_t paren = stat.rfind(')');
        if (paren == std::string::npos || paren + 2 >= stat.size()) continue;
        ++seen;
        if (stat[paren + 2] != 'T') all = false;
      }
      if (all && seen > 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

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

  ASSERT_TRUE(w1.Stop()) << "the worker did not stop";
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
  if (!got.ok() && got.status().code() == absl::StatusCode::kUnavailable) {
    // Seen once under TSan (2026-11-29): right after the resumed worker was probed ready, the
    // router's connection to it was reset by the peer and the first store failed with UNAVAILABLE
    // (a retryable code; the layer's undo is retried by the next call). One retry on a new
    // sequence must then succeed; a second failure fails the test.
    std::printf("first call after SIGCONT: %s; retrying once\n", got.status().ToString().c_str());
    so.id = "after-retry";
    after = client->CreateSequence(so);
    ASSERT_TRUE(after.ok()) << after.status();
    got = after->Prefill(0, Rows(in.q, 0, 600), Rows(in.k, 0, 600), Rows(in.v, 0, 600), true);
  }
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(after->Info()->workers_size(), 2);
  absl::StatusOr<AttendResult> want =
      AttendReference(Rows(in.q, 0, 600), Rows(in.k, 0, 600), Rows(in.v, 0, 600), config);
  ASSERT_TRUE(want.ok());
  router_test::ExpectMatches(*got, *want, true, "after SIGCONT");
}

// Starts a router over two worker processes; sequences shorter than a stripe (128 tokens) live on
// one worker: the first created on worker 0, the second on worker 1 (creations rotate the start).
std::unique_ptr<router::RouterServer> StartRouter(int p0, int p1) {
  router::RouterOptions o;
  o.listen_address = "127.0.0.1:0";
  o.worker_addresses = {"127.0.0.1:" + std::to_string(p0), "127.0.0.1:" + std::to_string(p1)};
  o.stripe_tokens = 128;
  o.threads = 2;
  o.probe_interval = std::chrono::milliseconds(200);
  o.worker_call_timeout = std::chrono::seconds(2);
  absl::StatusOr<std::unique_ptr<router::RouterServer>> r = router::RouterServer::Start(o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : nullptr;
}

TEST(StallTest, AStoppedWorkerDoesNotStallSequencesOnTheOtherWorker) {
  const uint64_t seed = ::dhsa::testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  const std::string base = "/tmp/dhsa-stall2-" + std::to_string(getpid());
  WorkerProcess w0(base + "-0.log"), w1(base + "-1.log");
  const int p0 = w0.Port(), p1 = w1.Port();
  ASSERT_GT(p0, 0);
  ASSERT_GT(p1, 0);
  std::unique_ptr<router::RouterServer> r = StartRouter(p0, p1);
  ASSERT_NE(r, nullptr);
  ASSERT_TRUE(WaitAvailable(*r, 0, true) && WaitAvailable(*r, 1, true));
  ClientOptions co;
  co.timeout = std::chrono::seconds(3);
  absl::StatusOr<Client> client = Client::Connect("127.0.0.1:" + std::to_string(r->port()), co);
  ASSERT_TRUE(client.ok());
  CheckedSequence kept(*client, "kept", seed);
  CheckedSequence stalled(*client, "stalled", seed + 1);
  ASSERT_NO_FATAL_FAILURE(kept.Prefill(100));
  ASSERT_NO_FATAL_FAILURE(stalled.Prefill(100));
  ASSERT_EQ(kept.Workers(), std::vector<std::string>{"127.0.0.1:" + std::to_string(p0)});
  ASSERT_EQ(stalled.Workers(), std::vector<std::string>{"127.0.0.1:" + std::to_string(p1)});
  ASSERT_TRUE(stalled.Decode().ok());
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };
  double before_ms = 0;
  for (int i = 0; i < 3; ++i) {
    const auto t = Clock::now();
    ASSERT_TRUE(kept.Decode().ok());
    before_ms = std::max(before_ms, ms(Clock::now() - t));
  }

  ASSERT_TRUE(w1.Stop()) << "the worker did not stop";
  const auto start = Clock::now();
  std::atomic<bool> stalled_done{false};
  absl::Status stalled_status;
  Clock::time_point stalled_end;
  std::thread stalled_call([&] {
    stalled_status = stalled.Decode();
    stalled_end = Clock::now();
    stalled_done = true;
  });
  // While the stalled worker's call is pending, the other worker's sequence is served.
  std::vector<double> during_ms;
  std::vector<Clock::time_point> during_end;
  for (int i = 0; i < 5; ++i) {
    const auto t = Clock::now();
    EXPECT_TRUE(kept.Decode().ok());
    during_end.push_back(Clock::now());
    during_ms.push_back(ms(during_end.back() - t));
  }
  stalled_call.join();
  EXPECT_TRUE(stalled_status.code() == absl::StatusCode::kUnavailable ||
              stalled_status.code() == absl::StatusCode::kDeadlineExceeded)
      << stalled_status;
  EXPECT_LT(ms(stalled_end - start), 3500) << "the call outlived its 3 s deadline";
  for (size_t i = 0; i < during_end.size(); ++i) {
    EXPECT_LT(during_end[i], stalled_end)
        << "decode " << i << " of the other worker's sequence waited for the stalled call";
  }
  std::printf(
      "kept decode: before the stall max %.1f ms; during it %.1f %.1f %.1f %.1f %.1f ms; "
      "stalled call ended after %.0f ms with %s\n",
      before_ms, during_ms[0], during_ms[1], during_ms[2], during_ms[3], during_ms[4],
      ms(stalled_end - start), absl::StatusCodeToString(stalled_status.code()).c_str());
  EXPECT_TRUE(WaitAvailable(*r, 1, false)) << "the stopped worker still counts as ready";
  EXPECT_TRUE(kept.Decode().ok());

  w1.Signal(SIGCONT);
  EXPECT_TRUE(WaitAvailable(*r, 1, true)) << "the worker was not accepted back";
  EXPECT_TRUE(kept.Decode().ok());
  CheckedSequence after(*client, "after", seed + 2);
  ASSERT_NO_FATAL_FAILURE(after.Prefill(150));
  EXPECT_EQ(after.Workers().size(), 2u) << "a new sequence does not use the returned worker";
  EXPECT_TRUE(after.Decode().ok());
  // The stalled sequence: its failed decode was undone (by its rollback, or when its worker could
  // not confirm that in time, by this call first), and it goes on with the reference's answers.
  const absl::Status again = DecodeWhenLayerFree(stalled);
  EXPECT_TRUE(again.ok()) << again;
  std::printf("the stalled sequence after SIGCONT: %s\n", again.ToString().c_str());
}

}  // namespace
}  // namespace dhsa::reliability_test
