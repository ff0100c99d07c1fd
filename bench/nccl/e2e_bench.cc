// End-to-end prefill through the service: one layer of Hq=32, Hkv=8, d=128 bf16 (defaults) at each
// length, sent by a client to a router (--target host:port: the router and its workers run
// elsewhere, e.g. two dhsa-worker --backend=cuda processes on two GPUs), or to an embedded service
// (--embedded N: N CUDA workers in this process, all on device 0, tensors through shared memory).
// Prints per length the median wall time of the Prefill call and the router's stage times, the
// transport and the bytes moved to and from the workers with the GB/s they imply over the
// dispatch and attention stages.
//
//   nccl_e2e_bench --target 127.0.0.1:50051 --label "2 GPU workers, NCCL" --lengths 32768,131072
//   nccl_e2e_bench --embedded 1 --label "1 GPU worker, embedded"
//   nccl_e2e_bench --embedded 1 --selection-device cpu --preset paper --label "paper, CPU
//   selection"
//
// --selection-device (embedded: the router's ServiceConfig.selection_device; default auto, the
// router's GPU) and --preset (default: DhsaConfig{}, the mass score, q_block 16; paper: the
// paper preset) apply to the service rows and --preset to --inprocess-gpu too. The service rows
// end with where the router selected ("cpu" or "cuda:N") and up_ms, its q/k upload to that GPU
// (part of bound_ms).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "clients/cpp/client.h"
#include "kernels/common/config.h"
#include "kernels/common/status_macros.h"
#include "kernels/common/tensor.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_cuda.h"
#include "kernels/cuda/sparse_attention_cuda.h"
#include "services/router/embedded.h"

namespace {

using dhsa::DType;
using dhsa::Tensor;

Tensor Random(std::mt19937_64& rng, int64_t heads, int64_t len, int64_t dim) {
  Tensor f = Tensor::Uninitialized(DType::kF32, {heads, len, dim});
  float* p = static_cast<float*>(f.data());
  std::normal_distribution<float> n(0.0f, 1.0f);
  // A few distinct segments (as keys of a real text have): a fresh base row every 2048 rows plus
  // noise drawn from a table of 2^20 normals at a pseudo-random offset per row (a 128K-token
  // layer has 800M elements: drawing each costs seconds).
  static std::vector<float>* const table = [&] {
    auto* t = new std::vector<float>(size_t{1} << 20);
    for (float& x : *t) x = n(rng);
    return t;
  }();
  const uint64_t mask = table->size() - 1;
  std::vector<float> base(static_cast<size_t>(dim));
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t t = 0; t < len; ++t) {
      if (t % 2048 == 0) {
        for (float& b : base) b = n(rng);
      }
      float* row = p + (h * len + t) * dim;
      const uint64_t at = rng() & mask;
      for (int64_t i = 0; i < dim; ++i) {
        row[i] =
            base[static_cast<size_t>(i)] + 0.5f * (*table)[(at + static_cast<uint64_t>(i)) & mask];
      }
    }
  }
  return f.ConvertTo(DType::kBF16);
}

double Since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

struct InProcessTimes {
  double total = 0, upload = 0, select = 0, attend = 0, download = 0;
};

// The single-GPU library path in this process: q, k, v from host memory onto device 0 (pageable
// copies, as a caller's tensors are), Steps 1-4 on the device (DeviceDhsaSelection), the sparse
// attention kernel, o and lse back into host tensors. Each phase is synchronized to time it.
absl::Status InProcessGpu(const Tensor& q, const Tensor& k, const Tensor& v,
                          const dhsa::DhsaConfig& config, InProcessTimes* t, Tensor* o_out) {
  using dhsa::CudaStatus;
  using dhsa::DeviceBuffer;
  const int64_t hq = q.shape[0], len = q.shape[1], d = q.shape[2], hkv = k.shape[0];
  const dhsa::AttentionShape shape{hq, hkv, d, len, len};
  cudaStream_t stream = nullptr;
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreate(&stream), "cudaStreamCreate"));
  DHSA_ASSIGN_OR_RETURN(dhsa::DeviceDhsaSelection selection,
                        dhsa::DeviceDhsaSelection::Create(config, shape, q.dtype));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer dq, DeviceBuffer::Allocate(q.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer dk, DeviceBuffer::Allocate(k.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer dv, DeviceBuffer::Allocate(v.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer dout, DeviceBuffer::Allocate(hq * len * d * sizeof(float)));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer dlse, DeviceBuffer::Allocate(hq * len * sizeof(float)));
  *o_out = Tensor::Uninitialized(DType::kF32, {hq, len, d});
  Tensor lse = Tensor::Uninitialized(DType::kF32, {hq, len});
  const auto start = std::chrono::steady_clock::now();
  auto mark = start;
  DHSA_RETURN_IF_ERROR(dq.CopyFromHost(q.data(), q.bytes.size()));
  DHSA_RETURN_IF_ERROR(dk.CopyFromHost(k.data(), k.bytes.size()));
  DHSA_RETURN_IF_ERROR(dv.CopyFromHost(v.data(), v.bytes.size()));
  t->upload = Since(mark);
  mark = std::chrono::steady_clock::now();
  DHSA_RETURN_IF_ERROR(selection.Run(dq.data(), dk.data(), stream));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "selection"));
  t->select = Since(mark);
  mark = std::chrono::steady_clock::now();
  dhsa::SparseAttentionCudaParams p;
  p.dtype = q.dtype;
  p.q = dq.data();
  p.k = dk.data();
  p.v = dv.data();
  p.o = dout.as<float>();
  p.lse = dlse.as<float>();
  p.hq = hq;
  p.hkv = hkv;
  p.head_dim = d;
  p.lq = len;
  p.lk = len;
  p.scale = dhsa::EffectiveScale(config, d);
  DHSA_RETURN_IF_ERROR(selection.Attach(&p));
  DHSA_RETURN_IF_ERROR(dhsa::SparseAttentionCuda(p, stream));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "attention"));
  t->attend = Since(mark);
  mark = std::chrono::steady_clock::now();
  DHSA_RETURN_IF_ERROR(dout.CopyToHost(o_out->data(), o_out->bytes.size()));
  DHSA_RETURN_IF_ERROR(dlse.CopyToHost(lse.data(), lse.bytes.size()));
  t->download = Since(mark);
  t->total = Since(start);
  (void)cudaStreamDestroy(stream);
  return absl::OkStatus();
}

int Usage() {
  std::fprintf(stderr,
               "usage: nccl_e2e_bench (--target HOST:PORT | --embedded N | --inprocess-gpu 1)\n"
               "         [--label TEXT]\n"
               "         [--lengths 32768,131072] [--reps 3] [--warmups 1] [--hq 32] [--hkv 8]\n"
               "         [--dim 128] [--selection-device auto|cpu|N] [--preset default|paper]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string target, label = "service", selection_device = "auto";
  dhsa::DhsaConfig config;  // The defaults (mass score), or --preset paper.
  int embedded = 0, reps = 3, warmups = 1;
  bool inprocess = false;
  int64_t hq = 32, hkv = 8, dim = 128;
  std::vector<int64_t> lengths = {32768, 131072};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) return Usage();
    const std::string v = argv[++i];
    int64_t n = 0;
    if (a == "--target") {
      target = v;
    } else if (a == "--inprocess-gpu") {
      inprocess = v == "1";
    } else if (a == "--label") {
      label = v;
    } else if (a == "--selection-device") {
      selection_device = v;
    } else if (a == "--preset") {
      if (v == "paper") {
        config = dhsa::PaperConfig();
      } else if (v != "default") {
        return Usage();
      }
    } else if (a == "--lengths") {
      lengths.clear();
      for (absl::string_view s : absl::StrSplit(v, ',')) {
        if (!absl::SimpleAtoi(s, &n) || n <= 0) return Usage();
        lengths.push_back(n);
      }
    } else if (a == "--warmups" && absl::SimpleAtoi(v, &n) && n >= 0) {
      warmups = static_cast<int>(n);
    } else if (absl::SimpleAtoi(v, &n) && n > 0) {
      if (a == "--embedded") {
        embedded = static_cast<int>(n);
      } else if (a == "--reps") {
        reps = static_cast<int>(n);
      } else if (a == "--hq") {
        hq = n;
      } else if (a == "--hkv") {
        hkv = n;
      } else if (a == "--dim") {
        dim = n;
      } else {
        return Usage();
      }
    } else {
      return Usage();
    }
  }
  if (inprocess) {
    std::mt19937_64 rng(42);
    std::printf("%-34s %7s %9s %9s %9s %9s %9s %9s\n", "config", "len", "total_ms", "upload_ms",
                "select_ms", "attend_ms", "down_ms", "gpu_ms");
    for (int64_t len : lengths) {
      const Tensor q = Random(rng, hq, len, dim), k = Random(rng, hkv, len, dim),
                   v = Random(rng, hkv, len, dim);
      std::vector<InProcessTimes> runs;
      for (int r = 0; r < reps + warmups; ++r) {
        InProcessTimes t;
        Tensor o;
        const absl::Status s = InProcessGpu(q, k, v, config, &t, &o);
        if (!s.ok()) {
          std::fprintf(stderr, "in-process GPU len %lld: %s\n", static_cast<long long>(len),
                       std::string(s.message()).c_str());
          return 1;
        }
        if (r >= warmups) runs.push_back(t);
      }
      std::sort(runs.begin(), runs.end(),
                [](const InProcessTimes& a, const InProcessTimes& b) { return a.total < b.total; });
      const InProcessTimes& m = runs[runs.size() / 2];
      std::printf("%-34s %7lld %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f\n", label.c_str(),
                  static_cast<long long>(len), m.total * 1e3, m.upload * 1e3, m.select * 1e3,
                  m.attend * 1e3, m.download * 1e3, (m.select + m.attend) * 1e3);
      std::fflush(stdout);
    }
    return 0;
  }
  if (target.empty() == (embedded == 0)) return Usage();

  std::unique_ptr<dhsa::EmbeddedService> service;
  if (embedded > 0) {
    dhsa::EmbeddedOptions o;
    o.num_workers = embedded;
    o.backend = "cuda";
    o.max_message_bytes = 64 << 20;
    o.data_plane.set_transport("shm");
    o.data_plane.set_shm_arena_bytes(int64_t{4} << 30);
    o.selection_device = selection_device;
    absl::StatusOr<std::unique_ptr<dhsa::EmbeddedService>> s = dhsa::EmbeddedService::Start(o);
    if (!s.ok()) {
      std::fprintf(stderr, "embedded service: %s\n", std::string(s.status().message()).c_str());
      return 1;
    }
    service = *std::move(s);
    target = service->router_address();
  }
  dhsa::ClientOptions co;
  co.max_message_bytes = 64 << 20;
  absl::StatusOr<dhsa::Client> client = dhsa::Client::Connect(target, co);
  if (!client.ok()) {
    std::fprintf(stderr, "connect %s: %s\n", target.c_str(),
                 std::string(client.status().message()).c_str());
    return 1;
  }
  std::mt19937_64 rng(42);
  std::printf("%-34s %7s %9s %9s %8s %9s %9s %9s %9s %8s %7s %9s %9s %8s\n", "config", "len",
              "wall_ms", "router_ms", "bound_ms", "select_ms", "store_ms", "attend_ms", "merge_ms",
              "other_ms", "kern_ms", "to_MB", "from_MB", "xfer_GBs");
  int rc = 0;
  for (int64_t len : lengths) {
    const Tensor q = Random(rng, hq, len, dim), k = Random(rng, hkv, len, dim),
                 v = Random(rng, hkv, len, dim);
    std::vector<double> walls;
    dhsa::v1::CallStats last;
    for (int r = 0; r < reps + warmups; ++r) {  // The first `warmups` are not timed.
      dhsa::SequenceOptions so;
      so.q_heads = static_cast<int>(hq);
      so.kv_heads = static_cast<int>(hkv);
      so.head_dim = static_cast<int>(dim);
      so.dtype = DType::kBF16;
      so.config = config;  // As the in-process runs (--inprocess-gpu 1).
      absl::StatusOr<dhsa::Sequence> seq = client->CreateSequence(so);
      if (!seq.ok()) {
        std::fprintf(stderr, "CreateSequence: %s\n", std::string(seq.status().message()).c_str());
        return 1;
      }
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<dhsa::AttentionOutput> out = seq->Prefill(0, q, k, v, false);
      const double wall =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      (void)seq->Release();
      if (!out.ok()) {
        std::fprintf(stderr, "%s len %lld: Prefill: %s\n", label.c_str(),
                     static_cast<long long>(len), std::string(out.status().message()).c_str());
        rc = 1;
        break;
      }
      if (r >= warmups) walls.push_back(wall);
      last = out->stats;
    }
    if (walls.empty()) continue;
    std::sort(walls.begin(), walls.end());
    const double wall = walls[walls.size() / 2];
    const double xfer_s = last.dispatch_seconds() + last.attention_seconds();
    const double moved = static_cast<double>(last.bytes_to_workers() + last.bytes_from_workers());
    // other: the router's time outside the named stages (input checks, planning, commit).
    const double other = last.total_seconds() - last.boundaries_seconds() -
                         last.selection_seconds() - last.dispatch_seconds() -
                         last.attention_seconds() - last.merge_seconds();
    std::printf(
        "%-34s %7lld %9.1f %9.1f %8.1f %9.1f %9.1f %9.1f %9.1f %8.1f %7.1f %9.1f %9.1f %8.2f  "
        "[%s] %s up_ms %.1f\n",
        label.c_str(), static_cast<long long>(len), wall * 1e3, last.total_seconds() * 1e3,
        last.boundaries_seconds() * 1e3, last.selection_seconds() * 1e3,
        last.dispatch_seconds() * 1e3, last.attention_seconds() * 1e3, last.merge_seconds() * 1e3,
        other * 1e3, last.worker_kernel_seconds() * 1e3,
        static_cast<double>(last.bytes_to_workers()) / 1e6,
        static_cast<double>(last.bytes_from_workers()) / 1e6,
        xfer_s > 0 ? moved / xfer_s / 1e9 : 0.0, last.transport().c_str(),
        last.selection_device().c_str(), last.selection_upload_seconds() * 1e3);
    std::fflush(stdout);
  }
  if (service != nullptr) service->Shutdown();
  return rc;
}
