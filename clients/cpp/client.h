// C++ SDK of the DHSA attention service (proto/dhsa/v1/attention.proto): create a sequence, then
// per layer Prefill (any number of tokens, streamed in pieces below the message limit) and Decode
// (one token), Info and Release. Tensors are dhsa::Tensor: q [Hq, n, d], k and v [Hkv, n, d] in the
// sequence's dtype; o comes back float32 [Hq, n, d] and lse float32 [Hq, n].
//
//   absl::StatusOr<dhsa::Client> client = dhsa::Client::Connect("127.0.0.1:50051");
//   absl::StatusOr<dhsa::Sequence> seq = client->CreateSequence({.num_layers = 32, ...});
//   absl::StatusOr<dhsa::PrefillOutput> out = seq->Prefill(0, q, k, v, /*want_lse=*/false);
//
// Or on the caller's own buffers (plain pointers; nothing allocated or copied into tensors):
//
//   dhsa::TensorSpan q{dhsa::DType::kBF16, {32, n, 128}, q_ptr};  // k, v likewise.
//   absl::StatusOr<dhsa::CallResult> r = seq->PrefillInto(0, q, k, v, o_ptr);  // o: float32.
//
// Client and Sequence are cheap to copy (they share one channel) and safe to use from several
// threads; calls on one layer of one sequence must not overlap (FAILED_PRECONDITION).
#ifndef DHSA_CLIENTS_CPP_CLIENT_H_
#define DHSA_CLIENTS_CPP_CLIENT_H_

#include <grpcpp/channel.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "dhsa/v1/attention.grpc.pb.h"
#include "kernels/common/config.h"
#include "kernels/common/tensor.h"

namespace dhsa {

struct ClientOptions {
  // Deadline of each call (0: none). It propagates to the workers.
  std::chrono::milliseconds timeout{0};
  // Largest gRPC message either way; tensors travel in pieces below it (the server's default).
  int64_t max_message_bytes = 4 << 20;
  // Connect waits this long for the router to answer (0: connect lazily on the first call).
  std::chrono::milliseconds connect_timeout{10000};
  // TLS: a PEM CA bundle that verifies the router (TLS is on when set), a client certificate and
  // key for mutual TLS, and the name the router's certificate carries (default: the target host).
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_server_name;
  // Bearer token sent with every call (needs TLS), or a file whose first line is it.
  std::string token;
  std::string token_file;
  // Prefill tensors through shared memory when the router runs on the same host and offers it
  // (OpenSharedMemory): one memcpy each way instead of a stream of messages. Anything else (a
  // remote or older router, shared memory turned off there, a region that cannot be opened) uses
  // the stream, with the same results. Prefills under 1 MiB always stream.
  bool shared_memory = true;
};

struct SequenceOptions {
  std::string id;  // Empty: the server makes one.
  int num_layers = 1;
  int q_heads = 1;
  int kv_heads = 1;
  int head_dim = 64;
  DType dtype = DType::kF32;  // Of the Q, K, V sent and of the KV cache.
  // Parameters (policy, budget, ...); unset: the server's defaults.
  std::optional<DhsaConfig> config;
};

// A caller's tensor, read in place by PrefillInto and DecodeInto (nothing is copied into a
// dhsa::Tensor first): its dtype, its shape ([Hq, n, d] for q, [Hkv, n, d] for k and v) and the
// address of its product(shape) x DTypeSize(dtype) bytes, contiguous, row-major. A dhsa::Tensor
// converts to one (a view of its bytes); the memory must stay valid for the call.
struct TensorSpan {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;

  TensorSpan() = default;
  TensorSpan(DType dtype_in, std::vector<int64_t> shape_in, const void* data_in)
      : dtype(dtype_in), shape(std::move(shape_in)), data(data_in) {}
  TensorSpan(const Tensor& t)  // NOLINT(google-explicit-constructor): a view, as std::span.
      : dtype(t.dtype), shape(t.shape), data(t.data()) {}
};

// What PrefillInto and DecodeInto return besides the outputs they write.
struct CallResult {
  int64_t length = 0;  // Tokens stored in the layer after the call.
  v1::CallStats stats;
  bool shared_memory = false;  // The tensors went through shared memory (else gRPC messages).
};

// What one Prefill or Decode returns.
struct AttentionOutput {
  Tensor o;            // [Hq, n, d] float32.
  Tensor lse;          // [Hq, n] float32, when asked for (else empty).
  int64_t length = 0;  // Tokens stored in the layer after the call.
  v1::CallStats stats;
  bool shared_memory = false;  // The tensors went through shared memory (else gRPC messages).
};
using PrefillOutput = AttentionOutput;
using DecodeOutput = AttentionOutput;

namespace client_internal {
struct Connection;
}  // namespace client_internal

class Sequence {
 public:
  const std::string& id() const { return id_; }
  // Token capacity the service reported at creation, over all layers.
  int64_t capacity_tokens() const { return capacity_tokens_; }

  // Appends q.shape[1] tokens to `layer` and returns their attention output.
  absl::StatusOr<PrefillOutput> Prefill(int layer, const Tensor& q, const Tensor& k,
                                        const Tensor& v, bool want_lse = false) const;
  // Appends one token (q [Hq, 1, d], k and v [Hkv, 1, d]).
  absl::StatusOr<DecodeOutput> Decode(int layer, const Tensor& q, const Tensor& k, const Tensor& v,
                                      bool want_lse = false) const;

  // Prefill and Decode on the caller's buffers: q, k and v are read where they are, and o (float32
  // [Hq, n, d]: Hq x n x d floats) and, when `lse` is not null, lse (float32 [Hq, n]) are written
  // into the caller's memory, only when the call succeeds (on an error they are left as they
  // were). The same calls and results as Prefill and Decode, without their tensor copies and
  // allocations: for an engine that keeps its own activation buffers.
  absl::StatusOr<CallResult> PrefillInto(int layer, const TensorSpan& q, const TensorSpan& k,
                                         const TensorSpan& v, float* o, float* lse = nullptr) const;
  absl::StatusOr<CallResult> DecodeInto(int layer, const TensorSpan& q, const TensorSpan& k,
                                        const TensorSpan& v, float* o, float* lse = nullptr) const;
  absl::StatusOr<v1::SequenceInfo> Info() const;
  // Frees the KV cache; returns the bytes freed.
  absl::StatusOr<int64_t> Release() const;

 private:
  friend class Client;
  Sequence(std::shared_ptr<client_internal::Connection> connection, std::string id,
           int64_t capacity_tokens)
      : connection_(std::move(connection)), id_(std::move(id)), capacity_tokens_(capacity_tokens) {}

  absl::StatusOr<CallResult> PrefillStreamed(int layer, const TensorSpan& q, const TensorSpan& k,
                                             const TensorSpan& v, float* o, float* lse) const;

  std::shared_ptr<client_internal::Connection> connection_;
  std::string id_;
  int64_t capacity_tokens_ = 0;
};

class Client {
 public:
  // A client of the router at `target` ("host:port" or any gRPC target). UNAVAILABLE if the router
  // does not answer within options.connect_timeout.
  static absl::StatusOr<Client> Connect(const std::string& target,
                                        const ClientOptions& options = {});

  absl::StatusOr<Sequence> CreateSequence(const SequenceOptions& options) const;
  // A handle on an existing sequence (nothing is checked until it is used).
  Sequence Attach(const std::string& id) const;

  std::shared_ptr<grpc::Channel> channel() const;

 private:
  explicit Client(std::shared_ptr<client_internal::Connection> connection)
      : connection_(std::move(connection)) {}
  std::shared_ptr<client_internal::Connection> connection_;
};

}  // namespace dhsa

#endif  // DHSA_CLIENTS_CPP_CLIENT_H_
