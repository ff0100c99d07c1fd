// `dhsa bench --backend cpu`: times the fast CPU path against the reference, against its own dense
// policy and against a library GEMM of the attention tiles' shapes run side by side (the machine's
// practical peak), on structured workloads (bench/workload).
#ifndef DHSA_BENCH_CPU_CPU_BENCH_H_
#define DHSA_BENCH_CPU_CPU_BENCH_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/dtype.h"

namespace dhsa {

struct CpuBenchConfig {
  std::vector<int64_t> lengths = {8192, 32768, 65536};  // Lq = Lk = L, a fresh prefill.
  int64_t hq = 8;
  int64_t hkv = 2;
  int64_t dim = 128;
  int64_t budget = 2048;  // Nb; the other DHSA knobs keep the spec's defaults.
  DType dtype = DType::kF32;
  int threads = 1;
  int repeats = 3;             // Sparse runs are timed this many times; the fastest counts.
  bool reference = true;       // (a) the reference dhsa on the smallest length.
  bool dense = true;           // (b) the fast path with the dense policy.
  int64_t decode_tokens = 20;  // Decode calls timed at the largest length (0: none).
  // Called with a line of progress before each long step (may be empty).
  std::function<void(const std::string&)> progress;
};

// Timings of one Attend call. Seconds; selection = boundaries + summaries + selection steps.
struct AttendTiming {
  double total = 0;
  double selection = 0;
  double attention = 0;
  int64_t computed_pairs = 0;
  int64_t causal_pairs = 0;
  double attention_gflops = 0;  // 4 * d * computed_pairs / attention seconds.
};

struct CpuBenchLength {
  int64_t length = 0;
  bool has_reference = false;
  AttendTiming reference;  // (a): dhsa on the reference kernels.
  bool has_dense = false;
  AttendTiming dense;  // (b): dense policy, fast path.
  AttendTiming dhsa;   // (c): dhsa, fast path (the fastest of `repeats`).
};

struct CpuBenchResult {
  CpuBenchConfig config;
  // (d) calibration: per thread, alternately Q K^T [rows x keys] with K = d and P V [rows x d]
  // with K = keys, for the tile shape below, on every thread at once.
  int64_t tile_rows = 0, tile_keys = 0;
  double calibration_seconds = 0;
  double calibration_gflops = 0;
  std::vector<CpuBenchLength> lengths;
  // One-token decode at the largest length (kept boundaries and chunk summaries): median and
  // fastest of decode_tokens calls.
  int64_t decode_length = 0;
  double decode_median = 0, decode_best = 0;
  std::string simd_target;  // The Highway target the kernels dispatched to ("AVX3", "AVX2").
};

absl::StatusOr<CpuBenchResult> RunCpuBench(const CpuBenchConfig& config);

}  // namespace dhsa

#endif  // DHSA_BENCH_CPU_CPU_BENCH_H_
