// Shared pieces of the router's end-to-end tests: an embedded service with a client, inputs, the
// in-process reference, and comparisons.
#ifndef DHSA_TESTS_ROUTER_SERVICE_TEST_UTIL_H_
#define DHSA_TESTS_ROUTER_SERVICE_TEST_UTIL_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

#include <algorithm>
#include <cmath>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "clients/cpp/client.h"
#include "gtest/gtest.h"
#include "kernels/dhsa.h"
#include "services/common/tsan_annotations.h"
#include "services/router/embedded.h"
#include "tests/kernels/test_util.h"

namespace dhsa::router_test {

// Rows [begin, end) of the middle axis of a [heads, len, dim] tensor (any dtype).
inline Tensor Rows(const Tensor& t, int64_t begin, int64_t end) {
  const int64_t heads = t.shape[0], len = t.shape[1], dim = t.shape[2];
  const size_t row = static_cast<size_t>(dim) * DTypeSize(t.dtype);
  Tensor out = Tensor::Zeros(t.dtype, {heads, end - begin, dim});
  for (int64_t h = 0; h < heads; ++h) {
    std::copy_n(t.bytes.data() + (h * len + begin) * row, (end - begin) * row,
                out.bytes.data() + h * (end - begin) * row);
  }
  return out;
}

// Q (Gaussian), K (topic segments, so that chunks differ) and V (Gaussian) for `len` positions.
struct Inputs {
  Tensor q, k, v;
};
inline Inputs MakeInputs(std::mt19937_64& rng, int64_t hq, int64_t hkv, int64_t len, int64_t dim,
                         DType dtype = DType::kF32) {
  Inputs in;
  in.q = testing::RandomTensor(rng, hq, len, dim).ConvertTo(dtype);
  in.k = testing::SegmentedTensor(rng, hkv, len, dim).ConvertTo(dtype);
  in.v = testing::RandomTensor(rng, hkv, len, dim).ConvertTo(dtype);
  return in;
}

// Small-model parameters under which every policy is sparse past a few hundred keys.
// The spec's method (preset paper) on a small structure; tests add the mass score where they mean
// it.
inline DhsaConfig SmallConfig(Policy policy) {
  DhsaConfig c = PaperConfig();
  c.policy = policy;
  c.budget = 256;
  c.sink = 16;
  c.local = 64;
  c.q_block = 32;
  c.block = 32;
  return c;
}

// The service's o and lse equal the reference's: max |diff| <= 1e-4 * max |o_ref| (and the same
// rule for lse against max(1, max |lse_ref|)).
inline void ExpectMatches(const AttentionOutput& got, const AttendResult& want, bool with_lse,
                          const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(got.o.shape, want.o.shape);
  double max_o = 0, diff_o = 0;
  for (int64_t i = 0; i < want.o.NumElements(); ++i) {
    max_o = std::max(max_o, std::abs(static_cast<double>(want.o.Get(i))));
    diff_o = std::max(diff_o, std::abs(static_cast<double>(got.o.Get(i)) - want.o.Get(i)));
  }
  EXPECT_LE(diff_o, 1e-4 * max_o) << "max |o| " << max_o;
  if (!with_lse) return;
  ASSERT_EQ(got.lse.shape, want.lse.shape);
  double max_l = 1, diff_l = 0;
  for (int64_t i = 0; i < want.lse.NumElements(); ++i) {
    max_l = std::max(max_l, std::abs(static_cast<double>(want.lse.Get(i))));
    diff_l = std::max(diff_l, std::abs(static_cast<double>(got.lse.Get(i)) - want.lse.Get(i)));
  }
  EXPECT_LE(diff_l, 1e-4 * max_l);
}

// An embedded router with `workers` workers and a client of it.
struct Harness {
  std::unique_ptr<EmbeddedService> service;
  std::unique_ptr<Client> client;

  static Harness Start(int workers, int64_t stripe_tokens, int64_t capacity_per_worker = 0,
                       std::chrono::milliseconds probe_interval = std::chrono::milliseconds(200)) {
    EmbeddedOptions options;
    options.num_workers = workers;
    options.stripe_tokens = stripe_tokens;
    options.threads = 2;
    options.capacity_bytes_per_worker =
        capacity_per_worker > 0 ? capacity_per_worker : int64_t{256} << 20;
    options.probe_interval = probe_interval;
    Harness h;
    absl::StatusOr<std::unique_ptr<EmbeddedService>> service = EmbeddedService::Start(options);
    EXPECT_TRUE(service.ok()) << service.status();
    if (!service.ok()) return h;
    h.service = *std::move(service);
    absl::StatusOr<Client> client = Client::Connect(h.service->router_address());
    EXPECT_TRUE(client.ok()) << client.status();
    if (client.ok()) h.client = std::make_unique<Client>(*std::move(client));
    return h;
  }

  // A second client of the same router that streams every tensor (no shared memory).
  absl::StatusOr<Client> StreamedClient() const {
    ClientOptions options;
    options.shared_memory = false;
    return Client::Connect(service->router_address(), options);
  }

  Sequence Create(const DhsaConfig& config, int layers, int hq, int hkv, int dim,
                  DType dtype = DType::kF32, const std::string& id = "") {
    SequenceOptions o;
    o.id = id;
    o.num_layers = layers;
    o.q_heads = hq;
    o.kv_heads = hkv;
    o.head_dim = dim;
    o.dtype = dtype;
    o.config = config;
    absl::StatusOr<Sequence> seq = client->CreateSequence(o);
    EXPECT_TRUE(seq.ok()) << seq.status();
    return seq.ok() ? *std::move(seq) : client->Attach("missing");
  }
};

// grpc.health.v1 Check of `service` over a generic stub (the health protos are not installed):
// 1 SERVING, 2 NOT_SERVING, -1 when the call fails.
inline int HealthStatus(const std::shared_ptr<grpc::Channel>& channel, const std::string& service) {
  grpc::GenericStub stub(channel);
  std::string request_bytes = std::string(1, '\x0a') + static_cast<char>(service.size()) + service;
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  std::promise<grpc::Status> done;
  DHSA_HAPPENS_BEFORE(&done);  // gRPC runs the callback on its thread.
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   DHSA_HAPPENS_AFTER(&done);
                   done.set_value(std::move(s));
                 });
  if (!done.get_future().get().ok()) return -1;
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return -1;
  std::string bytes;
  for (const grpc::Slice& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes.size() == 2 && bytes[0] == '\x08' ? bytes[1] : 0;
}

}  // namespace dhsa::router_test

#endif  // DHSA_TESTS_ROUTER_SERVICE_TEST_UTIL_H_
