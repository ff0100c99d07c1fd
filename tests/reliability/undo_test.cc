// A call that fails after its keys were stored, when the path to their worker closes, cannot be
// undone at once (the worker cannot be told to truncate them): the layer keeps a pending undo and
// answers UNAVAILABLE while the worker stays unreachable. When the path returns, the next call on
// the layer retries the undo first, and the client finishes the sequence: every answer equals the
// reference, the worker holds exactly the sequence's keys, and the router's accounting matches.
#include <chrono>
#include <cstdio>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/router/router.h"
#include "services/worker/worker_server.h"
#include "tests/reliability/fault_util.h"

namespace dhsa::reliability_test {
namespace {

using ::dhsa::router_test::Rows;
using ::testing::HasSubstr;

// KV bytes `worker` holds, asked without the proxy (-1 if the call fails).
int64_t HeldBytes(WorkerServer& worker) {
  auto stub = v1::Worker::NewStub(worker.InProcessChannel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::StatsResponse stats;
  if (!stub->Stats(&context, v1::StatsRequest(), &stats).ok()) return -1;
  return stats.held_bytes();
}

TEST(UndoTest, ALayerWhoseUndoFailedRecoversWhenTheWorkerReturns) {
  const uint64_t seed = ::dhsa::testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // One worker behind a proxy; every Attend waits 1 s first, so that the path can be closed while
  // a call's keys are stored and its attention is pending.
  WorkerOptions wo;
  wo.listen_address = "127.0.0.1:0";
  wo.capacity_bytes = int64_t{64} << 20;
  wo.threads = 2;
  wo.test_attend_stall = absl::Seconds(1);
  absl::StatusOr<std::unique_ptr<WorkerServer>> worker = WorkerServer::Start(wo);
  ASSERT_TRUE(worker.ok()) << worker.status();
  TcpProxy proxy((*worker)->port());
  router::RouterOptions o;
  o.listen_address = "127.0.0.1:0";
  o.worker_addresses = {proxy.address()};
  o.threads = 2;
  o.probe_interval = std::chrono::milliseconds(200);
  o.worker_call_timeout = std::chrono::seconds(20);
  absl::StatusOr<std::unique_ptr<router::RouterServer>> r = router::RouterServer::Start(o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(WaitAvailable(**r, 0, true));
  absl::StatusOr<Client> client = Client::Connect("127.0.0.1:" + std::to_string((*r)->port()));
  ASSERT_TRUE(client.ok()) << client.status();

  constexpr int64_t kHq = 4, kHkv = 2, kDim = 32, kFirst = 100, kLen = 160;
  constexpr int64_t kToken = 2 * kHkv * kDim * 4;  // K and V bytes of one float32 token.
  const DhsaConfig config = router_test::SmallConfig(Policy::kDense);
  const router_test::Inputs in = router_test::MakeInputs(rng, kHq, kHkv, kLen + 3, kDim);
  SequenceOptions so;
  so.q_heads = kHq;
  so.kv_heads = kHkv;
  so.head_dim = kDim;
  so.config = config;
  so.id = "undone";
  absl::StatusOr<Sequence> seq = client->CreateSequence(so);
  ASSERT_TRUE(seq.ok()) << seq.status();
  auto prefill = [&](int64_t a, int64_t b) {
    return seq->Prefill(0, Rows(in.q, a, b), Rows(in.k, a, b), Rows(in.v, a, b), true);
  };
  router::WorkerPool& pool = (*r)->service().pool();

  absl::StatusOr<PrefillOutput> got = prefill(0, kFirst);
  ASSERT_TRUE(got.ok()) << got.status();
  absl::StatusOr<AttendResult> want =
      AttendReference(Rows(in.q, 0, kFirst), Rows(in.k, 0, kFirst), Rows(in.v, 0, kFirst), config);
  ASSERT_TRUE(want.ok()) << want.status();
  router_test::ExpectMatches(*got, *want, true, "the first prefill");
  const std::vector<int64_t> first_boundaries = want->boundaries;
  ASSERT_EQ(HeldBytes(**worker), kFirst * kToken);

  // The chunked prefill stores its keys; the path closes while its attention is pending. The
  // router cannot tell the worker to truncate them.
  auto pending = std::async(std::launch::async, [&] { return prefill(kFirst, kLen).status(); });
  for (int i = 0; i < 2000 && HeldBytes(**worker) != kLen * kToken; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_EQ(HeldBytes(**worker), kLen * kToken);
  proxy.SetMode(TcpProxy::Mode::kRefuse);
  const absl::Status failed = pending.get();
  ASSERT_EQ(failed.code(), absl::StatusCode::kUnavailable) << failed;
  EXPECT_THAT(std::string(failed.message()), HasSubstr("could not truncate"));
  std::printf("the call cut off after storing its keys: %s\n", failed.ToString().c_str());
  EXPECT_EQ(HeldBytes(**worker), kLen * kToken) << "the failed call's keys should remain there";
  absl::StatusOr<v1::SequenceInfo> info = seq->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->layer_lengths(0), kFirst);
  EXPECT_EQ(info->kv_bytes(), kLen * kToken);  // The keys that may remain stay counted.

  // While the worker is unreachable the layer answers UNAVAILABLE and nothing changes.
  const absl::Status while_cut = prefill(kFirst, kLen).status();
  EXPECT_EQ(while_cut.code(), absl::StatusCode::kUnavailable) << while_cut;
  EXPECT_THAT(std::string(while_cut.message()), HasSubstr("undo"));
  const absl::Status decode_while_cut =
      seq->Decode(0, Rows(in.q, kFirst, kFirst + 1), Rows(in.k, kFirst, kFirst + 1),
                  Rows(in.v, kFirst, kFirst + 1))
          .status();
  EXPECT_EQ(decode_while_cut.code(), absl::StatusCode::kUnavailable) << decode_while_cut;
  EXPECT_EQ(HeldBytes(**worker), kLen * kToken);
  info = seq->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->layer_lengths(0), kFirst);

  // The path returns: the next call undoes the failed one first, then runs, and the client
  // finishes the sequence with the reference's answers.
  proxy.SetMode(TcpProxy::Mode::kForward);
  ASSERT_TRUE(WaitAvailable(**r, 0, true)) << "the worker was not accepted back";
  got = prefill(kFirst, kLen);
  ASSERT_TRUE(got.ok()) << got.status();
  AttendOptions chunked;
  chunked.prior_boundaries = &first_boundaries;
  want = AttendReference(Rows(in.q, kFirst, kLen), Rows(in.k, 0, kLen), Rows(in.v, 0, kLen), config,
                         chunked);
  ASSERT_TRUE(want.ok()) << want.status();
  router_test::ExpectMatches(*got, *want, true, "the chunked prefill after the worker returned");
  EXPECT_EQ(got->length, kLen);
  EXPECT_EQ(HeldBytes(**worker), kLen * kToken) << "the failed call's keys were not truncated";
  EXPECT_EQ(pool.Loads()[0].used_bytes, kLen * kToken);
  std::vector<int64_t> boundaries = want->boundaries;
  for (int64_t t = kLen; t < kLen + 3; ++t) {
    absl::StatusOr<DecodeOutput> decoded =
        seq->Decode(0, Rows(in.q, t, t + 1), Rows(in.k, t, t + 1), Rows(in.v, t, t + 1), true);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    AttendOptions decode;
    decode.prior_boundaries = &boundaries;
    decode.decode = true;
    want = AttendReference(Rows(in.q, t, t + 1), Rows(in.k, 0, t + 1), Rows(in.v, 0, t + 1), config,
                           decode);
    ASSERT_TRUE(want.ok()) << want.status();
    router_test::ExpectMatches(*decoded, *want, true, "decode at " + std::to_string(t));
    EXPECT_EQ(decoded->length, t + 1);
    boundaries = want->boundaries;
  }
  info = seq->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->layer_lengths(0), kLen + 3);
  EXPECT_EQ(info->kv_bytes(), (kLen + 3) * kToken);
  EXPECT_EQ(HeldBytes(**worker), (kLen + 3) * kToken);

  EXPECT_TRUE(seq->Release().ok());
  for (int i = 0; i < 100 && HeldBytes(**worker) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(HeldBytes(**worker), 0);
  EXPECT_EQ(pool.Loads()[0].used_bytes, 0);
}

}  // namespace
}  // namespace dhsa::reliability_test
