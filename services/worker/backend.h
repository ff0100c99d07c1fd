// The worker's compute backend (ServiceConfig.backend, dhsa-worker --backend): where its KV stripes
// live and what computes a partial attention over them.
//
// - "cpu" (default): host memory; one call of the fast CPU kernel (SparseAttentionCpu) over every
//   stripe a span touches (SparseAttentionParams::more_kv), in ComputePartialAttention.
// - "cuda" (builds with DHSA_WITH_CUDA, services/worker/cuda_backend.cc): stripes in device memory;
//   one SparseAttentionCuda call per touched stripe, each with the selection cut to that stripe's
//   positions, and the per-stripe partials merged on the device (MergePartialsCuda). The CUDA
//   kernel serves bfloat16/float16 keys of head dim 64 or 128 and per-(KV head, block) selections;
//   StoreKv of anything else is InvalidArgument up front, naming the CPU backend.
//
// Both compute the same partial (o, lse): the CUDA one within the kernels' tolerance (twice the
// error of the same math done naively in the storage precision; tests/gpu_service).
#ifndef DHSA_SERVICES_WORKER_BACKEND_H_
#define DHSA_SERVICES_WORKER_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/dtype.h"
#include "services/worker/kv_memory.h"
#include "services/worker/partial_attention.h"

namespace dhsa {
namespace transport {
class HostMemoryLocker;
}  // namespace transport

// Memory of the device a backend computes on (zeros for the CPU backend).
struct DeviceMemoryInfo {
  int64_t total_bytes = 0;
  int64_t free_bytes = 0;
};

class WorkerBackend {
 public:
  virtual ~WorkerBackend() = default;

  // "cpu" or "cuda".
  virtual std::string name() const = 0;
  // Where the KV store keeps stripes.
  virtual std::shared_ptr<KvMemory> memory() const = 0;
  // OK when this backend stores and attends keys of this layout; InvalidArgument naming what it
  // serves otherwise. Checked at StoreKv's header, before any byte is reserved.
  virtual absl::Status CheckLayout(int64_t head_dim, DType dtype) const = 0;
  // A partial attention over the stripes of in.keys (snapshot of this backend's store).
  virtual absl::StatusOr<PartialAttention> Compute(const PartialAttentionInputs& in) = 0;
  // The device's memory now (Stats); zeros for the CPU backend.
  virtual absl::StatusOr<DeviceMemoryInfo> DeviceMemory() const = 0;
  // `bytes` of this backend's device memory for PartialAttentionInputs::q_device (the NCCL data
  // plane receives into it); null for backends without a device (CPU).
  virtual absl::StatusOr<std::shared_ptr<WorkerDeviceBuffer>> AllocateDevice(int64_t /*bytes*/) {
    return std::shared_ptr<WorkerDeviceBuffer>();
  }
  // Whether Compute takes PartialAttentionInputs::q_host, o_host and lse_host (host memory read
  // and written in place, e.g. shared-memory regions); false: q's bytes in q, o and lse returned.
  virtual bool HostInPlace() const { return false; }
  // Page-locks host memory for this backend's device copies (the CUDA one: cudaHostRegister);
  // null for backends without a device. The worker gives it to its shared-memory arenas: Compute
  // then also takes q_host, o_host and lse_host when they lie in page-locked arena regions
  // (PartialAttentionInputs::host_locked).
  virtual std::shared_ptr<transport::HostMemoryLocker> HostLocker() const { return nullptr; }
};

// True in builds with the CUDA backend (DHSA_WITH_CUDA).
bool WorkerBackendCudaBuilt();

// The backend named `name` ("cpu" or "cuda"). InvalidArgument for other names and for "cuda" in a
// build without CUDA (naming the build option); FailedPrecondition when the build has CUDA but no
// device can be used.
absl::StatusOr<std::unique_ptr<WorkerBackend>> CreateWorkerBackend(absl::string_view name);

// KV capacity per worker when none is configured, for `workers` workers sharing the machine
// (1 for a standalone dhsa-worker): "cpu" half of physical memory, "cuda" half of the device's free
// memory at the time of the call, divided among them. Half, because a stripe grown by appends
// doubles its buffer (allocated bytes reach up to twice the held bytes that the capacity counts),
// and per-call buffers (q, o, partials) need room too. Errors as CreateWorkerBackend.
absl::StatusOr<int64_t> DefaultCapacityBytes(absl::string_view backend, int workers);

}  // namespace dhsa

#endif  // DHSA_SERVICES_WORKER_BACKEND_H_
