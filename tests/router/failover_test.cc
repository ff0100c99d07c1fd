// A worker that goes away makes the sequences it holds UNAVAILABLE; sequences held elsewhere keep
// working, new ones avoid it, and the router stays ready.
#include <thread>

#include "gtest/gtest.h"
#include "services/router/router.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;

TEST(RouterFailoverTest, AWorkerDownFailsOnlyTheSequencesItHolds) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // Stripes longer than any sequence here: each layer lives on one worker.
  Harness h = Harness::Start(2, /*stripe_tokens=*/4096);
  ASSERT_NE(h.client, nullptr);
  constexpr int64_t kHq = 2, kHkv = 2, kDim = 32, kLen = 200;
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  EXPECT_EQ(HealthStatus(h.client->channel(), router::kAttentionServiceName), 1);

  // Consecutive sequences start their placement on consecutive workers.
  Sequence a = h.Create(config, 1, kHq, kHkv, kDim);
  Sequence b = h.Create(config, 1, kHq, kHkv, kDim);
  const Inputs in_a = MakeInputs(rng, kHq, kHkv, kLen + 1, kDim);
  const Inputs in_b = MakeInputs(rng, kHq, kHkv, kLen + 1, kDim);
  ASSERT_TRUE(
      a.Prefill(0, Rows(in_a.q, 0, kLen), Rows(in_a.k, 0, kLen), Rows(in_a.v, 0, kLen)).ok());
  ASSERT_TRUE(
      b.Prefill(0, Rows(in_b.q, 0, kLen), Rows(in_b.k, 0, kLen), Rows(in_b.v, 0, kLen)).ok());
  auto info_a = a.Info();
  auto info_b = b.Info();
  ASSERT_TRUE(info_a.ok() && info_b.ok());
  ASSERT_EQ(info_a->workers_size(), 1);
  ASSERT_EQ(info_b->workers_size(), 1);
  ASSERT_NE(info_a->workers(0), info_b->workers(0));
  const int dead =
      info_a->workers(0) == absl::StrCat("127.0.0.1:", h.service->worker(0).port()) ? 0 : 1;
  h.service->worker(dead).Shutdown(absl::ZeroDuration());

  const absl::Status lost = a.Decode(0, Rows(in_a.q, kLen, kLen + 1), Rows(in_a.k, kLen, kLen + 1),
                                     Rows(in_a.v, kLen, kLen + 1))
                                .status();
  EXPECT_EQ(lost.code(), absl::StatusCode::kUnavailable) << lost;

  auto got = b.Decode(0, Rows(in_b.q, kLen, kLen + 1), Rows(in_b.k, kLen, kLen + 1),
                      Rows(in_b.v, kLen, kLen + 1), true);
  ASSERT_TRUE(got.ok()) << got.status();
  auto prior =
      AttendReference(Rows(in_b.q, 0, kLen), Rows(in_b.k, 0, kLen), Rows(in_b.v, 0, kLen), config);
  ASSERT_TRUE(prior.ok());
  AttendOptions decode;
  decode.prior_boundaries = &prior->boundaries;
  decode.decode = true;
  auto want = AttendReference(Rows(in_b.q, kLen, kLen + 1), in_b.k, in_b.v, config, decode);
  ASSERT_TRUE(want.ok());
  ExpectMatches(*got, *want, true, "decode on the live worker");

  // A new sequence goes to the live worker, whatever its turn in the rotation.
  for (int i = 0; i < 2; ++i) {
    Sequence c = h.Create(config, 1, kHq, kHkv, kDim);
    auto fresh = c.Prefill(0, Rows(in_b.q, 0, kLen), Rows(in_b.k, 0, kLen), Rows(in_b.v, 0, kLen));
    EXPECT_TRUE(fresh.ok()) << fresh.status();
  }
  EXPECT_EQ(HealthStatus(h.client->channel(), router::kAttentionServiceName), 1);
  EXPECT_EQ(HealthStatus(h.client->channel(), ""), 1);
  // The lost sequence can still be released.
  EXPECT_TRUE(a.Release().ok());
}

// Stores that succeed on one worker while another is down are undone with the workers' Truncate:
// whether the layer held keys before (its stripe is cut back) or not (the layer is freed).
TEST(RouterFailoverTest, AFailedStoreLeavesNothingBehind) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // The router learns that a worker is down from a failed call only (no probe during the test).
  Harness h = Harness::Start(3, /*stripe_tokens=*/128, 0, std::chrono::minutes(10));
  ASSERT_NE(h.client, nullptr);
  constexpr int64_t kHq = 2, kHkv = 1, kDim = 32;
  const DhsaConfig config = SmallConfig(Policy::kDense);
  const Inputs in = MakeInputs(rng, kHq, kHkv, 600, kDim);
  Sequence seq = h.Create(config, 2, kHq, kHkv, kDim);  // Its stripes go to workers 0, 1, 2, 2, ...
  ASSERT_TRUE(seq.Prefill(1, Rows(in.q, 0, 100), Rows(in.k, 0, 100), Rows(in.v, 0, 100)).ok());

  // Layer 1 holds [0, 100) on worker 0. Appending [100, 600): [100, 128) joins that stripe, the
  // next stripe goes to worker 1, which is down. Worker 0 cuts its stripe back to 100, and the
  // retry places the new stripes on the workers still up.
  h.service->worker(1).Shutdown(absl::ZeroDuration());
  absl::Status s =
      seq.Prefill(1, Rows(in.q, 100, 600), Rows(in.k, 100, 600), Rows(in.v, 100, 600)).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  auto info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(1), 100);
  absl::StatusOr<PrefillOutput> retried = absl::UnknownError("not run");
  for (int attempt = 0; attempt < 100; ++attempt) {  // The rollback may still hold the layer.
    retried =
        seq.Prefill(1, Rows(in.q, 100, 600), Rows(in.k, 100, 600), Rows(in.v, 100, 600), true);
    if (retried.status().code() != absl::StatusCode::kFailedPrecondition) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(retried.ok()) << retried.status();
  auto want = AttendReference(Rows(in.q, 100, 600), in.k, in.v, config);
  ASSERT_TRUE(want.ok());
  ExpectMatches(*retried, *want, true, "layer 1 after the undone append");

  // Layer 0 is empty: its stripes go to workers 0 and 2 (1 is known down); worker 2 is down too,
  // so worker 0's stripes are stored and then freed.
  h.service->worker(2).Shutdown(absl::ZeroDuration());
  s = seq.Prefill(0, in.q, in.k, in.v).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 0);
  EXPECT_EQ(info->layer_lengths(1), 600);
  // Everything now goes to worker 0, which holds nothing stale of layer 0 (else: overlap).
  absl::StatusOr<PrefillOutput> got = absl::UnknownError("not run");
  for (int attempt = 0; attempt < 100; ++attempt) {
    got = seq.Prefill(0, in.q, in.k, in.v, true);
    if (got.status().code() != absl::StatusCode::kFailedPrecondition) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(got.ok()) << got.status();
  want = AttendReference(in.q, in.k, in.v, config);
  ASSERT_TRUE(want.ok());
  ExpectMatches(*got, *want, true, "layer 0 after the undone call");
  EXPECT_TRUE(seq.Release().ok());
}

TEST(RouterFailoverTest, ReadinessFollowsTheWorkers) {
  Harness h = Harness::Start(1, /*stripe_tokens=*/256);
  ASSERT_NE(h.client, nullptr);
  EXPECT_EQ(HealthStatus(h.client->channel(), router::kAttentionServiceName), 1);
  h.service->worker(0).Shutdown(absl::ZeroDuration());
  int status = 1;
  for (int i = 0; i < 100 && status == 1; ++i) {  // The probe runs every 200 ms.
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    status = HealthStatus(h.client->channel(), router::kAttentionServiceName);
  }
  EXPECT_EQ(status, 2);                                 // NOT_SERVING: no worker reachable.
  EXPECT_EQ(HealthStatus(h.client->channel(), ""), 1);  // Still alive.
}

TEST(RouterFailoverTest, FullClusterIsResourceExhausted) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // 2 workers of 64 KiB: 1024 tokens of one KV head of d = 8 in float32 (64 bytes a token) each.
  Harness h = Harness::Start(2, /*stripe_tokens=*/256, /*capacity_per_worker=*/64 << 10);
  ASSERT_NE(h.client, nullptr);
  const DhsaConfig config = SmallConfig(Policy::kStreaming);
  Sequence seq = h.Create(config, 1, 1, 1, 8);
  const Inputs in = MakeInputs(rng, 1, 1, 2100, 8);
  const absl::Status full = seq.Prefill(0, in.q, in.k, in.v).status();
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  auto info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 0);
  auto fits = seq.Prefill(0, Rows(in.q, 0, 2000), Rows(in.k, 0, 2000), Rows(in.v, 0, 2000));
  EXPECT_TRUE(fits.ok()) << fits.status();
}

}  // namespace
}  // namespace dhsa::router_test
