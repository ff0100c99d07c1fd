// Prefill through same-host shared memory (OpenSharedMemory, PrefillHeader.shared): the region
// itself (sealed, nonce-checked, bounds), the SDK's use of it (same answers as the stream and the
// reference, fallback when the router has it off, the same bytes when a region is reused, a failed
// call's region retired), and the router's checks on hostile headers (o over the inputs and at
// unaligned offsets written whole).
#include <fcntl.h>
#include <grpcpp/create_channel.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "services/common/server.h"
#include "services/common/shared_region.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;

TEST(SharedRegionTest, OpensOnlyTheSealedRegionWithItsNonce) {
  absl::StatusOr<std::unique_ptr<SharedRegion>> region = SharedRegion::Create(100000);
  ASSERT_TRUE(region.ok()) << region.status();
  SharedRegion& r = **region;
  ASSERT_FALSE(r.path().empty());
  EXPECT_EQ(r.size(), 100000);
  std::memset(r.data(), 7, 100000);

  absl::StatusOr<std::unique_ptr<SharedRegion>> peer =
      SharedRegion::Open(r.path(), r.nonce(), r.size());
  ASSERT_TRUE(peer.ok()) << peer.status();
  EXPECT_EQ((*peer)->data()[99999], 7);
  (*peer)->data()[5] = 42;  // The same memory both ways.
  EXPECT_EQ(r.data()[5], 42);

  // Another nonce, another size, a missing path: not this region.
  std::string wrong = r.nonce();
  wrong[0] = static_cast<char>(wrong[0] ^ 1);
  EXPECT_EQ(SharedRegion::Open(r.path(), wrong, r.size()).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(SharedRegion::Open(r.path(), r.nonce(), r.size() + 1).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(SharedRegion::Open("/proc/self/fd/99999", r.nonce(), r.size()).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // Sealed: a client cannot shrink it under the router's reads.
  const int fd = open(r.path().c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  EXPECT_NE(ftruncate(fd, 4096), 0);
  close(fd);

  // An unsealed file of the right size and nonce is refused too.
  const int plain = memfd_create("plain", MFD_CLOEXEC);
  ASSERT_GE(plain, 0);
  ASSERT_EQ(ftruncate(plain, SharedRegion::kHeaderBytes + r.size()), 0);
  ASSERT_EQ(pwrite(plain, r.nonce().data(), r.nonce().size(), 0),
            static_cast<ssize_t>(r.nonce().size()));
  const std::string plain_path = "/proc/self/fd/" + std::to_string(plain);
  EXPECT_EQ(SharedRegion::Open(plain_path, r.nonce(), r.size()).status().code(),
            absl::StatusCode::kFailedPrecondition);
  close(plain);

  // Once closed, nobody opens it any more; the mappings stay.
  r.CloseDescriptor();
  EXPECT_TRUE(r.path().empty());
  EXPECT_EQ(r.data()[5], 42);

  EXPECT_TRUE(r.CheckRange(0, 100000, "q").ok());
  EXPECT_TRUE(r.CheckRange(99999, 1, "q").ok());
  EXPECT_EQ(r.CheckRange(99999, 2, "q").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.CheckRange(-1, 1, "q").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.CheckRange(1, int64_t{1} << 62, "q").code(), absl::StatusCode::kInvalidArgument);
}

// Inputs of more than 1 MiB, so that the SDK takes the shared-memory path.
constexpr int64_t kHq = 4, kHkv = 2, kDim = 64, kLen = 1501;

TEST(SharedMemoryPrefillTest, SameAnswersAsTheStreamAndTheReference) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(2, /*stripe_tokens=*/512);
  ASSERT_NE(h.client, nullptr);
  absl::StatusOr<Client> streamed = h.StreamedClient();
  ASSERT_TRUE(streamed.ok()) << streamed.status();

  for (DType dtype : {DType::kF32, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    const DhsaConfig config = SmallConfig(Policy::kDhsa);
    const Inputs in = MakeInputs(rng, kHq, kHkv, kLen, kDim, dtype);
    Sequence seq = h.Create(config, /*layers=*/3, kHq, kHkv, kDim, dtype);
    auto shared = seq.Prefill(0, in.q, in.k, in.v, /*want_lse=*/true);
    ASSERT_TRUE(shared.ok()) << shared.status();
    EXPECT_TRUE(shared->shared_memory);
    auto want = AttendReference(in.q, in.k, in.v, config);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectMatches(*shared, *want, /*with_lse=*/true, "shared memory");
    EXPECT_EQ(shared->length, kLen);

    // The same input through the stream, on a fresh layer of the same sequence (another
    // connection; a host-identified client may use another's sequence): the same bytes.
    Sequence same = streamed->Attach(seq.id());
    auto piece_by_piece = same.Prefill(1, in.q, in.k, in.v, /*want_lse=*/true);
    ASSERT_TRUE(piece_by_piece.ok()) << piece_by_piece.status();
    EXPECT_FALSE(piece_by_piece->shared_memory);
    EXPECT_EQ(piece_by_piece->o.bytes, shared->o.bytes);
    EXPECT_EQ(piece_by_piece->lse.bytes, shared->lse.bytes);

    // Chunked prefill on layer 2 reuses the region (odd split, no lse).
    auto first = seq.Prefill(2, Rows(in.q, 0, 1100), Rows(in.k, 0, 1100), Rows(in.v, 0, 1100));
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_TRUE(first->shared_memory);
    auto want_first =
        AttendReference(Rows(in.q, 0, 1100), Rows(in.k, 0, 1100), Rows(in.v, 0, 1100), config);
    ASSERT_TRUE(want_first.ok());
    ExpectMatches(*first, *want_first, false, "first part");
    std::vector<int64_t> boundaries = want_first->boundaries;
    auto second =
        seq.Prefill(2, Rows(in.q, 1100, kLen), Rows(in.k, 1100, kLen), Rows(in.v, 1100, kLen));
    ASSERT_TRUE(second.ok()) << second.status();
    AttendOptions chunked;
    chunked.prior_boundaries = &boundaries;
    auto want_second = AttendReference(Rows(in.q, 1100, kLen), in.k, in.v, config, chunked);
    ASSERT_TRUE(want_second.ok());
    ExpectMatches(*second, *want_second, false, "second part (streamed: under 1 MiB)");
    EXPECT_FALSE(second->shared_memory);
  }
}

TEST(SharedMemoryPrefillTest, RouterWithSharedMemoryOffIsStreamedTransparently) {
  std::mt19937_64 rng(FreshSeed());
  EmbeddedOptions options;
  options.num_workers = 1;
  options.threads = 2;
  options.capacity_bytes_per_worker = int64_t{256} << 20;
  options.client_shm_bytes = 0;
  absl::StatusOr<std::unique_ptr<EmbeddedService>> service = EmbeddedService::Start(options);
  ASSERT_TRUE(service.ok()) << service.status();
  absl::StatusOr<Client> client = Client::Connect((*service)->router_address());
  ASSERT_TRUE(client.ok());
  SequenceOptions o;
  o.q_heads = kHq;
  o.kv_heads = kHkv;
  o.head_dim = kDim;
  o.config = SmallConfig(Policy::kStreaming);
  absl::StatusOr<Sequence> seq = client->CreateSequence(o);
  ASSERT_TRUE(seq.ok());
  const Inputs in = MakeInputs(rng, kHq, kHkv, kLen, kDim);
  auto got = seq->Prefill(0, in.q, in.k, in.v, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->shared_memory);
  auto want = AttendReference(in.q, in.k, in.v, *o.config);
  ASSERT_TRUE(want.ok());
  ExpectMatches(*got, *want, true, "streamed");
}

// Calls reusing the SDK's region (a new one, then the same one twice, with and without lse): the
// same bytes every time, for every policy.
TEST(SharedMemoryPrefillTest, ReusedRegionGivesTheSameBytes) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(2, /*stripe_tokens=*/512);
  ASSERT_NE(h.client, nullptr);
  for (Policy policy : {Policy::kDhsa, Policy::kBlockTopk, Policy::kStreaming, Policy::kDense}) {
    SCOPED_TRACE(PolicyName(policy));
    const DhsaConfig config = SmallConfig(policy);
    const Inputs in = MakeInputs(rng, kHq, kHkv, kLen, kDim);
    Sequence seq = h.Create(config, /*layers=*/3, kHq, kHkv, kDim);
    std::vector<AttentionOutput> outs;
    for (int layer = 0; layer < 3; ++layer) {
      auto got = seq.Prefill(layer, in.q, in.k, in.v, /*want_lse=*/layer != 1);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_TRUE(got->shared_memory);
      outs.push_back(*std::move(got));
    }
    auto want = AttendReference(in.q, in.k, in.v, config);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectMatches(outs[0], *want, /*with_lse=*/true, "first call of the region");
    EXPECT_EQ(outs[1].o.bytes, outs[0].o.bytes);
    EXPECT_TRUE(outs[1].lse.bytes.empty());
    EXPECT_EQ(outs[2].o.bytes, outs[0].o.bytes);
    EXPECT_EQ(outs[2].lse.bytes, outs[0].lse.bytes);
    ASSERT_TRUE(seq.Release().ok());
  }
}

// A failed call may leave the router writing into its region (a deadline ends the call at the
// client first): the SDK closes that region and the next call gets a new one, with right answers.
TEST(SharedMemoryPrefillTest, FailedCallRetiresItsRegion) {
  std::mt19937_64 rng(FreshSeed());
  Harness h = Harness::Start(1, /*stripe_tokens=*/512);
  ASSERT_NE(h.client, nullptr);
  const router::SharedRegions& regions = h.service->router().service().shared_regions();
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  Sequence seq = h.Create(config, /*layers=*/2, kHq, kHkv, kDim);
  const Inputs in = MakeInputs(rng, kHq, kHkv, kLen, kDim);
  auto first = seq.Prefill(0, in.q, in.k, in.v, true);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->shared_memory);
  EXPECT_GT(regions.held_bytes(), 0);

  // NaN in k: refused inside the layer call, after the router took the region.
  Inputs bad = MakeInputs(rng, kHq, kHkv, kLen, kDim);
  static_cast<float*>(bad.k.data())[12345] = std::nanf("");
  auto failed = seq.Prefill(1, bad.q, bad.k, bad.v, true);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kInvalidArgument) << failed.status();
  EXPECT_EQ(regions.held_bytes(), 0);  // Closed at the router, not reused.

  auto again = seq.Prefill(1, in.q, in.k, in.v, true);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->shared_memory);
  EXPECT_GT(regions.held_bytes(), 0);
  EXPECT_EQ(again->o.bytes, first->o.bytes);
  EXPECT_EQ(again->lse.bytes, first->lse.bytes);
}

// The raw API: what a hostile or buggy client can send.
class SharedMemoryApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    EmbeddedOptions options;
    options.num_workers = 1;
    options.threads = 2;
    options.stripe_tokens = 512;
    options.capacity_bytes_per_worker = int64_t{64} << 20;
    options.client_shm_bytes = int64_t{8} << 20;
    absl::StatusOr<std::unique_ptr<EmbeddedService>> service = EmbeddedService::Start(options);
    ASSERT_TRUE(service.ok()) << service.status();
    service_ = *std::move(service);
    channel_ =
        grpc::CreateCustomChannel(service_->router_address(), grpc::InsecureChannelCredentials(),
                                  ChannelArgumentsForMessageLimit(4 << 20));
    stub_ = v1::Attention::NewStub(channel_);
    v1::CreateSequenceRequest create;
    create.mutable_config()->set_num_layers(1);
    create.mutable_config()->set_q_heads(2);
    create.mutable_config()->set_kv_heads(1);
    create.mutable_config()->set_head_dim(8);
    create.mutable_config()->set_dtype(v1::DTYPE_FLOAT32);
    v1::CreateSequenceResponse created;
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->CreateSequence(&context, create, &created).ok());
    sequence_ = created.sequence_id();
  }

  grpc::Status Open(int64_t bytes, v1::OpenSharedMemoryResponse* response) {
    grpc::ClientContext context;
    v1::OpenSharedMemoryRequest request;
    request.set_bytes(bytes);
    return stub_->OpenSharedMemory(&context, request, response);
  }

  // A Prefill of `n` tokens naming `shared`; the status it ends with.
  grpc::Status Prefill(int64_t n, const v1::SharedTensors& shared, bool want_lse = false) {
    grpc::ClientContext context;
    auto stream = stub_->Prefill(&context);
    v1::PrefillRequest request;
    v1::PrefillHeader* header = request.mutable_header();
    header->set_sequence_id(sequence_);
    header->set_num_tokens(n);
    header->set_want_lse(want_lse);
    *header->mutable_shared() = shared;
    if (stream->Write(request)) stream->WritesDone();
    v1::PrefillResponse response;
    while (stream->Read(&response)) {
    }
    return stream->Finish();
  }

  // `where` with what a client must declare for `n` tokens of this sequence: float32, q [2, n, 8],
  // k and v [1, n, 8].
  static v1::SharedTensors Declared(v1::SharedTensors where, int64_t n) {
    where.set_dtype(v1::DTYPE_FLOAT32);
    for (int64_t d : {int64_t{2}, n, int64_t{8}}) where.add_q_shape(d);
    for (int64_t d : {int64_t{1}, n, int64_t{8}}) {
      where.add_k_shape(d);
      where.add_v_shape(d);
    }
    return where;
  }

  int64_t StoredLength() {
    grpc::ClientContext context;
    v1::GetSequenceInfoRequest request;
    request.set_sequence_id(sequence_);
    v1::SequenceInfo info;
    EXPECT_TRUE(stub_->GetSequenceInfo(&context, request, &info).ok());
    return info.layer_lengths_size() > 0 ? info.layer_lengths(0) : -1;
  }

  std::unique_ptr<EmbeddedService> service_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Attention::Stub> stub_;
  std::string sequence_;
};

TEST_F(SharedMemoryApiTest, BadRegionsAndRangesAreRefusedAndNothingIsStored) {
  v1::OpenSharedMemoryResponse opened;
  ASSERT_TRUE(Open(1 << 20, &opened).ok());
  EXPECT_EQ(opened.bytes(), 1 << 20);
  ASSERT_FALSE(opened.path().empty());
  EXPECT_EQ(opened.nonce().size(), 16u);
  absl::StatusOr<std::unique_ptr<SharedRegion>> region =
      SharedRegion::Open(opened.path(), opened.nonce(), opened.bytes());
  ASSERT_TRUE(region.ok()) << region.status();

  // 100 tokens: q 2*100*8*4 = 6400 bytes, k and v 3200, o 6400.
  v1::SharedTensors good;
  good.set_region_id(opened.region_id());
  good.set_q_offset(0);
  good.set_k_offset(6400);
  good.set_v_offset(9600);
  good.set_o_offset(12800);
  good = Declared(good, 100);

  v1::SharedTensors unknown = good;
  unknown.set_region_id("shm-12345");
  grpc::Status s = Prefill(100, unknown);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();

  v1::SharedTensors past_end = good;
  past_end.set_v_offset((1 << 20) - 3199);
  s = Prefill(100, past_end);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("'v'"), std::string::npos) << s.error_message();

  v1::SharedTensors negative = good;
  negative.set_o_offset(-64);
  s = Prefill(100, negative);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_EQ(StoredLength(), 0);

  // What lies there must be declared, and be what the sequence holds: no dtype, another dtype, a
  // k of other tokens, a q of other heads.
  v1::SharedTensors undeclared = good;
  undeclared.clear_dtype();
  s = Prefill(100, undeclared);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("dtype"), std::string::npos) << s.error_message();
  v1::SharedTensors half = good;
  half.set_dtype(v1::DTYPE_FLOAT16);
  s = Prefill(100, half);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("float16"), std::string::npos) << s.error_message();
  v1::SharedTensors short_k = good;
  short_k.set_k_shape(1, 99);
  s = Prefill(100, short_k);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("'k'"), std::string::npos) << s.error_message();
  v1::SharedTensors more_heads = good;
  more_heads.set_q_shape(0, 4);
  s = Prefill(100, more_heads);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("'q'"), std::string::npos) << s.error_message();
  EXPECT_EQ(StoredLength(), 0);

  // NaN in q through shared memory: refused like a streamed NaN, nothing stored.
  float* q = reinterpret_cast<float*>((*region)->data());
  for (int i = 0; i < 1600; ++i) q[i] = 0.5f;
  float* kv = reinterpret_cast<float*>((*region)->data() + 6400);
  for (int i = 0; i < 1600; ++i) kv[i] = 0.25f;
  q[77] = std::nanf("");
  s = Prefill(100, good);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_EQ(StoredLength(), 0);

  // A good call: stored, and o written into the region (uniform v: o equals it).
  q[77] = 0.5f;
  s = Prefill(100, good);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(StoredLength(), 100);
  const float* o = reinterpret_cast<const float*>((*region)->data() + 12800);
  for (int i = 0; i < 1600; i += 97) EXPECT_FLOAT_EQ(o[i], 0.25f) << i;

  // Closed: later use is NOT_FOUND.
  {
    grpc::ClientContext context;
    v1::CloseSharedMemoryRequest close;
    close.set_region_id(opened.region_id());
    v1::CloseSharedMemoryResponse closed;
    EXPECT_TRUE(stub_->CloseSharedMemory(&context, close, &closed).ok());
  }
  EXPECT_EQ(Prefill(100, good).error_code(), grpc::StatusCode::NOT_FOUND);
}

// o may lie over the inputs (the router reads them before the call starts) or off a 64-byte
// boundary: every element of o and lse is written, on the region's first call and on later ones.
TEST_F(SharedMemoryApiTest, OutputOverTheInputsAndUnalignedOutputsAreWrittenWhole) {
  v1::OpenSharedMemoryResponse opened;
  ASSERT_TRUE(Open(1 << 20, &opened).ok());
  absl::StatusOr<std::unique_ptr<SharedRegion>> region =
      SharedRegion::Open(opened.path(), opened.nonce(), opened.bytes());
  ASSERT_TRUE(region.ok()) << region.status();
  uint8_t* base = (*region)->data();
  // 100 tokens: q 6400 bytes at 0, k and v 3200 at 6400 and 9600; lse 800 bytes.
  const auto fill_inputs = [&] {
    float* q = reinterpret_cast<float*>(base);
    for (int i = 0; i < 1600; ++i) q[i] = 0.5f;
    float* kv = reinterpret_cast<float*>(base + 6400);
    for (int i = 0; i < 1600; ++i) kv[i] = 0.25f;
  };
  struct Case {
    int64_t o_offset, lse_offset;
  };
  // Over q, aligned (twice: the first call of the region, then a later one); then unaligned.
  const Case cases[] = {{0, 12800}, {0, 12800}, {13700, 20100}};
  int64_t stored = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "o at " << c.o_offset << ", lse at " << c.lse_offset);
    std::memset(base + c.o_offset, 0x7F, 6400);  // Not a value the answer has.
    std::memset(base + c.lse_offset, 0x7F, 800);
    fill_inputs();  // Over o where o lies over q (q is 0.5: not the answer either).
    v1::SharedTensors where;
    where.set_region_id(opened.region_id());
    where.set_q_offset(0);
    where.set_k_offset(6400);
    where.set_v_offset(9600);
    where.set_o_offset(c.o_offset);
    where.set_lse_offset(c.lse_offset);
    const grpc::Status s = Prefill(100, Declared(where, 100), /*want_lse=*/true);
    ASSERT_TRUE(s.ok()) << s.error_message();
    stored += 100;
    EXPECT_EQ(StoredLength(), stored);
    float o[1600], lse[200];
    std::memcpy(o, base + c.o_offset, sizeof(o));
    std::memcpy(lse, base + c.lse_offset, sizeof(lse));
    for (int i = 0; i < 1600; ++i) ASSERT_FLOAT_EQ(o[i], 0.25f) << i;  // Uniform v: o equals it.
    for (int i = 0; i < 200; ++i) ASSERT_TRUE(std::isfinite(lse[i])) << i << ": " << lse[i];
  }
}

TEST_F(SharedMemoryApiTest, PerClientLimitIsResourceExhausted) {
  v1::OpenSharedMemoryResponse a, b;
  ASSERT_TRUE(Open(int64_t{6} << 20, &a).ok());
  const grpc::Status s = Open(int64_t{4} << 20, &b);  // 10 MiB > this router's 8 MiB.
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(Open(0, &b).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Closing one makes room again.
  grpc::ClientContext context;
  v1::CloseSharedMemoryRequest close;
  close.set_region_id(a.region_id());
  v1::CloseSharedMemoryResponse closed;
  ASSERT_TRUE(stub_->CloseSharedMemory(&context, close, &closed).ok());
  EXPECT_TRUE(Open(int64_t{4} << 20, &b).ok());
}

}  // namespace
}  // namespace dhsa::router_test
