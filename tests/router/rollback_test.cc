// A chunked prefill or a decode that fails part way (a worker down, a deadline during the
// attention) leaves its layer exactly as it was: the workers truncate the keys the call stored, the
// router's view and accounting are unchanged, and a retry gives the reference's answer. Worker
// calls without a client deadline are bounded by worker_call_timeout.
#include <chrono>
#include <future>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/router/router.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;
using ::testing::HasSubstr;

// KV bytes a worker holds, from its Stats (-1 if the call fails).
int64_t HeldBytes(WorkerServer& worker) {
  auto stub = v1::Worker::NewStub(worker.InProcessChannel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::StatsResponse stats;
  if (!stub->Stats(&context, v1::StatsRequest(), &stats).ok()) return -1;
  return stats.held_bytes();
}

// Waits (up to 10 s) until `worker` holds `bytes`; the rollback of a failed call may still be
// running when the client gets the error.
void ExpectHeldBytes(WorkerServer& worker, int64_t bytes) {
  int64_t held = HeldBytes(worker);
  for (int i = 0; i < 200 && held != bytes; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    held = HeldBytes(worker);
  }
  EXPECT_EQ(held, bytes);
}

// Retries `call` while the layer is still busy with the rollback of the previous call.
template <typename Call>
auto WhenLayerFree(Call call) {
  auto result = call();
  for (int attempt = 0; attempt < 100; ++attempt) {
    if (result.status().code() != absl::StatusCode::kFailedPrecondition ||
        !absl::StrContains(result.status().message(), "in flight")) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    result = call();
  }
  return result;
}

// Workers and a router started one by one, so that each can have its own options.
struct Cluster {
  std::vector<std::unique_ptr<WorkerServer>> workers;
  std::unique_ptr<router::RouterServer> router;
  std::unique_ptr<Client> client;
  std::string address;

  Cluster() = default;
  Cluster(Cluster&&) = default;
  ~Cluster() {
    if (router != nullptr) router->Shutdown(std::chrono::milliseconds(0));
    for (auto& w : workers) w->Shutdown(absl::ZeroDuration());
  }

  // `stall`: every Attend of every worker waits that long first (WorkerOptions, test only).
  static Cluster Start(int num_workers, absl::Duration stall,
                       std::chrono::milliseconds worker_call_timeout, int64_t stripe_tokens) {
    Cluster c;
    router::RouterOptions options;
    for (int i = 0; i < num_workers; ++i) {
      WorkerOptions w;
      w.listen_address = "127.0.0.1:0";
      w.capacity_bytes = int64_t{256} << 20;
      w.threads = 2;
      w.test_attend_stall = stall;
      absl::StatusOr<std::unique_ptr<WorkerServer>> worker = WorkerServer::Start(w);
      EXPECT_TRUE(worker.ok()) << worker.status();
      if (!worker.ok()) return c;
      options.worker_addresses.push_back(absl::StrCat("127.0.0.1:", (*worker)->port()));
      c.workers.push_back(*std::move(worker));
    }
    options.listen_address = "127.0.0.1:0";
    options.stripe_tokens = stripe_tokens;
    options.threads = 2;
    options.probe_interval = std::chrono::milliseconds(200);
    options.worker_call_timeout = worker_call_timeout;
    absl::StatusOr<std::unique_ptr<router::RouterServer>> router =
        router::RouterServer::Start(options);
    EXPECT_TRUE(router.ok()) << router.status();
    if (!router.ok()) return c;
    c.router = *std::move(router);
    c.address = absl::StrCat("127.0.0.1:", c.router->port());
    absl::StatusOr<Client> client = Client::Connect(c.address);
    EXPECT_TRUE(client.ok()) << client.status();
    if (client.ok()) c.client = std::make_unique<Client>(*std::move(client));
    return c;
  }

  Sequence Create(const DhsaConfig& config, int hq, int hkv, int dim) {
    SequenceOptions o;
    o.num_layers = 1;
    o.q_heads = hq;
    o.kv_heads = hkv;
    o.head_dim = dim;
    o.config = config;
    absl::StatusOr<Sequence> seq = client->CreateSequence(o);
    EXPECT_TRUE(seq.ok()) << seq.status();
    return seq.ok() ? *std::move(seq) : client->Attach("missing");
  }
};

TEST(RouterRollbackTest, ChunkedPrefillWithAWorkerDownIsUndone) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // No probe during the test: the router learns that a worker is down from the failed call.
  Harness h = Harness::Start(2, /*stripe_tokens=*/128, 0, std::chrono::minutes(10));
  ASSERT_NE(h.client, nullptr);
  constexpr int64_t kHq = 4, kHkv = 2, kDim = 32, kFirst = 100, kLen = 600;
  constexpr int64_t kToken = 2 * kHkv * kDim * 4;
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  const Inputs in = MakeInputs(rng, kHq, kHkv, kLen + 1, kDim);
  Sequence seq = h.Create(config, 1, kHq, kHkv, kDim);
  auto first = seq.Prefill(0, Rows(in.q, 0, kFirst), Rows(in.k, 0, kFirst), Rows(in.v, 0, kFirst));
  ASSERT_TRUE(first.ok()) << first.status();
  auto info = seq.Info();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->workers_size(), 1);
  const int live =
      info->workers(0) == absl::StrCat("127.0.0.1:", h.service->worker(0).port()) ? 0 : 1;

  // The next stripes go to both workers in turn: the live one appends to its stripe and opens new
  // ones, the other one is down. Everything the live one stored is truncated away.
  h.service->worker(1 - live).Shutdown(absl::ZeroDuration());
  const absl::Status failed =
      seq.Prefill(0, Rows(in.q, kFirst, kLen), Rows(in.k, kFirst, kLen), Rows(in.v, kFirst, kLen))
          .status();
  EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable) << failed;
  EXPECT_THAT(std::string(failed.message()), ::testing::Not(HasSubstr("unusable")));
  info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), kFirst);
  EXPECT_EQ(info->kv_bytes(), kFirst * kToken);
  ExpectHeldBytes(h.service->worker(live), kFirst * kToken);

  // The retry puts every stripe on the live worker and matches the reference.
  auto want_first =
      AttendReference(Rows(in.q, 0, kFirst), Rows(in.k, 0, kFirst), Rows(in.v, 0, kFirst), config);
  ASSERT_TRUE(want_first.ok());
  auto got = WhenLayerFree([&] {
    return seq.Prefill(0, Rows(in.q, kFirst, kLen), Rows(in.k, kFirst, kLen),
                       Rows(in.v, kFirst, kLen), /*want_lse=*/true);
  });
  ASSERT_TRUE(got.ok()) << got.status();
  AttendOptions chunked;
  chunked.prior_boundaries = &want_first->boundaries;
  auto want = AttendReference(Rows(in.q, kFirst, kLen), Rows(in.k, 0, kLen), Rows(in.v, 0, kLen),
                              config, chunked);
  ASSERT_TRUE(want.ok()) << want.status();
  ExpectMatches(*got, *want, true, "the retried chunked prefill");
  EXPECT_EQ(got->length, kLen);
  ExpectHeldBytes(h.service->worker(live), kLen * kToken);

  // And decode goes on from there.
  got = seq.Decode(0, Rows(in.q, kLen, kLen + 1), Rows(in.k, kLen, kLen + 1),
                   Rows(in.v, kLen, kLen + 1), true);
  ASSERT_TRUE(got.ok()) << got.status();
  AttendOptions decode;
  decode.prior_boundaries = &want->boundaries;
  decode.decode = true;
  auto want_decode = AttendReference(Rows(in.q, kLen, kLen + 1), in.k, in.v, config, decode);
  ASSERT_TRUE(want_decode.ok());
  ExpectMatches(*got, *want_decode, true, "decode after the retry");
  info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->kv_bytes(), (kLen + 1) * kToken);
  auto freed = seq.Release();
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, (kLen + 1) * kToken);
}

TEST(RouterRollbackTest, DeadlineDuringAttentionUndoesDecodeAndChunkedPrefill) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // Every Attend waits 1 s: a client deadline of 300 ms falls after the keys are stored.
  Cluster c = Cluster::Start(2, absl::Seconds(1), std::chrono::seconds(120), 128);
  ASSERT_NE(c.client, nullptr);
  constexpr int64_t kHq = 4, kHkv = 2, kDim = 32, kFirst = 300, kLen = 420;
  constexpr int64_t kToken = 2 * kHkv * kDim * 4;
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  const Inputs in = MakeInputs(rng, kHq, kHkv, kLen + 1, kDim);
  Sequence seq = c.Create(config, kHq, kHkv, kDim);
  auto got = seq.Prefill(0, Rows(in.q, 0, kFirst), Rows(in.k, 0, kFirst), Rows(in.v, 0, kFirst));
  ASSERT_TRUE(got.ok()) << got.status();
  auto want =
      AttendReference(Rows(in.q, 0, kFirst), Rows(in.k, 0, kFirst), Rows(in.v, 0, kFirst), config);
  ASSERT_TRUE(want.ok());
  const std::vector<int64_t> prior = want->boundaries;
  const auto held = [&] { return HeldBytes(*c.workers[0]) + HeldBytes(*c.workers[1]); };
  ASSERT_EQ(held(), kFirst * kToken);

  ClientOptions hurried;
  hurried.timeout = std::chrono::milliseconds(300);
  auto fast = Client::Connect(c.address, hurried);
  ASSERT_TRUE(fast.ok());
  const Sequence late = fast->Attach(seq.id());

  // Decode: stored on one worker, then cut short in the attention.
  const Tensor q1 = Rows(in.q, kFirst, kFirst + 1), k1 = Rows(in.k, kFirst, kFirst + 1),
               v1 = Rows(in.v, kFirst, kFirst + 1);
  absl::Status s = late.Decode(0, q1, k1, v1).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  for (int i = 0; i < 200 && held() != kFirst * kToken; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(held(), kFirst * kToken);
  auto info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), kFirst);
  EXPECT_EQ(info->kv_bytes(), kFirst * kToken);
  got = WhenLayerFree([&] { return seq.Decode(0, q1, k1, v1, /*want_lse=*/true); });
  ASSERT_TRUE(got.ok()) << got.status();
  AttendOptions decode;
  decode.prior_boundaries = &prior;
  decode.decode = true;
  want = AttendReference(q1, Rows(in.k, 0, kFirst + 1), Rows(in.v, 0, kFirst + 1), config, decode);
  ASSERT_TRUE(want.ok());
  ExpectMatches(*got, *want, true, "the retried decode");
  const std::vector<int64_t> after_decode = want->boundaries;

  // Chunked prefill: its stripes are stored on both workers, then cut short the same way.
  const int64_t t0 = kFirst + 1;
  s = late.Prefill(0, Rows(in.q, t0, kLen), Rows(in.k, t0, kLen), Rows(in.v, t0, kLen)).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  for (int i = 0; i < 200 && held() != t0 * kToken; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(held(), t0 * kToken);
  info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), t0);
  got = WhenLayerFree([&] {
    return seq.Prefill(0, Rows(in.q, t0, kLen), Rows(in.k, t0, kLen), Rows(in.v, t0, kLen), true);
  });
  ASSERT_TRUE(got.ok()) << got.status();
  AttendOptions chunked;
  chunked.prior_boundaries = &after_decode;
  want = AttendReference(Rows(in.q, t0, kLen), Rows(in.k, 0, kLen), Rows(in.v, 0, kLen), config,
                         chunked);
  ASSERT_TRUE(want.ok());
  ExpectMatches(*got, *want, true, "the retried chunked prefill");
  EXPECT_EQ(held(), kLen * kToken);
  info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->kv_bytes(), kLen * kToken);
}

TEST(RouterRollbackTest, AWorkerLostDuringTheCallRetiresTheLayer) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Cluster c = Cluster::Start(1, absl::Milliseconds(500), std::chrono::seconds(120), 4096);
  ASSERT_NE(c.client, nullptr);
  constexpr int64_t kHq = 2, kHkv = 1, kDim = 16, kToken = 2 * kHkv * kDim * 4;
  const DhsaConfig config = SmallConfig(Policy::kDense);
  const Inputs in = MakeInputs(rng, kHq, kHkv, 200, kDim);
  Sequence seq = c.Create(config, kHq, kHkv, kDim);
  ASSERT_TRUE(seq.Prefill(0, Rows(in.q, 0, 100), Rows(in.k, 0, 100), Rows(in.v, 0, 100)).ok());

  // The worker goes away while the call's attention waits on it: the keys it stored cannot be
  // truncated, so the layer takes no call (UNAVAILABLE) until the worker confirms the undo.
  auto pending = std::async(std::launch::async, [&] {
    return seq.Prefill(0, Rows(in.q, 100, 200), Rows(in.k, 100, 200), Rows(in.v, 100, 200))
        .status();
  });
  for (int i = 0; i < 200 && HeldBytes(*c.workers[0]) != 200 * kToken; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(HeldBytes(*c.workers[0]), 200 * kToken);
  c.workers[0]->Shutdown(absl::ZeroDuration());
  const absl::Status s = pending.get();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("layer 0 is now unusable"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("could not truncate"));
  const absl::Status next =
      seq.Prefill(0, Rows(in.q, 100, 200), Rows(in.k, 100, 200), Rows(in.v, 100, 200)).status();
  EXPECT_EQ(next.code(), absl::StatusCode::kUnavailable) << next;
  EXPECT_THAT(std::string(next.message()), HasSubstr("release the sequence"));
  EXPECT_TRUE(seq.Release().ok());
}

TEST(RouterRollbackTest, WorkerCallsWithoutAClientDeadlineGetTheDefault) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // The worker would stall every Attend for a minute; the router gives each worker call 1 s.
  Cluster c = Cluster::Start(1, absl::Minutes(1), std::chrono::seconds(1), 4096);
  ASSERT_NE(c.client, nullptr);
  constexpr int64_t kHq = 2, kHkv = 1, kDim = 16;
  const DhsaConfig config = SmallConfig(Policy::kDense);
  const Inputs in = MakeInputs(rng, kHq, kHkv, 64, kDim);
  Sequence seq = c.Create(config, kHq, kHkv, kDim);
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = seq.Prefill(0, in.q, in.k, in.v).status();  // No client deadline.
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_GE(seconds, 0.9);
  EXPECT_LT(seconds, 20.0);
  // The failed first prefill is undone like any other.
  ExpectHeldBytes(*c.workers[0], 0);
  auto info = seq.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 0);
  EXPECT_EQ(info->kv_bytes(), 0);
}

TEST(RouterRollbackTest, WorkerCallTimeoutComesFromTheServiceConfig) {
  v1::ServiceConfig config;
  absl::StatusOr<router::RouterOptions> o = router::RouterOptionsFromServiceConfig(config);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->worker_call_timeout, std::chrono::seconds(120));
  config.set_worker_call_timeout_seconds(2.5);
  o = router::RouterOptionsFromServiceConfig(config);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->worker_call_timeout, std::chrono::milliseconds(2500));
  config.set_worker_call_timeout_seconds(-1);
  EXPECT_EQ(router::RouterOptionsFromServiceConfig(config).status().code(),
            absl::StatusCode::kInvalidArgument);
  router::RouterOptions zero;
  zero.listen_address = "127.0.0.1:0";
  zero.worker_addresses = {"127.0.0.1:1"};
  zero.worker_call_timeout = std::chrono::milliseconds(0);
  EXPECT_EQ(router::RouterServer::Start(zero).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dhsa::router_test
