// For the GPU test and the NCCL bench: the Worker service's data-plane rpcs (Stats' data-plane
// fields, JoinCommunicator, LeaveCommunicator) served by a WorkerDataPlane exactly as WorkerService
// delegates them, plus a StoreKv that only assembles the "k" and "v" pieces (the gRPC bytes path's
// receiving cost, without a KV store). Lets these binaries skip the worker library (and its CUDA
// kernels). WorkerService's own delegation is covered by transport_test.
#ifndef DHSA_TESTS_NCCL_CONTROL_SERVICE_H_
#define DHSA_TESTS_NCCL_CONTROL_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <optional>

#include "dhsa/v1/worker.grpc.pb.h"
#include "services/common/status.h"
#include "services/common/wire.h"
#include "services/transport/data_plane.h"

namespace dhsa::transport {

class ControlService final : public v1::Worker::CallbackService {
 public:
  explicit ControlService(const DataPlaneOptions& options) : data_plane_(options) {}

  WorkerDataPlane& data_plane() { return data_plane_; }

  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context, const v1::StatsRequest*,
                                  v1::StatsResponse* response) override {
    data_plane_.FillStats(response);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* JoinCommunicator(grpc::CallbackServerContext* context,
                                             const v1::JoinCommunicatorRequest* request,
                                             v1::JoinCommunicatorResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    data_plane_.JoinAsync(*request, [reactor, response](absl::StatusOr<v1::CommunicatorInfo> info) {
      if (info.ok()) *response->mutable_communicator() = *std::move(info);
      reactor->Finish(ToGrpcStatus(info.status()));
    });
    return reactor;
  }

  grpc::ServerUnaryReactor* LeaveCommunicator(grpc::CallbackServerContext* context,
                                              const v1::LeaveCommunicatorRequest* request,
                                              v1::LeaveCommunicatorResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    data_plane_.LeaveAsync(*request, [reactor, response](bool found) {
      response->set_found(found);
      reactor->Finish(grpc::Status::OK);
    });
    return reactor;
  }

  grpc::ServerReadReactor<v1::StoreKvRequest>* StoreKv(grpc::CallbackServerContext*,
                                                       v1::StoreKvResponse* response) override {
    class Reactor : public grpc::ServerReadReactor<v1::StoreKvRequest> {
     public:
      explicit Reactor(v1::StoreKvResponse* response) : response_(response) {
        StartRead(&request_);
      }
      void OnReadDone(bool ok) override {
        if (!ok) {
          absl::Status s = k_ && v_ ? absl::OkStatus() : absl::InvalidArgumentError("no header");
          if (s.ok()) s = k_->Take().status();
          if (s.ok()) s = v_->Take().status();
          response_->set_held_bytes(bytes_);
          Finish(ToGrpcStatus(s));
          return;
        }
        absl::Status s;
        if (request_.has_header()) {
          k_.emplace("k", int64_t{1} << 36);
          v_.emplace("v", int64_t{1} << 36);
        } else if (!k_) {
          s = absl::InvalidArgumentError("StoreKv must start with a header");
        } else {
          bytes_ += static_cast<int64_t>(request_.piece().data().size());
          s = k_->complete() ? v_->Add(request_.piece()) : k_->Add(request_.piece());
        }
        if (!s.ok()) {
          Finish(ToGrpcStatus(s));
          return;
        }
        StartRead(&request_);
      }
      void OnDone() override { delete this; }

     private:
      v1::StoreKvResponse* response_;
      v1::StoreKvRequest request_;
      std::optional<TensorAssembler> k_, v_;
      int64_t bytes_ = 0;
    };
    return new Reactor(response);
  }

 private:
  WorkerDataPlane data_plane_;
};

}  // namespace dhsa::transport

#endif  // DHSA_TESTS_NCCL_CONTROL_SERVICE_H_
