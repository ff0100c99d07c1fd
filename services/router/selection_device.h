// Steps 1-4 of a first prefill (boundaries, chunk and query summaries, scores, the selection) on
// a CUDA device of the router (ServiceConfig.selection_device), by the device pipeline
// DeviceDhsaSelection (kernels/cuda/selection_cuda.h: the reference's function; with the mass
// score equal up to chunks whose scores tie with the cut within kMassScoreTolerance).
//
// The router uses it for the calls it can serve and the CPU kernels for the others:
// - only a layer's first prefill (no keys stored yet: t0 = 0). Chunked prefill would need the
//   stored keys themselves (the device pipeline reads k over [0, lk); the router keeps only the
//   tail chunk's), and decode is declined by the device pipeline (the tail chunk's growth);
// - what DeviceSelectionSupported accepts: policy dhsa, bfloat16/float16, no shared_heads, head
//   dims 8-256, sizes within its shared-memory plans.
// The boundaries and kappa come back to the host and go into the layer's LayoutDelta
// (LayerLayout::ProposeComputed), so later calls (decode, chunked prefill) continue on the CPU
// from the same state; the Selection comes back in the CPU's form and feeds PlanAttention as is.
//
// q and k go to the device through two reused pinned staging buffers (host copies on up to
// `threads` threads overlapped with the DMA of the other buffer): a pageable copy of a 128K-token
// q (1 GiB bf16) costs ~0.25 s, about what the device saves. Calls are serialised on the device
// (one stream, a mutex); the workspace of the last shape and the q/k buffers are kept for the
// next call (at 128K, Hq 32, Hkv 8, d 128 bf16: 1.25 GiB of q/k plus the selection's workspace).
#ifndef DHSA_SERVICES_ROUTER_SELECTION_DEVICE_H_
#define DHSA_SERVICES_ROUTER_SELECTION_DEVICE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/config.h"
#include "kernels/common/dtype.h"
#include "kernels/common/inputs.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"

namespace dhsa::router {

// ServiceConfig.selection_device, parsed: "auto" (or ""), "cpu", or a device ordinal >= 0.
struct SelectionDeviceSpec {
  enum class Kind { kAuto, kCpu, kOrdinal };
  Kind kind = Kind::kAuto;
  int ordinal = -1;  // kOrdinal only.
};

// InvalidArgument naming the accepted values for anything else.
absl::StatusOr<SelectionDeviceSpec> ParseSelectionDevice(const std::string& text);

// What one device run hands back, in the CPU path's forms.
struct DeviceSelectionResult {
  std::vector<int64_t> boundaries;        // Over [0, lk), from 0 to lk.
  Summaries kappa;                        // [kv_heads, chunks, dim], head-major.
  Selection selection;                    // As SelectSpansCpu's.
  double upload_seconds = 0;              // q and k host -> device.
  double boundaries_seconds = 0;          // Step 1 on the device.
  double rest_seconds = 0;                // Steps 2-4 and the downloads.
  double selection_download_seconds = 0;  // Part of rest: the selection's counts and spans.
  double selection_unpack_seconds = 0;    // Part of rest: the spans into `selection`.
};

class SelectionDevice {
 public:
  // The device `spec` names, or null for the CPU path: `cpu`; `auto` in a build without CUDA or
  // with no visible device (`preferred` >= 0: auto takes that ordinal when it exists, else 0).
  // An ordinal that does not exist, or any ordinal in a build without CUDA, is InvalidArgument.
  static absl::StatusOr<std::shared_ptr<SelectionDevice>> Open(const SelectionDeviceSpec& spec,
                                                               int preferred = -1);
  // Whether this build has the device path (DHSA_WITH_CUDA).
  static bool BuiltWithCuda();

  ~SelectionDevice();
  SelectionDevice(const SelectionDevice&) = delete;
  SelectionDevice& operator=(const SelectionDevice&) = delete;

  int ordinal() const { return ordinal_; }
  // "cuda:N" (CallStats.selection_device).
  const std::string& name() const { return name_; }
  // One line for the start-up log: the device's name and memory.
  std::string Describe() const;

  // OK when Run serves a call of `config` with `shape` (queries [t0, lk)) in `dtype`; why not
  // otherwise (decode, t0 > 0, what DeviceSelectionSupported declines).
  absl::Status Supports(const DhsaConfig& config, const AttentionShape& shape, DType dtype,
                        bool decode) const;

  // Steps 1-4 of a first prefill: q [hq, lq, d] and k [hkv, lq, d] host tensors of one dtype,
  // keys [0, lq). Host copies into the staging buffers use up to `threads` threads.
  absl::StatusOr<DeviceSelectionResult> Run(const DhsaConfig& config, const Tensor& q,
                                            const Tensor& k, int threads);

 private:
  SelectionDevice() = default;
  struct State;  // CUDA state (stream, staging, buffers, workspace); null without CUDA.
  std::unique_ptr<State> state_;
  int ordinal_ = -1;
  std::string name_;
};

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_SELECTION_DEVICE_H_
