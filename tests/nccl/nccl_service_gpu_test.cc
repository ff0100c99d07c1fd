// The NCCL data plane through the real service with CUDA workers (embedded: two dhsa workers with
// --backend=cuda on device 0, the router's NCCL ranks on device 1): q, k, v go out and o, lse come
// back over NCCL by descriptor (on the workers straight into and out of device memory), and the
// results equal the same service over shared memory, over gRPC bytes and over NCCL with the
// workers' tensors staged through host memory (same kernels; within 1e-6 of max |o|: a different
// placement only reorders the merge) and the in-process library within the CUDA kernels'
// storage-precision error. A communicator aborted on either side costs at most the calls in flight
// (UNAVAILABLE, bounded), later calls go over shared memory, and the next probe brings NCCL back.
// Skipped without NCCL or with fewer than two CUDA devices.
#include <stdlib.h>

#include <cmath>
#include <random>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "services/router/embedded.h"
#include "services/transport/nccl_communicator.h"
#include "services/transport/options.h"
#include "tests/router/service_test_util.h"

namespace dhsa::nccl_test {
namespace {

using ::dhsa::router_test::Inputs;
using ::dhsa::router_test::MakeInputs;
using ::dhsa::router_test::Rows;
using ::dhsa::router_test::SmallConfig;
using ::dhsa::testing::FreshSeed;

bool TwoDevices() { return transport::NcclBuilt() && transport::VisibleCudaDevices() >= 2; }

struct Service {
  std::unique_ptr<EmbeddedService> service;
  std::unique_ptr<Client> client;

  static Service Start(const std::string& transport) {
    EmbeddedOptions o;
    o.num_workers = 2;
    o.stripe_tokens = 256;
    o.threads = 4;
    o.backend = "cuda";
    o.capacity_bytes_per_worker = int64_t{512} << 20;
    o.probe_interval = std::chrono::milliseconds(200);
    o.data_plane.set_transport(transport);
    Service s;
    absl::StatusOr<std::unique_ptr<EmbeddedService>> service = EmbeddedService::Start(o);
    EXPECT_TRUE(service.ok()) << service.status();
    if (!service.ok()) return s;
    s.service = *std::move(service);
    absl::StatusOr<Client> client = Client::Connect(s.service->router_address());
    EXPECT_TRUE(client.ok()) << client.status();
    if (client.ok()) s.client = std::make_unique<Client>(*std::move(client));
    return s;
  }

  router::WorkerPool& pool() { return service->router().service().pool(); }

  Sequence Create(const DhsaConfig& config, int hq, int hkv, int dim, DType dtype) {
    SequenceOptions so;
    so.num_layers = 1;
    so.q_heads = hq;
    so.kv_heads = hkv;
    so.head_dim = dim;
    so.dtype = dtype;
    so.config = config;
    absl::StatusOr<Sequence> seq = client->CreateSequence(so);
    EXPECT_TRUE(seq.ok()) << seq.status();
    return seq.ok() ? *std::move(seq) : client->Attach("missing");
  }
};

// Max |a - b| over o and over lse.
std::pair<double, double> MaxDiff(const AttentionOutput& a, const AttentionOutput& b) {
  double o = 0, l = 0;
  EXPECT_EQ(a.o.shape, b.o.shape);
  EXPECT_EQ(a.lse.shape, b.lse.shape);
  if (a.o.shape != b.o.shape || a.lse.shape != b.lse.shape) return {1e30, 1e30};
  for (int64_t i = 0; i < a.o.NumElements(); ++i) {
    o = std::max(o, std::abs(static_cast<double>(a.o.Get(i)) - b.o.Get(i)));
  }
  for (int64_t i = 0; i < a.lse.NumElements(); ++i) {
    const double x = a.lse.Get(i), y = b.lse.Get(i);
    if (std::isinf(x) && x == y) continue;
    l = std::max(l, std::abs(x - y));
  }
  return {o, l};
}

// The same result up to the order of the merge: o within 1e-6 of max |a.o|, lse within 1e-6 of
// max(1, |lse|).
void ExpectSame(const AttentionOutput& a, const AttentionOutput& b, const std::string& what) {
  double max_o = 0, max_l = 1;
  for (int64_t i = 0; i < a.o.NumElements(); ++i) {
    max_o = std::max(max_o, std::abs(static_cast<double>(a.o.Get(i))));
  }
  for (int64_t i = 0; i < a.lse.NumElements(); ++i) {
    if (std::isfinite(a.lse.Get(i))) {
      max_l = std::max(max_l, std::abs(static_cast<double>(a.lse.Get(i))));
    }
  }
  const auto [o, l] = MaxDiff(a, b);
  EXPECT_LE(o, 1e-6 * max_o) << what << ": max |o| " << max_o;
  EXPECT_LE(l, 1e-6 * max_l) << what << ": max |lse| " << max_l;
}

// Within the storage-precision error of the CUDA kernels (P rounded to bf16/fp16 before P V):
// o within 1e-2 of max |o|, lse within 1e-3 of max(1, |lse|).
void ExpectNearReference(const AttentionOutput& got, const AttendResult& want,
                         const std::string& what) {
  SCOPED_TRACE(what);
  double max_o = 0, max_l = 1;
  for (int64_t i = 0; i < want.o.NumElements(); ++i) {
    max_o = std::max(max_o, std::abs(static_cast<double>(want.o.Get(i))));
  }
  for (int64_t i = 0; i < want.lse.NumElements(); ++i) {
    if (std::isfinite(want.lse.Get(i))) {
      max_l = std::max(max_l, std::abs(static_cast<double>(want.lse.Get(i))));
    }
  }
  AttentionOutput ref;
  ref.o = want.o;
  ref.lse = want.lse;
  const auto [o, l] = MaxDiff(got, ref);
  EXPECT_LE(o, 1e-2 * max_o) << "max |o| " << max_o;
  EXPECT_LE(l, 1e-3 * max_l) << "max |lse| " << max_l;
}

TEST(NcclService, EqualsSharedMemoryGrpcAndTheInProcessLibrary) {
  if (!TwoDevices()) GTEST_SKIP() << "needs NCCL and two CUDA devices";
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  Service nccl = Service::Start("nccl");
  Service shm = Service::Start("shm");
  Service grpc = Service::Start("grpc");
  ASSERT_NE(nccl.client, nullptr);
  ASSERT_NE(shm.client, nullptr);
  ASSERT_NE(grpc.client, nullptr);
  for (int i = 0; i < 2; ++i) {
    ASSERT_NE(nccl.pool().NcclLinkOf(i), nullptr) << "worker " << i;
    EXPECT_TRUE(nccl.pool().NcclLinkOf(i)->ok());
    EXPECT_EQ(shm.pool().NcclLinkOf(i), nullptr);
  }
  std::mt19937_64 rng(seed);
  struct Case {
    int64_t hq, hkv, dim, len, first;
    DType dtype;
    Policy policy;
  };
  for (const Case& c : {Case{8, 2, 128, 1037, 613, DType::kBF16, Policy::kDhsa},
                        Case{4, 4, 64, 777, 1, DType::kF16, Policy::kBlockTopk},
                        Case{32, 8, 128, 3001, 2999, DType::kBF16, Policy::kDhsa}}) {
    SCOPED_TRACE(::testing::Message() << "Hq " << c.hq << " Hkv " << c.hkv << " d " << c.dim
                                      << " len " << c.len << " " << DTypeName(c.dtype));
    const DhsaConfig config = SmallConfig(c.policy);
    constexpr int64_t kSteps = 2;
    const Inputs in = MakeInputs(rng, c.hq, c.hkv, c.len + kSteps, c.dim, c.dtype);
    std::vector<Sequence> seqs;
    // The fourth: over NCCL with the workers' q, o and lse staged through host memory
    // (DHSA_WORKER_NCCL_DEVICE=0) instead of received into and sent from device memory.
    for (Service* s : {&nccl, &shm, &grpc, &nccl}) {
      seqs.push_back(s->Create(config, static_cast<int>(c.hq), static_cast<int>(c.hkv),
                               static_cast<int>(c.dim), c.dtype));
    }
    std::vector<int64_t> boundaries;
    struct Step {
      int64_t begin, end;
      bool decode;
    };
    std::vector<Step> steps = {{0, c.first, false}, {c.first, c.len, false}};
    for (int64_t e = c.len + 1; e <= c.len + kSteps; ++e) steps.push_back({e - 1, e, true});
    for (const Step& st : steps) {
      SCOPED_TRACE(::testing::Message() << (st.decode ? "decode" : "prefill") << " [" << st.begin
                                        << ", " << st.end << ")");
      std::vector<AttentionOutput> got;
      const char* names[] = {"nccl", "shm", "grpc", "nccl"};
      for (size_t i = 0; i < 4; ++i) {
        const Tensor q = Rows(in.q, st.begin, st.end), k = Rows(in.k, st.begin, st.end),
                     v = Rows(in.v, st.begin, st.end);
        if (i == 3) setenv("DHSA_WORKER_NCCL_DEVICE", "0", 1);
        absl::StatusOr<AttentionOutput> out =
            st.decode ? seqs[i].Decode(0, q, k, v, true) : seqs[i].Prefill(0, q, k, v, true);
        if (i == 3) unsetenv("DHSA_WORKER_NCCL_DEVICE");
        ASSERT_TRUE(out.ok()) << names[i] << ": " << out.status();
        EXPECT_EQ(out->stats.transport(), names[i]);
        got.push_back(*std::move(out));
      }
      ExpectSame(got[0], got[1], "nccl vs shm");
      ExpectSame(got[0], got[2], "nccl vs grpc");
      ExpectSame(got[0], got[3], "nccl (device) vs nccl staged through host memory");
      AttendOptions options;
      // The first prefill has no keys before it.
      options.prior_boundaries = st.begin == 0 ? nullptr : &boundaries;
      options.decode = st.decode;
      auto want = AttendReference(Rows(in.q, st.begin, st.end), Rows(in.k, 0, st.end),
                                  Rows(in.v, 0, st.end), config, options);
      ASSERT_TRUE(want.ok()) << want.status();
      ExpectNearReference(got[0], *want, "nccl vs in-process");
      boundaries = want->boundaries;
    }
    for (Sequence& s : seqs) EXPECT_TRUE(s.Release().ok());
  }
  // The bytes moved over the communicators.
  for (int i = 0; i < 2; ++i) {
    const v1::CommunicatorInfo info = nccl.pool().NcclLinkOf(i)->communicator().Info();
    EXPECT_GT(info.bytes_sent(), 0) << i;
    EXPECT_GT(info.bytes_received(), 0) << i;
    std::printf("worker %d: communicator %s, %lld transfers, %lld bytes sent, %lld received\n", i,
                info.communicator_id().c_str(), static_cast<long long>(info.transfers()),
                static_cast<long long>(info.bytes_sent()),
                static_cast<long long>(info.bytes_received()));
  }
}

TEST(NcclService, AnAbortedCommunicatorFallsBackThenComesBack) {
  if (!TwoDevices()) GTEST_SKIP() << "needs NCCL and two CUDA devices";
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Service s = Service::Start("auto");
  ASSERT_NE(s.client, nullptr);
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  const Inputs in = MakeInputs(rng, 8, 2, 900, 128, DType::kBF16);
  auto run = [&](const char* what) -> absl::StatusOr<AttentionOutput> {
    SCOPED_TRACE(what);
    Sequence seq = s.Create(config, 8, 2, 128, DType::kBF16);
    absl::StatusOr<AttentionOutput> out = seq.Prefill(0, in.q, in.k, in.v, true);
    (void)seq.Release();
    return out;
  };
  absl::StatusOr<AttentionOutput> first = run("before");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->stats.transport(), "nccl");

  // The router aborts its side: the next call goes over shared memory, equal to the bit.
  std::shared_ptr<transport::NcclLink> old = s.pool().NcclLinkOf(0);
  ASSERT_NE(old, nullptr);
  old->Abort("test: router side aborted");
  absl::StatusOr<AttentionOutput> fallback = run("router aborted");
  ASSERT_TRUE(fallback.ok()) << fallback.status();
  EXPECT_EQ(fallback->stats.transport(), "shm");
  ExpectSame(*first, *fallback, "nccl vs shm fallback");

  // The next probe drops the failed link and connects a new communicator.
  const absl::Time until = absl::Now() + absl::Seconds(60);
  std::shared_ptr<transport::NcclLink> now;
  while (absl::Now() < until) {
    now = s.pool().NcclLinkOf(0);
    if (now != nullptr && now != old && now->ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_NE(now, nullptr);
  ASSERT_NE(now, old);
  absl::StatusOr<AttentionOutput> again = run("reconnected");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->stats.transport(), "nccl");
  ExpectSame(*first, *again, "nccl before vs after the reconnect");

  // The worker aborts its side (LeaveCommunicator abort): the call fails with UNAVAILABLE at once
  // (no wait for a transfer timeout), and the router drops the link.
  std::shared_ptr<transport::NcclLink> link = s.pool().NcclLinkOf(1);
  ASSERT_NE(link, nullptr);
  {
    grpc::ClientContext context;
    v1::LeaveCommunicatorRequest leave;
    leave.set_communicator_id(link->id());
    leave.set_abort(true);
    v1::LeaveCommunicatorResponse left;
    ASSERT_TRUE(s.pool().stub(1)->LeaveCommunicator(&context, leave, &left).ok());
    EXPECT_TRUE(left.found());
  }
  absl::SleepFor(absl::Milliseconds(100));
  const absl::Time start = absl::Now();
  absl::StatusOr<AttentionOutput> failed = run("worker aborted");
  const absl::Duration took = absl::Now() - start;
  if (!failed.ok()) {
    EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
  } else {
    // A probe saw the failed communicator first: shared memory served the call, or the new
    // communicator the probe connected did.
    EXPECT_NE(failed->stats.transport(), "grpc");
    EXPECT_NE(s.pool().NcclLinkOf(1), link);
  }
  EXPECT_LT(took, absl::Seconds(20));
  EXPECT_FALSE(link->ok());
}

}  // namespace
}  // namespace dhsa::nccl_test
