#include "clients/cpp/client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "services/common/config.h"
#include "services/common/server.h"
#include "services/common/shared_region.h"
#include "services/common/status.h"
#include "services/common/wire.h"
#include "services/transport/shm_copy.h"

namespace dhsa {
namespace client_internal {

// A shared-memory region of the router, mapped here (OpenSharedMemory).
struct Region {
  std::string id;
  std::unique_ptr<SharedRegion> memory;
  bool busy = false;  // A call is using it.
};

struct Connection {
  std::string target;
  ClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Attention::Stub> stub;

  // Shared memory: at most kMaxRegions regions, each used by one call at a time.
  static constexpr int kMaxRegions = 2;
  std::mutex mu;
  std::vector<std::unique_ptr<Region>> regions;  // Guarded by mu.
  bool shm_off = false;  // The router refused for good, or its regions cannot be mapped here.

  ~Connection() {
    for (const auto& region : regions) CloseAtRouter(region->id);
  }

  // Tells the router a region is no longer wanted (best effort: it also closes idle ones).
  void CloseAtRouter(const std::string& id) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
    v1::CloseSharedMemoryRequest request;
    request.set_region_id(id);
    v1::CloseSharedMemoryResponse response;
    (void)stub->CloseSharedMemory(&context, request, &response);
  }

  // A free region of at least `bytes` data bytes, marked busy; nullptr: stream this call.
  Region* AcquireRegion(int64_t bytes) {
    std::string too_small;  // A free region to replace by a larger one.
    {
      std::lock_guard<std::mutex> lock(mu);
      if (shm_off) return nullptr;
      for (const auto& region : regions) {
        if (!region->busy && region->memory->size() >= bytes) {
          region->busy = true;
          return region.get();
        }
      }
      if (static_cast<int>(regions.size()) >= kMaxRegions) {
        for (auto it = regions.begin(); it != regions.end(); ++it) {
          if (!(*it)->busy) {
            too_small = (*it)->id;
            regions.erase(it);
            break;
          }
        }
        if (too_small.empty()) return nullptr;  // All in use: stream.
      }
    }
    if (!too_small.empty()) CloseAtRouter(too_small);
    // Sizes in steps of 64 MiB, so that the layers of a model share one region.
    constexpr int64_t kStep = int64_t{64} << 20;
    v1::OpenSharedMemoryRequest request;
    request.set_bytes((bytes + kStep - 1) / kStep * kStep);
    v1::OpenSharedMemoryResponse response;
    auto context = Context();
    const grpc::Status opened = stub->OpenSharedMemory(context.get(), request, &response);
    if (!opened.ok()) {
      // UNIMPLEMENTED (an older router), FAILED_PRECONDITION (turned off): never again on this
      // connection; RESOURCE_EXHAUSTED and transient failures: stream this call only.
      if (opened.error_code() == grpc::StatusCode::UNIMPLEMENTED ||
          opened.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
        std::lock_guard<std::mutex> lock(mu);
        shm_off = true;
      }
      return nullptr;
    }
    absl::StatusOr<std::unique_ptr<SharedRegion>> memory =
        SharedRegion::Open(response.path(), response.nonce(), response.bytes());
    if (!memory.ok()) {
      // Another host or PID namespace: the router's regions are out of reach from here.
      CloseAtRouter(response.region_id());
      std::lock_guard<std::mutex> lock(mu);
      shm_off = true;
      return nullptr;
    }
    auto region = std::make_unique<Region>();
    region->id = response.region_id();
    region->memory = *std::move(memory);
    region->busy = true;
    std::lock_guard<std::mutex> lock(mu);
    regions.push_back(std::move(region));
    return regions.back().get();
  }

  void ReleaseRegion(Region* region) {
    std::lock_guard<std::mutex> lock(mu);
    region->busy = false;
  }

  // The router no longer knows the region (idle timeout, a new connection): forget it.
  void DropRegion(Region* region) {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = regions.begin(); it != regions.end(); ++it) {
      if (it->get() == region) {
        regions.erase(it);
        return;
      }
    }
  }

  // A context with the call deadline.
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto context = std::make_unique<grpc::ClientContext>();
    if (options.timeout.count() > 0) {
      context->set_deadline(std::chrono::system_clock::now() + options.timeout);
    }
    return context;
  }
};

}  // namespace client_internal

absl::StatusOr<Client> Client::Connect(const std::string& target, const ClientOptions& options) {
  if (target.empty()) return absl::InvalidArgumentError("router target is empty");
  if (options.max_message_bytes < 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be >= 4096; got ", options.max_message_bytes));
  }
  auto connection = std::make_shared<client_internal::Connection>();
  connection->target = target;
  connection->options = options;
  grpc::ChannelArguments args = ChannelArgumentsForMessageLimit(options.max_message_bytes);
  ChannelSecurity security;
  security.ca_file = options.tls_ca_file;
  security.cert_file = options.tls_cert_file;
  security.key_file = options.tls_key_file;
  security.server_name = options.tls_server_name;
  security.token = options.token;
  security.token_file = options.token_file;
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      MakeChannelCredentials(security, &args);
  if (!credentials.ok()) return credentials.status();
  connection->channel = grpc::CreateCustomChannel(target, *credentials, args);
  connection->stub = v1::Attention::NewStub(connection->channel);
  if (options.connect_timeout.count() > 0 &&
      !connection->channel->WaitForConnected(std::chrono::system_clock::now() +
                                             options.connect_timeout)) {
    return absl::UnavailableError(absl::StrCat("the DHSA router at '", target,
                                               "' did not answer within ",
                                               options.connect_timeout.count(), " ms"));
  }
  return Client(std::move(connection));
}

std::shared_ptr<grpc::Channel> Client::channel() const { return connection_->channel; }

Sequence Client::Attach(const std::string& id) const { return Sequence(connection_, id, 0); }

absl::StatusOr<Sequence> Client::CreateSequence(const SequenceOptions& options) const {
  v1::CreateSequenceRequest request;
  request.set_sequence_id(options.id);
  v1::SequenceConfig* config = request.mutable_config();
  config->set_num_layers(options.num_layers);
  config->set_q_heads(options.q_heads);
  config->set_kv_heads(options.kv_heads);
  config->set_head_dim(options.head_dim);
  config->set_dtype(ToProtoDType(options.dtype));
  if (options.config.has_value()) DhsaConfigToProto(*options.config, config->mutable_params());
  v1::CreateSequenceResponse response;
  auto context = connection_->Context();
  DHSA_RETURN_IF_ERROR(
      FromGrpcStatus(connection_->stub->CreateSequence(context.get(), request, &response)));
  return Sequence(connection_, response.sequence_id(), response.capacity_tokens());
}

namespace {

// The bytes of `t` named `name` if it is a [heads, n, d] tensor with its memory given;
// InvalidArgument otherwise.
absl::StatusOr<int64_t> SpanBytes(const TensorSpan& t, const char* name) {
  if (t.shape.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " must be 3-D ([heads, tokens, dim]); got ", ShapeString(t.shape)));
  }
  DHSA_ASSIGN_OR_RETURN(const int64_t bytes, TensorByteSize(t.shape, t.dtype, name));
  if (bytes > 0 && t.data == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has shape ", ShapeString(t.shape), " but no memory (null data)"));
  }
  return bytes;
}

// Checks the three inputs and the output pointer; returns the bytes of q, k, v and o.
struct CallBytes {
  int64_t q = 0, k = 0, v = 0, o = 0, lse = 0;
};
absl::StatusOr<CallBytes> CheckCall(const TensorSpan& q, const TensorSpan& k, const TensorSpan& v,
                                    const float* o) {
  CallBytes b;
  DHSA_ASSIGN_OR_RETURN(b.q, SpanBytes(q, "q"));
  DHSA_ASSIGN_OR_RETURN(b.k, SpanBytes(k, "k"));
  DHSA_ASSIGN_OR_RETURN(b.v, SpanBytes(v, "v"));
  if (k.dtype != q.dtype || v.dtype != q.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat("q, k and v must have one dtype (the sequence's); got ", DTypeName(q.dtype),
                     ", ", DTypeName(k.dtype), " and ", DTypeName(v.dtype)));
  }
  const int64_t rows = q.shape[0] * q.shape[1];
  b.o = rows * q.shape[2] * static_cast<int64_t>(sizeof(float));
  b.lse = rows * static_cast<int64_t>(sizeof(float));
  if (o == nullptr && b.o > 0) return absl::InvalidArgumentError("o (the output) is null");
  return b;
}

Tensor CopyOf(const TensorSpan& t, int64_t bytes) {
  Tensor out = Tensor::Uninitialized(t.dtype, t.shape);
  if (bytes > 0) std::memcpy(out.bytes.data(), t.data, static_cast<size_t>(bytes));
  return out;
}

// Faults in the pages of a fresh output buffer for writing on a thread of its own while the call
// runs: otherwise the first touch of each page comes after the answer, on the call's path (on the
// development VM 0.3 s for the 128 MiB o of a 32K-token layer of 8 heads). MADV_POPULATE_WRITE
// does not change the bytes (pages already there are left alone), so the copy of the answer may
// overlap it; where the kernel lacks it (before Linux 5.14) nothing is done.
class PrefaultWhileWaiting {
 public:
  PrefaultWhileWaiting(void* data, size_t bytes) {
    constexpr size_t kMinBytes = size_t{8} << 20;
    if (bytes < kMinBytes) return;
    const uintptr_t page = 4096;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(page - 1);
    if (end <= begin) return;
    thread_ = std::thread([begin, end] {
      (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
    });
  }
  ~PrefaultWhileWaiting() {
    if (thread_.joinable()) thread_.join();
  }
  PrefaultWhileWaiting(const PrefaultWhileWaiting&) = delete;
  PrefaultWhileWaiting& operator=(const PrefaultWhileWaiting&) = delete;

 private:
  std::thread thread_;
};

// A dhsa::Tensor passed as input holds the bytes its shape says (its fields are public: a span of
// it must not promise more than there is).
absl::Status CheckTensorBytes(const Tensor& t, const char* name) {
  DHSA_ASSIGN_OR_RETURN(const int64_t bytes, TensorByteSize(t.shape, t.dtype, name));
  if (bytes == static_cast<int64_t>(t.bytes.size())) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, " of shape ", ShapeString(t.shape),
                                                 " holds ", t.bytes.size(),
                                                 " bytes; its shape needs ", bytes));
}
absl::Status CheckTensorBytes(const Tensor& q, const Tensor& k, const Tensor& v) {
  DHSA_RETURN_IF_ERROR(CheckTensorBytes(q, "q"));
  DHSA_RETURN_IF_ERROR(CheckTensorBytes(k, "k"));
  return CheckTensorBytes(v, "v");
}

// The [Hq, n, d] o and (want_lse) [Hq, n] lse tensors a call on `q` fills.
void AllocateOutputs(const Tensor& q, bool want_lse, AttentionOutput* out) {
  if (q.shape.size() != 3) return;  // PrefillInto names the problem.
  out->o = Tensor::Uninitialized(DType::kF32, {q.shape[0], q.shape[1], q.shape[2]});
  if (want_lse) out->lse = Tensor::Uninitialized(DType::kF32, {q.shape[0], q.shape[1]});
}

float* FloatsOf(Tensor& t) { return reinterpret_cast<float*>(t.bytes.data()); }

// The router's answer `t` is a float32 tensor of `shape` (else INTERNAL: nothing is written into
// the caller's buffers from an answer of another size).
absl::Status CheckAnswer(const Tensor& t, const char* name, const std::vector<int64_t>& shape) {
  if (t.dtype == DType::kF32 && t.shape == shape) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("bad answer: ", name, " is ", DTypeName(t.dtype), " ",
                                          ShapeString(t.shape), ", expected float32 ",
                                          ShapeString(shape)));
}

}  // namespace

absl::StatusOr<PrefillOutput> Sequence::Prefill(int layer, const Tensor& q, const Tensor& k,
                                                const Tensor& v, bool want_lse) const {
  DHSA_RETURN_IF_ERROR(CheckTensorBytes(q, k, v));
  PrefillOutput out;
  AllocateOutputs(q, want_lse, &out);
  absl::StatusOr<CallResult> result;
  {
    PrefaultWhileWaiting prefault(out.o.bytes.data(), out.o.bytes.size());
    result = PrefillInto(layer, q, k, v, FloatsOf(out.o), want_lse ? FloatsOf(out.lse) : nullptr);
  }
  if (!result.ok()) return result.status();
  out.length = result->length;
  out.stats = std::move(result->stats);
  out.shared_memory = result->shared_memory;
  return out;
}

absl::StatusOr<CallResult> Sequence::PrefillInto(int layer, const TensorSpan& q,
                                                 const TensorSpan& k, const TensorSpan& v, float* o,
                                                 float* lse) const {
  DHSA_ASSIGN_OR_RETURN(const CallBytes b, CheckCall(q, k, v, o));
  const int64_t in_bytes = b.q + b.k + b.v;
  if (!connection_->options.shared_memory || in_bytes < (int64_t{1} << 20)) {
    return PrefillStreamed(layer, q, k, v, o, lse);
  }
  const bool want_lse = lse != nullptr;
  // Layout in the region: q, k, v, then lse, each at a 64-byte boundary; o from offset 0 over
  // q, k and v when it fits there (the router reads the inputs before the call starts and writes
  // o at its end), else after v. A smaller region: fewer fresh pages to map on both sides.
  const auto aligned = [](int64_t n) { return (n + 63) / 64 * 64; };
  const int64_t o_bytes = b.o;
  const int64_t lse_bytes = want_lse ? b.lse : 0;
  int64_t offsets[5];
  offsets[0] = 0;
  offsets[1] = aligned(b.q);
  offsets[2] = offsets[1] + aligned(b.k);
  const int64_t in_end = offsets[2] + aligned(b.v);
  offsets[3] = aligned(o_bytes) <= in_end ? 0 : in_end;
  offsets[4] = std::max(in_end, offsets[3] + aligned(o_bytes));
  const int64_t end = offsets[4] + aligned(lse_bytes);
  client_internal::Region* region = connection_->AcquireRegion(end);
  if (region == nullptr) return PrefillStreamed(layer, q, k, v, o, lse);

  uint8_t* base = region->memory->data();
  // Through the kernel: see services/transport/shm_copy.h.
  transport::CopyIntoShared(base + offsets[0], q.data, static_cast<size_t>(b.q));
  transport::CopyIntoShared(base + offsets[1], k.data, static_cast<size_t>(b.k));
  transport::CopyIntoShared(base + offsets[2], v.data, static_cast<size_t>(b.v));
  auto context = connection_->Context();
  auto stream = connection_->stub->Prefill(context.get());
  v1::PrefillRequest request;
  v1::PrefillHeader* header = request.mutable_header();
  header->set_sequence_id(id_);
  header->set_layer(layer);
  header->set_num_tokens(q.shape[1]);
  header->set_want_lse(want_lse);
  v1::SharedTensors* shared = header->mutable_shared();
  shared->set_region_id(region->id);
  shared->set_q_offset(offsets[0]);
  shared->set_k_offset(offsets[1]);
  shared->set_v_offset(offsets[2]);
  shared->set_o_offset(offsets[3]);
  shared->set_lse_offset(offsets[4]);
  shared->set_dtype(ToProtoDType(q.dtype));
  shared->mutable_q_shape()->Assign(q.shape.begin(), q.shape.end());
  shared->mutable_k_shape()->Assign(k.shape.begin(), k.shape.end());
  shared->mutable_v_shape()->Assign(v.shape.begin(), v.shape.end());
  if (stream->Write(request)) stream->WritesDone();
  CallResult out;
  bool have_result = false;
  v1::PrefillResponse response;
  while (stream->Read(&response)) {
    if (response.has_result()) {
      out.length = response.result().length();
      out.stats = response.result().stats();
      have_result = true;
    }
  }
  const absl::Status status = FromGrpcStatus(stream->Finish());
  if (status.code() == absl::StatusCode::kNotFound &&
      absl::StrContains(status.message(), "shared-memory region")) {
    // The router closed the region (idle, or this is a new connection); nothing was stored.
    connection_->DropRegion(region);
    return PrefillStreamed(layer, q, k, v, o, lse);
  }
  if (!status.ok() || !have_result) {
    // The router may still be writing the answer of this call into the region (a deadline or a
    // cancellation ends the call here first): the region is never used again, so that no later
    // call reads inputs or outputs overwritten by this one.
    const std::string id = region->id;
    connection_->DropRegion(region);
    connection_->CloseAtRouter(id);
    if (!status.ok()) return status;
    return absl::InternalError("the Prefill answer has no result");
  }
  transport::CopyFromShared(o, base + offsets[3], static_cast<size_t>(o_bytes));
  if (want_lse) {
    transport::CopyFromShared(lse, base + offsets[4], static_cast<size_t>(lse_bytes));
  }
  out.shared_memory = true;
  connection_->ReleaseRegion(region);
  return out;
}

absl::StatusOr<CallResult> Sequence::PrefillStreamed(int layer, const TensorSpan& q,
                                                     const TensorSpan& k, const TensorSpan& v,
                                                     float* o, float* lse) const {
  DHSA_ASSIGN_OR_RETURN(const CallBytes b, CheckCall(q, k, v, o));
  const bool want_lse = lse != nullptr;
  auto context = connection_->Context();
  auto stream = connection_->stub->Prefill(context.get());
  v1::PrefillRequest request;
  v1::PrefillHeader* header = request.mutable_header();
  header->set_sequence_id(id_);
  header->set_layer(layer);
  header->set_num_tokens(q.shape[1]);
  header->set_want_lse(want_lse);
  bool sending = stream->Write(request);
  const int64_t piece_bytes = PieceBytesForMessageLimit(connection_->options.max_message_bytes);
  auto send = [&](v1::TensorPiece&& piece) {
    v1::PrefillRequest r;
    *r.mutable_piece() = std::move(piece);
    return stream->Write(r);
  };
  // A failed write means the router has already answered (an error): Finish tells which.
  const std::pair<const TensorSpan*, int64_t> inputs[3] = {{&q, b.q}, {&k, b.k}, {&v, b.v}};
  const char* const names[3] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    const TensorSpan& t = *inputs[i].first;
    if (sending) {
      sending = SendTensorPieces(t.dtype, t.shape, static_cast<const uint8_t*>(t.data),
                                 inputs[i].second, names[i], piece_bytes, send)
                    .ok();
    }
  }
  if (sending) stream->WritesDone();

  TensorAssembler o_pieces("o", b.o), lse_pieces("lse", b.o);
  CallResult out;
  bool have_result = false;
  absl::Status read_error;
  v1::PrefillResponse response;
  while (stream->Read(&response)) {
    if (!read_error.ok()) continue;  // Drain after cancelling.
    if (response.has_piece()) {
      read_error =
          o_pieces.complete() ? lse_pieces.Add(response.piece()) : o_pieces.Add(response.piece());
      if (!read_error.ok()) context->TryCancel();
    } else if (response.has_result()) {
      out.length = response.result().length();
      out.stats = response.result().stats();
      have_result = true;
    }
  }
  const absl::Status status = FromGrpcStatus(stream->Finish());
  if (!read_error.ok())
    return absl::InternalError(absl::StrCat("bad answer: ", read_error.message()));
  if (!status.ok()) return status;
  if (!have_result) return absl::InternalError("the Prefill answer has no result");
  const std::vector<int64_t> o_shape = {q.shape[0], q.shape[1], q.shape[2]};
  const std::vector<int64_t> lse_shape = {q.shape[0], q.shape[1]};
  DHSA_ASSIGN_OR_RETURN(const Tensor o_got, o_pieces.Take());
  DHSA_RETURN_IF_ERROR(CheckAnswer(o_got, "o", o_shape));
  Tensor lse_got;
  if (want_lse) {
    DHSA_ASSIGN_OR_RETURN(lse_got, lse_pieces.Take());
    DHSA_RETURN_IF_ERROR(CheckAnswer(lse_got, "lse", lse_shape));
  }
  // Written only now, when the whole answer is there and right.
  if (b.o > 0) std::memcpy(o, o_got.bytes.data(), static_cast<size_t>(b.o));
  if (want_lse && b.lse > 0) std::memcpy(lse, lse_got.bytes.data(), static_cast<size_t>(b.lse));
  return out;
}

absl::StatusOr<DecodeOutput> Sequence::Decode(int layer, const Tensor& q, const Tensor& k,
                                              const Tensor& v, bool want_lse) const {
  DHSA_RETURN_IF_ERROR(CheckTensorBytes(q, k, v));
  DecodeOutput out;
  AllocateOutputs(q, want_lse, &out);
  DHSA_ASSIGN_OR_RETURN(CallResult result, DecodeInto(layer, q, k, v, FloatsOf(out.o),
                                                      want_lse ? FloatsOf(out.lse) : nullptr));
  out.length = result.length;
  out.stats = std::move(result.stats);
  return out;
}

absl::StatusOr<CallResult> Sequence::DecodeInto(int layer, const TensorSpan& q, const TensorSpan& k,
                                                const TensorSpan& v, float* o, float* lse) const {
  DHSA_ASSIGN_OR_RETURN(const CallBytes b, CheckCall(q, k, v, o));
  const bool want_lse = lse != nullptr;
  v1::DecodeRequest request;
  request.set_sequence_id(id_);
  request.set_layer(layer);
  TensorToProto(CopyOf(q, b.q), request.mutable_q());
  TensorToProto(CopyOf(k, b.k), request.mutable_k());
  TensorToProto(CopyOf(v, b.v), request.mutable_v());
  request.set_want_lse(want_lse);
  v1::DecodeResponse response;
  auto context = connection_->Context();
  DHSA_RETURN_IF_ERROR(
      FromGrpcStatus(connection_->stub->Decode(context.get(), request, &response)));
  DHSA_ASSIGN_OR_RETURN(const Tensor o_got, TensorFromProto(response.o(), "o"));
  DHSA_RETURN_IF_ERROR(CheckAnswer(o_got, "o", {q.shape[0], q.shape[1], q.shape[2]}));
  Tensor lse_got;
  if (want_lse) {
    DHSA_ASSIGN_OR_RETURN(lse_got, TensorFromProto(response.lse(), "lse"));
    DHSA_RETURN_IF_ERROR(CheckAnswer(lse_got, "lse", {q.shape[0], q.shape[1]}));
  }
  if (b.o > 0) std::memcpy(o, o_got.bytes.data(), static_cast<size_t>(b.o));
  if (want_lse && b.lse > 0) std::memcpy(lse, lse_got.bytes.data(), static_cast<size_t>(b.lse));
  CallResult out;
  out.length = response.length();
  out.stats = response.stats();
  return out;
}

absl::StatusOr<v1::SequenceInfo> Sequence::Info() const {
  v1::GetSequenceInfoRequest request;
  request.set_sequence_id(id_);
  v1::SequenceInfo info;
  auto context = connection_->Context();
  DHSA_RETURN_IF_ERROR(
      FromGrpcStatus(connection_->stub->GetSequenceInfo(context.get(), request, &info)));
  return info;
}

absl::StatusOr<int64_t> Sequence::Release() const {
  v1::ReleaseSequenceRequest request;
  request.set_sequence_id(id_);
  v1::ReleaseSequenceResponse response;
  auto context = connection_->Context();
  DHSA_RETURN_IF_ERROR(
      FromGrpcStatus(connection_->stub->ReleaseSequence(context.get(), request, &response)));
  return response.freed_bytes();
}

}  // namespace dhsa
