#include "services/transport/options.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace dhsa::transport {
namespace {

absl::StatusOr<absl::Duration> Timeout(double seconds, double default_seconds, const char* name) {
  if (!std::isfinite(seconds) || seconds < 0) {
    return absl::InvalidArgumentError(absl::StrCat("data_plane.", name,
                                                   " must be finite and >= 0 (0: default ",
                                                   default_seconds, " s); got ", seconds));
  }
  return absl::Seconds(seconds > 0 ? seconds : default_seconds);
}

}  // namespace

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kNccl:
      return "nccl";
    case Kind::kShm:
      return "shm";
    case Kind::kGrpc:
      break;
  }
  return "grpc";
}

bool NcclBuilt() {
#ifdef DHSA_TRANSPORT_WITH_NCCL
  return true;
#else
  return false;
#endif
}

absl::StatusOr<DataPlaneOptions> DataPlaneOptionsFromProto(const v1::DataPlaneConfig& config) {
  DataPlaneOptions o;
  const std::string& t = config.transport();
  if (t.empty() || t == "auto") {
    o.mode = Mode::kAuto;
  } else if (t == "grpc") {
    o.mode = Mode::kGrpc;
  } else if (t == "nccl") {
    o.mode = Mode::kNccl;
  } else if (t == "shm") {
    o.mode = Mode::kShm;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "data_plane.transport must be \"auto\", \"grpc\", \"shm\" or \"nccl\"; got \"", t, "\""));
  }
  if (config.shm_arena_bytes() < 0 ||
      (config.shm_arena_bytes() > 0 && config.shm_arena_bytes() < (int64_t{1} << 20))) {
    return absl::InvalidArgumentError(
        absl::StrCat("data_plane.shm_arena_bytes must be 0 (default 1 GiB) or >= 1 MiB; got ",
                     config.shm_arena_bytes()));
  }
  if (config.shm_arena_bytes() > 0) o.shm_arena_bytes = config.shm_arena_bytes();
  for (int d : config.router_devices()) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("data_plane.router_devices holds ", d, "; CUDA device ordinals are >= 0"));
    }
    o.router_devices.push_back(d);
  }
  if (config.device() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("data_plane.device must be >= 0; got ", config.device()));
  }
  o.device = config.device();
  absl::StatusOr<absl::Duration> setup =
      Timeout(config.setup_timeout_seconds(), 30, "setup_timeout_seconds");
  if (!setup.ok()) return setup.status();
  o.setup_timeout = *setup;
  absl::StatusOr<absl::Duration> transfer =
      Timeout(config.transfer_timeout_seconds(), 60, "transfer_timeout_seconds");
  if (!transfer.ok()) return transfer.status();
  o.transfer_timeout = *transfer;
  return o;
}

absl::StatusOr<TransportChoice> ChooseTransport(Mode mode, bool nccl_built,
                                                const std::vector<PeerState>& workers) {
  if (workers.empty()) {
    return absl::InvalidArgumentError("a sequence with no worker has no transport to choose");
  }
  if (mode == Mode::kGrpc) return TransportChoice{Kind::kGrpc, "data_plane.transport is grpc"};
  const auto first_without = [&](bool PeerState::*ready) -> const PeerState* {
    for (const PeerState& w : workers) {
      if (!(w.*ready)) return &w;
    }
    return nullptr;
  };
  const PeerState* no_comm = first_without(&PeerState::communicator_ready);
  const PeerState* no_shm = first_without(&PeerState::shm_ready);
  const std::string no_comm_why =
      !nccl_built          ? std::string("this router was built without NCCL (-DDHSA_WITH_NCCL=ON)")
      : no_comm != nullptr ? absl::StrCat("worker ", no_comm->address,
                                          " shares no ready NCCL communicator with the router")
                           : std::string();
  const std::string no_shm_why =
      no_shm != nullptr ? absl::StrCat("worker ", no_shm->address,
                                       " shares no shared-memory arena with the router")
                        : std::string();
  if (mode == Mode::kNccl) {
    if (!no_comm_why.empty()) {
      return absl::UnavailableError(absl::StrCat("data_plane.transport is nccl but ", no_comm_why));
    }
    return TransportChoice{
        Kind::kNccl, absl::StrCat("all ", workers.size(), " workers share a ready communicator")};
  }
  if (mode == Mode::kShm) {
    if (!no_shm_why.empty()) {
      return absl::UnavailableError(absl::StrCat("data_plane.transport is shm but ", no_shm_why));
    }
    return TransportChoice{
        Kind::kShm, absl::StrCat("all ", workers.size(), " workers share arenas (same host)")};
  }
  if (no_comm_why.empty()) {
    return TransportChoice{
        Kind::kNccl, absl::StrCat("all ", workers.size(), " workers share a ready communicator")};
  }
  if (no_shm_why.empty()) {
    return TransportChoice{
        Kind::kShm,
        absl::StrCat("all ", workers.size(), " workers share arenas (same host); ", no_comm_why)};
  }
  return TransportChoice{Kind::kGrpc, absl::StrCat(no_comm_why, "; ", no_shm_why)};
}

}  // namespace dhsa::transport
