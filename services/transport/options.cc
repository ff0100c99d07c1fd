#include "services/transport/options.h"

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

const char* KindName(Kind kind) { return kind == Kind::kNccl ? "nccl" : "grpc"; }

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
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "data_plane.transport must be \"auto\", \"grpc\" or \"nccl\"; got \"", t, "\""));
  }
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
  if (!nccl_built) {
    if (mode == Mode::kNccl) {
      return absl::UnavailableError(
          "data_plane.transport is nccl but this router was built without NCCL "
          "(-DDHSA_WITH_NCCL=ON)");
    }
    return TransportChoice{Kind::kGrpc, "built without NCCL"};
  }
  for (const PeerState& w : workers) {
    if (!w.communicator_ready) {
      const std::string why =
          absl::StrCat("worker ", w.address, " shares no ready NCCL communicator with the router");
      if (mode == Mode::kNccl) {
        return absl::UnavailableError(absl::StrCat("data_plane.transport is nccl but ", why));
      }
      return TransportChoice{Kind::kGrpc, why};
    }
  }
  return TransportChoice{
      Kind::kNccl, absl::StrCat("all ", workers.size(), " workers share a ready communicator")};
}

}  // namespace dhsa::transport
