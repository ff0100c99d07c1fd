#include "services/common/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/channel_arguments.h>
#include <malloc.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "services/common/metrics.h"
#include "services/common/tsan_annotations.h"

namespace dhsa {
namespace {

// AuthContext property naming the client whose token was accepted.
constexpr char kClientProperty[] = "dhsa_client";

int ClampToInt(int64_t bytes) {
  return static_cast<int>(std::min<int64_t>(bytes, std::numeric_limits<int>::max()));
}

absl::StatusOr<std::string> ReadSecurityFile(const std::string& path, absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", what, " '", path, "'"));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// "NAME TOKEN" lines of a token file.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ReadTokenFile(
    const std::string& path) {
  absl::StatusOr<std::string> text = ReadSecurityFile(path, "token file");
  if (!text.ok()) return text.status();
  std::vector<std::pair<std::string, std::string>> tokens;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2 || fields[1].size() < 16) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file '", path, "' line ", line_number,
                       ": expected \"NAME TOKEN\" with a token of at least 16 characters"));
    }
    tokens.emplace_back(std::string(fields[0]), std::string(fields[1]));
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("token file '", path, "' lists no tokens"));
  }
  return tokens;
}

// Accepts a call whose "authorization" metadata is "Bearer TOKEN" of a listed token, and records
// the token's name in the call's AuthContext; UNAUTHENTICATED otherwise.
class TokenChecker : public grpc::AuthMetadataProcessor {
 public:
  explicit TokenChecker(std::vector<std::pair<std::string, std::string>> tokens)
      : tokens_(std::move(tokens)) {
    DHSA_HAPPENS_BEFORE(this);  // Process runs on gRPC's threads.
  }

  bool IsBlocking() const override { return false; }

  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed, OutputMetadata* /*response*/) override {
    DHSA_HAPPENS_AFTER(this);
    auto it = auth_metadata.find("authorization");
    if (it == auth_metadata.end()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "this server requires a bearer token (metadata 'authorization: Bearer "
                          "TOKEN'); none was sent");
    }
    const absl::string_view value(it->second.data(), it->second.size());
    constexpr absl::string_view kBearer = "Bearer ";
    const absl::string_view token =
        absl::StartsWith(value, kBearer) ? value.substr(kBearer.size()) : absl::string_view();
    // Every listed token is compared, in constant time each, whatever matches.
    const std::string* name = nullptr;
    for (const auto& [n, t] : tokens_) {
      if (ConstantTimeEquals(token, t)) name = &n;
    }
    if (name == nullptr) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "the bearer token is not valid for this server");
    }
    consumed->insert(std::make_pair(std::string(it->first.data(), it->first.size()),
                                    std::string(it->second.data(), it->second.size())));
    context->AddProperty(kClientProperty, *name);
    return grpc::Status::OK;
  }

 private:
  const std::vector<std::pair<std::string, std::string>> tokens_;
};

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const ServerSecurity& security) {
  if (security.cert_file.empty()) {
    if (!security.key_file.empty() || !security.client_ca_file.empty() ||
        !security.token_file.empty()) {
      return absl::InvalidArgumentError(
          "tls.key_file, tls.client_ca_file and auth_token_file need tls.cert_file: the server "
          "would otherwise accept tokens and serve in cleartext");
    }
    return grpc::InsecureServerCredentials();
  }
  if (security.key_file.empty()) {
    return absl::InvalidArgumentError("tls.cert_file is set but tls.key_file is not");
  }
  grpc::SslServerCredentialsOptions options(
      security.client_ca_file.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                      : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::StatusOr<std::string> cert = ReadSecurityFile(security.cert_file, "TLS certificate");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadSecurityFile(security.key_file, "TLS key");
  if (!key.ok()) return key.status();
  pair.cert_chain = *std::move(cert);
  pair.private_key = *std::move(key);
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!security.client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadSecurityFile(security.client_ca_file, "client CA");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *std::move(ca);
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::SslServerCredentials(options);
  if (!security.token_file.empty()) {
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> tokens =
        ReadTokenFile(security.token_file);
    if (!tokens.ok()) return tokens.status();
    credentials->SetAuthMetadataProcessor(std::make_shared<TokenChecker>(*std::move(tokens)));
  }
  return credentials;
}

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const ChannelSecurity& security, grpc::ChannelArguments* args) {
  std::string token = security.token;
  if (token.empty() && !security.token_file.empty()) {
    absl::StatusOr<std::string> text = ReadSecurityFile(security.token_file, "token file");
    if (!text.ok()) return text.status();
    token = std::string(absl::StripAsciiWhitespace(
        absl::string_view(*text).substr(0, std::min(text->find('\n'), text->size()))));
    if (token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file '", security.token_file, "' holds no token on its first line"));
    }
  }
  if (security.ca_file.empty()) {
    if (!token.empty() || !security.cert_file.empty()) {
      return absl::InvalidArgumentError(
          "a bearer token or client certificate needs TLS (a CA file to verify the server)");
    }
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions options;
  absl::StatusOr<std::string> ca = ReadSecurityFile(security.ca_file, "CA file");
  if (!ca.ok()) return ca.status();
  options.pem_root_certs = *std::move(ca);
  if (security.cert_file.empty() != security.key_file.empty()) {
    return absl::InvalidArgumentError("a client certificate needs both its cert and key file");
  }
  if (!security.cert_file.empty()) {
    absl::StatusOr<std::string> cert = ReadSecurityFile(security.cert_file, "client certificate");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadSecurityFile(security.key_file, "client key");
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *std::move(cert);
    options.pem_private_key = *std::move(key);
  }
  if (!security.server_name.empty() && args != nullptr) {
    args->SetSslTargetNameOverride(security.server_name);
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::SslCredentials(options);
  if (!token.empty()) {
    credentials =
        grpc::CompositeChannelCredentials(credentials, grpc::AccessTokenCredentials(token));
  }
  return credentials;
}

std::string ClientIdentity(const grpc::ServerContextBase& context) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth != nullptr) {
    std::vector<grpc::string_ref> names = auth->FindPropertyValues(kClientProperty);
    if (!names.empty())
      return absl::StrCat("token:", absl::string_view(names[0].data(), names[0].size()));
    std::vector<grpc::string_ref> cn = auth->FindPropertyValues("x509_common_name");
    if (!cn.empty()) return absl::StrCat("cert:", absl::string_view(cn[0].data(), cn[0].size()));
  }
  // "ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1": every connection of one host is one client.
  std::string peer = context.peer();
  const size_t colon = peer.rfind(':');
  if (colon != std::string::npos && colon > peer.find(':')) peer.resize(colon);
  return absl::StrCat("peer:", peer);
}

void KeepMessageBuffersMapped() {
  static std::once_flag once;
  std::call_once(once, [] {
    // 32 MiB is the largest mmap threshold glibc accepts; both calls are advice that changes no
    // result (a failure leaves the defaults).
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  });
}

absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(const std::string& address,
                                                              int64_t max_message_bytes,
                                                              std::vector<grpc::Service*> services,
                                                              int* bound_port,
                                                              const ServerSecurity& security) {
  KeepMessageBuffersMapped();
  if (address.empty()) return absl::InvalidArgumentError("listen address is empty");
  if (max_message_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be positive; got ", max_message_bytes));
  }
  // Both are process-wide switches read when a builder is created; setting them again is harmless.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MakeServerCredentials(security);
  if (!credentials.ok()) return credentials.status();

  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, *credentials, &port);
  builder.SetMaxReceiveMessageSize(ClampToInt(max_message_bytes));
  builder.SetMaxSendMessageSize(ClampToInt(max_message_bytes));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES,
                             StreamWindowBytes(max_message_bytes));
  for (grpc::Service* service : services) builder.RegisterService(service);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(metrics::NewRpcInterceptorFactory());  // Request counts and latency.
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    if (server != nullptr) server->Shutdown();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on '", address, "' (address in use, or not a host:port?)"));
  }
  if (bound_port != nullptr) *bound_port = port;
  return server;
}

int StreamWindowBytes(int64_t max_message_bytes) {
  return ClampToInt(std::max<int64_t>(kMinStreamWindowBytes, 2 * max_message_bytes));
}

grpc::ChannelArguments ChannelArgumentsForMessageLimit(int64_t max_message_bytes) {
  KeepMessageBuffersMapped();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(ClampToInt(max_message_bytes));
  args.SetMaxSendMessageSize(ClampToInt(max_message_bytes));
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, StreamWindowBytes(max_message_bytes));
  return args;
}

}  // namespace dhsa
