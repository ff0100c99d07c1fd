// End to end through an embedded router and workers: the service computes what AttendReference
// computes in process, for every served policy, with 1, 2 and 3 workers, chunked prefill, decode,
// GQA, odd lengths and several layers and sequences at once.
#include <thread>

#include "gtest/gtest.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;

class EveryPolicyTest : public ::testing::TestWithParam<int> {};

TEST_P(EveryPolicyTest, MatchesTheReferenceThroughPrefillChunkedPrefillAndDecode) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed << ", workers " << GetParam());
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(GetParam(), /*stripe_tokens=*/256);
  ASSERT_NE(h.client, nullptr);
  constexpr int64_t kHq = 4, kHkv = 2, kDim = 32, kLen = 1025, kFirst = 600, kSteps = 3;
  // Every policy, and dhsa with the mass chunk score (query summaries per query head and piece).
  DhsaConfig mass = SmallConfig(Policy::kDhsa);
  mass.chunk_score = ChunkScore::kMass;
  mass.q_block = 16;
  mass.score_rows = 8;
  for (const DhsaConfig& config :
       {SmallConfig(Policy::kDhsa), mass, SmallConfig(Policy::kBlockTopk),
        SmallConfig(Policy::kStreaming), SmallConfig(Policy::kDense)}) {
    SCOPED_TRACE(::testing::Message()
                 << PolicyName(config.policy)
                 << (config.chunk_score == ChunkScore::kMass ? " (mass score)" : ""));
    const Inputs in = MakeInputs(rng, kHq, kHkv, kLen + kSteps, kDim);
    Sequence seq = h.Create(config, /*layers=*/2, kHq, kHkv, kDim);

    // Layer 0: one prefill of every token.
    auto got = seq.Prefill(0, Rows(in.q, 0, kLen), Rows(in.k, 0, kLen), Rows(in.v, 0, kLen),
                           /*want_lse=*/true);
    ASSERT_TRUE(got.ok()) << got.status();
    auto want =
        AttendReference(Rows(in.q, 0, kLen), Rows(in.k, 0, kLen), Rows(in.v, 0, kLen), config);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectMatches(*got, *want, true, "layer 0 prefill");
    EXPECT_EQ(got->length, kLen);
    EXPECT_EQ(got->stats.computed_pairs(), want->computed_pairs);
    EXPECT_EQ(got->stats.causal_pairs(), want->causal_pairs);

    // Layer 1: two prefills, then decode steps.
    got = seq.Prefill(1, Rows(in.q, 0, kFirst), Rows(in.k, 0, kFirst), Rows(in.v, 0, kFirst), true);
    ASSERT_TRUE(got.ok()) << got.status();
    want = AttendReference(Rows(in.q, 0, kFirst), Rows(in.k, 0, kFirst), Rows(in.v, 0, kFirst),
                           config);
    ASSERT_TRUE(want.ok());
    ExpectMatches(*got, *want, true, "layer 1 first prefill");
    std::vector<int64_t> boundaries = want->boundaries;

    got = seq.Prefill(1, Rows(in.q, kFirst, kLen), Rows(in.k, kFirst, kLen),
                      Rows(in.v, kFirst, kLen), false);
    ASSERT_TRUE(got.ok()) << got.status();
    AttendOptions chunked;
    chunked.prior_boundaries = &boundaries;
    want = AttendReference(Rows(in.q, kFirst, kLen), Rows(in.k, 0, kLen), Rows(in.v, 0, kLen),
                           config, chunked);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectMatches(*got, *want, false, "layer 1 second prefill");
    EXPECT_TRUE(got->lse.shape.empty());
    boundaries = want->boundaries;

    for (int64_t end = kLen + 1; end <= kLen + kSteps; ++end) {
      got = seq.Decode(1, Rows(in.q, end - 1, end), Rows(in.k, end - 1, end),
                       Rows(in.v, end - 1, end), /*want_lse=*/true);
      ASSERT_TRUE(got.ok()) << got.status();
      AttendOptions decode;
      decode.prior_boundaries = &boundaries;
      decode.decode = true;
      want = AttendReference(Rows(in.q, end - 1, end), Rows(in.k, 0, end), Rows(in.v, 0, end),
                             config, decode);
      ASSERT_TRUE(want.ok()) << want.status();
      ExpectMatches(*got, *want, true, "decode to " + std::to_string(end));
      EXPECT_EQ(got->length, end);
      boundaries = want->boundaries;
    }

    auto info = seq.Info();
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(std::vector<int64_t>(info->layer_lengths().begin(), info->layer_lengths().end()),
              (std::vector<int64_t>{kLen, kLen + kSteps}));
    EXPECT_EQ(info->kv_bytes(), (2 * kLen + kSteps) * 2 * kHkv * kDim * 4);
    EXPECT_EQ(info->workers_size(), GetParam());  // At least 3 stripes per layer.
    auto freed = seq.Release();
    ASSERT_TRUE(freed.ok()) << freed.status();
    EXPECT_EQ(*freed, info->kv_bytes());
    EXPECT_EQ(seq.Info().status().code(), absl::StatusCode::kNotFound);
  }
}

INSTANTIATE_TEST_SUITE_P(Workers, EveryPolicyTest, ::testing::Values(1, 2, 3));

TEST(RouterEndToEndTest, LongOddLengthSpreadsOverEveryWorker) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(3, /*stripe_tokens=*/512);
  ASSERT_NE(h.client, nullptr);
  constexpr int64_t kHq = 4, kHkv = 2, kDim = 64, kLen = 4099;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    const DhsaConfig config = SmallConfig(Policy::kDhsa);
    const Inputs in = MakeInputs(rng, kHq, kHkv, kLen, kDim, dtype);
    Sequence seq = h.Create(config, 1, kHq, kHkv, kDim, dtype);
    auto got = seq.Prefill(0, in.q, in.k, in.v, true);
    ASSERT_TRUE(got.ok()) << got.status();
    auto want = AttendReference(in.q, in.k, in.v, config);
    ASSERT_TRUE(want.ok()) << want.status();
    ExpectMatches(*got, *want, true, "prefill");
    EXPECT_EQ(got->stats.workers_used(), 3);
    EXPECT_EQ(got->stats.computed_pairs(), want->computed_pairs);
    auto info = seq.Info();
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->workers_size(), 3);
  }
}

TEST(RouterEndToEndTest, ConcurrentLayersAndSequences) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  Harness h = Harness::Start(2, /*stripe_tokens=*/128);
  ASSERT_NE(h.client, nullptr);
  constexpr int64_t kHq = 2, kHkv = 1, kDim = 32, kLen = 513, kLayers = 3;
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  Sequence a = h.Create(config, kLayers, kHq, kHkv, kDim);
  Sequence b = h.Create(config, kLayers, kHq, kHkv, kDim);
  std::vector<Inputs> inputs;
  for (int i = 0; i < 2 * kLayers; ++i) inputs.push_back(MakeInputs(rng, kHq, kHkv, kLen, kDim));
  std::vector<absl::StatusOr<PrefillOutput>> outputs(inputs.size(), absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < 2 * kLayers; ++i) {
    threads.emplace_back([&, i] {
      const Sequence& seq = i < kLayers ? a : b;
      outputs[i] = seq.Prefill(i % kLayers, inputs[i].q, inputs[i].k, inputs[i].v, true);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 2 * kLayers; ++i) {
    ASSERT_TRUE(outputs[i].ok()) << outputs[i].status();
    auto want = AttendReference(inputs[i].q, inputs[i].k, inputs[i].v, config);
    ASSERT_TRUE(want.ok());
    ExpectMatches(*outputs[i], *want, true, "call " + std::to_string(i));
  }
}

}  // namespace
}  // namespace dhsa::router_test
