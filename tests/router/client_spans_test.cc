// The SDK on the caller's buffers (Sequence::PrefillInto and DecodeInto): the same bytes as the
// Tensor calls through shared memory and through the stream, inputs read from inside larger
// buffers, outputs written only on success, and bad spans refused with nothing stored.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;

// Inputs of more than 1 MiB in float32 (the SDK's shared-memory path); odd length.
constexpr int64_t kHq = 4, kHkv = 2, kDim = 64, kLen = 1237;

// A caller's buffer holding `t`'s bytes after `pad` bytes of other data, and the span of them.
struct Embedded {
  std::vector<uint8_t> storage;
  TensorSpan span;
};
Embedded EmbeddedIn(const Tensor& t, size_t pad) {
  Embedded e;
  e.storage.assign(pad + t.bytes.size(), 0xAB);
  std::memcpy(e.storage.data() + pad, t.bytes.data(), t.bytes.size());
  e.span = TensorSpan(t.dtype, t.shape, e.storage.data() + pad);
  return e;
}

decltype(Tensor::bytes) BytesOf(const std::vector<float>& v) {
  decltype(Tensor::bytes) out(v.size() * sizeof(float));
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

TEST(ClientSpansTest, IntoCallerBuffersEqualsTheTensorCalls) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(2, /*stripe_tokens=*/512);
  ASSERT_NE(h.client, nullptr);
  absl::StatusOr<Client> streamed = h.StreamedClient();
  ASSERT_TRUE(streamed.ok()) << streamed.status();

  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (bool shared_memory : {true, false}) {
      SCOPED_TRACE(::testing::Message()
                   << DTypeName(dtype) << (shared_memory ? " shm" : " stream"));
      const DhsaConfig config = SmallConfig(Policy::kDhsa);
      const Client& client = shared_memory ? *h.client : *streamed;
      const Inputs in = MakeInputs(rng, kHq, kHkv, kLen, kDim, dtype);
      // Layer 0 through the Tensor calls, layer 1 through the spans: the same inputs, so the same
      // bytes out.
      Sequence seq = h.Create(config, /*layers=*/2, kHq, kHkv, kDim, dtype);
      Sequence same = client.Attach(seq.id());
      auto want = same.Prefill(0, in.q, in.k, in.v, /*want_lse=*/true);
      ASSERT_TRUE(want.ok()) << want.status();
      EXPECT_EQ(want->shared_memory, shared_memory);

      const Embedded q = EmbeddedIn(in.q, 40), k = EmbeddedIn(in.k, 3), v = EmbeddedIn(in.v, 0);
      std::vector<float> o(static_cast<size_t>(kHq * kLen * kDim) + 7, -5.0f);
      std::vector<float> lse(static_cast<size_t>(kHq * kLen), -5.0f);
      auto got = same.PrefillInto(1, q.span, k.span, v.span, o.data() + 7, lse.data());
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->length, kLen);
      EXPECT_EQ(got->shared_memory, want->shared_memory);
      EXPECT_EQ(got->stats.computed_pairs(), want->stats.computed_pairs());
      for (int i = 0; i < 7; ++i) EXPECT_EQ(o[static_cast<size_t>(i)], -5.0f);  // Not written.
      std::vector<float> o_only(o.begin() + 7, o.end());
      EXPECT_EQ(BytesOf(o_only), want->o.bytes);
      EXPECT_EQ(BytesOf(lse), want->lse.bytes);

      // Decode steps on both layers: spans equal tensors (o without lse, then with it).
      for (int step = 0; step < 3; ++step) {
        const Inputs one = MakeInputs(rng, kHq, kHkv, 1, kDim, dtype);
        const bool with_lse = step == 2;
        auto want_step = same.Decode(0, one.q, one.k, one.v, with_lse);
        ASSERT_TRUE(want_step.ok()) << want_step.status();
        std::vector<float> o_step(static_cast<size_t>(kHq * kDim));
        std::vector<float> lse_step(static_cast<size_t>(kHq));
        auto got_step = same.DecodeInto(1, one.q, one.k, one.v, o_step.data(),
                                        with_lse ? lse_step.data() : nullptr);
        ASSERT_TRUE(got_step.ok()) << got_step.status();
        EXPECT_EQ(got_step->length, kLen + step + 1);
        EXPECT_EQ(BytesOf(o_step), want_step->o.bytes);
        if (with_lse) {
          EXPECT_EQ(BytesOf(lse_step), want_step->lse.bytes);
        }
      }
    }
  }
}

TEST(ClientSpansTest, BadSpansAreRefusedAndAFailedCallLeavesTheOutputAlone) {
  std::mt19937_64 rng(FreshSeed());
  Harness h = Harness::Start(1, /*stripe_tokens=*/512);
  ASSERT_NE(h.client, nullptr);
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  Sequence seq = h.Create(config, /*layers=*/1, kHq, kHkv, kDim);
  const Inputs in = MakeInputs(rng, kHq, kHkv, kLen, kDim);
  const float kSentinel = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> o(static_cast<size_t>(kHq * kLen * kDim), kSentinel);

  const auto expect_invalid = [&](absl::StatusOr<CallResult> r, const char* needle) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find(needle), absl::string_view::npos) << r.status();
  };
  // Null memory, a 2-D shape, a negative size, no output buffer.
  expect_invalid(
      seq.PrefillInto(0, TensorSpan(DType::kF32, in.q.shape, nullptr), in.k, in.v, o.data()),
      "no memory");
  expect_invalid(
      seq.PrefillInto(0, in.q, TensorSpan(DType::kF32, {kHkv, kLen}, in.k.data()), in.v, o.data()),
      "k must be 3-D");
  expect_invalid(
      seq.PrefillInto(0, in.q, in.k, TensorSpan(DType::kF32, {kHkv, -kLen, kDim}, in.v.data()),
                      o.data()),
      "negative");
  expect_invalid(seq.PrefillInto(0, in.q, in.k, in.v, nullptr), "o (the output) is null");
  Tensor short_v = in.v;  // Tensors whose bytes fall short of their shape.
  short_v.bytes.resize(short_v.bytes.size() - 4);
  EXPECT_EQ(seq.Prefill(0, in.q, in.k, short_v).status().code(),
            absl::StatusCode::kInvalidArgument);
  Tensor short_q = Rows(in.q, 0, 1);
  short_q.bytes.resize(short_q.bytes.size() - 1);
  EXPECT_EQ(seq.Decode(0, short_q, Rows(in.k, 0, 1), Rows(in.v, 0, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  expect_invalid(seq.PrefillInto(0, in.q, in.k.ConvertTo(DType::kBF16), in.v, o.data()),
                 "must have one dtype");
  expect_invalid(seq.DecodeInto(0, Rows(in.q, 0, 1), Rows(in.k, 0, 1), Rows(in.v, 0, 1), nullptr),
                 "o (the output) is null");

  // Calls the router refuses (a layer the sequence does not have; then a dtype it was not created
  // with): their status, the output untouched, nothing stored.
  auto wrong_layer = seq.PrefillInto(3, in.q, in.k, in.v, o.data());
  ASSERT_FALSE(wrong_layer.ok());
  EXPECT_EQ(wrong_layer.status().code(), absl::StatusCode::kInvalidArgument)
      << wrong_layer.status();
  // (float16 q, k and v: 1.2 MiB, through shared memory, where the router checks what the SDK
  // declares.)
  auto wrong_dtype = seq.PrefillInto(0, in.q.ConvertTo(DType::kF16), in.k.ConvertTo(DType::kF16),
                                     in.v.ConvertTo(DType::kF16), o.data());
  ASSERT_FALSE(wrong_dtype.ok());
  EXPECT_EQ(wrong_dtype.status().code(), absl::StatusCode::kInvalidArgument)
      << wrong_dtype.status();
  EXPECT_NE(wrong_dtype.status().message().find("float16"), absl::string_view::npos)
      << wrong_dtype.status();
  for (float x : o) ASSERT_TRUE(std::isnan(x));
  auto info = seq.Info();
  ASSERT_TRUE(info.ok()) << info.status();
  for (int64_t length : info->layer_lengths()) EXPECT_EQ(length, 0);

  // And then the good call goes through into the same buffer.
  auto good = seq.PrefillInto(0, in.q, in.k, in.v, o.data());
  ASSERT_TRUE(good.ok()) << good.status();
  auto want = AttendReference(in.q, in.k, in.v, config);
  ASSERT_TRUE(want.ok());
  AttentionOutput as_output;
  as_output.o = Tensor::Uninitialized(DType::kF32, {kHq, kLen, kDim});
  std::memcpy(as_output.o.bytes.data(), o.data(), as_output.o.bytes.size());
  ExpectMatches(as_output, *want, /*with_lse=*/false, "into the caller's buffer");
}

}  // namespace
}  // namespace dhsa::router_test
