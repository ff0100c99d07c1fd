// Workers found through DNS, and a 128K-token layer through the default 4 MiB messages.
#include "gtest/gtest.h"
#include "services/router/router.h"
#include "services/router/workers.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;

TEST(WorkerDnsTest, ResolvesTargetsAndRejectsMalformedOnes) {
  auto resolved = router::ResolveDnsTarget("dns:///localhost:4321");
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  ASSERT_FALSE(resolved->empty());
  EXPECT_NE(std::find(resolved->begin(), resolved->end(), "127.0.0.1:4321"), resolved->end());
  EXPECT_TRUE(router::ResolveDnsTarget("dns:localhost:1").ok());
  EXPECT_EQ(router::ResolveDnsTarget("localhost:1").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router::ResolveDnsTarget("dns:///localhost").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(WorkerDnsTest, ARouterFindsItsWorkerThroughDns) {
  WorkerOptions w;
  w.listen_address = "127.0.0.1:0";
  w.capacity_bytes = 64 << 20;
  w.threads = 1;
  auto worker = WorkerServer::Start(w);
  ASSERT_TRUE(worker.ok()) << worker.status();
  router::RouterOptions options;
  options.listen_address = "127.0.0.1:0";
  options.worker_dns = "dns:///localhost:" + std::to_string((*worker)->port());
  options.threads = 1;
  auto server = router::RouterServer::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = Client::Connect("127.0.0.1:" + std::to_string((*server)->port()));
  ASSERT_TRUE(client.ok());
  EXPECT_EQ(HealthStatus(client->channel(), router::kAttentionServiceName), 1);
  SequenceOptions o;
  o.head_dim = 8;
  auto seq = client->CreateSequence(o);
  ASSERT_TRUE(seq.ok()) << seq.status();
  std::mt19937_64 rng(FreshSeed());
  const Inputs in = MakeInputs(rng, 1, 1, 40, 8);
  EXPECT_TRUE(seq->Prefill(0, in.q, in.k, in.v).ok());
  (*server)->Shutdown(std::chrono::seconds(1));
  (*worker)->Shutdown(absl::ZeroDuration());
}

// 131072 tokens, Hq = 2, d = 64: q alone is 64 MiB, sent and answered in pieces of the default
// message size. Streaming keeps the attention cheap; the output is checked on sampled rows.
TEST(RouterScaleTest, A128KTokenLayerGoesThroughWithDefaultMessages) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(2, /*stripe_tokens=*/32768, int64_t{1} << 30);
  ASSERT_NE(h.client, nullptr);
  constexpr int64_t kLen = 131072, kHq = 2, kHkv = 1, kDim = 64;
  DhsaConfig config;
  config.policy = Policy::kStreaming;
  config.budget = 48;
  config.sink = 16;
  config.q_block = 32;
  config.local = 32;
  Sequence seq = h.Create(config, 1, kHq, kHkv, kDim);
  const Inputs in = {testing::RandomTensor(rng, kHq, kLen, kDim),
                     testing::RandomTensor(rng, kHkv, kLen, kDim),
                     testing::RandomTensor(rng, kHkv, kLen, kDim)};
  auto got = seq.Prefill(0, in.q, in.k, in.v, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->length, kLen);
  ASSERT_EQ(got->o.shape, (std::vector<int64_t>{kHq, kLen, kDim}));
  // Rows near the end see the sink and the last budget - sink keys of their block.
  const int64_t t0 = kLen - 100;
  auto want = AttendReference(Rows(in.q, t0, kLen), in.k, in.v, config);
  ASSERT_TRUE(want.ok());
  AttentionOutput tail;
  tail.o = Rows(got->o, t0, kLen);
  Tensor lse3 = got->lse;
  lse3.shape = {kHq, kLen, 1};
  tail.lse = Rows(lse3, t0, kLen);
  tail.lse.shape = {kHq, kLen - t0};
  ExpectMatches(tail, *want, true, "last rows");
  auto info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->workers_size(), 2);
}

}  // namespace
}  // namespace dhsa::router_test
