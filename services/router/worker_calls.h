// Asynchronous calls from the router to one worker (gRPC callback API): storing keys and values,
// partial attention, and dropping or truncating a layer. Each call deletes itself when done and
// reports once through its callback, on a gRPC thread: callbacks must only record the result and
// hand heavier work to the router's executor. StoreKv and Attend are waited for by their LayerCall
// (and it by the client's call, which the server waits for); Drop and Truncate are the pool's
// background calls (workers.h), which the pool waits for before its channels go.
#ifndef DHSA_SERVICES_ROUTER_WORKER_CALLS_H_
#define DHSA_SERVICES_ROUTER_WORKER_CALLS_H_

#include <grpcpp/client_context.h>
#include <grpcpp/support/client_callback.h>

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "dhsa/v1/worker.grpc.pb.h"
#include "kernels/common/tensor.h"
#include "services/common/tsan_annotations.h"
#include "services/common/wire.h"
#include "services/router/pieces.h"
#include "services/router/sequence.h"
#include "services/router/workers.h"
#include "services/transport/nccl_link.h"
#include "services/transport/shm_arena.h"

namespace dhsa::router {

// Shared-memory regions a call sends from; freed (or quarantined while the worker still has them
// pinned) when the call ends.
using Regions = std::vector<std::unique_ptr<transport::ShmRegion>>;

// StoreKv: the header, then "k" and "v" rows [row_begin, row_end) of the call's new keys and
// values; or, when the header describes them (StoreKvHeader.tensors: in `regions`, or sent over
// NCCL by the caller), the header alone.
class StoreKvCall : public GrpcHandover<grpc::ClientWriteReactor<v1::StoreKvRequest>> {
 public:
  // `may_have_stored`: true when the call succeeded, or failed in a way that leaves its outcome
  // unknown (every byte and the half-close went out, so the worker may have committed, and the
  // failure is a cancellation, a deadline or a transport error rather than the worker's own
  // refusal). False when the worker cannot hold the tokens: it refused them, or the stream ended
  // before the half-close (the worker commits only on it).
  using Done = std::function<void(absl::Status status, bool may_have_stored)>;
  // `context` must outlive the call (the router's LayerCall owns it).
  static void Start(v1::Worker::Stub* stub, grpc::ClientContext* context,
                    const v1::StoreKvHeader& header, std::shared_ptr<const Tensor> k,
                    std::shared_ptr<const Tensor> v, int64_t row_begin, int64_t row_end,
                    int64_t piece_bytes, Regions regions, Done done);

  void OnWriteDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  StoreKvCall(std::shared_ptr<const Tensor> k, std::shared_ptr<const Tensor> v, int64_t row_begin,
              int64_t row_end, int64_t piece_bytes, Regions regions, Done done);
  void WriteNext();

  std::optional<PieceStream> k_;  // Unset when "k" and "v" go out of band.
  std::optional<PieceStream> v_;
  Regions regions_;
  Done done_;
  v1::StoreKvRequest request_;
  v1::StoreKvResponse response_;
  bool half_closed_ = false;  // Every piece was written and StartWritesDone issued.
};

// What a worker's Attend returned: o [Hq, rows, d] and lse [Hq, rows] float32. Over gRPC bytes
// `o` and `lse` hold the data; over shared memory (NCCL) they carry dtype and shape only and the
// data is in the regions (the pinned buffers the NCCL receives filled), read in place and held
// until this result is destroyed.
struct PartialResult {
  Tensor o;
  Tensor lse;
  v1::AttendResult result;
  std::shared_ptr<transport::ShmRegion> o_region;
  std::shared_ptr<transport::ShmRegion> lse_region;
  std::shared_ptr<transport::PinnedBuffer> o_pinned;
  std::shared_ptr<transport::PinnedBuffer> lse_pinned;

  const float* o_data() const {
    return static_cast<const float*>(o_region   ? o_region->data()
                                     : o_pinned ? o_pinned->data()
                                                : o.data());
  }
  const float* lse_data() const {
    return static_cast<const float*>(lse_region   ? lse_region->data()
                                     : lse_pinned ? lse_pinned->data()
                                                  : lse.data());
  }
  int64_t byte_size() const {
    return o_region   ? o_region->bytes() + lse_region->bytes()
           : o_pinned ? o_pinned->bytes() + lse_pinned->bytes()
                      : static_cast<int64_t>(o.bytes.size() + lse.bytes.size());
  }
};

// Attend: the header, then "q" rows [row_begin, row_end) of the call's queries (none when the
// header's q_tensor describes them: in `q_region`, or sent over NCCL by the caller); reads "o",
// "lse" and the result (the result alone when the header's o_tensor and lse_tensor describe them:
// `o_region` and `lse_region`, or received over NCCL by the caller, which then fills the
// PartialResult's data).
class AttendCall
    : public GrpcHandover<grpc::ClientBidiReactor<v1::AttendRequest, v1::AttendResponse>> {
 public:
  using Done = std::function<void(absl::Status, PartialResult)>;
  static void Start(v1::Worker::Stub* stub, grpc::ClientContext* context,
                    const v1::AttendHeader& header, std::shared_ptr<const Tensor> q,
                    int64_t row_begin, int64_t row_end, int64_t piece_bytes,
                    std::unique_ptr<transport::ShmRegion> q_region,
                    std::shared_ptr<transport::ShmRegion> o_region,
                    std::shared_ptr<transport::ShmRegion> lse_region, Done done);

  void OnWriteDone(bool ok) override;
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  AttendCall(grpc::ClientContext* context, std::shared_ptr<const Tensor> q, int64_t row_begin,
             int64_t row_end, int64_t piece_bytes, int64_t o_bytes, Done done);
  void WriteNext();
  void Fail(absl::Status status);

  grpc::ClientContext* context_;
  std::optional<PieceStream> q_;  // Unset when "q" goes out of band.
  std::unique_ptr<transport::ShmRegion> q_region_;
  bool outputs_out_of_band_ = false;  // The header describes "o" and "lse".
  std::vector<int64_t> o_shape_;      // [Hq, rows, d].
  Done done_;
  v1::AttendRequest request_;
  v1::AttendResponse response_;
  TensorAssembler o_;
  TensorAssembler lse_;
  bool have_result_ = false;
  PartialResult partial_;
  std::mutex mu_;
  absl::Status error_;  // Guarded by mu_: a bad answer found while reading.
};

// Drop: frees every stripe `worker` holds under `worker_sequence_id`.
void DropOnWorker(WorkerPool& pool, int worker, const std::string& worker_sequence_id,
                  std::chrono::milliseconds timeout, std::function<void(absl::Status)> done);

// Truncate: drops the tokens at positions >= end that `worker` holds for one layer under
// `worker_sequence_id` (and fences that layer's writes still in flight there).
void TruncateOnWorker(WorkerPool& pool, int worker, const std::string& worker_sequence_id,
                      int layer, int64_t end, std::chrono::milliseconds timeout,
                      std::function<void(absl::Status)> done);

// Retries the pending undo of `layer` (LayerState::undo), which the caller has claimed
// (BeginLayerCall): a Truncate(undo.end) on each worker that still owes one, each bounded by
// `timeout`. `done` gets OK at once when there is none, and OK when every worker confirmed (the
// undo is cleared and its bytes given back: the layer is as it was before the failed call);
// otherwise UNAVAILABLE naming the workers that did not (those that did are struck off the undo).
// From this thread or a gRPC thread.
void RetryPendingUndo(WorkerPool& pool, std::shared_ptr<SequenceState> seq, int layer,
                      std::chrono::milliseconds timeout, std::function<void(absl::Status)> done);

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_WORKER_CALLS_H_
