// A worker's share of Step 5 (spec/DHSA.md): sparse attention of query rows over the selected spans
// of the stripes it holds. The CPU backend makes one kernel call over every stripe a span touches
// (each stripe a run of keys: SparseAttentionParams::more_kv); the CUDA backend one call per
// stripe, the per-stripe partial results combined by the LSE merge on the device.
#ifndef DHSA_SERVICES_WORKER_PARTIAL_ATTENTION_H_
#define DHSA_SERVICES_WORKER_PARTIAL_ATTENTION_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"
#include "services/worker/kv_store.h"

namespace dhsa {

// FailedPrecondition naming the first span (and its entry) that reaches keys outside the snapshot's
// stripes: a partial result that silently skipped them would merge into a wrong answer.
absl::Status CheckSpansHeld(const Selection& selection, const LayerSnapshot& keys,
                            const std::string& sequence_id, int32_t layer);

// Memory on a backend's device (the CUDA backend's; WorkerBackend::AllocateDevice), freed when the
// last holder lets go. The NCCL data plane receives "q" into it and sends "o" and "lse" from it, so
// those tensors never pass through host memory on the worker.
class WorkerDeviceBuffer {
 public:
  virtual ~WorkerDeviceBuffer() = default;
  virtual void* data() const = 0;
  virtual int64_t bytes() const = 0;
  virtual int device() const = 0;  // CUDA device ordinal of this process.
};

struct PartialAttention {
  Tensor o;    // [Hq, Lq, d] float32; 0 where a row saw no key.
  Tensor lse;  // [Hq, Lq] float32, natural log; -inf where a row saw no key.
  // With PartialAttentionInputs::outputs_on_device: o and lse (as above) on the backend's device,
  // complete (the computing stream synchronized); the host tensors o and lse are then empty.
  std::shared_ptr<WorkerDeviceBuffer> o_device, lse_device;
  int64_t computed_pairs = 0;  // (query, key) pairs attended, over all query heads.
  double seconds = 0;          // The kernel call.
};

// What one Attend computes. Spans must have passed CheckSpansHeld against `keys`.
struct PartialAttentionInputs {
  const Tensor* q = nullptr;  // [Hq, Lq, d]; row r is absolute position q_begin + r.
  int64_t q_begin = 0;
  const Selection* selection = nullptr;
  const LayerSnapshot* keys = nullptr;
  float scale = 0.0f;   // > 0.
  int num_threads = 1;  // Threads inside the kernel call.
  // Polled between tiles of the kernel; true aborts with Cancelled.
  std::function<bool()> cancelled;
  // Device I/O (the CUDA backend only; others answer InvalidArgument when either is set):
  // q_device holds q's bytes on the backend's device, in q->dtype, which must be the keys' dtype;
  // q then gives only dtype and shape (its bytes may be empty). outputs_on_device leaves o and
  // lse on the device (PartialAttention::o_device, lse_device) instead of downloading them.
  const WorkerDeviceBuffer* q_device = nullptr;
  bool outputs_on_device = false;
  // Host I/O in place (backends whose WorkerBackend::HostInPlace() is true, the CPU one; the others
  // must not be given these): q_host, when set, holds q's bytes (q->dtype, q->shape; q's own bytes
  // may then be empty), e.g. a pinned shared-memory region; o_host and lse_host, when set, receive
  // o [Hq, Lq, d] and lse [Hq, Lq] (float32) instead of PartialAttention::o and lse, which are then
  // empty. Saves a copy of each and their fresh memory.
  const void* q_host = nullptr;
  float* o_host = nullptr;
  float* lse_host = nullptr;
  // The CUDA backend takes q_host (in the keys' dtype), o_host and lse_host too when they are
  // page-locked shared-memory regions (the worker's arenas, WorkerBackend::HostLocker): it copies
  // q from there and o and lse into there, cutting each copy at transport::kShmLockChunkBytes-
  // aligned addresses (one registration per piece).
  bool host_locked = false;
};

absl::StatusOr<PartialAttention> ComputePartialAttention(const PartialAttentionInputs& in);

// The per-stripe decomposition of the CUDA backend (one kernel call per stripe, partials merged):
// the entries of `selection` (kKvHeadBlock) for absolute query blocks [first_block, first_block +
// num_blocks), each span cut to [lo, hi) (a stripe's held positions, capped at the last query row
// + 1). `any` tells whether some span is left. Attention over every stripe's cut, merged by LSE,
// equals attention over the selection (tests/services/worker_backend_test.cc checks it on the CPU
// kernel).
Selection SelectionForStripe(const Selection& selection, int64_t first_block, int64_t num_blocks,
                             int64_t lo, int64_t hi, bool* any);

}  // namespace dhsa

#endif  // DHSA_SERVICES_WORKER_PARTIAL_ATTENTION_H_
