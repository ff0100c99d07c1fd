// Security: TLS and mutual TLS on the router's and the workers' ports, bearer tokens on the public
// API (UNAUTHENTICATED without a listed one) and between router and workers, and the per-client
// limits (sequences, KV bytes) and ownership. Certificates are made with openssl at test time.
#include <grpcpp/create_channel.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "dhsa/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "services/common/server.h"
#include "services/router/router.h"
#include "services/worker/worker_server.h"
#include "tests/router/service_test_util.h"

namespace dhsa::reliability_test {
namespace {

using ::dhsa::router_test::Inputs;
using ::dhsa::router_test::MakeInputs;
using ::dhsa::router_test::Rows;
using ::dhsa::router_test::SmallConfig;
using ::dhsa::testing::FreshSeed;

constexpr int kHq = 4, kHkv = 2, kDim = 32;
constexpr char kAliceToken[] = "alice-0123456789abcdef0123456789";
constexpr char kBobToken[] = "bob-fedcba9876543210fedcba987654";
constexpr char kRouterToken[] = "router-5555555555555555555555555";

// A CA, a server certificate for localhost / 127.0.0.1, a "router" client certificate, and a
// rogue CA with a client certificate of its own, in a fresh directory.
class Pki {
 public:
  Pki() {
    dir_ = std::filesystem::temp_directory_path() /
           ("dhsa-pki-" + std::to_string(getpid()) + "-" + std::to_string(counter_++));
    std::filesystem::create_directories(dir_);
    Run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "
        "/CN=dhsa-test-ca -keyout ca.key "
        "-out ca.pem");
    Run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "
        "/CN=rogue-ca -keyout rogue.key "
        "-out rogue.pem");
    Issue("server", "ca", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1");
    Issue("router", "ca", "router", "");
    Issue("intruder", "rogue", "router", "");
    Write("tokens", std::string("# clients of the public API\nalice ") + kAliceToken + "\nbob " +
                        kBobToken + "\n");
    Write("worker-tokens", std::string("router ") + kRouterToken + "\n");
    Write("router-token", std::string(kRouterToken) + "\n");
  }
  ~Pki() {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  bool ok() const { return ok_; }

 private:
  void Run(const std::string& command) {
    const std::string line = "cd '" + dir_.string() + "' && " + command + " >/dev/null 2>&1";
    if (std::system(line.c_str()) != 0) {
      ADD_FAILURE() << "failed: " << line;
      ok_ = false;
    }
  }
  void Issue(const std::string& name, const std::string& ca, const std::string& cn,
             const std::string& extension) {
    Run("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=" + cn +
        " -keyout " + name + ".key -out " + name + ".csr");
    std::string ext;
    if (!extension.empty()) {
      Write(name + ".ext", extension + "\n");
      ext = " -extfile " + name + ".ext";
    }
    Run("openssl x509 -req -in " + name + ".csr -CA " + ca + ".pem -CAkey " + ca +
        ".key -CAcreateserial -days 2 -out " + name + ".pem" + ext);
  }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }

  static inline int counter_ = 0;
  std::filesystem::path dir_;
  bool ok_ = true;
};

ServerSecurity ServerTls(const Pki& pki) {
  ServerSecurity s;
  s.cert_file = pki.Path("server.pem");
  s.key_file = pki.Path("server.key");
  return s;
}

// A worker and a router over it with the given security; workers listen on 127.0.0.1.
struct Cluster {
  std::unique_ptr<WorkerServer> worker;
  std::unique_ptr<router::RouterServer> router;
  std::string router_address, worker_address;
};

Cluster StartCluster(const ServerSecurity& worker_security, const ChannelSecurity& to_workers,
                     const ServerSecurity& router_security, int max_sequences = 0,
                     int64_t max_kv_bytes = 0) {
  Cluster c;
  WorkerOptions w;
  w.listen_address = "127.0.0.1:0";
  w.capacity_bytes = int64_t{64} << 20;
  w.threads = 1;
  w.security = worker_security;
  absl::StatusOr<std::unique_ptr<WorkerServer>> worker = WorkerServer::Start(w);
  EXPECT_TRUE(worker.ok()) << worker.status();
  if (!worker.ok()) return c;
  c.worker = *std::move(worker);
  c.worker_address = absl::StrCat("127.0.0.1:", c.worker->port());
  router::RouterOptions r;
  r.listen_address = "127.0.0.1:0";
  r.worker_addresses = {c.worker_address};
  r.threads = 2;
  r.probe_interval = std::chrono::milliseconds(200);
  r.security = router_security;
  r.worker_security = to_workers;
  r.max_sequences_per_client = max_sequences;
  r.max_kv_bytes_per_client = max_kv_bytes;
  absl::StatusOr<std::unique_ptr<router::RouterServer>> router = router::RouterServer::Start(r);
  EXPECT_TRUE(router.ok()) << router.status();
  if (!router.ok()) return c;
  c.router = *std::move(router);
  c.router_address = absl::StrCat("localhost:", c.router->port());
  return c;
}

ClientOptions TlsClient(const Pki& pki, const std::string& token) {
  ClientOptions o;
  o.tls_ca_file = pki.Path("ca.pem");
  o.token = token;
  o.timeout = std::chrono::seconds(30);
  o.connect_timeout = std::chrono::milliseconds(0);  // Lazy: errors show on the first call.
  return o;
}

SequenceOptions Shapes(const std::string& id) {
  SequenceOptions o;
  o.id = id;
  o.q_heads = kHq;
  o.kv_heads = kHkv;
  o.head_dim = kDim;
  o.config = SmallConfig(Policy::kDhsa);
  return o;
}

// Waits until the router sees its worker (probes run every 200 ms).
void WaitForWorker(const Client& client) {
  for (int i = 0; i < 100; ++i) {
    if (router_test::HealthStatus(client.channel(), "dhsa.v1.Attention") == 1) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ADD_FAILURE() << "the router never saw its worker";
}

TEST(SecurityTest, ConstantTimeEqualsComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_TRUE(ConstantTimeEquals("secret-token", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("secret-token", "secret-tokeN"));
  EXPECT_FALSE(ConstantTimeEquals("secret-token", "secret-token-longer"));
  EXPECT_FALSE(ConstantTimeEquals("secret", ""));
  EXPECT_FALSE(ConstantTimeEquals(std::string("a\0b", 3), std::string("a\0c", 3)));
}

TEST(SecurityTest, TokensWithoutTlsAreRefusedAtStart) {
  Pki pki;
  ASSERT_TRUE(pki.ok());
  ServerSecurity s;
  s.token_file = pki.Path("tokens");
  WorkerOptions w;
  w.listen_address = "127.0.0.1:0";
  w.capacity_bytes = 1 << 20;
  w.security = s;
  absl::StatusOr<std::unique_ptr<WorkerServer>> worker = WorkerServer::Start(w);
  EXPECT_EQ(worker.status().code(), absl::StatusCode::kInvalidArgument) << worker.status();
  ClientOptions o;
  o.token = kAliceToken;
  EXPECT_EQ(Client::Connect("127.0.0.1:1", o).status().code(), absl::StatusCode::kInvalidArgument);
  s = ServerTls(pki);
  s.token_file = pki.Path("no-such-file");
  w.security = s;
  EXPECT_EQ(WorkerServer::Start(w).status().code(), absl::StatusCode::kNotFound);
}

// TLS + tokens on the public API, mutual TLS + a token between router and worker: the right
// credentials work end to end (and match the reference); every wrong one is refused.
TEST(SecurityTest, TlsTokensAndMutualTlsAdmitOnlyTheRightCallers) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Pki pki;
  ASSERT_TRUE(pki.ok());
  ServerSecurity worker_security = ServerTls(pki);
  worker_security.client_ca_file = pki.Path("ca.pem");  // Only certificates of our CA get in.
  worker_security.token_file = pki.Path("worker-tokens");
  ChannelSecurity to_workers;
  to_workers.ca_file = pki.Path("ca.pem");
  to_workers.cert_file = pki.Path("router.pem");
  to_workers.key_file = pki.Path("router.key");
  to_workers.token_file = pki.Path("router-token");
  to_workers.server_name = "localhost";
  ServerSecurity router_security = ServerTls(pki);
  router_security.token_file = pki.Path("tokens");
  Cluster c = StartCluster(worker_security, to_workers, router_security);
  ASSERT_NE(c.router, nullptr);

  // The right token over TLS: a full prefill + decode, equal to the reference.
  absl::StatusOr<Client> alice = Client::Connect(c.router_address, TlsClient(pki, kAliceToken));
  ASSERT_TRUE(alice.ok()) << alice.status();
  WaitForWorker(*alice);
  absl::StatusOr<Sequence> seq = alice->CreateSequence(Shapes("a-1"));
  ASSERT_TRUE(seq.ok()) << seq.status();
  const Inputs in = MakeInputs(rng, kHq, kHkv, 301, kDim);
  absl::StatusOr<PrefillOutput> got =
      seq->Prefill(0, Rows(in.q, 0, 300), Rows(in.k, 0, 300), Rows(in.v, 0, 300), true);
  ASSERT_TRUE(got.ok()) << got.status();
  absl::StatusOr<AttendResult> want = AttendReference(Rows(in.q, 0, 300), Rows(in.k, 0, 300),
                                                      Rows(in.v, 0, 300), *Shapes("").config);
  ASSERT_TRUE(want.ok());
  router_test::ExpectMatches(*got, *want, true, "over TLS");
  ASSERT_TRUE(
      seq->Decode(0, Rows(in.q, 300, 301), Rows(in.k, 300, 301), Rows(in.v, 300, 301)).ok());

  // No token, a wrong token: UNAUTHENTICATED with a message saying so.
  for (const std::string& token : {std::string(), std::string("alice-0123456789abcdef01234567890"),
                                   std::string(kRouterToken)}) {
    SCOPED_TRACE("token '" + token + "'");
    absl::StatusOr<Client> mallory = Client::Connect(c.router_address, TlsClient(pki, token));
    ASSERT_TRUE(mallory.ok());
    absl::Status s = mallory->CreateSequence(Shapes("m-1")).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << s;
    EXPECT_NE(s.message().find(token.empty() ? "requires a bearer token" : "not valid"),
              absl::string_view::npos)
        << s;
    EXPECT_EQ(mallory->Attach("a-1").Info().status().code(), absl::StatusCode::kUnauthenticated);
  }
  // Plaintext to a TLS port, or TLS trusting another CA: the connection itself fails.
  ClientOptions plain;
  plain.connect_timeout = std::chrono::milliseconds(0);
  plain.timeout = std::chrono::seconds(5);
  absl::StatusOr<Client> cleartext = Client::Connect(c.router_address, plain);
  ASSERT_TRUE(cleartext.ok());
  EXPECT_EQ(cleartext->Attach("a-1").Info().status().code(), absl::StatusCode::kUnavailable);
  ClientOptions wrong_ca = TlsClient(pki, kAliceToken);
  wrong_ca.tls_ca_file = pki.Path("rogue.pem");
  wrong_ca.timeout = std::chrono::seconds(5);
  absl::StatusOr<Client> fooled = Client::Connect(c.router_address, wrong_ca);
  ASSERT_TRUE(fooled.ok());
  EXPECT_EQ(fooled->Attach("a-1").Info().status().code(), absl::StatusCode::kUnavailable);

  // The worker admits only the router: without a client certificate, with one of another CA, or
  // with our CA's certificate but no token, a direct call fails.
  auto worker_stats = [&](const ChannelSecurity& security) {
    grpc::ChannelArguments args;
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
        MakeChannelCredentials(security, &args);
    EXPECT_TRUE(creds.ok()) << creds.status();
    auto stub = v1::Worker::NewStub(grpc::CreateCustomChannel(c.worker_address, *creds, args));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::StatsResponse stats;
    return stub->Stats(&context, v1::StatsRequest(), &stats).error_code();
  };
  EXPECT_EQ(worker_stats(to_workers), grpc::StatusCode::OK);
  ChannelSecurity no_cert = to_workers;
  no_cert.cert_file = no_cert.key_file = "";
  EXPECT_EQ(worker_stats(no_cert), grpc::StatusCode::UNAVAILABLE);
  ChannelSecurity intruder = to_workers;
  intruder.cert_file = pki.Path("intruder.pem");
  intruder.key_file = pki.Path("intruder.key");
  EXPECT_EQ(worker_stats(intruder), grpc::StatusCode::UNAVAILABLE);
  ChannelSecurity no_token = to_workers;
  no_token.token_file = "";
  EXPECT_EQ(worker_stats(no_token), grpc::StatusCode::UNAUTHENTICATED);
  ChannelSecurity plaintext;
  EXPECT_EQ(worker_stats(plaintext), grpc::StatusCode::UNAVAILABLE);

  // Still serving the right client after all of that.
  absl::StatusOr<v1::SequenceInfo> info = seq->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->layer_lengths(0), 301);
}

// Per-client limits: sequences and KV bytes per token name; a client's sequences are invisible
// to another client; what one client does not affect another's budget.
TEST(SecurityTest, PerClientLimitsAndOwnership) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Pki pki;
  ASSERT_TRUE(pki.ok());
  ServerSecurity router_security = ServerTls(pki);
  router_security.token_file = pki.Path("tokens");
  const int64_t bytes_per_token = 2 * kHkv * kDim * 4;
  Cluster c = StartCluster({}, {}, router_security, /*max_sequences=*/2,
                           /*max_kv_bytes=*/250 * bytes_per_token);
  ASSERT_NE(c.router, nullptr);
  absl::StatusOr<Client> alice = Client::Connect(c.router_address, TlsClient(pki, kAliceToken));
  absl::StatusOr<Client> bob = Client::Connect(c.router_address, TlsClient(pki, kBobToken));
  ASSERT_TRUE(alice.ok() && bob.ok());
  WaitForWorker(*alice);

  absl::StatusOr<Sequence> a1 = alice->CreateSequence(Shapes("a-1"));
  absl::StatusOr<Sequence> a2 = alice->CreateSequence(Shapes("a-2"));
  ASSERT_TRUE(a1.ok() && a2.ok());
  absl::Status third = alice->CreateSequence(Shapes("a-3")).status();
  EXPECT_EQ(third.code(), absl::StatusCode::kResourceExhausted) << third;
  EXPECT_NE(third.message().find("max_sequences_per_client"), absl::string_view::npos) << third;
  absl::StatusOr<Sequence> b1 = bob->CreateSequence(Shapes("b-1"));  // Bob's own budget.
  ASSERT_TRUE(b1.ok()) << b1.status();

  // Ownership: Bob cannot see, use or release Alice's sequence.
  EXPECT_EQ(bob->Attach("a-1").Info().status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(bob->Attach("a-1").Release().status().code(), absl::StatusCode::kNotFound);
  const Inputs in = MakeInputs(rng, kHq, kHkv, 300, kDim);
  EXPECT_EQ(bob->Attach("a-1").Prefill(0, in.q, in.k, in.v).status().code(),
            absl::StatusCode::kNotFound);

  // KV bytes: 200 tokens fit in 250; another 100 do not (and nothing of them is stored); decode
  // tokens fit until the limit.
  ASSERT_TRUE(a1->Prefill(0, Rows(in.q, 0, 200), Rows(in.k, 0, 200), Rows(in.v, 0, 200)).ok());
  absl::Status over =
      a2->Prefill(0, Rows(in.q, 0, 100), Rows(in.k, 0, 100), Rows(in.v, 0, 100)).status();
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted) << over;
  EXPECT_NE(over.message().find("max_kv_bytes_per_client"), absl::string_view::npos) << over;
  EXPECT_EQ(a2->Info()->layer_lengths(0), 0);
  ASSERT_TRUE(a2->Prefill(0, Rows(in.q, 0, 50), Rows(in.k, 0, 50), Rows(in.v, 0, 50)).ok());
  EXPECT_EQ(a1->Decode(0, Rows(in.q, 200, 201), Rows(in.k, 200, 201), Rows(in.v, 200, 201))
                .status()
                .code(),
            absl::StatusCode::kResourceExhausted);
  // Bob's bytes are his own.
  ASSERT_TRUE(b1->Prefill(0, Rows(in.q, 0, 200), Rows(in.k, 0, 200), Rows(in.v, 0, 200)).ok());

  // Releasing gives both budgets back.
  ASSERT_TRUE(a2->Release().ok());
  EXPECT_TRUE(a1->Decode(0, Rows(in.q, 200, 201), Rows(in.k, 200, 201), Rows(in.v, 200, 201)).ok());
  EXPECT_TRUE(alice->CreateSequence(Shapes("a-3")).ok());
}

}  // namespace
}  // namespace dhsa::reliability_test
