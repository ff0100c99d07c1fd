#include "bench/load/load.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/dhsa.h"

namespace dhsa::load {
namespace {

using Clock = std::chrono::steady_clock;

Tensor Gaussian(std::mt19937_64& rng, int64_t heads, int64_t len, int64_t dim) {
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(heads * len * dim));
  for (float& x : values) x = normal(rng);
  return Tensor::FromFloats({heads, len, dim}, values);
}

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace

double Quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const size_t i = static_cast<size_t>(std::min<double>(
      static_cast<double>(sorted.size() - 1), std::floor(q * static_cast<double>(sorted.size()))));
  return sorted[i];
}

LoadReport RunLoad(const LoadOptions& o) {
  LoadReport report;
  std::mutex mu;
  std::atomic<int64_t> next_sequence{0};
  const Clock::time_point start = Clock::now();
  const Clock::time_point end =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
  auto error = [&](const absl::Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    ++report.errors[absl::StatusCodeToString(s.code())];
  };
  auto worker = [&](int thread) {
    absl::StatusOr<Client> client = Client::Connect(o.target, o.client);
    if (!client.ok()) {
      error(client.status());
      return;
    }
    std::mt19937_64 rng(o.seed * 1000003 + static_cast<uint64_t>(thread));
    while (Clock::now() < end) {
      const int64_t n = next_sequence.fetch_add(1);
      SequenceOptions so;
      so.id = absl::StrCat("load-", o.seed, "-", n);
      so.q_heads = o.q_heads;
      so.kv_heads = o.kv_heads;
      so.head_dim = o.head_dim;
      so.config = o.config;
      absl::StatusOr<Sequence> seq = client->CreateSequence(so);
      if (!seq.ok()) {
        error(seq.status());
        std::this_thread::sleep_for(std::chrono::milliseconds(20));  // Back off.
        continue;
      }
      const Tensor q = Gaussian(rng, o.q_heads, o.prefill_tokens, o.head_dim);
      const Tensor k = Gaussian(rng, o.kv_heads, o.prefill_tokens, o.head_dim);
      const Tensor v = Gaussian(rng, o.kv_heads, o.prefill_tokens, o.head_dim);
      Clock::time_point t = Clock::now();
      absl::StatusOr<PrefillOutput> out = seq->Prefill(0, q, k, v);
      const double prefill_s = Since(t);
      if (!out.ok()) {
        error(out.status());
      } else {
        {
          std::lock_guard<std::mutex> lock(mu);
          ++report.prefills;
          report.prefill_tokens += o.prefill_tokens;
          report.prefill_latency.push_back(prefill_s);
        }
        if (o.check_every > 0 && n % o.check_every == 0) {
          absl::StatusOr<AttendResult> want = Attend(q, k, v, o.config);
          double max_o = 0, diff = 0;
          if (want.ok() && want->o.shape == out->o.shape) {
            for (int64_t i = 0; i < want->o.NumElements(); ++i) {
              max_o = std::max(max_o, std::abs(static_cast<double>(want->o.Get(i))));
              diff = std::max(diff, std::abs(static_cast<double>(out->o.Get(i)) - want->o.Get(i)));
            }
          }
          const double rel = max_o > 0 ? diff / max_o : 1;
          std::lock_guard<std::mutex> lock(mu);
          ++report.checked;
          report.max_rel_error = std::max(report.max_rel_error, rel);
          if (!want.ok() || !(rel <= 1e-4)) ++report.wrong;
        }
        for (int step = 0; step < o.decode_steps && Clock::now() < end; ++step) {
          const Tensor q1 = Gaussian(rng, o.q_heads, 1, o.head_dim);
          const Tensor k1 = Gaussian(rng, o.kv_heads, 1, o.head_dim);
          const Tensor v1 = Gaussian(rng, o.kv_heads, 1, o.head_dim);
          t = Clock::now();
          absl::StatusOr<DecodeOutput> d = seq->Decode(0, q1, k1, v1);
          const double decode_s = Since(t);
          if (!d.ok()) {
            error(d.status());
            break;
          }
          std::lock_guard<std::mutex> lock(mu);
          ++report.decodes;
          report.decode_latency.push_back(decode_s);
        }
      }
      absl::StatusOr<int64_t> freed = seq->Release();
      if (!freed.ok()) error(freed.status());
      std::lock_guard<std::mutex> lock(mu);
      ++report.sequences;
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < o.concurrency; ++i) threads.emplace_back(worker, i);
  for (std::thread& t : threads) t.join();
  report.seconds = Since(start);
  std::sort(report.prefill_latency.begin(), report.prefill_latency.end());
  std::sort(report.decode_latency.begin(), report.decode_latency.end());
  return report;
}

std::string FormatReport(const LoadOptions& o, const LoadReport& r) {
  std::string s = absl::StrFormat(
      "load: %d concurrent clients for %.1f s; sequences of %d prefill tokens + %d decodes, "
      "Hq %d Hkv %d d %d, budget %d\n",
      o.concurrency, r.seconds, o.prefill_tokens, o.decode_steps, o.q_heads, o.kv_heads, o.head_dim,
      o.config.budget);
  absl::StrAppendFormat(&s, "sequences %d, prefills %d (%.0f tokens/s), decodes %d (%.1f/s)\n",
                        r.sequences, r.prefills, r.prefill_tokens / r.seconds, r.decodes,
                        r.decodes / r.seconds);
  absl::StrAppendFormat(&s, "prefill latency p50 %.1f ms, p99 %.1f ms\n",
                        1e3 * Quantile(r.prefill_latency, 0.5),
                        1e3 * Quantile(r.prefill_latency, 0.99));
  absl::StrAppendFormat(&s, "decode latency  p50 %.2f ms, p99 %.2f ms\n",
                        1e3 * Quantile(r.decode_latency, 0.5),
                        1e3 * Quantile(r.decode_latency, 0.99));
  int64_t errors = 0;
  std::string by_code;
  for (const auto& [code, n] : r.errors) {
    errors += n;
    absl::StrAppend(&by_code, " ", code, "=", n);
  }
  absl::StrAppendFormat(&s, "errors %d%s\n", errors, by_code);
  absl::StrAppendFormat(&s, "spot checks %d vs in process: %d wrong (max relative error %.2e)\n",
                        r.checked, r.wrong, r.max_rel_error);
  return s;
}

}  // namespace dhsa::load
