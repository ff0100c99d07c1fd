// Bad requests get the status codes of attention.proto and store nothing; a call cut short by its
// deadline stores nothing either.
#include <thread>

#include "gtest/gtest.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;

constexpr int64_t kHq = 4, kHkv = 2, kDim = 32;

template <typename T>
absl::StatusCode Code(const absl::StatusOr<T>& s) {
  return s.status().code();
}

// The layer lengths and bytes the service reports.
void ExpectEmpty(const Sequence& seq) {
  auto info = seq.Info();
  ASSERT_TRUE(info.ok()) << info.status();
  for (int64_t len : info->layer_lengths()) EXPECT_EQ(len, 0);
  EXPECT_EQ(info->kv_bytes(), 0);
  EXPECT_EQ(info->workers_size(), 0);
}

TEST(RouterErrorsTest, BadRequestsGetTheRightCodesAndStoreNothing) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(2, /*stripe_tokens=*/128);
  ASSERT_NE(h.client, nullptr);
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  const Inputs in = MakeInputs(rng, kHq, kHkv, 300, kDim);
  const Tensor q1 = Rows(in.q, 0, 1), k1 = Rows(in.k, 0, 1), v1 = Rows(in.v, 0, 1);

  // Unknown sequence.
  const Sequence ghost = h.client->Attach("no-such-sequence");
  EXPECT_EQ(Code(ghost.Prefill(0, in.q, in.k, in.v)), absl::StatusCode::kNotFound);
  EXPECT_EQ(Code(ghost.Decode(0, q1, k1, v1)), absl::StatusCode::kNotFound);
  EXPECT_EQ(Code(ghost.Info()), absl::StatusCode::kNotFound);
  EXPECT_EQ(Code(ghost.Release()), absl::StatusCode::kNotFound);

  // Bad sequence configs.
  SequenceOptions bad;
  bad.q_heads = 3;
  bad.kv_heads = 2;
  bad.head_dim = kDim;
  EXPECT_EQ(Code(h.client->CreateSequence(bad)), absl::StatusCode::kInvalidArgument);  // Hq % Hkv.
  bad.q_heads = 4;
  bad.head_dim = 0;
  EXPECT_EQ(Code(h.client->CreateSequence(bad)), absl::StatusCode::kInvalidArgument);
  bad.head_dim = kDim;
  bad.id = "spaces are not allowed";
  EXPECT_EQ(Code(h.client->CreateSequence(bad)), absl::StatusCode::kInvalidArgument);
  bad.id = "";
  DhsaConfig oracle = config;
  oracle.policy = Policy::kOracleTopk;
  bad.config = oracle;
  EXPECT_EQ(Code(h.client->CreateSequence(bad)), absl::StatusCode::kInvalidArgument);
  DhsaConfig tiny = config;
  tiny.budget = 10;  // Below sink + local.
  bad.config = tiny;
  EXPECT_EQ(Code(h.client->CreateSequence(bad)), absl::StatusCode::kInvalidArgument);

  Sequence seq = h.Create(config, 2, kHq, kHkv, kDim, DType::kF32, "seq-1");
  SequenceOptions dup;
  dup.id = "seq-1";
  dup.q_heads = kHq;
  dup.kv_heads = kHkv;
  dup.head_dim = kDim;
  EXPECT_EQ(Code(h.client->CreateSequence(dup)), absl::StatusCode::kInvalidArgument);

  // Wrong state.
  EXPECT_EQ(Code(seq.Decode(0, q1, k1, v1)), absl::StatusCode::kFailedPrecondition);
  // Bad layer, shapes, dtypes, values.
  EXPECT_EQ(Code(seq.Prefill(2, in.q, in.k, in.v)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Code(seq.Prefill(-1, in.q, in.k, in.v)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Code(seq.Prefill(0, in.q, Rows(in.k, 0, 299), in.v)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Code(seq.Prefill(0, in.q, in.k, in.k)), absl::StatusCode::kOk);  // Same shape: fine.
  Sequence seq2 = h.Create(config, 1, kHq, kHkv, kDim);
  EXPECT_EQ(Code(seq2.Prefill(0, in.k, in.k, in.v)), absl::StatusCode::kInvalidArgument);  // Hq.
  EXPECT_EQ(Code(seq2.Prefill(0, in.q, in.k.ConvertTo(DType::kF16), in.v)),
            absl::StatusCode::kInvalidArgument);
  Tensor nan_q = in.q;
  static_cast<float*>(nan_q.data())[1234] = std::nanf("");
  EXPECT_EQ(Code(seq2.Prefill(0, nan_q, in.k, in.v)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Code(seq2.Decode(0, q1, k1, v1)), absl::StatusCode::kFailedPrecondition);
  ExpectEmpty(seq2);

  // The first sequence's layer 1 was never touched; after all this, a real call still matches.
  auto got = seq2.Prefill(0, in.q, in.k, in.v, true);
  ASSERT_TRUE(got.ok()) << got.status();
  auto want = AttendReference(in.q, in.k, in.v, config);
  ASSERT_TRUE(want.ok());
  ExpectMatches(*got, *want, true, "after the bad requests");
  EXPECT_EQ(Code(seq2.Decode(0, Rows(in.q, 0, 2), k1, v1)), absl::StatusCode::kInvalidArgument);
  auto info = seq2.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 300);
}

TEST(RouterErrorsTest, ACallPastItsDeadlineStoresNothing) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(2, /*stripe_tokens=*/256);
  ASSERT_NE(h.client, nullptr);
  const DhsaConfig config = SmallConfig(Policy::kDense);
  const Inputs in = MakeInputs(rng, kHq, kHkv, 2000, kDim);
  Sequence seq = h.Create(config, 1, kHq, kHkv, kDim, DType::kF32, "deadline");

  // Dense attention over 2000 keys takes the workers a few hundred milliseconds: the deadline
  // usually falls after the keys are stored, so the router must drop them again.
  ClientOptions hurried;
  hurried.timeout = std::chrono::milliseconds(50);
  auto fast = Client::Connect(h.service->router_address(), hurried);
  ASSERT_TRUE(fast.ok());
  const absl::Status late = fast->Attach("deadline").Prefill(0, in.q, in.k, in.v).status();
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded) << late;

  // The router may still be undoing the call: wait until the layer is free, then the same prefill
  // must succeed on an empty layer.
  absl::StatusOr<PrefillOutput> got = absl::UnknownError("not run");
  for (int attempt = 0; attempt < 100; ++attempt) {
    got = seq.Prefill(0, in.q, in.k, in.v, true);
    if (got.status().code() != absl::StatusCode::kFailedPrecondition) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->length, 2000);
  auto want = AttendReference(in.q, in.k, in.v, config);
  ASSERT_TRUE(want.ok());
  ExpectMatches(*got, *want, true, "after the late call");
}

}  // namespace
}  // namespace dhsa::router_test
