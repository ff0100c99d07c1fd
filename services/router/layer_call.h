// One Prefill or Decode of one layer, distributed: boundaries and summaries of the new keys,
// selection, placement of the new keys on stripes, StoreKv to their workers, Attend on every worker
// holding selected keys, the LSE merge, then the commit of the layer's new layout. Heavy steps run
// on the router's executor; worker calls are asynchronous and hand back to the executor when the
// last one answers. A failed call leaves the layer as it was: nothing is committed, reservations
// are returned, and keys it may have stored on workers are truncated away (see Rollback in
// layer_call.cc); when a worker that may hold such keys cannot be reached, the layer keeps a
// pending undo instead (LayerState::undo), which the next call on the layer retries first.
#ifndef DHSA_SERVICES_ROUTER_LAYER_CALL_H_
#define DHSA_SERVICES_ROUTER_LAYER_CALL_H_

#include <grpcpp/client_context.h>
#include <grpcpp/server_context.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "dhsa/v1/attention.pb.h"
#include "kernels/common/tensor.h"
#include "services/common/executor.h"
#include "services/router/layout.h"
#include "services/router/placement.h"
#include "services/router/plan.h"
#include "services/router/selection_device.h"
#include "services/router/sequence.h"
#include "services/router/worker_calls.h"
#include "services/router/workers.h"

namespace dhsa::router {

// What every call shares with the router.
struct RouterCore {
  WorkerPool* pool = nullptr;
  Executor* executor = nullptr;
  const PlacementPolicy* policy = nullptr;
  int64_t stripe_tokens = 4096;
  int64_t piece_bytes = 1 << 20;  // Data bytes per TensorPiece sent to workers.
  int kernel_threads = 1;  // Threads of each boundaries/summaries/selection/merge kernel call.
  // Deadline of the Truncate calls that undo a failed call's stores.
  std::chrono::milliseconds cleanup_timeout{5000};
  // Deadline of each StoreKv and Attend of a client call that has no deadline of its own (a
  // client's deadline propagates to the worker calls as is): a stalled worker cannot hang a call.
  std::chrono::milliseconds worker_call_timeout{120000};
  // Where a first prefill's Steps 1-4 run when the device supports the call (selection_device.h);
  // null: always on the CPU.
  std::shared_ptr<SelectionDevice> selection_device;
};

struct LayerCallOutput {
  Tensor o;            // [Hq, Lq, d] float32.
  Tensor lse;          // [Hq, Lq] float32.
  int64_t length = 0;  // Tokens in the layer after the call.
  v1::CallStats stats;
};

class LayerCall : public std::enable_shared_from_this<LayerCall> {
 public:
  using Done = std::function<void(absl::StatusOr<LayerCallOutput>)>;

  // Runs the call; `done` is called once, from an executor thread. The caller has claimed the
  // layer (BeginLayerCall) and checked the shapes: q [Hq, Lq, d], k and v [Hkv, Lq, d] in the
  // sequence's dtype. Worker calls inherit the deadline and cancellation of `server_context` (may
  // be null), which must stay alive until `done`; without a client deadline each worker call gets
  // core.worker_call_timeout.
  static std::shared_ptr<LayerCall> Start(const RouterCore& core,
                                          std::shared_ptr<SequenceState> seq, int layer,
                                          std::shared_ptr<const Tensor> q,
                                          std::shared_ptr<const Tensor> k,
                                          std::shared_ptr<const Tensor> v, bool decode,
                                          const grpc::CallbackServerContext* server_context,
                                          Done done);

  // The client went away: worker calls are cancelled and `done` gets CANCELLED soon.
  void Cancel();

 private:
  LayerCall() = default;
  using Clock = std::chrono::steady_clock;

  absl::Status PlanAndStore();
  // Steps 1-4 on core_.selection_device when it serves this call: true with delta_ and
  // `selection` set; false (the CPU path runs) when it does not, or when it failed (logged).
  bool SelectOnDevice(LayerState& layer, Selection* selection);
  void AfterStores();
  void AfterAttends();
  absl::StatusOr<LayerCallOutput> MergeAndCommit();
  // A context for one worker call, or null when the call was cancelled.
  grpc::ClientContext* NewWorkerContext();
  // A worker call failed: the status the client gets.
  absl::Status WorkerFailure(int worker, const char* what, const absl::Status& status);
  int64_t PieceBytes(size_t piece) const;  // KV bytes of pieces_[piece].
  // Undoes the call (Truncate to t0_ on every worker sent a StoreKv), then finishes with `status`.
  void Rollback(absl::Status status);
  // The truncates of Rollback have answered: `held` are the pieces workers may hold, `failed` the
  // workers holding some of them whose Truncate failed (with why).
  void AfterTruncates(const std::vector<size_t>& held, const std::map<int, absl::Status>& failed,
                      absl::Status status);
  void MarkBroken(const std::vector<size_t>& pieces, const std::string& why);
  void Finish(absl::StatusOr<LayerCallOutput> result);

  RouterCore core_;
  std::shared_ptr<SequenceState> seq_;
  int layer_ = 0;
  std::shared_ptr<const Tensor> q_, k_, v_;
  bool decode_ = false;
  const grpc::CallbackServerContext* server_context_ = nullptr;
  Done done_;

  // Shapes of the call: queries [t0_, lk_).
  int64_t hq_ = 0, hkv_ = 0, dim_ = 0, t0_ = 0, lk_ = 0;
  transport::Kind transport_ = transport::Kind::kGrpc;  // Of this call's worker tensors.
  LayoutDelta delta_;
  std::vector<StorePiece> pieces_;
  std::vector<Stripe> new_stripes_;
  std::vector<WorkerWork> works_;
  LayerCallOutput out_;
  Clock::time_point start_, stage_start_;

  std::mutex mu_;
  bool cancelled_ = false;                                      // Guarded by mu_.
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_;  // Guarded by mu_.
  size_t pending_ = 0;                                          // Guarded by mu_.
  std::vector<absl::Status> store_status_;                      // Guarded by mu_.
  std::vector<bool> store_sent_;                                // Guarded by mu_.
  std::vector<bool> store_maybe_;                               // Guarded by mu_: may be held.
  std::vector<absl::Status> attend_status_;                     // Guarded by mu_.
  std::vector<PartialResult> partials_;                         // Guarded by mu_.
};

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_LAYER_CALL_H_
