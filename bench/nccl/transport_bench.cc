// Bytes moved and GB/s per transport between a router and one worker on another GPU of the same
// host: NCCL device to device, NCCL from and to host memory (staged through the communicator's
// device), and gRPC bytes (a StoreKv stream of 4 MiB TensorPieces over loopback, assembled by
// TensorAssembler as a worker does, without its KV store: the service's data path today). Then the
// tensors of one layer's prefill at each --lengths (Hq 32, Hkv 8, d 128, bf16 q/k/v, float32 o/lse)
// moved each way over each transport. The communicator is set up as the service does it:
// JoinCommunicator over gRPC.
//
//   nccl_transport_bench [--reps 5] [--lengths 32768,131072] [--max_mib 1024]
#include <cuda_runtime.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "services/common/wire.h"
#include "services/transport/data_plane.h"
#include "services/transport/transport.h"
#include "tests/nccl/control_service.h"

namespace dhsa::transport {
namespace {

struct Flags {
  int reps = 5;
  std::vector<int64_t> lengths = {32768, 131072};
  int64_t max_mib = 1024;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void Die(const absl::Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
  std::exit(1);
}

class Bench {
 public:
  explicit Bench(const Flags& f) : flags_(f) {}

  void SetUp() {
    DataPlaneOptions options;
    options.device = 1;
    service_ = std::make_unique<ControlService>(options);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.SetMaxReceiveMessageSize(8 << 20);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    if (!server_) Die(absl::UnavailableError("no server"), "worker");
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(8 << 20);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
    stub_ = v1::Worker::NewStub(grpc::CreateCustomChannel(
        absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials(), args));
    router_ = std::make_unique<RouterDataPlane>(DataPlaneOptions{}, "bench");
    const absl::Time start = absl::Now();
    Die(router_->Connect(0, "loopback", stub_.get()), "communicator set-up");
    std::printf("communicator set up over gRPC (JoinCommunicator) in %.3f s\n",
                absl::ToDoubleSeconds(absl::Now() - start));
    mine_ = router_->Communicator(0);
    theirs_ = service_->data_plane().Find(mine_->id());
    const v1::CommunicatorInfo a = mine_->Info(), b = theirs_->Info();
    std::printf("router rank %d on device %d (%s), worker rank %d on device %d (%s)\n", a.rank(),
                a.device(), a.device_pci_bus_id().c_str(), b.rank(), b.device(),
                b.device_pci_bus_id().c_str());
  }

  // Seconds of one NCCL transfer of `bytes` from the router to the worker (or back).
  double NcclOnce(int64_t bytes, bool device, bool to_worker, void* router_buf, void* worker_buf,
                  Tensor* router_host, Tensor* worker_host) {
    const uint64_t id = mine_->AllocateTransferId();
    const absl::Time deadline = absl::Now() + absl::Seconds(120);
    NcclCommunicator* sender = to_worker ? mine_.get() : theirs_.get();
    NcclCommunicator* receiver = to_worker ? theirs_.get() : mine_.get();
    const int to = to_worker ? 1 : 0, from = to_worker ? 0 : 1;
    void* sbuf = to_worker ? router_buf : worker_buf;
    void* rbuf = to_worker ? worker_buf : router_buf;
    Tensor* shost = to_worker ? router_host : worker_host;
    Tensor* rhost = to_worker ? worker_host : router_host;
    const absl::Time start = absl::Now();
    auto recv = std::async(std::launch::async, [&] {
      return device ? receiver->RecvDevice(id, rbuf, bytes, from, deadline, "bench recv")
                    : receiver->RecvHost(id, rhost->data(), bytes, from, deadline, "bench recv");
    });
    absl::Status s = device
                         ? sender->SendDevice(id, sbuf, bytes, to, deadline, "bench send")
                         : sender->SendHost(id, shost->data(), bytes, to, deadline, "bench send");
    Die(s, "send");
    Die(recv.get(), "recv");
    return absl::ToDoubleSeconds(absl::Now() - start);
  }

  // Seconds of one StoreKv of k and v, `bytes` in all, over loopback gRPC, assembled on arrival.
  double GrpcOnce(int64_t bytes, const Tensor& k) {
    const int64_t n = k.shape[1];
    const absl::Time start = absl::Now();
    grpc::ClientContext context;
    v1::StoreKvResponse response;
    std::unique_ptr<grpc::ClientWriter<v1::StoreKvRequest>> writer =
        stub_->StoreKv(&context, &response);
    v1::StoreKvRequest request;
    v1::StoreKvHeader* h = request.mutable_header();
    h->set_sequence_id("bench");
    h->set_layer(0);
    h->set_begin(0);
    h->set_num_tokens(n);
    h->set_kv_heads(static_cast<int32_t>(k.shape[0]));
    h->set_head_dim(static_cast<int32_t>(k.shape[2]));
    h->set_dtype(ToProtoDType(k.dtype));
    writer->Write(request);
    const int64_t piece = PieceBytesForMessageLimit(4 << 20);
    for (const char* name : {"k", "v"}) {
      Die(SendTensorPieces(k, name, piece,
                           [&](v1::TensorPiece&& p) {
                             *request.mutable_piece() = std::move(p);
                             return writer->Write(request);
                           }),
          "StoreKv pieces");
    }
    writer->WritesDone();
    grpc::Status s = writer->Finish();
    const double t = absl::ToDoubleSeconds(absl::Now() - start);
    if (!s.ok()) Die(absl::UnavailableError(s.error_message()), "StoreKv");
    if (2 * static_cast<int64_t>(k.bytes.size()) != bytes) Die(absl::InternalError("size"), "kv");
    return t;
  }

  // k of [8, n, 128] bf16 with 2 * bytes(k) == bytes (rounded down to whole tokens).
  static Tensor KvFor(int64_t bytes) {
    const int64_t n = std::max<int64_t>(1, bytes / (2 * 8 * 128 * 2));
    Tensor k = Tensor::Uninitialized(DType::kBF16, {8, n, 128});
    for (size_t i = 0; i < k.bytes.size(); i += 4096) k.bytes[i] = static_cast<uint8_t>(i >> 12);
    return k;
  }

  struct Row {
    double nccl_dev = 0, nccl_host = 0, grpc = 0;
  };

  // Median seconds of `bytes` each way over each transport.
  Row Measure(int64_t bytes, bool to_worker) {
    void* rbuf = nullptr;
    void* wbuf = nullptr;
    Die(cudaSetDevice(0) == cudaSuccess && cudaMalloc(&rbuf, bytes) == cudaSuccess
            ? absl::OkStatus()
            : absl::ResourceExhaustedError("cudaMalloc"),
        "router buffer");
    Die(cudaSetDevice(1) == cudaSuccess && cudaMalloc(&wbuf, bytes) == cudaSuccess
            ? absl::OkStatus()
            : absl::ResourceExhaustedError("cudaMalloc"),
        "worker buffer");
    Tensor rh = Tensor::Zeros(DType::kF32, {bytes / 4});
    Tensor wh = Tensor::Zeros(DType::kF32, {bytes / 4});
    Row r;
    std::vector<double> dev, host, grpc;
    for (int i = 0; i < flags_.reps + 1; ++i) {
      const double a = NcclOnce(bytes, true, to_worker, rbuf, wbuf, &rh, &wh);
      const double b = NcclOnce(bytes, false, to_worker, rbuf, wbuf, &rh, &wh);
      if (i == 0) continue;  // Warm-up (buffers, staging allocation).
      dev.push_back(a);
      host.push_back(b);
    }
    const Tensor k = KvFor(bytes);
    const int grpc_reps = bytes > (int64_t{256} << 20) ? 2 : flags_.reps;
    for (int i = 0; i < grpc_reps + 1; ++i) {
      const double g = GrpcOnce(2 * static_cast<int64_t>(k.bytes.size()), k);
      if (i > 0) grpc.push_back(g);
    }
    r.nccl_dev = Median(dev);
    r.nccl_host = Median(host);
    r.grpc = Median(grpc);
    (void)cudaSetDevice(0);
    (void)cudaFree(rbuf);
    (void)cudaSetDevice(1);
    (void)cudaFree(wbuf);
    return r;
  }

  static double Gbps(int64_t bytes, double s) { return static_cast<double>(bytes) / s / 1e9; }

  void Run() {
    std::printf(
        "\n== transfer microbenchmark, router (device 0 / host) -> worker (device 1 / "
        "host), median of %d\n",
        flags_.reps);
    std::printf("%10s | %22s | %22s | %22s\n", "bytes", "nccl device->device", "nccl host->host",
                "grpc StoreKv loopback");
    for (int64_t mib = 1; mib <= flags_.max_mib; mib *= 4) {
      const int64_t bytes = mib << 20;
      const Row r = Measure(bytes, true);
      std::printf("%10lld | %9.3f ms %6.1f GB/s | %9.3f ms %6.1f GB/s | %9.3f ms %6.2f GB/s\n",
                  static_cast<long long>(bytes), r.nccl_dev * 1e3, Gbps(bytes, r.nccl_dev),
                  r.nccl_host * 1e3, Gbps(bytes, r.nccl_host), r.grpc * 1e3, Gbps(bytes, r.grpc));
      std::fflush(stdout);
    }
    std::printf(
        "\n== one prefill layer's tensors (Hq 32, Hkv 8, d 128; q/k/v bf16, o/lse f32), "
        "one worker holding all keys\n");
    for (int64_t len : flags_.lengths) {
      const int64_t in = (32 + 8 + 8) * len * 128 * 2;        // q, k, v to the worker.
      const int64_t out = 32 * len * 128 * 4 + 32 * len * 4;  // o, lse back.
      const Row a = Measure(in, true);
      const Row b = Measure(out, false);
      std::printf("L=%lld: to worker %lld B, back %lld B\n", static_cast<long long>(len),
                  static_cast<long long>(in), static_cast<long long>(out));
      std::printf("  nccl device : %8.3f ms (%.1f GB/s to, %.1f GB/s back)\n",
                  (a.nccl_dev + b.nccl_dev) * 1e3, Gbps(in, a.nccl_dev), Gbps(out, b.nccl_dev));
      std::printf("  nccl host   : %8.3f ms (%.1f GB/s to, %.1f GB/s back)\n",
                  (a.nccl_host + b.nccl_host) * 1e3, Gbps(in, a.nccl_host), Gbps(out, b.nccl_host));
      std::printf("  grpc bytes  : %8.3f ms (%.2f GB/s; StoreKv streams of the same byte counts)\n",
                  (a.grpc + b.grpc) * 1e3, Gbps(in + out, a.grpc + b.grpc));
      std::fflush(stdout);
    }
  }

  void TearDown() {
    mine_.reset();
    theirs_.reset();
    router_.reset();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    service_.reset();
  }

 private:
  Flags flags_;
  std::unique_ptr<ControlService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Worker::Stub> stub_;
  std::unique_ptr<RouterDataPlane> router_;
  std::shared_ptr<NcclCommunicator> mine_, theirs_;
};

}  // namespace
}  // namespace dhsa::transport

int main(int argc, char** argv) {
  dhsa::transport::Flags f;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--reps") {
      f.reps = std::atoi(v.c_str());
    } else if (k == "--max_mib") {
      f.max_mib = std::atoll(v.c_str());
    } else if (k == "--lengths") {
      f.lengths.clear();
      for (absl::string_view s : absl::StrSplit(v, ',')) {
        int64_t n = 0;
        if (absl::SimpleAtoi(s, &n)) f.lengths.push_back(n);
      }
    } else {
      std::fprintf(stderr, "unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  if (dhsa::transport::VisibleCudaDevices() < 2) {
    std::fprintf(stderr, "needs 2 CUDA devices; %d visible\n",
                 dhsa::transport::VisibleCudaDevices());
    return 1;
  }
  dhsa::transport::Bench bench(f);
  bench.SetUp();
  bench.Run();
  bench.TearDown();
  return 0;
}
