// Building a gRPC server the way every dhsa process does: one listening address (port 0 picks a
// free port), the standard grpc.health.v1 service and server reflection, and one message size limit
// for both directions.
#ifndef DHSA_SERVICES_COMMON_SERVER_H_
#define DHSA_SERVICES_COMMON_SERVER_H_

#include <grpcpp/security/credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_context.h>
#include <grpcpp/support/channel_arguments.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dhsa {

// Transport security and authentication of one gRPC server (ServiceConfig.tls and
// auth_token_file). All empty: plaintext, no authentication.
struct ServerSecurity {
  std::string cert_file;  // PEM certificate chain served; TLS is on when set (needs key_file).
  std::string key_file;   // PEM private key of cert_file.
  // PEM CA bundle; when set, clients must present a certificate signed by it (mutual TLS).
  std::string client_ca_file;
  // Bearer tokens accepted, one "NAME TOKEN" per line (NAME identifies the client for per-client
  // limits; '#' starts a comment). When set, every call without "authorization: Bearer TOKEN" of
  // a listed token fails with UNAUTHENTICATED. Needs TLS: tokens never travel in cleartext.
  std::string token_file;
};

// Client side of the same (the router's calls to workers, dhsa::Client).
struct ChannelSecurity {
  std::string ca_file;    // PEM CA bundle that verifies the server; TLS is on when set.
  std::string cert_file;  // PEM certificate presented for mutual TLS (with key_file).
  std::string key_file;
  std::string token;        // Bearer token sent on every call (needs TLS), or:
  std::string token_file;   // a file whose first line is the token.
  std::string server_name;  // Name checked in the server's certificate (default: the target host).
};

// Channel credentials for `security` (insecure when ca_file is empty; InvalidArgument for a token
// without TLS or a certificate without its key, NotFound for an unreadable file). Applies
// server_name to `args`.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const ChannelSecurity& security, grpc::ChannelArguments* args);

// Who is calling, for per-client limits and ownership: "token:NAME" when the server checks
// tokens, else "cert:CN" of a client certificate (mutual TLS), else "peer:HOST" of the address.
std::string ClientIdentity(const grpc::ServerContextBase& context);

// Equal strings, in time that depends only on the lengths (for secrets).
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

// Starts a server on `address` ("host:port", port 0 = any free port) serving `services` (not owned;
// they must outlive the server), with health (liveness "" SERVING; callers set readiness per
// service name with GetHealthCheckService()->SetServingStatus) and reflection enabled, and
// `max_message_bytes` (> 0) as the receive and send limit. Writes the bound port to `*bound_port`
// when not null. Unavailable when the address cannot be bound, InvalidArgument for bad arguments
// (including a token file without TLS), NotFound for a certificate, key or token file that cannot
// be read.
absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(const std::string& address,
                                                              int64_t max_message_bytes,
                                                              std::vector<grpc::Service*> services,
                                                              int* bound_port,
                                                              const ServerSecurity& security = {});

// HTTP/2 flow-control window per stream, bytes: two messages of the limit, at least 8 MiB. Tensors
// stream as back-to-back messages near the limit; gRPC's default window (64 KiB, grown by BDP
// probes) makes the sender wait for a window update every few frames, which costs a wake-up of
// each side per 64 KiB on a loaded host.
inline constexpr int64_t kMinStreamWindowBytes = int64_t{8} << 20;
int StreamWindowBytes(int64_t max_message_bytes);

// Sets glibc's malloc, once per process, to keep the buffers of large messages mapped: blocks up to
// 32 MiB come from the heap rather than a fresh mmap, and up to 1 GiB of free heap stays mapped
// instead of being trimmed. A tensor streams as 4 MiB messages, each parsed into a new buffer; by
// default every one of them could cost a page fault per 4 KiB when written, which measured as the
// largest system-time cost of the service on a 2-core VM (perf, `dhsa demo`). Called by
// StartGrpcServer and ChannelArgumentsForMessageLimit, so every dhsa server and client has it.
void KeepMessageBuffersMapped();

// Channel arguments a client of a dhsa server uses so that messages up to `max_message_bytes`
// pass in both directions, with the stream window above.
grpc::ChannelArguments ChannelArgumentsForMessageLimit(int64_t max_message_bytes);

}  // namespace dhsa

#endif  // DHSA_SERVICES_COMMON_SERVER_H_
