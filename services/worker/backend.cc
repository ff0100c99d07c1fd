#include "services/worker/backend.h"

#include <unistd.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#ifdef DHSA_WORKER_WITH_CUDA
#include "services/worker/cuda_backend.h"
#endif

namespace dhsa {
namespace {

class CpuWorkerBackend final : public WorkerBackend {
 public:
  std::string name() const override { return "cpu"; }
  std::shared_ptr<KvMemory> memory() const override { return memory_; }
  absl::Status CheckLayout(int64_t /*head_dim*/, DType /*dtype*/) const override {
    return absl::OkStatus();  // The CPU kernel takes every dtype and head dim.
  }
  absl::StatusOr<PartialAttention> Compute(const PartialAttentionInputs& in) override {
    return ComputePartialAttention(in);
  }
  absl::StatusOr<DeviceMemoryInfo> DeviceMemory() const override { return DeviceMemoryInfo{}; }
  bool HostInPlace() const override { return true; }

 private:
  std::shared_ptr<KvMemory> memory_ = std::make_shared<HostKvMemory>();
};

constexpr char kNoCuda[] =
    "backend \"cuda\": this build has no CUDA backend (configure with -DDHSA_WITH_CUDA=ON and the "
    "CUDA toolkit, or use --backend=cpu)";

absl::Status CheckName(absl::string_view name) {
  if (name == "cpu") return absl::OkStatus();
  if (name == "cuda") {
    return WorkerBackendCudaBuilt() ? absl::OkStatus() : absl::InvalidArgumentError(kNoCuda);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend \"", name, "\"; expected \"cpu\" or \"cuda\""));
}

}  // namespace

bool WorkerBackendCudaBuilt() {
#ifdef DHSA_WORKER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<WorkerBackend>> CreateWorkerBackend(absl::string_view name) {
  DHSA_RETURN_IF_ERROR(CheckName(name));
  if (name == "cpu") return std::make_unique<CpuWorkerBackend>();
#ifdef DHSA_WORKER_WITH_CUDA
  return CreateCudaWorkerBackend();
#else
  return absl::InvalidArgumentError(kNoCuda);
#endif
}

absl::StatusOr<int64_t> DefaultCapacityBytes(absl::string_view backend, int workers) {
  DHSA_RETURN_IF_ERROR(CheckName(backend));
  const int64_t sharing = std::max(1, workers);
  if (backend == "cpu") {
    const long pages = sysconf(_SC_PHYS_PAGES);
    const long page_size = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page_size <= 0) return int64_t{1} << 30;
    return std::max<int64_t>(int64_t{1} << 26,
                             static_cast<int64_t>(pages) * page_size / 2 / sharing);
  }
#ifdef DHSA_WORKER_WITH_CUDA
  DHSA_ASSIGN_OR_RETURN(const DeviceMemoryInfo memory, CudaDeviceMemory());
  return memory.free_bytes / 2 / sharing;
#else
  return absl::InvalidArgumentError(kNoCuda);
#endif
}

}  // namespace dhsa
