#include "clients/cpp/client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <algorithm>
#include <cstring>
#include <mutex>
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

absl::StatusOr<PrefillOutput> Sequence::Prefill(int layer, const Tensor& q, const Tensor& k,
                                                const Tensor& v, bool want_lse) const {
  if (q.shape.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("q must be [Hq, n, d]; got ", ShapeString(q.shape)));
  }
  const int64_t in_bytes = static_cast<int64_t>(q.bytes.size() + k.bytes.size() + v.bytes.size());
  if (!connection_->options.shared_memory || in_bytes < (int64_t{1} << 20)) {
    return PrefillStreamed(layer, q, k, v, want_lse);
  }
  // Layout in the region: q, k, v, then lse, each at a 64-byte boundary; o from offset 0 over
  // q, k and v when it fits there (the router reads the inputs before the call starts and writes
  // o at its end), else after v. A smaller region: fewer fresh pages to map on both sides.
  const auto aligned = [](int64_t n) { return (n + 63) / 64 * 64; };
  const int64_t rows = q.shape[0] * q.shape[1];
  const int64_t o_bytes = rows * q.shape[2] * static_cast<int64_t>(sizeof(float));
  const int64_t lse_bytes = want_lse ? rows * static_cast<int64_t>(sizeof(float)) : 0;
  int64_t offsets[5];
  offsets[0] = 0;
  offsets[1] = aligned(static_cast<int64_t>(q.bytes.size()));
  offsets[2] = offsets[1] + aligned(static_cast<int64_t>(k.bytes.size()));
  const int64_t in_end = offsets[2] + aligned(static_cast<int64_t>(v.bytes.size()));
  offsets[3] = aligned(o_bytes) <= in_end ? 0 : in_end;
  offsets[4] = std::max(in_end, offsets[3] + aligned(o_bytes));
  const int64_t end = offsets[4] + aligned(lse_bytes);
  client_internal::Region* region = connection_->AcquireRegion(end);
  if (region == nullptr) return PrefillStreamed(layer, q, k, v, want_lse);

  uint8_t* base = region->memory->data();
  // Through the kernel: see services/transport/shm_copy.h.
  transport::CopyIntoShared(base + offsets[0], q.bytes.data(), q.bytes.size());
  transport::CopyIntoShared(base + offsets[1], k.bytes.data(), k.bytes.size());
  transport::CopyIntoShared(base + offsets[2], v.bytes.data(), v.bytes.size());
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
  if (stream->Write(request)) stream->WritesDone();
  PrefillOutput out;
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
    return PrefillStreamed(layer, q, k, v, want_lse);
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
  out.o = Tensor::Uninitialized(DType::kF32, {q.shape[0], q.shape[1], q.shape[2]});
  transport::CopyFromShared(out.o.bytes.data(), base + offsets[3], static_cast<size_t>(o_bytes));
  if (want_lse) {
    out.lse = Tensor::Uninitialized(DType::kF32, {q.shape[0], q.shape[1]});
    transport::CopyFromShared(out.lse.bytes.data(), base + offsets[4],
                              static_cast<size_t>(lse_bytes));
  }
  out.shared_memory = true;
  connection_->ReleaseRegion(region);
  return out;
}

absl::StatusOr<PrefillOutput> Sequence::PrefillStreamed(int layer, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, bool want_lse) const {
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
  for (const auto& [tensor, name] :
       {std::pair<const Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    if (sending) sending = SendTensorPieces(*tensor, name, piece_bytes, send).ok();
  }
  if (sending) stream->WritesDone();

  const int64_t o_bytes =
      q.shape[0] * q.shape[1] * q.shape[2] * static_cast<int64_t>(sizeof(float));
  TensorAssembler o("o", o_bytes), lse("lse", o_bytes);
  PrefillOutput out;
  bool have_result = false;
  absl::Status read_error;
  v1::PrefillResponse response;
  while (stream->Read(&response)) {
    if (!read_error.ok()) continue;  // Drain after cancelling.
    if (response.has_piece()) {
      read_error = o.complete() ? lse.Add(response.piece()) : o.Add(response.piece());
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
  DHSA_ASSIGN_OR_RETURN(out.o, o.Take());
  if (want_lse) {
    DHSA_ASSIGN_OR_RETURN(out.lse, lse.Take());
  }
  return out;
}

absl::StatusOr<DecodeOutput> Sequence::Decode(int layer, const Tensor& q, const Tensor& k,
                                              const Tensor& v, bool want_lse) const {
  v1::DecodeRequest request;
  request.set_sequence_id(id_);
  request.set_layer(layer);
  TensorToProto(q, request.mutable_q());
  TensorToProto(k, request.mutable_k());
  TensorToProto(v, request.mutable_v());
  request.set_want_lse(want_lse);
  v1::DecodeResponse response;
  auto context = connection_->Context();
  DHSA_RETURN_IF_ERROR(
      FromGrpcStatus(connection_->stub->Decode(context.get(), request, &response)));
  DecodeOutput out;
  DHSA_ASSIGN_OR_RETURN(out.o, TensorFromProto(response.o(), "o"));
  if (want_lse) {
    DHSA_ASSIGN_OR_RETURN(out.lse, TensorFromProto(response.lse(), "lse"));
  }
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
