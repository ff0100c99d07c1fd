#include "services/router/selection_device.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"

#ifdef DHSA_ROUTER_SELECTION_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cpu/parallel.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_cuda.h"
#include "services/common/config.h"
#endif

namespace dhsa::router {

absl::StatusOr<SelectionDeviceSpec> ParseSelectionDevice(const std::string& text) {
  SelectionDeviceSpec spec;
  if (text.empty() || text == "auto") return spec;
  if (text == "cpu") {
    spec.kind = SelectionDeviceSpec::Kind::kCpu;
    return spec;
  }
  int ordinal = -1;
  if (absl::SimpleAtoi(text, &ordinal) && ordinal >= 0 &&
      text.find_first_not_of("0123456789") == std::string::npos) {
    spec.kind = SelectionDeviceSpec::Kind::kOrdinal;
    spec.ordinal = ordinal;
    return spec;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("selection_device must be \"auto\", \"cpu\" or a CUDA device ordinal (0, 1, "
                   "...); got \"",
                   text, "\""));
}

#ifndef DHSA_ROUTER_SELECTION_CUDA

struct SelectionDevice::State {};

bool SelectionDevice::BuiltWithCuda() { return false; }

absl::StatusOr<std::shared_ptr<SelectionDevice>> SelectionDevice::Open(
    const SelectionDeviceSpec& spec, int /*preferred*/) {
  if (spec.kind == SelectionDeviceSpec::Kind::kOrdinal) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection_device ", spec.ordinal,
                     " needs a build with CUDA (DHSA_WITH_CUDA=ON); this build has none: use "
                     "\"auto\" or \"cpu\""));
  }
  return std::shared_ptr<SelectionDevice>();
}

SelectionDevice::~SelectionDevice() = default;

std::string SelectionDevice::Describe() const { return name_; }

absl::Status SelectionDevice::Supports(const DhsaConfig&, const AttentionShape&, DType,
                                       bool) const {
  return absl::UnimplementedError("this build has no CUDA");
}

absl::StatusOr<DeviceSelectionResult> SelectionDevice::Run(const DhsaConfig&, const Tensor&,
                                                           const Tensor&, int) {
  return absl::UnimplementedError("this build has no CUDA");
}

#else  // DHSA_ROUTER_SELECTION_CUDA

namespace {

constexpr size_t kStagingBytes = size_t{64} << 20;  // Each of the two pinned staging buffers.

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// Makes `ordinal` the calling thread's current device for its lifetime, then restores the one
// before (router threads may serve other devices: NCCL ranks, an embedded CUDA worker).
class DeviceScope {
 public:
  explicit DeviceScope(int ordinal) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    status_ = CudaStatus(cudaSetDevice(ordinal), "cudaSetDevice");
  }
  ~DeviceScope() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  const absl::Status& status() const { return status_; }

 private:
  int previous_ = -1;
  absl::Status status_;
};

}  // namespace

struct SelectionDevice::State {
  std::mutex mu;  // One Run at a time.
  cudaStream_t stream = nullptr;
  void* staging[2] = {nullptr, nullptr};       // Pinned.
  cudaEvent_t staged[2] = {nullptr, nullptr};  // The DMA out of staging[i] has ended.
  cudaEvent_t uploaded = nullptr, boundaries_done = nullptr;
  DeviceBuffer q, k;
  std::string workspace_key;  // Config, shape and dtype of `selection`.
  std::unique_ptr<DeviceDhsaSelection> selection;

  ~State() {
    for (int i = 0; i < 2; ++i) {
      if (staged[i] != nullptr) (void)cudaEventDestroy(staged[i]);
      if (staging[i] != nullptr) (void)cudaFreeHost(staging[i]);
    }
    if (uploaded != nullptr) (void)cudaEventDestroy(uploaded);
    if (boundaries_done != nullptr) (void)cudaEventDestroy(boundaries_done);
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }

  // Enqueues the copy of host [src, src + bytes) to device `dst` through the staging buffers.
  absl::Status Upload(void* dst, const void* src, size_t bytes, int threads) {
    for (size_t done = 0, i = 0; done < bytes; ++i) {
      const int b = static_cast<int>(i % 2);
      const size_t n = std::min(kStagingBytes, bytes - done);
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(staged[b]), "staging buffer"));
      uint8_t* to = static_cast<uint8_t*>(staging[b]);
      const uint8_t* from = static_cast<const uint8_t*>(src) + done;
      // Threads only for copies of at least 8 MiB a thread.
      const int parts = static_cast<int>(
          std::clamp<int64_t>(static_cast<int64_t>(n >> 23), 1, std::max(1, threads)));
      cpu::ParallelFor(parts, parts, [&](int64_t p, int) {
        const size_t a = n * static_cast<size_t>(p) / static_cast<size_t>(parts);
        const size_t e = n * static_cast<size_t>(p + 1) / static_cast<size_t>(parts);
        std::memcpy(to + a, from + a, e - a);
      });
      DHSA_RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(static_cast<uint8_t*>(dst) + done, to, n, cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (selection upload)"));
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(staged[b], stream), "cudaEventRecord"));
      done += n;
    }
    return absl::OkStatus();
  }
};

bool SelectionDevice::BuiltWithCuda() { return true; }

absl::StatusOr<std::shared_ptr<SelectionDevice>> SelectionDevice::Open(
    const SelectionDeviceSpec& spec, int preferred) {
  if (spec.kind == SelectionDeviceSpec::Kind::kCpu) return std::shared_ptr<SelectionDevice>();
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
  (void)cudaGetLastError();  // No driver or no device: not an error for auto.
  int ordinal = 0;
  if (spec.kind == SelectionDeviceSpec::Kind::kOrdinal) {
    if (spec.ordinal >= count) {
      return absl::InvalidArgumentError(absl::StrCat(
          "selection_device ", spec.ordinal, ": this machine has ", count,
          " visible CUDA device(s); use \"auto\", \"cpu\" or an ordinal below ", count));
    }
    ordinal = spec.ordinal;
  } else {
    if (count == 0) return std::shared_ptr<SelectionDevice>();
    ordinal = preferred >= 0 && preferred < count ? preferred : 0;
  }
  std::shared_ptr<SelectionDevice> device(new SelectionDevice);
  device->ordinal_ = ordinal;
  device->name_ = absl::StrCat("cuda:", ordinal);
  device->state_ = std::make_unique<State>();
  State& s = *device->state_;
  DeviceScope scope(ordinal);
  DHSA_RETURN_IF_ERROR(scope.status());
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking),
                                  "cudaStreamCreate (selection device)"));
  for (int i = 0; i < 2; ++i) {
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaHostAlloc(&s.staging[i], kStagingBytes, 0),
                                    "cudaHostAlloc (selection staging)"));
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&s.staged[i], cudaEventDisableTiming),
                                    "cudaEventCreate"));
  }
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&s.uploaded), "cudaEventCreate"));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&s.boundaries_done), "cudaEventCreate"));
  return device;
}

SelectionDevice::~SelectionDevice() {
  if (state_ == nullptr) return;
  DeviceScope scope(ordinal_);
  state_.reset();
}

std::string SelectionDevice::Describe() const {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, ordinal_) != cudaSuccess) return name_;
  return absl::StrCat(name_, " (", prop.name, ", ", prop.totalGlobalMem >> 20, " MiB)");
}

absl::Status SelectionDevice::Supports(const DhsaConfig& config, const AttentionShape& shape,
                                       DType dtype, bool decode) const {
  if (decode) {
    return absl::UnimplementedError("decode selects on the CPU (the tail chunk's growth)");
  }
  if (shape.t0() != 0) {
    return absl::UnimplementedError(
        "chunked prefill selects on the CPU (the device pipeline reads every key; the router "
        "keeps only the tail chunk's)");
  }
  return DeviceSelectionSupported(config, shape, dtype, false);
}

absl::StatusOr<DeviceSelectionResult> SelectionDevice::Run(const DhsaConfig& config,
                                                           const Tensor& q, const Tensor& k,
                                                           int threads) {
  using Clock = std::chrono::steady_clock;
  if (q.shape.size() != 3 || k.shape.size() != 3 || q.dtype != k.dtype ||
      q.shape[1] != k.shape[1] || q.shape[2] != k.shape[2] || k.shape[0] < 1 ||
      q.shape[0] % k.shape[0] != 0) {
    return absl::InvalidArgumentError(absl::StrCat("device selection: q ", ShapeString(q.shape),
                                                   " and k ", ShapeString(k.shape),
                                                   " are not a first prefill's"));
  }
  const AttentionShape shape{q.shape[0], k.shape[0], q.shape[2], q.shape[1], q.shape[1]};
  DHSA_RETURN_IF_ERROR(Supports(config, shape, q.dtype, false));
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mu);
  DeviceScope scope(ordinal_);
  DHSA_RETURN_IF_ERROR(scope.status());
  DeviceSelectionResult out;
  const auto start = Clock::now();

  // The workspace of the last shape is kept; q and k buffers only grow.
  v1::DhsaParams params;
  DhsaConfigToProto(config, &params);
  const std::string key =
      absl::StrCat(params.SerializeAsString(), "|", shape.hq, ",", shape.hkv, ",", shape.dim, ",",
                   shape.lq, ",", shape.lk, "|", DTypeName(q.dtype));
  if (s.selection == nullptr || s.workspace_key != key) {
    s.selection.reset();
    DHSA_ASSIGN_OR_RETURN(DeviceDhsaSelection created,
                          DeviceDhsaSelection::Create(config, shape, q.dtype));
    s.selection = std::make_unique<DeviceDhsaSelection>(std::move(created));
    s.workspace_key = key;
  }
  for (auto [buffer, bytes] : {std::pair<DeviceBuffer*, size_t>{&s.q, q.bytes.size()},
                               std::pair<DeviceBuffer*, size_t>{&s.k, k.bytes.size()}}) {
    if (buffer->size() < bytes) {
      *buffer = DeviceBuffer();
      DHSA_ASSIGN_OR_RETURN(*buffer, DeviceBuffer::Allocate(bytes));
    }
  }
  DHSA_RETURN_IF_ERROR(s.Upload(s.k.data(), k.data(), k.bytes.size(), threads));
  DHSA_RETURN_IF_ERROR(s.Upload(s.q.data(), q.data(), q.bytes.size(), threads));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(s.uploaded, s.stream), "cudaEventRecord"));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(s.uploaded), "selection upload"));
  out.upload_seconds = Seconds(Clock::now() - start);

  const auto steps = Clock::now();
  SelectionStageEvents events;
  events.boundaries_done = s.boundaries_done;
  DHSA_RETURN_IF_ERROR(s.selection->Run(s.q.data(), s.k.data(), s.stream, nullptr, &events));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(s.stream), "device selection"));
  float step1_ms = 0;
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventElapsedTime(&step1_ms, s.uploaded, s.boundaries_done),
                                  "cudaEventElapsedTime"));
  DHSA_ASSIGN_OR_RETURN(out.boundaries, s.selection->Boundaries());
  DHSA_ASSIGN_OR_RETURN(out.kappa, s.selection->Kappa());
  DeviceDhsaSelection::SelectionTimes times;
  // The unpacking on the kernel threads (the selection's vectors: ~60 ms on one thread at 128K,
  // q_block 16).
  const DeviceDhsaSelection::RangeRunner ranges =
      [threads](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
        cpu::ParallelForRanges(n, threads, body);
      };
  DHSA_ASSIGN_OR_RETURN(out.selection, s.selection->ToSelection(&times, &ranges));
  out.selection_download_seconds = times.download_seconds;
  out.selection_unpack_seconds = times.unpack_seconds;
  out.boundaries_seconds = step1_ms * 1e-3;
  out.rest_seconds = std::max(0.0, Seconds(Clock::now() - steps) - out.boundaries_seconds);
  return out;
}

#endif  // DHSA_ROUTER_SELECTION_CUDA

}  // namespace dhsa::router
