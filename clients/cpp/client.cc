#include "clients/cpp/client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "services/common/config.h"
#include "services/common/server.h"
#include "services/common/status.h"
#include "services/common/wire.h"

namespace dhsa {
namespace client_internal {

struct Connection {
  std::string target;
  ClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Attention::Stub> stub;

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
