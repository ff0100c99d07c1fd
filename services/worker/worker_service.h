// The Worker gRPC service (proto/dhsa/v1/worker.proto) on the callback API: StoreKv and Attend are
// reactors that read and write on gRPC threads and run attention on the service's executor.
#ifndef DHSA_SERVICES_WORKER_WORKER_SERVICE_H_
#define DHSA_SERVICES_WORKER_WORKER_SERVICE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "dhsa/v1/worker.grpc.pb.h"
#include "services/common/executor.h"
#include "services/transport/data_plane.h"
#include "services/transport/shm_arena.h"
#include "services/worker/backend.h"
#include "services/worker/kv_store.h"

namespace dhsa {

class WorkerService final : public v1::Worker::CallbackService {
 public:
  struct Options {
    int64_t capacity_bytes = 0;     // KV bytes accepted in all.
    int threads = 1;                // Executor threads (attention jobs and their kernel threads).
    int64_t max_message_bytes = 0;  // Message limit; response tensors go in pieces below it.
    std::string backend = "cpu";    // Metrics label (Stats reports the backend object's name).
    // Test only (WorkerOptions::test_attend_stall): every Attend waits this long on the executor,
    // or until it is cancelled, before it computes.
    absl::Duration test_attend_stall = absl::ZeroDuration();
    // NCCL communicators with the router (JoinCommunicator; services/transport).
    transport::DataPlaneOptions data_plane;
  };

  // Stripes and attention on `backend` (the CPU backend when null).
  WorkerService(const Options& options, std::unique_ptr<WorkerBackend> backend = nullptr);
  // Runs the attention jobs still queued; the gRPC server must be shut down first.
  ~WorkerService() override;

  grpc::ServerReadReactor<v1::StoreKvRequest>* StoreKv(grpc::CallbackServerContext* context,
                                                       v1::StoreKvResponse* response) override;
  grpc::ServerBidiReactor<v1::AttendRequest, v1::AttendResponse>* Attend(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* Drop(grpc::CallbackServerContext* context,
                                 const v1::DropRequest* request,
                                 v1::DropResponse* response) override;
  grpc::ServerUnaryReactor* Truncate(grpc::CallbackServerContext* context,
                                     const v1::TruncateRequest* request,
                                     v1::TruncateResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context,
                                  const v1::StatsRequest* request,
                                  v1::StatsResponse* response) override;
  grpc::ServerUnaryReactor* JoinCommunicator(grpc::CallbackServerContext* context,
                                             const v1::JoinCommunicatorRequest* request,
                                             v1::JoinCommunicatorResponse* response) override;
  grpc::ServerUnaryReactor* LeaveCommunicator(grpc::CallbackServerContext* context,
                                              const v1::LeaveCommunicatorRequest* request,
                                              v1::LeaveCommunicatorResponse* response) override;
  grpc::ServerUnaryReactor* AttachArena(grpc::CallbackServerContext* context,
                                        const v1::AttachArenaRequest* request,
                                        v1::AttachArenaResponse* response) override;
  grpc::ServerUnaryReactor* DetachArena(grpc::CallbackServerContext* context,
                                        const v1::DetachArenaRequest* request,
                                        v1::DetachArenaResponse* response) override;
  // The shared-memory arenas routers attached.
  transport::ShmPeerArenas& arenas() { return arenas_; }
  // The worker's NCCL communicators (the data plane reads tensors through them).
  transport::WorkerDataPlane& data_plane() { return data_plane_; }

 private:
  class StoreKvReactor;
  class AttendReactor;
  class BufferPool;

  const Options options_;
  const std::unique_ptr<WorkerBackend> backend_;
  KvStore store_;
  transport::ShmPeerArenas arenas_;
  std::unique_ptr<BufferPool> buffers_;  // Before executor_: its jobs give buffers back.
  Executor executor_;
  transport::WorkerDataPlane data_plane_;
};

}  // namespace dhsa

#endif  // DHSA_SERVICES_WORKER_WORKER_SERVICE_H_
