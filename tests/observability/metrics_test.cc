// The metrics module on its own (family table, exposition) and on a real embedded service: every
// family appears once the service has worked, and the counters move exactly as the calls did.
#include "services/common/metrics.h"

#include <map>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "clients/cpp/client.h"
#include "gtest/gtest.h"
#include "services/router/embedded.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

// "name{labels}" (labels as exposed, sorted by prometheus-cpp) -> value, from exposition text.
std::map<std::string, double> ParseExposition(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    out[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return out;
}

double Get(const std::map<std::string, double>& m, const std::string& key) {
  auto it = m.find(key);
  return it == m.end() ? 0.0 : it->second;
}

// Sum of every series of `family` whose label text contains `filter`.
double Sum(const std::map<std::string, double>& m, const std::string& family,
           const std::string& filter = "") {
  double total = 0;
  for (const auto& [key, value] : m) {
    const std::string name = key.substr(0, key.find('{'));
    if (name == family && key.find(filter) != std::string::npos) total += value;
  }
  return total;
}

TEST(MetricsFamilies, NamesCarryUnitsAndLabelsAreFromTheSmallSet) {
  const std::set<std::string> allowed = {"role",    "method", "code",      "stage",     "policy",
                                         "backend", "worker", "transport", "direction", "device"};
  const std::regex name_re("^(dhsa|process)_[a-z0-9_]+$");
  std::set<std::string> names;
  for (const metrics::FamilyInfo& f : metrics::Families()) {
    SCOPED_TRACE(f.name);
    EXPECT_TRUE(std::regex_match(f.name, name_re));
    EXPECT_TRUE(names.insert(f.name).second) << "listed twice";
    EXPECT_FALSE(f.help.empty());
    for (const std::string& l : f.labels) EXPECT_EQ(allowed.count(l), 1u) << l;
    const auto ends = [&](const std::string& s) {
      return f.name.size() >= s.size() &&
             f.name.compare(f.name.size() - s.size(), s.size(), s) == 0;
    };
    switch (f.type) {
      case metrics::FamilyType::kCounter:
        EXPECT_TRUE(ends("_total"));
        break;
      case metrics::FamilyType::kHistogram:
        EXPECT_TRUE(ends("_seconds") || ends("_ratio"));
        break;
      case metrics::FamilyType::kGauge:
        EXPECT_FALSE(ends("_total"));
        break;
    }
  }
}

TEST(MetricsFamilies, BucketsAreIncreasingAndCoverDecodeToLongPrefill) {
  const std::vector<double>& d = metrics::DurationBuckets();
  ASSERT_GE(d.size(), 10u);
  for (size_t i = 1; i < d.size(); ++i) EXPECT_LT(d[i - 1], d[i]);
  EXPECT_LE(d.front(), 0.001);  // A decode step on a small model.
  EXPECT_GE(d.back(), 60);      // A long prefill.
  const std::vector<double>& r = metrics::DensityBuckets();
  for (size_t i = 1; i < r.size(); ++i) EXPECT_LT(r[i - 1], r[i]);
  EXPECT_EQ(r.back(), 1.0);
}

TEST(MetricsExposer, ServesOnAFreePortOnce) {
  absl::StatusOr<int> port = metrics::StartExposer("127.0.0.1:0");
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_GT(*port, 0);
  EXPECT_EQ(metrics::StartExposer("127.0.0.1:0").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(MetricsService, CountsMatchTheCallsMadeAndEveryFamilyIsExported) {
  EmbeddedOptions options;
  options.num_workers = 2;
  options.threads = 1;
  options.stripe_tokens = 256;
  options.capacity_bytes_per_worker = int64_t{64} << 20;
  absl::StatusOr<std::unique_ptr<EmbeddedService>> service = EmbeddedService::Start(options);
  ASSERT_TRUE(service.ok()) << service.status();
  absl::StatusOr<Client> client = Client::Connect((*service)->router_address());
  ASSERT_TRUE(client.ok()) << client.status();

  const auto before = ParseExposition(metrics::ScrapeText());
  const int layers = 2, hq = 4, hkv = 2, dim = 16;
  const int64_t len = 700, decode_steps = 3;
  SequenceOptions so;
  so.num_layers = layers;
  so.q_heads = hq;
  so.kv_heads = hkv;
  so.head_dim = dim;
  absl::StatusOr<Sequence> seq = client->CreateSequence(so);
  ASSERT_TRUE(seq.ok()) << seq.status();
  std::mt19937_64 rng(std::random_device{}());
  for (int l = 0; l < layers; ++l) {
    ASSERT_TRUE(seq->Prefill(l, testing::RandomTensor(rng, hq, len, dim),
                             testing::RandomTensor(rng, hkv, len, dim),
                             testing::RandomTensor(rng, hkv, len, dim), false)
                    .ok());
  }
  for (int64_t s = 0; s < decode_steps; ++s) {
    for (int l = 0; l < layers; ++l) {
      ASSERT_TRUE(seq->Decode(l, testing::RandomTensor(rng, hq, 1, dim),
                              testing::RandomTensor(rng, hkv, 1, dim),
                              testing::RandomTensor(rng, hkv, 1, dim), false)
                      .ok());
    }
  }
  // One failing call: a layer that does not exist.
  EXPECT_FALSE(seq->Decode(layers, testing::RandomTensor(rng, hq, 1, dim),
                           testing::RandomTensor(rng, hkv, 1, dim),
                           testing::RandomTensor(rng, hkv, 1, dim), false)
                   .ok());

  const int64_t kv_bytes = (len + decode_steps) * layers * 2 * hkv * dim * 4;
  const auto held = ParseExposition(metrics::ScrapeText());
  EXPECT_EQ(Sum(held, "dhsa_kv_held_bytes"), static_cast<double>(kv_bytes));
  EXPECT_EQ(Sum(held, "dhsa_active_sequences") - Sum(before, "dhsa_active_sequences"), 1);
  EXPECT_EQ(Sum(held, "dhsa_worker_up"), 2);
  ASSERT_TRUE(seq->Release().ok());
  // The server counts a call when its RPC ends, which may be just after the client has its answer:
  // scrape until nothing is in flight and the last call is counted (bounded).
  std::map<std::string, double> after;
  for (int i = 0; i < 500; ++i) {
    after = ParseExposition(metrics::ScrapeText());
    if (Sum(after, "dhsa_inflight_requests") == 0 &&
        Sum(after, "dhsa_requests_total", "ReleaseSequence") >
            Sum(before, "dhsa_requests_total", "ReleaseSequence")) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }

  const auto delta = [&](const std::string& key) { return Get(after, key) - Get(before, key); };
  EXPECT_EQ(delta("dhsa_requests_total{code=\"OK\",method=\"Prefill\",role=\"router\"}"), layers);
  EXPECT_EQ(delta("dhsa_requests_total{code=\"OK\",method=\"Decode\",role=\"router\"}"),
            decode_steps * layers);
  EXPECT_EQ(
      delta("dhsa_requests_total{code=\"INVALID_ARGUMENT\",method=\"Decode\",role=\"router\"}"), 1);
  EXPECT_EQ(
      delta("dhsa_request_duration_seconds_count{code=\"OK\",method=\"Decode\",role=\"router\"}"),
      decode_steps * layers);
  EXPECT_EQ(delta("dhsa_prefill_tokens_total{policy=\"dhsa\"}"), len * layers);
  EXPECT_EQ(delta("dhsa_decode_tokens_total{policy=\"dhsa\"}"), decode_steps * layers);
  EXPECT_EQ(delta("dhsa_kv_stored_bytes_total"), static_cast<double>(kv_bytes));
  EXPECT_EQ(delta("dhsa_stage_duration_seconds_count{method=\"Prefill\",stage=\"merge\"}"), layers);
  EXPECT_GT(delta("dhsa_stage_duration_seconds_sum{method=\"Prefill\",stage=\"attention\"}"), 0);
  EXPECT_EQ(delta("dhsa_selection_density_ratio_count{method=\"Prefill\",policy=\"dhsa\"}"),
            layers);
  // Every stored key went to a worker, plus queries; outputs came back. The embedded workers share
  // the router's host: the data plane is shared memory (transport "shm").
  EXPECT_GE(delta("dhsa_transfer_bytes_total{direction=\"to_workers\",transport=\"shm\"}"),
            static_cast<double>(kv_bytes));
  EXPECT_GT(delta("dhsa_transfer_bytes_total{direction=\"from_workers\",transport=\"shm\"}"), 0);
  EXPECT_GE(Sum(after, "dhsa_worker_attention_duration_seconds_count") -
                Sum(before, "dhsa_worker_attention_duration_seconds_count"),
            layers);
  EXPECT_EQ(Sum(after, "dhsa_kv_held_bytes"), 0);
  EXPECT_EQ(Sum(after, "dhsa_inflight_requests"), 0);
  EXPECT_GT(Get(after, "process_resident_memory_bytes"), 0);

  // Every family of the table is in the exposition (GPU memory only in a CUDA process).
  for (const metrics::FamilyInfo& f : metrics::Families()) {
    if (f.name.rfind("dhsa_gpu_", 0) == 0) continue;
    const std::string series =
        f.type == metrics::FamilyType::kHistogram ? f.name + "_count" : f.name;
    EXPECT_TRUE(Sum(after, series) != 0 || after.count(series) > 0 ||
                std::any_of(after.begin(), after.end(),
                            [&](const auto& kv) { return kv.first.rfind(series + "{", 0) == 0; }))
        << f.name << " is not exported";
  }
  service->reset();
  // A service that is gone leaves no scrape source behind.
  EXPECT_EQ(Sum(ParseExposition(metrics::ScrapeText()), "dhsa_kv_capacity_bytes"), 0);
}

}  // namespace
}  // namespace dhsa
