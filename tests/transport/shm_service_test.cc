// The router <-> worker data plane through the real service: results equal the in-process library
// over shared memory and over gRPC bytes (prefill, chunked prefill, decode, odd sizes, bf16, 1-3
// workers); a full arena falls back to gRPC bytes per tensor; a worker process that dies takes its
// arenas with it (nothing left in /dev/shm, the router unmaps them) and its sequences fail with
// UNAVAILABLE while the others keep working.
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <regex>
#include <set>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "services/router/router.h"
#include "tests/reliability/fault_util.h"
#include "tests/router/service_test_util.h"

namespace dhsa::transport_test {
namespace {

using ::dhsa::reliability_test::WaitAvailable;
using ::dhsa::router_test::ExpectMatches;
using ::dhsa::router_test::Inputs;
using ::dhsa::router_test::MakeInputs;
using ::dhsa::router_test::Rows;
using ::dhsa::router_test::SmallConfig;
using ::dhsa::testing::FreshSeed;

struct Service {
  std::unique_ptr<EmbeddedService> service;
  std::unique_ptr<Client> client;

  static Service Start(int workers, const std::string& transport, int64_t arena_bytes = 0,
                       int64_t stripe_tokens = 256) {
    EmbeddedOptions o;
    o.num_workers = workers;
    o.stripe_tokens = stripe_tokens;
    o.threads = 2;
    o.capacity_bytes_per_worker = int64_t{256} << 20;
    o.probe_interval = std::chrono::milliseconds(200);
    o.data_plane.set_transport(transport);
    o.data_plane.set_shm_arena_bytes(arena_bytes);
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

  Sequence Create(const DhsaConfig& config, int layers, int hq, int hkv, int dim, DType dtype) {
    SequenceOptions so;
    so.num_layers = layers;
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

class TransportTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(TransportTest, EqualsTheInProcessLibrary) {
  const std::string transport = std::get<0>(GetParam());
  const int workers = std::get<1>(GetParam());
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message()
               << "seed " << seed << ", " << transport << ", " << workers << " workers");
  std::mt19937_64 rng(seed);
  Service s = Service::Start(workers, transport);
  ASSERT_NE(s.client, nullptr);
  for (int i = 0; i < workers; ++i) {
    // The link is up from the router's first probe on.
    EXPECT_EQ(s.service->router().service().pool().ShmLinkOf(i) != nullptr, transport == "shm");
  }
  struct Case {
    int64_t hq, hkv, dim, len, first;
    DType dtype;
    Policy policy;
  };
  for (const Case& c : {Case{4, 2, 32, 1037, 613, DType::kF32, Policy::kDhsa},
                        Case{6, 3, 64, 777, 1, DType::kBF16, Policy::kBlockTopk},
                        Case{1, 1, 8, 5, 3, DType::kF16, Policy::kDense}}) {
    SCOPED_TRACE(::testing::Message() << "Hq " << c.hq << " Hkv " << c.hkv << " d " << c.dim
                                      << " len " << c.len << " " << DTypeName(c.dtype));
    const DhsaConfig config = SmallConfig(c.policy);
    constexpr int64_t kSteps = 2;
    const Inputs in = MakeInputs(rng, c.hq, c.hkv, c.len + kSteps, c.dim, c.dtype);
    Sequence seq = s.Create(config, 1, static_cast<int>(c.hq), static_cast<int>(c.hkv),
                            static_cast<int>(c.dim), c.dtype);
    auto got = seq.Prefill(0, Rows(in.q, 0, c.first), Rows(in.k, 0, c.first),
                           Rows(in.v, 0, c.first), /*want_lse=*/true);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->stats.transport(), transport);
    auto want = AttendReference(Rows(in.q, 0, c.first), Rows(in.k, 0, c.first),
                                Rows(in.v, 0, c.first), config);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectMatches(*got, *want, true, "first prefill");
    std::vector<int64_t> boundaries = want->boundaries;

    got = seq.Prefill(0, Rows(in.q, c.first, c.len), Rows(in.k, c.first, c.len),
                      Rows(in.v, c.first, c.len), true);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->stats.transport(), transport);
    AttendOptions chunked;
    chunked.prior_boundaries = &boundaries;
    want = AttendReference(Rows(in.q, c.first, c.len), Rows(in.k, 0, c.len), Rows(in.v, 0, c.len),
                           config, chunked);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectMatches(*got, *want, true, "second prefill");
    boundaries = want->boundaries;

    for (int64_t end = c.len + 1; end <= c.len + kSteps; ++end) {
      got = seq.Decode(0, Rows(in.q, end - 1, end), Rows(in.k, end - 1, end),
                       Rows(in.v, end - 1, end), true);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->stats.transport(), transport);
      AttendOptions decode;
      decode.prior_boundaries = &boundaries;
      decode.decode = true;
      want = AttendReference(Rows(in.q, end - 1, end), Rows(in.k, 0, end), Rows(in.v, 0, end),
                             config, decode);
      ASSERT_TRUE(want.ok()) << want.status();
      ExpectMatches(*got, *want, true, "decode");
      boundaries = want->boundaries;
    }
    ASSERT_TRUE(seq.Release().ok());
  }
  if (transport == "shm") {
    // Every region went back: nothing is left allocated or quarantined.
    for (int i = 0; i < workers; ++i) {
      std::shared_ptr<transport::ShmLink> link = s.service->router().service().pool().ShmLinkOf(i);
      ASSERT_NE(link, nullptr);
      EXPECT_EQ(link->r2w().Stats().regions, 0);
      EXPECT_EQ(link->w2r().Stats().regions, 0);
      EXPECT_EQ(link->r2w().Stats().quarantined, 0);
      EXPECT_GT(link->r2w().Stats().allocations, 0);
      EXPECT_EQ(link->r2w().Stats().failed_allocations, 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, TransportTest,
                         ::testing::Combine(::testing::Values("shm", "grpc"),
                                            ::testing::Values(1, 2, 3)));

TEST(ShmTransportTest, FullArenaFallsBackToGrpcBytesPerTensor) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // 1 MiB arenas: each 512-token stripe's k and v (256 KiB each) fit, a worker's q (about 4 MiB)
  // and o do not.
  Service s = Service::Start(2, "shm", int64_t{1} << 20, /*stripe_tokens=*/512);
  ASSERT_NE(s.client, nullptr);
  constexpr int64_t kHq = 8, kHkv = 2, kDim = 64, kLen = 4099;
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  const Inputs in = MakeInputs(rng, kHq, kHkv, kLen, kDim, DType::kF32);
  Sequence seq = s.Create(config, 1, kHq, kHkv, kDim, DType::kF32);
  auto got = seq.Prefill(0, in.q, in.k, in.v, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->stats.transport(), "shm");
  auto want = AttendReference(in.q, in.k, in.v, config);
  ASSERT_TRUE(want.ok()) << want.status();
  ExpectMatches(*got, *want, true, "prefill");
  for (int i = 0; i < 2; ++i) {
    std::shared_ptr<transport::ShmLink> link = s.service->router().service().pool().ShmLinkOf(i);
    ASSERT_NE(link, nullptr);
    EXPECT_GT(link->r2w().Stats().allocations, 0);         // k and v went through it,
    EXPECT_GT(link->r2w().Stats().failed_allocations, 0);  // q did not;
    EXPECT_GT(link->w2r().Stats().failed_allocations, 0);  // nor o.
    EXPECT_EQ(link->r2w().Stats().regions, 0);
  }
  // Decode rows are small: they fit again.
  const Inputs more = MakeInputs(rng, kHq, kHkv, 1, kDim, DType::kF32);
  got = seq.Decode(0, more.q, more.k, more.v, false);
  ASSERT_TRUE(got.ok()) << got.status();
}

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
    Kill();
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
  void Kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  pid_t pid() const { return pid_; }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

// Mappings of this router's arenas in process `pid` ("/dev/shm/dhsa-<router pid>-..." lines).
int ArenaMappings(pid_t pid) {
  std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
  const std::string ours = "/dev/shm/dhsa-" + std::to_string(getpid()) + "-";
  int n = 0;
  for (std::string line; std::getline(maps, line);) n += line.find(ours) != std::string::npos;
  return n;
}

bool NamesLeftInDevShm() {
  const std::string prefix = "dhsa-" + std::to_string(getpid()) + "-";
  std::unique_ptr<DIR, int (*)(DIR*)> dir(opendir("/dev/shm"), closedir);
  if (dir == nullptr) return false;
  while (dirent* e = readdir(dir.get())) {
    if (std::string(e->d_name).rfind(prefix, 0) == 0) return true;
  }
  return false;
}

TEST(ShmTransportTest, KilledWorkerProcessFreesItsArenasAndOnlyItsSequencesFail) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const std::string base = "/tmp/dhsa-shm-" + std::to_string(getpid());
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
  o.worker_call_timeout = std::chrono::seconds(5);
  o.data_plane.set_transport("shm");
  o.data_plane.set_shm_arena_bytes(int64_t{64} << 20);
  absl::StatusOr<std::unique_ptr<router::RouterServer>> r = router::RouterServer::Start(o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(WaitAvailable(**r, 0, true) && WaitAvailable(**r, 1, true));
  router::WorkerPool& pool = (*r)->service().pool();
  ASSERT_NE(pool.ShmLinkOf(0), nullptr);
  ASSERT_NE(pool.ShmLinkOf(1), nullptr);
  // Two arenas mapped in each worker and four here; no name left to leak.
  EXPECT_EQ(ArenaMappings(w0.pid()), 2);
  EXPECT_EQ(ArenaMappings(w1.pid()), 2);
  EXPECT_EQ(ArenaMappings(getpid()), 4);
  EXPECT_FALSE(NamesLeftInDevShm());

  absl::StatusOr<Client> client = Client::Connect("127.0.0.1:" + std::to_string((*r)->port()));
  ASSERT_TRUE(client.ok());
  const DhsaConfig config = SmallConfig(Policy::kDense);
  SequenceOptions so;
  so.q_heads = 4;
  so.kv_heads = 2;
  so.head_dim = 32;
  so.config = config;
  // Short sequences land on one worker each (placement rotates): keep making them until both
  // workers hold one.
  constexpr int64_t kLen = 100;
  std::vector<std::pair<Sequence, Inputs>> seqs;
  std::set<int> used;
  for (int i = 0; i < 8 && used.size() < 2; ++i) {
    absl::StatusOr<Sequence> seq = client->CreateSequence(so);
    ASSERT_TRUE(seq.ok()) << seq.status();
    Inputs in = MakeInputs(rng, 4, 2, kLen + 1, 32);
    auto got = seq->Prefill(0, Rows(in.q, 0, kLen), Rows(in.k, 0, kLen), Rows(in.v, 0, kLen), true);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->stats.transport(), "shm");
    auto info = seq->Info();
    ASSERT_TRUE(info.ok());
    ASSERT_EQ(info->workers_size(), 1);
    used.insert(info->workers(0).find(std::to_string(p0)) != std::string::npos ? 0 : 1);
    seqs.emplace_back(*std::move(seq), std::move(in));
  }
  ASSERT_EQ(used.size(), 2u);

  w0.Kill();
  ASSERT_TRUE(WaitAvailable(**r, 0, false));
  // The router let go of worker 0's arenas: their memory is gone with the worker.
  for (int i = 0; i < 50 && ArenaMappings(getpid()) != 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(ArenaMappings(getpid()), 2);
  EXPECT_EQ(pool.ShmLinkOf(0), nullptr);
  EXPECT_NE(pool.ShmLinkOf(1), nullptr);
  EXPECT_FALSE(NamesLeftInDevShm());

  for (auto& [seq, in] : seqs) {
    auto info = seq.Info();
    ASSERT_TRUE(info.ok());
    const bool on_dead = info->workers(0).find(std::to_string(p0)) != std::string::npos;
    auto got = seq.Decode(0, Rows(in.q, kLen, kLen + 1), Rows(in.k, kLen, kLen + 1),
                          Rows(in.v, kLen, kLen + 1), true);
    if (on_dead) {
      EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
    } else {
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->stats.transport(), "shm");
      AttendOptions decode;
      decode.decode = true;
      auto want = AttendReference(Rows(in.q, kLen, kLen + 1), Rows(in.k, 0, kLen + 1),
                                  Rows(in.v, 0, kLen + 1), config, decode);
      ASSERT_TRUE(want.ok());
      ExpectMatches(*got, *want, true, "decode on the live worker");
    }
  }
  (*r)->Shutdown(std::chrono::milliseconds(0));
}

}  // namespace
}  // namespace dhsa::transport_test
