// The load generator against an embedded service: at a concurrency the service can hold, no errors
// and no wrong spot checks; with KV capacity and the in-flight limit far below the load, only
// RESOURCE_EXHAUSTED (never another code, a crash or a wrong result), and the service serves again
// once the load has gone.
#include "bench/load/load.h"

#include "gtest/gtest.h"
#include "services/router/embedded.h"
#include "tests/router/service_test_util.h"

namespace dhsa::reliability_test {
namespace {

std::unique_ptr<EmbeddedService> Start(int64_t capacity_per_worker, int max_inflight) {
  EmbeddedOptions e;
  e.num_workers = 2;
  e.stripe_tokens = 128;
  e.threads = 2;
  e.capacity_bytes_per_worker = capacity_per_worker;
  e.max_inflight = max_inflight;
  absl::StatusOr<std::unique_ptr<EmbeddedService>> s = EmbeddedService::Start(e);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

load::LoadOptions Options(const std::string& target, int concurrency) {
  load::LoadOptions o;
  o.target = target;
  o.client.timeout = std::chrono::seconds(60);
  o.concurrency = concurrency;
  o.seconds = 2;
  o.prefill_tokens = 200;
  o.decode_steps = 4;
  o.q_heads = 4;
  o.kv_heads = 2;
  o.head_dim = 32;
  o.config = router_test::SmallConfig(Policy::kDhsa);
  o.check_every = 2;
  o.seed = ::dhsa::testing::FreshSeed();
  return o;
}

TEST(LoadTest, WithinCapacityNoErrorsAndNoWrongResults) {
  std::unique_ptr<EmbeddedService> s = Start(int64_t{64} << 20, 64);
  ASSERT_NE(s, nullptr);
  const load::LoadOptions o = Options(s->router_address(), 4);
  const load::LoadReport r = load::RunLoad(o);
  std::printf("%s", load::FormatReport(o, r).c_str());
  EXPECT_GT(r.prefills, 0);
  EXPECT_GT(r.checked, 0);
  EXPECT_EQ(r.wrong, 0);
  EXPECT_TRUE(r.errors.empty());
}

TEST(LoadTest, OverCapacityOnlyResourceExhausted) {
  // Each sequence stores 200 tokens * 2 * 2 heads * 32 * 4 bytes = 102400 bytes (+ decodes): two
  // workers of 150 KB hold about two sequences at once, and 3 calls may be in flight.
  std::unique_ptr<EmbeddedService> s = Start(150000, 3);
  ASSERT_NE(s, nullptr);
  const load::LoadOptions o = Options(s->router_address(), 8);
  const load::LoadReport r = load::RunLoad(o);
  std::printf("%s", load::FormatReport(o, r).c_str());
  EXPECT_EQ(r.wrong, 0);
  ASSERT_FALSE(r.errors.empty());
  for (const auto& [code, n] : r.errors) EXPECT_EQ(code, "RESOURCE_EXHAUSTED") << n;
  EXPECT_GT(r.prefills, 0);

  // Load gone: a sequence works again.
  load::LoadOptions one = Options(s->router_address(), 1);
  one.seconds = 0.5;
  const load::LoadReport after = load::RunLoad(one);
  EXPECT_GT(after.prefills, 0);
  EXPECT_TRUE(after.errors.empty());
  EXPECT_EQ(after.wrong, 0);
}

}  // namespace
}  // namespace dhsa::reliability_test
