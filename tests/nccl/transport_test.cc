// The data plane's parts that need no GPU: descriptors, the gRPC bytes transport, NCCL error
// mapping, configuration, the choice of transport and of the router's device, and the worker's
// JoinCommunicator / LeaveCommunicator / Stats without a usable device.
#include "services/transport/transport.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <random>

#include "services/common/config.h"
#include "services/transport/data_plane.h"
#include "services/transport/descriptor.h"
#include "services/transport/nccl_status.h"
#include "services/transport/options.h"
#include "services/worker/worker_service.h"

namespace dhsa::transport {
namespace {

TensorDescriptor Desc(std::vector<int64_t> shape, DType dtype = DType::kBF16) {
  TensorDescriptor d;
  d.name = "q";
  d.dtype = dtype;
  d.shape = std::move(shape);
  d.communicator_id = "router-x/w0/1";
  d.src_rank = 0;
  d.dst_rank = 1;
  d.transfer_id = 7;
  return d;
}

Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  Tensor t = Tensor::Uninitialized(dtype, std::move(shape));
  std::mt19937 rng(seed);
  for (auto& b : t.bytes) b = static_cast<uint8_t>(rng());
  return t;
}

TEST(Descriptor, RoundTripsThroughProto) {
  TensorDescriptor d = Desc({32, 1037, 128});
  v1::TensorDescriptor proto;
  DescriptorToProto(d, &proto);
  absl::StatusOr<TensorDescriptor> back = DescriptorFromProto(proto, int64_t{1} << 40);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->name, "q");
  EXPECT_EQ(back->dtype, DType::kBF16);
  EXPECT_EQ(back->shape, (std::vector<int64_t>{32, 1037, 128}));
  EXPECT_EQ(back->communicator_id, d.communicator_id);
  EXPECT_EQ(back->src_rank, 0);
  EXPECT_EQ(back->dst_rank, 1);
  EXPECT_EQ(back->transfer_id, 7u);
  EXPECT_EQ(back->ByteSize(), 32 * 1037 * 128 * 2);
}

TEST(Descriptor, RejectsBadFields) {
  const int64_t big = int64_t{1} << 40;
  auto code = [&](TensorDescriptor d, int64_t max = int64_t{1} << 40) {
    return ValidateDescriptor(d, max).code();
  };
  TensorDescriptor d = Desc({4, 5, 6});
  EXPECT_EQ(code(d), absl::StatusCode::kOk);
  d.name.clear();
  EXPECT_EQ(code(d), absl::StatusCode::kInvalidArgument);
  d = Desc({4, 5, 6});
  d.communicator_id.clear();
  EXPECT_EQ(code(d), absl::StatusCode::kInvalidArgument);
  d = Desc({4, 5, 6});
  d.dst_rank = 0;
  EXPECT_EQ(code(d), absl::StatusCode::kInvalidArgument);
  d = Desc({4, 5, 6});
  d.src_rank = -1;
  EXPECT_EQ(code(d), absl::StatusCode::kInvalidArgument);
  d = Desc({4, 5, 6});
  d.transfer_id = 0;
  EXPECT_EQ(code(d), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Desc({4, -5, 6})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Desc({int64_t{1} << 40, int64_t{1} << 40})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Desc({4, 5, 6}), 4 * 5 * 6 * 2 - 1), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(code(Desc({4, 5, 6}), 4 * 5 * 6 * 2), absl::StatusCode::kOk);
  v1::TensorDescriptor proto;
  DescriptorToProto(Desc({2}), &proto);
  proto.set_dtype(static_cast<v1::DType>(99));
  absl::StatusOr<TensorDescriptor> bad = DescriptorFromProto(proto, big);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'q'"), absl::string_view::npos) << bad.status();
}

// Send through pieces of every size (odd ones too), receive, compare bytes.
TEST(GrpcBytesTransport, MovesTensorsExactly) {
  for (const int64_t piece : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{1} << 20}) {
    for (const auto& shape : std::vector<std::vector<int64_t>>{{3, 5, 7}, {32, 97, 128}, {0, 4}}) {
      for (DType dtype : {DType::kBF16, DType::kF32}) {
        if (piece == 1 && shape[1] == 97) continue;  // 800k messages: slow, adds nothing.
        const Tensor t = RandomTensor(dtype, shape, static_cast<uint32_t>(piece + shape[1]));
        std::vector<v1::TensorPiece> wire;
        size_t next = 0;
        GrpcBytesTransport tr(
            piece, int64_t{1} << 30,
            [&](v1::TensorPiece&& p) {
              wire.push_back(std::move(p));
              return true;
            },
            [&]() -> std::optional<v1::TensorPiece> {
              if (next == wire.size()) return std::nullopt;
              return wire[next++];
            });
        TensorDescriptor d = Desc(shape, dtype);
        ASSERT_TRUE(tr.Send(d, t, absl::InfiniteFuture()).ok());
        absl::StatusOr<Tensor> got = tr.Recv(d, absl::InfiniteFuture());
        ASSERT_TRUE(got.ok()) << got.status();
        EXPECT_EQ(got->shape, t.shape);
        EXPECT_EQ(got->dtype, t.dtype);
        EXPECT_TRUE(got->bytes == t.bytes) << "piece " << piece;
      }
    }
  }
}

TEST(GrpcBytesTransport, ReportsMismatchesAndShortStreams) {
  const Tensor t = RandomTensor(DType::kBF16, {2, 3, 4}, 1);
  std::vector<v1::TensorPiece> wire;
  size_t next = 0;
  GrpcBytesTransport tr(
      5, 1 << 20,
      [&](v1::TensorPiece&& p) {
        wire.push_back(std::move(p));
        return true;
      },
      [&]() -> std::optional<v1::TensorPiece> {
        if (next == wire.size()) return std::nullopt;
        return wire[next++];
      });
  EXPECT_EQ(tr.Send(Desc({2, 3, 5}), t, absl::InfiniteFuture()).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(tr.Send(Desc({2, 3, 4}), t, absl::InfiniteFuture()).ok());
  // The receiver expects another shape.
  EXPECT_EQ(tr.Recv(Desc({2, 4, 3}), absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The stream ends early.
  wire.resize(2);
  next = 0;
  absl::StatusOr<Tensor> short_read = tr.Recv(Desc({2, 3, 4}), absl::InfiniteFuture());
  EXPECT_EQ(short_read.status().code(), absl::StatusCode::kInvalidArgument);
  // The stream is gone while sending.
  GrpcBytesTransport gone(
      5, 1 << 20, [](v1::TensorPiece&&) { return false; },
      []() -> std::optional<v1::TensorPiece> { return std::nullopt; });
  EXPECT_EQ(gone.Send(Desc({2, 3, 4}), t, absl::InfiniteFuture()).code(),
            absl::StatusCode::kUnavailable);
}

TEST(NcclStatus, MapsEveryCode) {
  struct Case {
    int code;
    absl::StatusCode want;
  };
  for (const Case& c : std::vector<Case>{{0, absl::StatusCode::kOk},
                                         {1, absl::StatusCode::kUnavailable},
                                         {2, absl::StatusCode::kUnavailable},
                                         {3, absl::StatusCode::kInternal},
                                         {4, absl::StatusCode::kInternal},
                                         {5, absl::StatusCode::kInternal},
                                         {6, absl::StatusCode::kUnavailable},
                                         {7, absl::StatusCode::kFailedPrecondition},
                                         {8, absl::StatusCode::kUnknown},
                                         {-3, absl::StatusCode::kUnknown}}) {
    const absl::Status s = StatusFromNcclCode(c.code, "ncclSend of 'q' to rank 1", "peer gone");
    EXPECT_EQ(s.code(), c.want) << c.code << ": " << s;
    if (!s.ok()) {
      EXPECT_NE(s.message().find("ncclSend of 'q' to rank 1"), absl::string_view::npos) << s;
      EXPECT_NE(s.message().find("peer gone"), absl::string_view::npos) << s;
    }
  }
  const absl::Status t = NcclTimeoutStatus("ncclRecv of 'o'", 2.5);
  EXPECT_EQ(t.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(t.message().find("2.5 s"), absl::string_view::npos) << t;
  EXPECT_NE(t.message().find("ncclCommAbort"), absl::string_view::npos) << t;
}

TEST(DataPlaneOptions, DefaultsAndChecks) {
  absl::StatusOr<DataPlaneOptions> d = DataPlaneOptionsFromProto(v1::DataPlaneConfig());
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->mode, Mode::kAuto);
  EXPECT_EQ(d->device, 0);
  EXPECT_TRUE(d->router_devices.empty());
  EXPECT_EQ(d->setup_timeout, absl::Seconds(30));
  EXPECT_EQ(d->transfer_timeout, absl::Seconds(60));

  v1::DataPlaneConfig c;
  c.set_transport("nccl");
  c.add_router_devices(1);
  c.add_router_devices(0);
  c.set_device(3);
  c.set_setup_timeout_seconds(2.5);
  c.set_transfer_timeout_seconds(0.25);
  d = DataPlaneOptionsFromProto(c);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->mode, Mode::kNccl);
  EXPECT_EQ(d->router_devices, (std::vector<int>{1, 0}));
  EXPECT_EQ(d->device, 3);
  EXPECT_EQ(d->setup_timeout, absl::Milliseconds(2500));
  EXPECT_EQ(d->transfer_timeout, absl::Milliseconds(250));

  auto bad = [](auto edit) {
    v1::DataPlaneConfig b;
    edit(b);
    return DataPlaneOptionsFromProto(b).status();
  };
  absl::Status s = bad([](v1::DataPlaneConfig& b) { b.set_transport("rdma"); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("rdma"), absl::string_view::npos) << s;
  EXPECT_EQ(bad([](v1::DataPlaneConfig& b) { b.set_device(-1); }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad([](v1::DataPlaneConfig& b) { b.add_router_devices(-2); }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad([](v1::DataPlaneConfig& b) { b.set_setup_timeout_seconds(-1); }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad([](v1::DataPlaneConfig& b) { b.set_transfer_timeout_seconds(NAN); }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(bad([](v1::DataPlaneConfig& b) { b.set_transport("grpc"); }).ok());
  EXPECT_TRUE(bad([](v1::DataPlaneConfig& b) { b.set_transport("auto"); }).ok());
}

TEST(DataPlaneOptions, ReadFromServiceConfigJson) {
  const std::string path = ::testing::TempDir() + "/data_plane_config.json";
  {
    std::ofstream f(path);
    f << R"({"dataPlane": {"transport": "grpc", "routerDevices": [1], "device": 1,
             "setupTimeoutSeconds": 5, "transferTimeoutSeconds": 7}})";
  }
  absl::StatusOr<v1::ServiceConfig> config = LoadServiceConfigJson(path);
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<DataPlaneOptions> d = DataPlaneOptionsFromProto(config->data_plane());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->mode, Mode::kGrpc);
  EXPECT_EQ(d->router_devices, std::vector<int>{1});
  EXPECT_EQ(d->device, 1);
  EXPECT_EQ(d->setup_timeout, absl::Seconds(5));
  EXPECT_EQ(d->transfer_timeout, absl::Seconds(7));
  std::remove(path.c_str());
}

TEST(ChooseTransport, NcclOnlyWhenEveryWorkerSharesAReadyCommunicator) {
  const std::vector<PeerState> all = {{"w0:1", true}, {"w1:1", true}};
  const std::vector<PeerState> one = {{"w0:1", true}, {"w1:1", false}};
  absl::StatusOr<TransportChoice> c = ChooseTransport(Mode::kAuto, true, all);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kNccl);
  EXPECT_STREQ(KindName(c->kind), "nccl");
  c = ChooseTransport(Mode::kAuto, true, one);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kGrpc);
  EXPECT_STREQ(KindName(c->kind), "grpc");
  EXPECT_NE(c->reason.find("w1:1"), std::string::npos) << c->reason;
  c = ChooseTransport(Mode::kAuto, false, all);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kGrpc);
  c = ChooseTransport(Mode::kGrpc, true, all);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kGrpc);
  EXPECT_EQ(ChooseTransport(Mode::kNccl, true, one).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(ChooseTransport(Mode::kNccl, false, all).status().code(),
            absl::StatusCode::kUnavailable);
  c = ChooseTransport(Mode::kNccl, true, all);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kNccl);
  EXPECT_EQ(ChooseTransport(Mode::kAuto, true, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChooseTransport, SharedMemoryWhenEveryWorkerSharesArenasAndNoCommunicator) {
  const std::vector<PeerState> shm = {{"w0:1", false, true}, {"w1:1", false, true}};
  const std::vector<PeerState> mixed = {{"w0:1", false, true}, {"w1:1", false, false}};
  const std::vector<PeerState> both = {{"w0:1", true, true}, {"w1:1", true, true}};
  absl::StatusOr<TransportChoice> c = ChooseTransport(Mode::kAuto, false, shm);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kShm);
  EXPECT_STREQ(KindName(c->kind), "shm");
  c = ChooseTransport(Mode::kAuto, true, shm);  // NCCL built, no communicator.
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kShm);
  c = ChooseTransport(Mode::kAuto, true, both);  // NCCL first.
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kNccl);
  c = ChooseTransport(Mode::kShm, true, both);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kShm);
  c = ChooseTransport(Mode::kAuto, false, mixed);  // One remote worker: gRPC for the call.
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kGrpc);
  EXPECT_NE(c->reason.find("w1:1"), std::string::npos) << c->reason;
  absl::Status s = ChooseTransport(Mode::kShm, false, mixed).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("w1:1"), absl::string_view::npos) << s;
  c = ChooseTransport(Mode::kGrpc, false, shm);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, Kind::kGrpc);
}

TEST(DataPlaneOptions, ShmTransportAndArenaSize) {
  v1::DataPlaneConfig c;
  c.set_transport("shm");
  absl::StatusOr<DataPlaneOptions> d = DataPlaneOptionsFromProto(c);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->mode, Mode::kShm);
  EXPECT_EQ(d->shm_arena_bytes, int64_t{1} << 30);
  c.set_shm_arena_bytes(int64_t{3} << 20);
  EXPECT_EQ(DataPlaneOptionsFromProto(c)->shm_arena_bytes, int64_t{3} << 20);
  c.set_shm_arena_bytes(4096);
  EXPECT_EQ(DataPlaneOptionsFromProto(c).status().code(), absl::StatusCode::kInvalidArgument);
  c.set_shm_arena_bytes(-1);
  EXPECT_EQ(DataPlaneOptionsFromProto(c).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PickRouterDevice, AvoidsTheWorkersDevice) {
  const std::vector<std::pair<int, std::string>> devs = {{0, "0000:19:00.0"}, {1, "0000:3b:00.0"}};
  EXPECT_EQ(*PickRouterDevice(devs, "0000:19:00.0"), 1);
  EXPECT_EQ(*PickRouterDevice(devs, "0000:3b:00.0"), 0);
  EXPECT_EQ(*PickRouterDevice(devs, "0000:aa:00.0"), 0);
  EXPECT_EQ(PickRouterDevice({{0, "0000:19:00.0"}}, "0000:19:00.0").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(PickRouterDevice({}, "x").status().code(), absl::StatusCode::kInvalidArgument);
}

// Without a CUDA device (CI) or without NCCL in the build, set-up fails at once, clearly.
TEST(NcclCommunicator, FailsCleanlyWithoutADevice) {
  if (NcclBuilt() && VisibleCudaDevices() > 0) GTEST_SKIP() << "this machine has a CUDA device";
  NcclCommunicator::Params p;
  p.id = "c";
  p.unique_id = std::string(128, '\0');
  absl::StatusOr<std::shared_ptr<NcclCommunicator>> c = NcclCommunicator::Create(p);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition) << c.status();
  if (!NcclBuilt()) {
    EXPECT_EQ(NewNcclUniqueId().status().code(), absl::StatusCode::kFailedPrecondition);
  }
}

TEST(NcclCommunicator, RejectsBadParams) {
  if (!NcclBuilt()) GTEST_SKIP() << "built without NCCL";
  NcclCommunicator::Params p;
  p.id = "c";
  p.unique_id = std::string(128, '\0');
  p.rank = 2;
  EXPECT_EQ(NcclCommunicator::Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.rank = 0;
  p.unique_id = "short";
  EXPECT_EQ(NcclCommunicator::Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.unique_id = std::string(128, '\0');
  p.id.clear();
  EXPECT_EQ(NcclCommunicator::Create(p).status().code(), absl::StatusCode::kInvalidArgument);
}

// The Worker service's control rpcs on a real gRPC server, with no usable device.
TEST(WorkerControl, JoinFailsCleanlyAndStatsListsNothing) {
  if (NcclBuilt() && VisibleCudaDevices() > 0) GTEST_SKIP() << "this machine has a CUDA device";
  WorkerService::Options options;
  options.capacity_bytes = 1 << 20;
  WorkerService service(options);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = v1::Worker::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));

  grpc::ClientContext join_context;
  v1::JoinCommunicatorRequest join;
  join.set_communicator_id("router/w0/1");
  join.set_nccl_unique_id(std::string(128, '\1'));
  join.set_num_ranks(2);
  join.set_rank(1);
  join.set_timeout_seconds(2);
  v1::JoinCommunicatorResponse joined;
  grpc::Status s = stub->JoinCommunicator(&join_context, join, &joined);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();

  grpc::ClientContext leave_context;
  v1::LeaveCommunicatorRequest leave;
  leave.set_communicator_id("router/w0/1");
  v1::LeaveCommunicatorResponse left;
  s = stub->LeaveCommunicator(&leave_context, leave, &left);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(left.found());

  grpc::ClientContext stats_context;
  v1::StatsResponse stats;
  s = stub->Stats(&stats_context, v1::StatsRequest(), &stats);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(stats.communicators_size(), 0);
  EXPECT_TRUE(stats.data_plane_device_pci_bus_id().empty());

  // The router's side sees no data plane on this worker and keeps gRPC.
  RouterDataPlane router(DataPlaneOptions{}, "router-test");
  absl::Status connect = router.Connect(0, "w0", stub.get());
  EXPECT_EQ(connect.code(), absl::StatusCode::kFailedPrecondition) << connect;
  absl::StatusOr<TransportChoice> choice = router.Choose({0});
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->kind, Kind::kGrpc);
  server->Shutdown();
}

}  // namespace
}  // namespace dhsa::transport
