// The data plane's configuration (ServiceConfig.data_plane) and the choice of transport for one
// sequence's worker calls.
#ifndef DHSA_SERVICES_TRANSPORT_OPTIONS_H_
#define DHSA_SERVICES_TRANSPORT_OPTIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dhsa/v1/service_config.pb.h"

namespace dhsa::transport {

enum class Kind { kGrpc, kNccl, kShm };
// "grpc", "nccl" or "shm": the value of the metrics' `transport` label and of the logs.
const char* KindName(Kind kind);

enum class Mode { kAuto, kGrpc, kNccl, kShm };

struct DataPlaneOptions {
  Mode mode = Mode::kAuto;
  std::vector<int> router_devices;  // Empty: every visible device.
  int device = 0;                   // Worker's device.
  absl::Duration setup_timeout = absl::Seconds(30);
  absl::Duration transfer_timeout = absl::Seconds(60);
  int64_t shm_arena_bytes = int64_t{1} << 30;  // Router: each shared-memory arena.
};

// The options of `config` with defaults for zero fields. InvalidArgument for an unknown transport
// name, a negative device, a negative or non-finite timeout.
absl::StatusOr<DataPlaneOptions> DataPlaneOptionsFromProto(const v1::DataPlaneConfig& config);

// True in builds with DHSA_WITH_NCCL.
bool NcclBuilt();

// What the router knows about one worker of a sequence.
struct PeerState {
  std::string address;
  // The router and this worker share a communicator in state "ready".
  bool communicator_ready = false;
  // The router and this worker share shared-memory arenas (same host; shm_arena.h).
  bool shm_ready = false;
};

struct TransportChoice {
  Kind kind = Kind::kGrpc;
  std::string reason;  // For the logs: why this transport.
};

// The transport of a sequence's worker calls: kNccl when the mode allows it, this build has NCCL
// and every worker of the sequence shares a ready communicator with the router; else kShm when the
// mode allows it and every worker shares arenas with the router; kGrpc otherwise. Mode kNccl (kShm)
// without that is Unavailable (naming the first worker without a communicator (arenas)); a
// sequence with no worker is InvalidArgument.
absl::StatusOr<TransportChoice> ChooseTransport(Mode mode, bool nccl_built,
                                                const std::vector<PeerState>& workers);

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_OPTIONS_H_
