// The worker through a real gRPC channel on 127.0.0.1 with a 64 KiB message limit, so that every
// tensor of any size travels in pieces.
#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include <cmath>
#include <future>
#include <limits>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "services/common/config.h"
#include "services/common/server.h"
#include "services/common/tsan_annotations.h"
#include "services/worker/backend.h"
#include "services/worker/worker_server.h"
#include "tests/services/worker_client.h"
#include "tests/services/worker_test_util.h"

namespace dhsa {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kMaxMessageBytes = 64 << 10;

class WorkerTest : public ::testing::Test {
 protected:
  WorkerTest() : seed_(std::random_device{}()), rng_(seed_) {}

  void SetUp() override {
    RecordProperty("seed", std::to_string(seed_));
    StartWorker(int64_t{1} << 30);
  }

  // `stall`: WorkerOptions::test_attend_stall (every Attend waits that long, or until cancelled).
  void StartWorker(int64_t capacity_bytes, absl::Duration stall = absl::ZeroDuration()) {
    stub_.reset();
    server_.reset();
    WorkerOptions options;
    options.test_attend_stall = stall;
    options.listen_address = "127.0.0.1:0";
    options.capacity_bytes = capacity_bytes;
    options.threads = 2;
    options.max_message_bytes = kMaxMessageBytes;
    absl::StatusOr<std::unique_ptr<WorkerServer>> server = WorkerServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    channel_ = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                         grpc::InsecureChannelCredentials(),
                                         ChannelArgumentsForMessageLimit(kMaxMessageBytes));
    stub_ = v1::Worker::NewStub(channel_);
  }

  std::string Seed() const { return absl::StrCat("seed ", seed_); }

  // Stores rows [begin, end) of k_all and v_all ([Hkv, L, d]).
  absl::StatusOr<v1::StoreKvResponse> Store(const std::string& seq, int layer, int64_t begin,
                                            int64_t end, bool append, const Tensor& k_all,
                                            const Tensor& v_all) {
    v1::StoreKvHeader h;
    h.set_sequence_id(seq);
    h.set_layer(layer);
    h.set_begin(begin);
    h.set_num_tokens(end - begin);
    h.set_kv_heads(static_cast<int32_t>(k_all.shape[0]));
    h.set_head_dim(static_cast<int32_t>(k_all.shape[2]));
    h.set_dtype(ToProtoDType(k_all.dtype));
    h.set_append(append);
    return StoreKvCall(stub_.get(), h, SliceRows(k_all, begin, end), SliceRows(v_all, begin, end),
                       PieceBytesForMessageLimit(kMaxMessageBytes));
  }

  static v1::AttendHeader Header(const std::string& seq, int layer, const Selection& sel,
                                 const Tensor& q, int64_t q_begin) {
    v1::AttendHeader h;
    h.set_sequence_id(seq);
    h.set_layer(layer);
    h.set_q_begin(q_begin);
    h.set_num_rows(q.shape[1]);
    h.set_head_dim(static_cast<int32_t>(q.shape[2]));
    SelectionToAttendHeader(sel, &h);
    return h;
  }

  absl::StatusOr<AttendReply> Attend(const v1::AttendHeader& h, const Tensor& q) {
    return AttendCall(stub_.get(), h, q, PieceBytesForMessageLimit(kMaxMessageBytes));
  }

  v1::StatsResponse Stats() {
    grpc::ClientContext context;
    v1::StatsResponse response;
    const grpc::Status s = stub_->Stats(&context, v1::StatsRequest(), &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return response;
  }

  int64_t Drop(const std::string& seq) {
    grpc::ClientContext context;
    v1::DropRequest request;
    request.set_sequence_id(seq);
    v1::DropResponse response;
    const grpc::Status s = stub_->Drop(&context, request, &response);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return response.freed_bytes();
  }

  absl::StatusOr<v1::TruncateResponse> Truncate(const std::string& seq, int layer, int64_t end) {
    grpc::ClientContext context;
    v1::TruncateRequest request;
    request.set_sequence_id(seq);
    request.set_layer(layer);
    request.set_end(end);
    v1::TruncateResponse response;
    DHSA_RETURN_IF_ERROR(FromGrpcStatus(stub_->Truncate(&context, request, &response)));
    return response;
  }

  // Attends rows [q_begin, lk) with `sel` and compares with the reference over all keys.
  void ExpectAttendMatches(const std::string& seq, const Selection& sel, const Tensor& q,
                           int64_t q_begin, const Tensor& k_all, const Tensor& v_all) {
    const v1::AttendHeader h = Header(seq, 0, sel, q, q_begin);
    absl::StatusOr<AttendReply> reply = Attend(h, q);
    ASSERT_TRUE(reply.ok()) << reply.status();
    const int64_t lk = q_begin + q.shape[1];
    const ReferenceResult ref =
        Reference(q, q_begin, SliceRows(k_all, 0, lk), SliceRows(v_all, 0, lk), sel,
                  1.0f / std::sqrt(static_cast<float>(q.shape[2])));
    ExpectMatchesReference(reply->o, reply->lse, ref);
    AttentionShape shape;
    shape.hq = q.shape[0];
    shape.hkv = k_all.shape[0];
    shape.dim = q.shape[2];
    shape.lq = q.shape[1];
    shape.lk = lk;
    EXPECT_EQ(reply->result.computed_pairs(), CountComputedPairs(sel, shape));
  }

  const uint64_t seed_;
  std::mt19937_64 rng_;
  std::unique_ptr<WorkerServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Worker::Stub> stub_;
};

class WorkerDtypeTest : public WorkerTest, public ::testing::WithParamInterface<DType> {};

TEST_P(WorkerDtypeTest, TwoStripesWithDecodeAppendsMatchWholeKeys) {
  SCOPED_TRACE(Seed());
  const DType dtype = GetParam();
  const int64_t hq = 4, hkv = 2, d = 24, lk = 95;
  const Tensor k = RandomNormal(dtype, {hkv, lk, d}, rng_);
  const Tensor v = RandomNormal(dtype, {hkv, lk, d}, rng_);
  // Stripe A [0, 37), stripe B [37, 90), then five decode-style appends of one token to B (the
  // first grows B's buffer).
  ASSERT_TRUE(Store("s", 0, 0, 37, false, k, v).ok());
  absl::StatusOr<v1::StoreKvResponse> stored = Store("s", 0, 37, 90, false, k, v);
  ASSERT_TRUE(stored.ok()) << stored.status();
  for (int64_t pos = 90; pos < lk; ++pos) {
    stored = Store("s", 0, pos, pos + 1, true, k, v);
    ASSERT_TRUE(stored.ok()) << stored.status();
  }
  EXPECT_EQ(stored->stripe_begin(), 37);
  EXPECT_EQ(stored->stripe_length(), lk - 37);
  const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
  EXPECT_EQ(stored->held_bytes(), 2 * hkv * lk * d * elem);

  // Prefill-style: rows [60, 95) in blocks of 16 (absolute blocks 3, 4, 5), random spans, one span
  // across the stripe edge, and one empty entry (KV head 1, block 4).
  const int64_t q_begin = 60;
  const Tensor q = RandomNormal(dtype, {hq, lk - q_begin, d}, rng_);
  Selection sel = RandomSelection(hkv, hq / hkv, 16, q_begin, lk - q_begin, lk, rng_);
  sel.At(0, 0) = {{30, 45}, {50, 51}};
  sel.At(1, 1).clear();
  {
    SCOPED_TRACE("prefill rows");
    ExpectAttendMatches("s", sel, q, q_begin, k, v);
  }
  absl::StatusOr<AttendReply> reply = Attend(Header("s", 0, sel, q, q_begin), q);
  ASSERT_TRUE(reply.ok()) << reply.status();
  const float* lse = static_cast<const float*>(reply->lse.data());
  const float* o = static_cast<const float*>(reply->o.data());
  for (int64_t g = 2; g < 4; ++g) {
    for (int64_t pos = 64; pos < 80; ++pos) {
      const int64_t row = g * (lk - q_begin) + pos - q_begin;
      EXPECT_EQ(lse[row], -std::numeric_limits<float>::infinity())
          << "head " << g << " pos " << pos;
      for (int64_t c = 0; c < d; ++c) ASSERT_EQ(o[row * d + c], 0.0f);
    }
  }

  // Decode-style: the last token alone.
  const Tensor q1 = RandomNormal(dtype, {hq, 1, d}, rng_);
  Selection decode = RandomSelection(hkv, hq / hkv, 16, lk - 1, 1, lk, rng_);
  decode.At(0, 0) = {{0, 5}, {20, 60}, {93, 95}};
  {
    SCOPED_TRACE("decode row");
    ExpectAttendMatches("s", decode, q1, lk - 1, k, v);
  }

  // Only stripe B.
  Selection only_b = RandomSelection(hkv, hq / hkv, 16, q_begin, lk - q_begin, lk, rng_);
  for (std::vector<Span>& spans : only_b.spans) spans = {{41, 58}, {70, 94}};
  {
    SCOPED_TRACE("one stripe");
    ExpectAttendMatches("s", only_b, q, q_begin, k, v);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, WorkerDtypeTest, ::testing::Values(DType::kF32, DType::kF16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(DTypeName(info.param));
                         });

TEST_F(WorkerTest, EmptySelectionGivesZeroAndMinusInf) {
  SCOPED_TRACE(Seed());
  const Tensor k = RandomNormal(DType::kF32, {1, 20, 8}, rng_);
  ASSERT_TRUE(Store("s", 0, 0, 20, false, k, k).ok());
  const Tensor q = RandomNormal(DType::kF32, {3, 5, 8}, rng_);
  Selection sel = RandomSelection(1, 3, 4, 15, 5, 20, rng_);
  for (std::vector<Span>& spans : sel.spans) spans.clear();
  absl::StatusOr<AttendReply> reply = Attend(Header("s", 0, sel, q, 15), q);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->result.computed_pairs(), 0);
  for (float x : reply->lse.ToFloats()) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
  for (float x : reply->o.ToFloats()) ASSERT_EQ(x, 0.0f);
}

TEST_F(WorkerTest, PerQueryHeadSelection) {
  SCOPED_TRACE(Seed());
  const Tensor k = RandomNormal(DType::kBF16, {2, 50, 16}, rng_);
  const Tensor v = RandomNormal(DType::kBF16, {2, 50, 16}, rng_);
  ASSERT_TRUE(Store("s", 0, 0, 21, false, k, v).ok());
  ASSERT_TRUE(Store("s", 0, 21, 50, false, k, v).ok());
  const Tensor q = RandomNormal(DType::kF32, {4, 10, 16}, rng_);
  Selection sel;
  sel.unit = SelectionUnit::kQueryHeadRow;
  sel.block_size = 1;
  sel.first_block = 40;
  sel.num_blocks = 10;
  sel.num_heads = 4;
  sel.group = 2;
  for (int i = 0; i < 40; ++i) sel.spans.push_back(RandomSpans(50, 3, rng_));
  ExpectAttendMatches("s", sel, q, 40, k, v);
}

TEST_F(WorkerTest, LargeTensorsGoThroughInPieces) {
  SCOPED_TRACE(Seed());
  const int64_t hq = 8, hkv = 2, d = 64, lk = 700, q_begin = 400;
  const Tensor k = RandomNormal(DType::kF32, {hkv, lk, d}, rng_);
  const Tensor v = RandomNormal(DType::kF32, {hkv, lk, d}, rng_);
  // Each stripe's k is 179200 bytes, q and o are 614400 bytes: all far above 64 KiB.
  ASSERT_TRUE(Store("big", 0, 0, 350, false, k, v).ok());
  ASSERT_TRUE(Store("big", 0, 350, lk, false, k, v).ok());
  const Tensor q = RandomNormal(DType::kF32, {hq, lk - q_begin, d}, rng_);
  Selection sel = RandomSelection(hkv, hq / hkv, 128, q_begin, lk - q_begin, lk, rng_);
  for (std::vector<Span>& spans : sel.spans) spans = {{0, lk}};
  ExpectAttendMatches("big", sel, q, q_begin, k, v);

  // The same stripe as one message is over the server's limit.
  auto unlimited = v1::Worker::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server_->port()), grpc::InsecureChannelCredentials()));
  v1::StoreKvHeader h;
  h.set_sequence_id("big");
  h.set_begin(lk);
  h.set_num_tokens(350);
  h.set_kv_heads(hkv);
  h.set_head_dim(d);
  h.set_dtype(v1::DTYPE_FLOAT32);
  const Tensor part = SliceRows(k, 0, 350);
  const absl::Status s =
      StoreKvCall(unlimited.get(), h, part, part, static_cast<int64_t>(part.bytes.size())).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(Stats().held_bytes(), 2 * hkv * lk * d * 4);
}

TEST_F(WorkerTest, CapacityExhaustionKeepsHeldBytes) {
  SCOPED_TRACE(Seed());
  StartWorker(10000);
  const Tensor k = RandomNormal(DType::kF32, {2, 60, 24}, rng_);
  ASSERT_TRUE(Store("s", 0, 0, 20, false, k, k).ok());  // 7680 bytes.
  absl::Status s = Store("s", 0, 20, 40, false, k, k).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("7680 bytes"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("7680 of 10000"));
  EXPECT_EQ(Stats().held_bytes(), 7680);
  EXPECT_EQ(Stats().stripes(), 1);
  // What still fits is accepted.
  absl::StatusOr<v1::StoreKvResponse> ok = Store("s", 0, 20, 25, true, k, k);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->held_bytes(), 9600);
}

TEST_F(WorkerTest, OverlapsAndBadAppendsAreRejected) {
  SCOPED_TRACE(Seed());
  const Tensor k = RandomNormal(DType::kF32, {2, 80, 8}, rng_);
  ASSERT_TRUE(Store("s", 0, 0, 37, false, k, k).ok());
  ASSERT_TRUE(Store("s", 0, 50, 60, false, k, k).ok());
  const int64_t held = Stats().held_bytes();
  for (auto [begin, end, append] :
       {std::tuple{30, 40, false}, std::tuple{0, 5, false}, std::tuple{36, 37, true},
        std::tuple{37, 55, true}, std::tuple{45, 51, false}}) {
    SCOPED_TRACE(absl::StrCat("[", begin, ", ", end, ") append ", append));
    const absl::Status s = Store("s", 0, begin, end, append, k, k).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("[0, 37), [50, 60)"));
  }
  EXPECT_EQ(Stats().held_bytes(), held);
  EXPECT_TRUE(Store("s", 0, 60, 61, false, k, k).ok());
  EXPECT_TRUE(Store("s", 0, 37, 50, true, k, k).ok());  // Fills the gap exactly.
  // Another layer is independent; other shapes for the same sequence are not.
  EXPECT_TRUE(Store("s", 1, 0, 37, false, k, k).ok());
  const Tensor other = RandomNormal(DType::kF32, {2, 10, 16}, rng_);
  EXPECT_EQ(Store("s", 2, 0, 10, false, other, other).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Store("new", 0, 5, 6, true, k, k).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(WorkerTest, BadTensorsStoreNothing) {
  SCOPED_TRACE(Seed());
  const Tensor k = RandomNormal(DType::kF32, {2, 10, 8}, rng_);
  v1::StoreKvHeader h;
  h.set_sequence_id("s");
  h.set_num_tokens(10);
  h.set_kv_heads(2);
  h.set_head_dim(8);
  h.set_dtype(v1::DTYPE_FLOAT32);
  const int64_t piece = PieceBytesForMessageLimit(kMaxMessageBytes);
  // Same bytes, wrong shape.
  Tensor reshaped = k;
  reshaped.shape = {2, 8, 10};
  absl::Status s = StoreKvCall(stub_.get(), h, reshaped, k, piece).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("'k'"));
  // Wrong dtype.
  s = StoreKvCall(stub_.get(), h, k, k.ConvertTo(DType::kF16), piece).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  // A header without a dtype.
  h.set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(StoreKvCall(stub_.get(), h, k, k, piece).status().code(),
            absl::StatusCode::kInvalidArgument);
  h.set_dtype(v1::DTYPE_FLOAT32);
  // Truncated: "v" stops half way.
  {
    grpc::ClientContext context;
    v1::StoreKvResponse response;
    auto writer = stub_->StoreKv(&context, &response);
    v1::StoreKvRequest request;
    *request.mutable_header() = h;
    ASSERT_TRUE(writer->Write(request));
    int pieces = 0;
    const auto send = [&](v1::TensorPiece&& p) {
      *request.mutable_piece() = std::move(p);
      return writer->Write(request);
    };
    ASSERT_TRUE(SendTensorPieces(k, "k", 100, send).ok());
    ASSERT_FALSE(SendTensorPieces(k, "v", 100, [&](v1::TensorPiece&& p) {
                   return ++pieces <= 3 && send(std::move(p));
                 }).ok());
    writer->WritesDone();
    s = FromGrpcStatus(writer->Finish());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()),
                HasSubstr("stream ended after 300 of 640 bytes of tensor 'v'"));
  }
  const v1::StatsResponse stats = Stats();
  EXPECT_EQ(stats.held_bytes(), 0);
  EXPECT_EQ(stats.stripes(), 0);
  EXPECT_EQ(stats.sequences(), 0);
}

TEST_F(WorkerTest, StatsCountAndDropFrees) {
  SCOPED_TRACE(Seed());
  const Tensor a = RandomNormal(DType::kF32, {2, 50, 8}, rng_);
  const Tensor b = RandomNormal(DType::kF16, {1, 10, 32}, rng_);
  ASSERT_TRUE(Store("a", 0, 0, 37, false, a, a).ok());
  ASSERT_TRUE(Store("a", 0, 37, 50, false, a, a).ok());
  ASSERT_TRUE(Store("a", 1, 0, 20, false, a, a).ok());
  ASSERT_TRUE(Store("a", 1, 20, 21, true, a, a).ok());
  ASSERT_TRUE(Store("b", 0, 0, 10, false, b, b).ok());
  const int64_t a_bytes = 2 * 2 * (50 + 21) * 8 * 4, b_bytes = 2 * 10 * 32 * 2;
  v1::StatsResponse stats = Stats();
  EXPECT_EQ(stats.capacity_bytes(), int64_t{1} << 30);
  EXPECT_EQ(stats.held_bytes(), a_bytes + b_bytes);
  EXPECT_GE(stats.allocated_bytes(), stats.held_bytes());
  EXPECT_EQ(stats.sequences(), 2);
  EXPECT_EQ(stats.stripes(), 4);
  EXPECT_EQ(stats.backend(), "cpu");

  EXPECT_EQ(Drop("a"), a_bytes);
  EXPECT_EQ(Drop("a"), 0);
  EXPECT_EQ(Drop("unknown"), 0);
  stats = Stats();
  EXPECT_EQ(stats.held_bytes(), b_bytes);
  EXPECT_EQ(stats.allocated_bytes(), b_bytes);
  EXPECT_EQ(stats.sequences(), 1);
  EXPECT_EQ(stats.stripes(), 1);

  const Tensor q = RandomNormal(DType::kF32, {2, 1, 8}, rng_);
  const Selection sel = RandomSelection(2, 1, 16, 49, 1, 50, rng_);
  EXPECT_EQ(Attend(Header("a", 0, sel, q, 49), q).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(WorkerTest, TruncateCutsStripesAndStoresResumeAtTheCut) {
  SCOPED_TRACE(Seed());
  const int64_t hq = 4, hkv = 2, d = 8, lk = 80;
  const int64_t token = 2 * hkv * d * 4;
  const Tensor k = RandomNormal(DType::kF32, {hkv, lk, d}, rng_);
  const Tensor v = RandomNormal(DType::kF32, {hkv, lk, d}, rng_);
  // [0, 37), then [37, 60) grown by an append to [37, 70).
  ASSERT_TRUE(Store("s", 0, 0, 37, false, k, v).ok());
  ASSERT_TRUE(Store("s", 0, 37, 60, false, k, v).ok());
  ASSERT_TRUE(Store("s", 0, 60, 70, true, k, v).ok());
  ASSERT_TRUE(Store("s", 1, 0, 5, false, k, v).ok());

  // In the middle of the second stripe.
  absl::StatusOr<v1::TruncateResponse> cut = Truncate("s", 0, 50);
  ASSERT_TRUE(cut.ok()) << cut.status();
  EXPECT_EQ(cut->freed_bytes(), 20 * token);
  EXPECT_EQ(cut->held_bytes(), 55 * token);
  v1::StatsResponse stats = Stats();
  EXPECT_EQ(stats.held_bytes(), 55 * token);
  EXPECT_GE(stats.allocated_bytes(), stats.held_bytes());
  EXPECT_EQ(stats.stripes(), 3);
  // Idempotent; past the end, unknown layers and sequences: nothing freed.
  for (auto [seq, layer, end] : {std::tuple{"s", 0, 50}, std::tuple{"s", 0, 1000},
                                 std::tuple{"s", 7, 0}, std::tuple{"unknown", 0, 0}}) {
    cut = Truncate(seq, layer, end);
    ASSERT_TRUE(cut.ok()) << cut.status();
    EXPECT_EQ(cut->freed_bytes(), 0);
    EXPECT_EQ(cut->held_bytes(), 55 * token);
  }
  EXPECT_EQ(Truncate("", 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Truncate("s", 0, -5).status().code(), absl::StatusCode::kInvalidArgument);
  // The cut positions are free again: other keys append at the cut, and attention sees them.
  const Tensor k2 = RandomNormal(DType::kF32, {hkv, lk, d}, rng_);
  const Tensor v2 = RandomNormal(DType::kF32, {hkv, lk, d}, rng_);
  EXPECT_EQ(Store("s", 0, 70, 80, true, k2, v2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<v1::StoreKvResponse> stored = Store("s", 0, 50, lk, true, k2, v2);
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(stored->stripe_begin(), 37);
  EXPECT_EQ(stored->stripe_length(), lk - 37);
  EXPECT_EQ(stored->held_bytes(), 85 * token);
  const int64_t q_begin = 45;
  const Tensor q = RandomNormal(DType::kF32, {hq, lk - q_begin, d}, rng_);
  Selection sel = RandomSelection(hkv, hq / hkv, 16, q_begin, lk - q_begin, lk, rng_);
  sel.At(0, 0) = {{0, lk}};
  sel.At(1, 1) = {{36, 51}, {60, 75}};
  ExpectAttendMatches("s", sel, q, q_begin, WithRows(k, k2, 50, lk), WithRows(v, v2, 50, lk));

  // At a stripe start: the second stripe goes whole.
  cut = Truncate("s", 0, 37);
  ASSERT_TRUE(cut.ok());
  EXPECT_EQ(cut->freed_bytes(), (lk - 37) * token);
  stats = Stats();
  EXPECT_EQ(stats.held_bytes(), 42 * token);
  EXPECT_EQ(stats.stripes(), 2);
  // To 0: layer 0 is gone (Attend: NOT_FOUND); layer 1 and the sequence remain.
  ASSERT_TRUE(Truncate("s", 0, 0).ok());
  const Tensor q1 = RandomNormal(DType::kF32, {hq, 1, d}, rng_);
  EXPECT_EQ(Attend(Header("s", 0, RandomSelection(hkv, hq / hkv, 16, 4, 1, 5, rng_), q1, 4), q1)
                .status()
                .code(),
            absl::StatusCode::kNotFound);
  stats = Stats();
  EXPECT_EQ(stats.held_bytes(), 5 * token);
  EXPECT_EQ(stats.sequences(), 1);
  EXPECT_EQ(Drop("s"), 5 * token);
}

TEST_F(WorkerTest, SpansOutsideHeldKeysFailPrecondition) {
  SCOPED_TRACE(Seed());
  const Tensor k = RandomNormal(DType::kF32, {1, 100, 8}, rng_);
  ASSERT_TRUE(Store("s", 0, 0, 37, false, k, k).ok());
  ASSERT_TRUE(Store("s", 0, 50, 80, false, k, k).ok());
  const Tensor q = RandomNormal(DType::kF32, {2, 10, 8}, rng_);
  Selection sel = RandomSelection(1, 2, 16, 70, 10, 37, rng_);
  sel.At(0, sel.num_blocks - 1) = {{30, 55}};
  absl::Status s = Attend(Header("s", 0, sel, q, 70), q).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("[37, 50)"));
  sel.At(0, sel.num_blocks - 1) = {{60, 85}};
  s = Attend(Header("s", 0, sel, q, 70), q).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("[80, 85)"));
  // Wrong shapes in the header or the "q" tensor are InvalidArgument.
  sel.At(0, sel.num_blocks - 1) = {{60, 80}};
  v1::AttendHeader h = Header("s", 0, sel, q, 70);
  h.set_head_dim(16);
  EXPECT_EQ(Attend(h, q).status().code(), absl::StatusCode::kInvalidArgument);
  h = Header("s", 0, sel, q, 70);
  EXPECT_EQ(Attend(h, SliceRows(q, 0, 9)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Attend(h, q).ok());
}

TEST_F(WorkerTest, DeadlineEndsAttend) {
  SCOPED_TRACE(Seed());
  // The Attend stalls on the worker (test_attend_stall) past the 300 ms deadline: the fast CPU
  // kernel alone may finish this call in time on a fast machine.
  StartWorker(int64_t{1} << 30, absl::Seconds(30));
  const int64_t lk = 20000, d = 4;
  const Tensor k = RandomNormal(DType::kF32, {1, lk, d}, rng_);
  for (int64_t b = 0; b < lk; b += 2500) ASSERT_TRUE(Store("s", 0, b, b + 2500, false, k, k).ok());
  const Tensor q = RandomNormal(DType::kF32, {16, 1000, d}, rng_);
  Selection sel = RandomSelection(1, 16, 1000, lk - 1000, 1000, lk, rng_);
  for (std::vector<Span>& spans : sel.spans) spans = {{0, lk}};
  const absl::Status s =
      AttendCall(stub_.get(), Header("s", 0, sel, q, lk - 1000), q,
                 PieceBytesForMessageLimit(kMaxMessageBytes), std::chrono::milliseconds(300))
          .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_EQ(Stats().stripes(), 8);  // The worker still serves.
}

TEST_F(WorkerTest, HealthAndInProcessChannel) {
  grpc::GenericStub generic(channel_);
  auto check = [&](const std::string& service) {
    std::string request;
    if (!service.empty())
      request = std::string("\x0a", 1) + static_cast<char>(service.size()) + service;
    grpc::Slice slice(request);
    grpc::ByteBuffer in(&slice, 1), out;
    grpc::ClientContext context;
    std::promise<grpc::Status> done;
    DHSA_HAPPENS_BEFORE(&done);  // gRPC runs the callback on its thread.
    generic.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &in, &out,
                      [&](grpc::Status s) {
                        DHSA_HAPPENS_AFTER(&done);
                        done.set_value(s);
                      });
    const grpc::Status s = done.get_future().get();
    std::vector<grpc::Slice> slices;
    std::string bytes;
    if (s.ok() && out.Dump(&slices).ok()) {
      for (const grpc::Slice& piece : slices) bytes.append(piece.begin(), piece.end());
    }
    return std::make_pair(s.error_code(), bytes);
  };
  const std::string serving("\x08\x01", 2);
  EXPECT_EQ(check(""), std::make_pair(grpc::StatusCode::OK, serving));
  EXPECT_EQ(check("dhsa.v1.Worker"), std::make_pair(grpc::StatusCode::OK, serving));
  EXPECT_EQ(check("nope").first, grpc::StatusCode::NOT_FOUND);

  auto local = v1::Worker::NewStub(server_->InProcessChannel());
  grpc::ClientContext context;
  v1::StatsResponse stats;
  ASSERT_TRUE(local->Stats(&context, v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.backend(), "cpu");
}

TEST(WorkerServerStart, RejectsBadOptions) {
  WorkerOptions o;
  o.listen_address = "127.0.0.1:0";
  o.backend = "cuda";
  if (!WorkerBackendCudaBuilt()) {
    absl::Status s = WorkerServer::Start(o).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("this build has no CUDA backend"));
  }
  o.backend = "tpu";
  EXPECT_EQ(WorkerServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.backend = "";
  o.listen_address = "not an address";
  EXPECT_EQ(WorkerServer::Start(o).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace dhsa
