// The NCCL data plane on two CUDA devices (labels gpu, nccl; skipped on fewer): a worker joins a
// communicator with the router through the Worker gRPC service (unique id carried in
// JoinCommunicator), tensors move both ways over NCCL (host and device memory, odd sizes) and
// arrive byte for byte as over the gRPC bytes transport, and every failure is bounded: a transfer
// the peer never matches fails UNAVAILABLE by its deadline, a lost worker's communicator is aborted
// under a waiting transfer, later transfers fail at once.
#include <cuda_runtime.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>

#include <future>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "services/transport/data_plane.h"
#include "services/transport/transport.h"
#include "tests/nccl/control_service.h"

namespace dhsa::transport {
namespace {

Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  Tensor t = Tensor::Uninitialized(dtype, std::move(shape));
  std::mt19937 rng(seed);
  for (auto& b : t.bytes) b = static_cast<uint8_t>(rng());
  return t;
}

// A worker's data-plane rpcs (tests/nccl/control_service.h) with its data plane on device 1, served
// on loopback; a router data plane connected to it (router rank 0 on device 0).
class NcclPair : public ::testing::Test {
 protected:
  void SetUp() override {
    if (VisibleCudaDevices() < 2) GTEST_SKIP() << "needs 2 CUDA devices";
    DataPlaneOptions options;
    options.device = 1;
    options.setup_timeout = absl::Seconds(60);
    service_ = std::make_unique<ControlService>(options);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    address_ = absl::StrCat("127.0.0.1:", port);
    stub_ = v1::Worker::NewStub(grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
    DataPlaneOptions router_options;
    router_options.setup_timeout = absl::Seconds(60);
    router_ = std::make_unique<RouterDataPlane>(router_options, "router-test");
    const absl::Time start = absl::Now();
    const absl::Status s = router_->Connect(0, address_, stub_.get());
    ASSERT_TRUE(s.ok()) << s;
    std::printf("communicator set up in %.3f s\n", absl::ToDoubleSeconds(absl::Now() - start));
    mine_ = router_->Communicator(0);
    ASSERT_NE(mine_, nullptr);
    theirs_ = service_->data_plane().Find(mine_->id());
    ASSERT_NE(theirs_, nullptr);
  }

  void TearDown() override {
    mine_.reset();
    theirs_.reset();
    router_.reset();
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    service_.reset();
  }

  std::unique_ptr<ControlService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  std::unique_ptr<v1::Worker::Stub> stub_;
  std::unique_ptr<RouterDataPlane> router_;
  std::shared_ptr<NcclCommunicator> mine_, theirs_;
};

TEST_F(NcclPair, SetUpIsVisibleInStatsAndChoice) {
  EXPECT_EQ(mine_->rank(), 0);
  EXPECT_EQ(mine_->device(), 0);
  EXPECT_EQ(theirs_->rank(), 1);
  EXPECT_EQ(theirs_->device(), 1);
  grpc::ClientContext context;
  v1::StatsResponse stats;
  ASSERT_TRUE(stub_->Stats(&context, v1::StatsRequest(), &stats).ok());
  ASSERT_EQ(stats.communicators_size(), 1);
  const v1::CommunicatorInfo& info = stats.communicators(0);
  EXPECT_EQ(info.communicator_id(), mine_->id());
  EXPECT_EQ(info.state(), "ready");
  EXPECT_EQ(info.rank(), 1);
  EXPECT_EQ(info.num_ranks(), 2);
  EXPECT_EQ(info.device(), 1);
  EXPECT_FALSE(info.device_pci_bus_id().empty());
  EXPECT_EQ(info.device_pci_bus_id(), stats.data_plane_device_pci_bus_id());
  absl::StatusOr<TransportChoice> choice = router_->Choose({0});
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->kind, Kind::kNccl) << choice->reason;
  EXPECT_EQ(router_->Choose({0, 1})->kind, Kind::kGrpc);  // Worker 1 has no communicator.
}

// q, k, v router -> worker, o and lse back, host memory, odd sizes; compared byte for byte with
// the original and with the gRPC bytes transport's copy.
TEST_F(NcclPair, HostTensorsArriveExactlyBothWays) {
  NcclTransport router(mine_, int64_t{1} << 34);
  NcclTransport worker(theirs_, int64_t{1} << 34);
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  uint32_t seed = 1;
  for (int64_t rows : {int64_t{1}, int64_t{37}, int64_t{1037}, int64_t{4099}}) {
    std::vector<std::pair<std::string, Tensor>> out = {
        {"q", RandomTensor(DType::kBF16, {32, rows, 128}, seed++)},
        {"k", RandomTensor(DType::kBF16, {8, rows, 128}, seed++)},
        {"v", RandomTensor(DType::kF16, {8, rows, 64}, seed++)}};
    for (auto& [name, t] : out) {
      const TensorDescriptor d = DescribeForSend(*mine_, name, t, 1);
      // The descriptor survives the proto (what travels over gRPC).
      v1::TensorDescriptor proto;
      DescriptorToProto(d, &proto);
      absl::StatusOr<TensorDescriptor> wd = DescriptorFromProto(proto, int64_t{1} << 34);
      ASSERT_TRUE(wd.ok()) << wd.status();
      auto recv = std::async(std::launch::async, [&] { return worker.Recv(*wd, deadline); });
      ASSERT_TRUE(router.Send(d, t, deadline).ok());
      absl::StatusOr<Tensor> got = recv.get();
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_TRUE(got->bytes == t.bytes) << name << " rows " << rows;
      // The same tensor through the gRPC bytes transport.
      std::vector<v1::TensorPiece> wire;
      size_t next = 0;
      GrpcBytesTransport grpc_bytes(
          4 << 20, int64_t{1} << 34,
          [&](v1::TensorPiece&& p) {
            wire.push_back(std::move(p));
            return true;
          },
          [&]() -> std::optional<v1::TensorPiece> {
            if (next == wire.size()) return std::nullopt;
            return wire[next++];
          });
      ASSERT_TRUE(grpc_bytes.Send(d, t, deadline).ok());
      absl::StatusOr<Tensor> via_grpc = grpc_bytes.Recv(d, deadline);
      ASSERT_TRUE(via_grpc.ok());
      EXPECT_TRUE(via_grpc->bytes == got->bytes);
    }
    // o and lse back: the worker sends, with ids the router numbered.
    const Tensor o = RandomTensor(DType::kF32, {32, rows, 128}, seed++);
    const Tensor lse = RandomTensor(DType::kF32, {32, rows}, seed++);
    TensorDescriptor od = DescribeForSend(*mine_, "o", o, 1);
    std::swap(od.src_rank, od.dst_rank);
    TensorDescriptor ld = DescribeForSend(*mine_, "lse", lse, 1);
    std::swap(ld.src_rank, ld.dst_rank);
    auto send = std::async(std::launch::async, [&] {
      absl::Status s = worker.Send(od, o, deadline);
      return s.ok() ? worker.Send(ld, lse, deadline) : s;
    });
    absl::StatusOr<Tensor> got_o = router.Recv(od, deadline);
    absl::StatusOr<Tensor> got_lse = router.Recv(ld, deadline);
    ASSERT_TRUE(send.get().ok());
    ASSERT_TRUE(got_o.ok()) << got_o.status();
    ASSERT_TRUE(got_lse.ok()) << got_lse.status();
    EXPECT_TRUE(got_o->bytes == o.bytes);
    EXPECT_TRUE(got_lse->bytes == lse.bytes);
  }
  EXPECT_GT(theirs_->Info().bytes_received(), 0);
  EXPECT_EQ(theirs_->Info().bytes_received(), mine_->Info().bytes_sent());
}

// Device memory to device memory, and receives issued out of order by two threads.
TEST_F(NcclPair, DeviceTensorsAndOutOfOrderIssue) {
  NcclTransport router(mine_, int64_t{1} << 34);
  NcclTransport worker(theirs_, int64_t{1} << 34);
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  const Tensor a = RandomTensor(DType::kBF16, {8, 4099, 128}, 11);
  const Tensor b = RandomTensor(DType::kBF16, {3, 5, 7}, 12);
  void* src[2];
  void* dst[2];
  const Tensor* t[2] = {&a, &b};
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&src[i], t[i]->bytes.size()), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(src[i], t[i]->data(), t[i]->bytes.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dst[i], t[i]->bytes.size()), cudaSuccess);
  }
  const TensorDescriptor da = DescribeForSend(*mine_, "k", a, 1);
  const TensorDescriptor db = DescribeForSend(*mine_, "v", b, 1);
  // The worker's receive of the second transfer is issued first: it waits for its turn.
  auto second =
      std::async(std::launch::async, [&] { return worker.RecvDevice(db, dst[1], deadline); });
  absl::SleepFor(absl::Milliseconds(50));
  auto first =
      std::async(std::launch::async, [&] { return worker.RecvDevice(da, dst[0], deadline); });
  ASSERT_TRUE(router.SendDevice(da, src[0], deadline).ok());
  ASSERT_TRUE(router.SendDevice(db, src[1], deadline).ok());
  ASSERT_TRUE(first.get().ok());
  ASSERT_TRUE(second.get().ok());
  for (int i = 0; i < 2; ++i) {
    Tensor back = Tensor::Uninitialized(t[i]->dtype, t[i]->shape);
    ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(back.data(), dst[i], back.bytes.size(), cudaMemcpyDeviceToHost),
              cudaSuccess);
    EXPECT_TRUE(back.bytes == t[i]->bytes) << i;
    (void)cudaFree(dst[i]);
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    (void)cudaFree(src[i]);
  }
}

// The worker never posts the receive: the send fails UNAVAILABLE by its deadline, the
// communicator is aborted, the next transfer fails at once, and the router falls back to gRPC.
TEST_F(NcclPair, UnmatchedSendEndsByItsDeadline) {
  NcclTransport router(mine_, int64_t{1} << 34);
  const Tensor t = RandomTensor(DType::kBF16, {32, 4099, 128}, 5);
  const TensorDescriptor d = DescribeForSend(*mine_, "q", t, 1);
  const absl::Time start = absl::Now();
  const absl::Status s = router.Send(d, t, start + absl::Seconds(2));
  const double took = absl::ToDoubleSeconds(absl::Now() - start);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_LT(took, 10.0) << s;
  std::printf("unmatched send ended after %.3f s: %s\n", took, std::string(s.message()).c_str());
  EXPECT_FALSE(mine_->ready());
  EXPECT_EQ(mine_->Info().state(), "failed");
  const TensorDescriptor d2 = DescribeForSend(*mine_, "q", t, 1);
  const absl::Time again = absl::Now();
  EXPECT_EQ(router.Send(d2, t, again + absl::Seconds(30)).code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(absl::ToDoubleSeconds(absl::Now() - again), 1.0);
  EXPECT_EQ(router_->Choose({0})->kind, Kind::kGrpc);
  // The worker's side is told to abort (as the router does on a failure).
  grpc::ClientContext context;
  v1::LeaveCommunicatorRequest leave;
  leave.set_communicator_id(mine_->id());
  leave.set_abort(true);
  v1::LeaveCommunicatorResponse left;
  ASSERT_TRUE(stub_->LeaveCommunicator(&context, leave, &left).ok());
  EXPECT_TRUE(left.found());
  EXPECT_EQ(theirs_->Info().state(), "failed");
}

// The router loses the worker while a receive from it waits: the receive ends UNAVAILABLE long
// before its deadline, and the communicator is forgotten (gRPC from then on).
TEST_F(NcclPair, WorkerLostAbortsAWaitingReceive) {
  NcclTransport router(mine_, int64_t{1} << 34);
  TensorDescriptor d;
  d.name = "o";
  d.dtype = DType::kF32;
  d.shape = {32, 1037, 128};
  d.communicator_id = mine_->id();
  d.src_rank = 1;
  d.dst_rank = 0;
  d.transfer_id = mine_->AllocateTransferId();
  const absl::Time start = absl::Now();
  auto recv =
      std::async(std::launch::async, [&] { return router.Recv(d, start + absl::Seconds(60)); });
  absl::SleepFor(absl::Milliseconds(300));
  router_->WorkerLost(0, "worker 127.0.0.1 stopped answering health checks");
  absl::StatusOr<Tensor> got = recv.get();
  const double took = absl::ToDoubleSeconds(absl::Now() - start);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
  EXPECT_LT(took, 10.0);
  std::printf("receive ended %.3f s after start: %s\n", took,
              std::string(got.status().message()).c_str());
  EXPECT_EQ(router_->Communicator(0), nullptr);
  EXPECT_EQ(router_->Choose({0})->kind, Kind::kGrpc);
  theirs_->Abort("test over");
}

// An orderly leave on both sides, then Stats shows the communicator "left".
TEST_F(NcclPair, LeaveEndsBothSides) {
  auto worker_leave = std::async(std::launch::async, [&] {
    grpc::ClientContext context;
    v1::LeaveCommunicatorRequest leave;
    leave.set_communicator_id(mine_->id());
    v1::LeaveCommunicatorResponse left;
    return stub_->LeaveCommunicator(&context, leave, &left).ok() && left.found();
  });
  const absl::Status s = mine_->Leave(absl::Seconds(20));
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_TRUE(worker_leave.get());
  grpc::ClientContext context;
  v1::StatsResponse stats;
  ASSERT_TRUE(stub_->Stats(&context, v1::StatsRequest(), &stats).ok());
  ASSERT_EQ(stats.communicators_size(), 1);
  // The worker's leave runs on its own thread; it is bounded by 10 s.
  for (int i = 0; i < 200 && stats.communicators(0).state() == "ready"; ++i) {
    absl::SleepFor(absl::Milliseconds(100));
    grpc::ClientContext again;
    stats.Clear();
    ASSERT_TRUE(stub_->Stats(&again, v1::StatsRequest(), &stats).ok());
  }
  EXPECT_TRUE(stats.communicators(0).state() == "left" ||
              stats.communicators(0).state() == "failed")
      << stats.communicators(0).state();
  EXPECT_EQ(mine_->Info().state(), "left");
}

}  // namespace
}  // namespace dhsa::transport
