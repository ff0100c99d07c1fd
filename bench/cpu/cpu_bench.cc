#include "bench/cpu/cpu_bench.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "bench/workload/workload.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/boundaries.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/sparse_attention.h"
#include "kernels/cpu/summaries.h"
#include "kernels/cpu/vector_ops.h"
#include "kernels/dhsa.h"

namespace dhsa {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void Progress(const CpuBenchConfig& c, const std::string& line) {
  if (c.progress) c.progress(line);
}

// Rows [begin, end) of every head of a [heads, len, dim] tensor, as a tensor of their own.
Tensor TokenRows(const Tensor& t, int64_t begin, int64_t end) {
  const int64_t heads = t.shape[0], len = t.shape[1], dim = t.shape[2];
  const size_t row = static_cast<size_t>(dim) * DTypeSize(t.dtype);
  Tensor out = Tensor::Zeros(t.dtype, {heads, end - begin, dim});
  for (int64_t h = 0; h < heads; ++h) {
    std::memcpy(out.bytes.data() + static_cast<size_t>(h * (end - begin)) * row,
                t.bytes.data() + static_cast<size_t>(h * len + begin) * row,
                static_cast<size_t>(end - begin) * row);
  }
  return out;
}

absl::StatusOr<AttendTiming> TimeAttend(const Workload& w, const DhsaConfig& config,
                                        const AttendOptions& options, int repeats) {
  AttendTiming best;
  for (int i = 0; i < std::max(1, repeats); ++i) {
    const auto start = Clock::now();
    DHSA_ASSIGN_OR_RETURN(AttendResult r, Attend(w.q, w.k, w.v, config, options));
    AttendTiming t;
    t.total = SecondsSince(start);
    t.selection = r.times.boundaries + r.times.summaries + r.times.selection;
    t.attention = r.times.attention;
    t.computed_pairs = r.computed_pairs;
    t.causal_pairs = r.causal_pairs;
    t.attention_gflops = 4.0 * static_cast<double>(w.config.dim) *
                         static_cast<double>(r.computed_pairs) / t.attention / 1e9;
    if (i == 0 || t.total < best.total) best = t;
  }
  return best;
}

// Every thread at once runs the tile products of sparse attention on its own cache-resident
// operands: scores = Q K^T ([rows x keys], inner dim d) then O += P V ([rows x d], inner dim keys).
absl::Status Calibrate(const CpuBenchConfig& c, CpuBenchResult& result) {
  const int64_t rows = result.tile_rows, keys = result.tile_keys, d = c.dim;
  const double flops_per_step = 4.0 * static_cast<double>(rows * keys * d);
  struct Buffers {
    std::vector<float> q, k, v, s, o;
  };
  std::vector<Buffers> buffers(static_cast<size_t>(c.threads));
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;
  for (Buffers& b : buffers) {
    for (auto* v : {&b.q, &b.o}) v->resize(static_cast<size_t>(rows * d));
    for (auto* v : {&b.k, &b.v}) v->resize(static_cast<size_t>(keys * d));
    b.s.resize(static_cast<size_t>(rows * keys));
    for (auto* v : {&b.q, &b.k, &b.v, &b.s}) {
      for (float& x : *v) x = normal(rng) * 0.1f;
    }
  }
  auto step = [&](Buffers& b) {
    absl::Status s = cpu::GemmF32(true, rows, keys, d, 1.0f, b.q.data(), d, b.k.data(), d, 0.0f,
                                  b.s.data(), keys);
    if (s.ok()) {
      s = cpu::GemmF32(false, rows, d, keys, 1.0f, b.s.data(), keys, b.v.data(), d, 1.0f,
                       b.o.data(), d);
    }
    return s;
  };
  // Size the run to about two seconds from one warm step.
  DHSA_RETURN_IF_ERROR(step(buffers[0]));
  auto start = Clock::now();
  DHSA_RETURN_IF_ERROR(step(buffers[0]));
  const int64_t steps = std::max<int64_t>(20, static_cast<int64_t>(2.0 / SecondsSince(start)));
  std::vector<absl::Status> errors(buffers.size());
  std::atomic<int> ready{0};
  std::vector<std::thread> pool;
  start = Clock::now();
  for (int t = 0; t < c.threads; ++t) {
    pool.emplace_back([&, t] {
      Buffers& b = buffers[static_cast<size_t>(t)];
      ++ready;
      while (ready.load() < c.threads) std::this_thread::yield();
      for (int64_t i = 0; i < steps && errors[static_cast<size_t>(t)].ok(); ++i) {
        errors[static_cast<size_t>(t)] = step(b);
      }
    });
  }
  for (std::thread& t : pool) t.join();
  result.calibration_seconds = SecondsSince(start);
  for (const absl::Status& s : errors) DHSA_RETURN_IF_ERROR(s);
  result.calibration_gflops =
      flops_per_step * static_cast<double>(steps * c.threads) / result.calibration_seconds / 1e9;
  return absl::OkStatus();
}

absl::Status TimeDecode(const CpuBenchConfig& c, const Workload& w, const DhsaConfig& config,
                        CpuBenchResult& result) {
  const int64_t len = w.config.len;
  const Tensor q = TokenRows(w.q, len - 1, len);
  DHSA_ASSIGN_OR_RETURN(HeadsView k, HeadsView::Of(w.k, "K"));
  // The state a sequence keeps between calls: boundaries and chunk summaries of [0, len - 1).
  DHSA_ASSIGN_OR_RETURN(std::vector<int64_t> boundaries,
                        SegmentKeysCpu(k, 0, len - 1, config, c.threads));
  const Summaries kappa = ChunkSummariesCpu(k, boundaries, config.summary_norm, c.threads);
  AttendOptions options;
  options.num_threads = c.threads;
  options.decode = true;
  options.prior_boundaries = &boundaries;
  options.prior_kappa = &kappa;
  std::vector<double> seconds;
  for (int64_t i = 0; i < c.decode_tokens + 1; ++i) {
    const auto start = Clock::now();
    DHSA_ASSIGN_OR_RETURN(AttendResult r, Attend(q, w.k, w.v, config, options));
    if (i > 0) seconds.push_back(SecondsSince(start));  // The first call warms caches up.
  }
  std::sort(seconds.begin(), seconds.end());
  result.decode_length = len;
  result.decode_median = seconds[seconds.size() / 2];
  result.decode_best = seconds.front();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CpuBenchResult> RunCpuBench(const CpuBenchConfig& c) {
  if (c.lengths.empty()) return absl::InvalidArgumentError("no lengths to benchmark");
  for (int64_t len : c.lengths) {
    if (len < 2) return absl::InvalidArgumentError(absl::StrCat("length ", len, " is too short"));
  }
  if (c.threads < 1 || c.repeats < 1 || c.decode_tokens < 0) {
    return absl::InvalidArgumentError("threads and repeats must be positive, decode tokens >= 0");
  }
  DhsaConfig dhsa;
  dhsa.budget = c.budget;
  DHSA_RETURN_IF_ERROR(ValidateConfig(dhsa));
  DhsaConfig dense = dhsa;
  dense.policy = Policy::kDense;

  CpuBenchResult result;
  result.config = c;
  result.simd_target = cpu::SimdTargetName();
  result.tile_rows =
      std::min(cpu::kAttentionPanelRows, (c.hq / std::max<int64_t>(1, c.hkv)) * dhsa.q_block);
  result.tile_keys = cpu::kAttentionGroupKeys;
  Progress(c, absl::StrCat("calibrating: GEMM tiles ", result.tile_rows, " x ", result.tile_keys,
                           " x ", c.dim, " on ", c.threads, " threads"));
  DHSA_RETURN_IF_ERROR(Calibrate(c, result));

  std::vector<int64_t> lengths = c.lengths;
  std::sort(lengths.begin(), lengths.end());
  AttendOptions fast;
  fast.num_threads = c.threads;
  AttendOptions reference = fast;
  reference.backend = Backend::kReference;
  for (int64_t len : lengths) {
    Progress(c, absl::StrCat("L = ", len, ": generating the workload"));
    WorkloadConfig wc;
    wc.len = len;
    wc.hq = c.hq;
    wc.hkv = c.hkv;
    wc.dim = c.dim;
    wc.dtype = c.dtype;
    DHSA_ASSIGN_OR_RETURN(const Workload w, GenerateWorkload(wc));
    CpuBenchLength row;
    row.length = len;
    if (c.reference && len == lengths.front()) {
      Progress(c, absl::StrCat("L = ", len, ": (a) reference, dhsa (slow)"));
      DHSA_ASSIGN_OR_RETURN(row.reference, TimeAttend(w, dhsa, reference, 1));
      row.has_reference = true;
    }
    // dhsa first: its repeats leave the output's pages mapped for the single dense run, whose
    // time would otherwise include first-touch page faults the best-of-N dhsa time avoids.
    Progress(c, absl::StrCat("L = ", len, ": (c) cpu, dhsa, best of ", c.repeats));
    DHSA_ASSIGN_OR_RETURN(row.dhsa, TimeAttend(w, dhsa, fast, c.repeats));
    if (c.dense) {
      Progress(c, absl::StrCat("L = ", len, ": (b) cpu, dense"));
      DHSA_ASSIGN_OR_RETURN(row.dense, TimeAttend(w, dense, fast, 1));
      row.has_dense = true;
    }
    result.lengths.push_back(row);
    if (c.decode_tokens > 0 && len == lengths.back()) {
      Progress(c, absl::StrCat("L = ", len, ": decode, ", c.decode_tokens, " calls"));
      DHSA_RETURN_IF_ERROR(TimeDecode(c, w, dhsa, result));
    }
  }
  return result;
}

}  // namespace dhsa
