// Times the CUDA sparse attention (Step 5) on structured synthetic inputs (bench/workload):
// dense against dhsa at a token budget, Hq = 32, Hkv = 8, d = 128, bf16, prefill of L tokens.
// Reports the median device time (CUDA events, after warm-up) and TFLOP/s of the (query, key)
// pairs actually computed (4 d flops each: q.k and p v), next to the device's ceilings measured
// in the same run (cuBLAS bf16 GEMM, device-to-device copy). The table is printed last.
//
// Usage: sparse_attention_bench [--lengths=8192,32768,131072] [--budget=2048] [--seconds=1]
// Exit status: 0 when every case ran, 1 when one failed, 2 without a CUDA device.
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/gpu/calibration.h"
#include "bench/gpu/event_timer.h"
#include "bench/gpu/reference_selection.h"
#include "bench/workload/workload.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_csr.h"
#include "kernels/cuda/sparse_attention_cuda.h"

namespace dhsa {
namespace {

constexpr int64_t kHq = 32, kHkv = 8, kDim = 128;

struct Options {
  std::vector<int64_t> lengths = {8192, 32768, 131072};
  int64_t budget = 2048;
  double seconds = 1.0;  // Timed runs per case take about this long (3 to 50 runs).
};

struct Row {
  int64_t len = 0;
  std::string policy;
  int64_t pairs = 0;
  double density = 0;
  double select_s = 0;
  DeviceTiming timing;
  double tflops = 0;
  int64_t nonfinite = 0;
  std::string error;
};

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool ParseOptions(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq),
                      value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    if (key == "--lengths") {
      o->lengths.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int64_t len = 0;
        if (!absl::SimpleAtoi(part, &len) || len < 1) return false;
        o->lengths.push_back(len);
      }
    } else if (key == "--budget") {
      if (!absl::SimpleAtoi(value, &o->budget) || o->budget < 1) return false;
    } else if (key == "--seconds") {
      if (!absl::SimpleAtod(value, &o->seconds) || !(o->seconds > 0)) return false;
    } else {
      return false;
    }
  }
  return !o->lengths.empty();
}

// Device copies of one workload's Q, K, V and room for O and LSE.
struct DeviceInputs {
  DeviceBuffer q, k, v, o, lse;
};

absl::StatusOr<DeviceInputs> Upload(const Workload& w) {
  DeviceInputs d;
  DHSA_ASSIGN_OR_RETURN(d.q, DeviceBuffer::FromHost(w.q.data(), w.q.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(d.k, DeviceBuffer::FromHost(w.k.data(), w.k.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(d.v, DeviceBuffer::FromHost(w.v.data(), w.v.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(d.o, DeviceBuffer::Allocate(w.q.NumElements() * sizeof(float)));
  DHSA_ASSIGN_OR_RETURN(d.lse, DeviceBuffer::Allocate(kHq * w.config.len * sizeof(float)));
  return d;
}

// Selection, one checked run on NaN-poisoned outputs, then the timed runs.
absl::Status RunCase(const Workload& w, DeviceInputs& d, const DhsaConfig& config,
                     const Options& options, cudaStream_t stream, Row* row) {
  const int64_t len = w.config.len;
  auto start = std::chrono::steady_clock::now();
  DHSA_ASSIGN_OR_RETURN(Selection selection, ReferenceSelection(w.q, w.k, config));
  row->select_s = SecondsSince(start);
  AttentionShape shape;
  shape.hq = kHq;
  shape.hkv = kHkv;
  shape.dim = kDim;
  shape.lq = len;
  shape.lk = len;
  row->pairs = CountComputedPairs(selection, shape);
  row->density = double(row->pairs) / (double(kHq) * double(len) * double(len + 1) / 2.0);
  DHSA_ASSIGN_OR_RETURN(DeviceSelection device_selection, DeviceSelection::Upload(selection));

  SparseAttentionCudaParams p;
  p.dtype = DType::kBF16;
  p.q = d.q.data();
  p.k = d.k.data();
  p.v = d.v.data();
  p.o = d.o.as<float>();
  p.lse = d.lse.as<float>();
  p.hq = kHq;
  p.hkv = kHkv;
  p.head_dim = kDim;
  p.lq = len;
  p.lk = len;
  p.scale = EffectiveScale(config, kDim);
  DHSA_RETURN_IF_ERROR(device_selection.Attach(&p));

  DHSA_RETURN_IF_ERROR(d.o.Fill(0xFF));
  DHSA_RETURN_IF_ERROR(d.lse.Fill(0xFF));
  start = std::chrono::steady_clock::now();
  DHSA_RETURN_IF_ERROR(SparseAttentionCuda(p, stream));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "sparse attention"));
  const double first_ms = SecondsSince(start) * 1e3;
  std::vector<float> lse(static_cast<size_t>(kHq * len));
  DHSA_RETURN_IF_ERROR(d.lse.CopyToHost(lse.data(), lse.size() * sizeof(float)));
  for (float x : lse) row->nonfinite += std::isfinite(x) ? 0 : 1;

  auto launch = [&] { return SparseAttentionCuda(p, stream); };
  DHSA_ASSIGN_OR_RETURN(row->timing,
                        TimeOnDevice(launch, stream, 1, RepsFor(first_ms, options.seconds, 3, 50)));
  row->tflops = 4.0 * kDim * double(row->pairs) / (row->timing.median_ms * 1e-3) / 1e12;
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  Options options;
  if (!ParseOptions(argc, argv, &options)) {
    std::fprintf(stderr, "usage: %s [--lengths=8192,32768,131072] [--budget=2048] [--seconds=1]\n",
                 argv[0]);
    return 1;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to time\n");
    return 2;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s, %d SMs, sm_%d%d, %.1f GiB, L2 %d MiB\n", prop.name,
              prop.multiProcessorCount, prop.major, prop.minor,
              double(prop.totalGlobalMem) / (1 << 30), prop.l2CacheSize >> 20);
  cudaStream_t stream;
  if (cudaStreamCreate(&stream) != cudaSuccess) return 1;

  const absl::StatusOr<double> gemm = CublasBf16GemmTflops(8192, stream);
  const absl::StatusOr<double> copy = DeviceCopyTbps(size_t{1} << 30, stream);
  const std::string gemm_text = gemm.ok() ? absl::StrCat(*gemm) : gemm.status().ToString();
  const std::string copy_text = copy.ok() ? absl::StrCat(*copy) : copy.status().ToString();
  std::printf("ceiling: cuBLAS bf16 GEMM 8192^3 TFLOP/s = %s\n", gemm_text.c_str());
  std::printf("ceiling: device-to-device copy TB/s (read + write) = %s\n", copy_text.c_str());
  std::fflush(stdout);

  std::vector<Row> rows;
  bool failed = false;
  for (int64_t len : options.lengths) {
    WorkloadConfig wc;
    wc.len = len;
    wc.hq = kHq;
    wc.hkv = kHkv;
    wc.dim = kDim;
    wc.dtype = DType::kBF16;
    auto start = std::chrono::steady_clock::now();
    absl::StatusOr<Workload> w = GenerateWorkload(wc);
    if (!w.ok()) {
      std::printf("L=%lld: workload: %s\n", static_cast<long long>(len),
                  w.status().ToString().c_str());
      failed = true;
      continue;
    }
    std::printf("L=%lld: workload generated in %.1f s\n", static_cast<long long>(len),
                SecondsSince(start));
    std::fflush(stdout);
    absl::StatusOr<DeviceInputs> d = Upload(*w);
    if (!d.ok()) {
      std::printf("L=%lld: upload: %s\n", static_cast<long long>(len),
                  d.status().ToString().c_str());
      failed = true;
      continue;
    }
    for (const Policy policy : {Policy::kDense, Policy::kDhsa}) {
      DhsaConfig config;
      config.policy = policy;
      config.budget = options.budget;
      Row row;
      row.len = len;
      row.policy =
          policy == Policy::kDense ? std::string("dense") : absl::StrCat("dhsa-", options.budget);
      const absl::Status status = RunCase(*w, *d, config, options, stream, &row);
      if (!status.ok()) {
        row.error = status.ToString();
        failed = true;
      }
      if (row.nonfinite > 0) failed = true;
      std::printf(
          "L=%lld %s: selection %.1f s, %s\n", static_cast<long long>(len), row.policy.c_str(),
          row.select_s,
          status.ok()
              ? absl::StrCat(row.timing.median_ms, " ms median of ", row.timing.reps).c_str()
              : row.error.c_str());
      std::fflush(stdout);
      rows.push_back(row);
    }
  }

  std::printf("\n== CUDA sparse attention, Hq=%lld Hkv=%lld d=%lld bf16, %s ==\n",
              static_cast<long long>(kHq), static_cast<long long>(kHkv),
              static_cast<long long>(kDim), prop.name);
  std::printf("ceilings: cuBLAS bf16 GEMM %s TFLOP/s, D2D copy %s TB/s\n", gemm_text.c_str(),
              copy_text.c_str());
  std::printf("%-8s %-10s %12s %8s %10s %10s %8s %7s %8s %s\n", "L", "policy", "pairs", "density",
              "median_ms", "min_ms", "TFLOP/s", "%gemm", "speedup", "check");
  double dense_ms = 0;
  for (const Row& r : rows) {
    if (r.policy == "dense") dense_ms = r.timing.median_ms;
    const double share = gemm.ok() && *gemm > 0 ? 100.0 * r.tflops / *gemm : 0.0;
    const double speedup =
        r.policy != "dense" && r.timing.median_ms > 0 ? dense_ms / r.timing.median_ms : 1.0;
    std::printf("%-8lld %-10s %12.4g %8.4f %10.3f %10.3f %8.1f %7.1f %8.2f %s\n",
                static_cast<long long>(r.len), r.policy.c_str(), double(r.pairs), r.density,
                r.timing.median_ms, r.timing.min_ms, r.tflops, share, speedup,
                !r.error.empty()  ? r.error.c_str()
                : r.nonfinite > 0 ? absl::StrCat(r.nonfinite, " non-finite lse").c_str()
                                  : "ok");
  }
  cudaStreamDestroy(stream);
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace dhsa

int main(int argc, char** argv) { return dhsa::Main(argc, argv); }
