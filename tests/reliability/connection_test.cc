// The path between the router and one worker drops (a TCP proxy in between is cut): calls that need
// that worker end within their deadline (UNAVAILABLE when the connection closes; UNAVAILABLE or
// DEADLINE_EXCEEDED when it goes silent), the router marks the worker not ready, a sequence on the
// other worker keeps serving correct answers meanwhile, and when the path returns the worker is
// ready again and serves new sequences correctly.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "services/router/router.h"
#include "services/worker/worker_server.h"
#include "tests/reliability/fault_util.h"

namespace dhsa::reliability_test {
namespace {

constexpr auto kDeadline = std::chrono::seconds(3);

struct Cluster {
  std::unique_ptr<WorkerServer> workers[2];
  std::unique_ptr<TcpProxy> proxies[2];
  std::unique_ptr<router::RouterServer> router;
  std::unique_ptr<Client> client;
};

void StartCluster(Cluster& c) {
  for (int i = 0; i < 2; ++i) {
    WorkerOptions wo;
    wo.listen_address = "127.0.0.1:0";
    wo.capacity_bytes = int64_t{64} << 20;
    wo.threads = 1;
    absl::StatusOr<std::unique_ptr<WorkerServer>> w = WorkerServer::Start(wo);
    ASSERT_TRUE(w.ok()) << w.status();
    c.workers[i] = *std::move(w);
    c.proxies[i] = std::make_unique<TcpProxy>(c.workers[i]->port());
  }
  router::RouterOptions o;
  o.listen_address = "127.0.0.1:0";
  o.worker_addresses = {c.proxies[0]->address(), c.proxies[1]->address()};
  // Sequences shorter than a stripe live on one worker: the first created on worker 0, the second
  // on worker 1 (creations rotate the zigzag's start).
  o.stripe_tokens = 128;
  o.threads = 2;
  o.probe_interval = std::chrono::milliseconds(200);
  o.worker_call_timeout = std::chrono::seconds(2);
  absl::StatusOr<std::unique_ptr<router::RouterServer>> r = router::RouterServer::Start(o);
  ASSERT_TRUE(r.ok()) << r.status();
  c.router = *std::move(r);
  ASSERT_TRUE(WaitAvailable(*c.router, 0, true) && WaitAvailable(*c.router, 1, true));
  ClientOptions co;
  co.timeout = kDeadline;
  absl::StatusOr<Client> client =
      Client::Connect("127.0.0.1:" + std::to_string(c.router->port()), co);
  ASSERT_TRUE(client.ok()) << client.status();
  c.client = std::make_unique<Client>(*std::move(client));
}

void CutAndRestore(TcpProxy::Mode cut) {
  const uint64_t seed = ::dhsa::testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Cluster c;
  ASSERT_NO_FATAL_FAILURE(StartCluster(c));
  CheckedSequence kept(*c.client, "kept", seed);
  CheckedSequence cut_off(*c.client, "cut-off", seed + 1);
  ASSERT_NO_FATAL_FAILURE(kept.Prefill(100));
  ASSERT_NO_FATAL_FAILURE(cut_off.Prefill(100));
  ASSERT_EQ(kept.Workers(), std::vector<std::string>{c.proxies[0]->address()});
  ASSERT_EQ(cut_off.Workers(), std::vector<std::string>{c.proxies[1]->address()});
  ASSERT_TRUE(kept.Decode().ok());
  ASSERT_TRUE(cut_off.Decode().ok());

  c.proxies[1]->SetMode(cut);
  const auto start = std::chrono::steady_clock::now();
  const absl::Status status = cut_off.Decode();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (cut == TcpProxy::Mode::kRefuse) {
    EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  } else {
    EXPECT_TRUE(status.code() == absl::StatusCode::kUnavailable ||
                status.code() == absl::StatusCode::kDeadlineExceeded)
        << status;
  }
  EXPECT_LT(seconds, 3.5) << "the call outlived its 3 s deadline";
  std::printf("%s path: the cut-off call ended after %.0f ms with %s\n",
              cut == TcpProxy::Mode::kRefuse ? "closed" : "silent", seconds * 1000,
              absl::StatusCodeToString(status.code()).c_str());
  EXPECT_TRUE(WaitAvailable(*c.router, 1, false)) << "the cut-off worker still counts as ready";
  // The other worker's sequence keeps serving, and new sequences go to it only.
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(kept.Decode().ok());
  CheckedSequence during(*c.client, "during", seed + 2);
  ASSERT_NO_FATAL_FAILURE(during.Prefill(140));
  EXPECT_EQ(during.Workers(), std::vector<std::string>{c.proxies[0]->address()});
  EXPECT_TRUE(during.Decode().ok());

  c.proxies[1]->SetMode(TcpProxy::Mode::kForward);
  EXPECT_TRUE(WaitAvailable(*c.router, 1, true)) << "the worker was not accepted back";
  CheckedSequence after(*c.client, "after", seed + 3);
  ASSERT_NO_FATAL_FAILURE(after.Prefill(150));
  EXPECT_EQ(after.Workers().size(), 2u) << "a new sequence does not use the returned worker";
  EXPECT_TRUE(after.Decode().ok());
  EXPECT_TRUE(kept.Decode().ok());
  // The cut-off sequence: its failed decode was undone (by its rollback, or when its worker could
  // not confirm that, by this call first), and it goes on with the reference's answers.
  const absl::Status again = DecodeWhenLayerFree(cut_off);
  EXPECT_TRUE(again.ok()) << again;
  std::printf("the cut-off sequence after the path returned: %s\n", again.ToString().c_str());
}

TEST(ConnectionTest, ClosedPathFailsFastAndComesBack) { CutAndRestore(TcpProxy::Mode::kRefuse); }

TEST(ConnectionTest, SilentPathEndsWithinTheDeadlineAndComesBack) {
  CutAndRestore(TcpProxy::Mode::kBlackhole);
}

}  // namespace
}  // namespace dhsa::reliability_test
