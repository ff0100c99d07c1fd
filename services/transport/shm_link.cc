#include "services/transport/shm_link.h"

#include <grpcpp/client_context.h>
#include <unistd.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "services/common/status.h"

namespace dhsa::transport {

absl::StatusOr<std::shared_ptr<ShmLink>> ShmLink::Connect(v1::Worker::Stub* stub,
                                                          const std::string& name, int worker,
                                                          int generation, int64_t arena_bytes,
                                                          std::chrono::milliseconds timeout) {
  std::shared_ptr<ShmLink> link(new ShmLink);
  const std::string prefix = absl::StrCat(name, "/w", worker, "/", generation, "/");
  for (const char* direction : {"r2w", "w2r"}) {
    absl::StatusOr<std::shared_ptr<ShmArena>> arena =
        ShmArena::Create(absl::StrCat(prefix, direction), arena_bytes);
    if (!arena.ok()) return arena.status();
    v1::AttachArenaRequest request;
    request.set_arena_id((*arena)->id());
    request.set_shm_name((*arena)->mapping().name());
    request.set_size_bytes((*arena)->mapping().size());
    request.set_cookie((*arena)->mapping().cookie());
    request.set_owner_pid(getpid());
    request.set_direction(direction);
    v1::AttachArenaResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeout);
    const grpc::Status s = stub->AttachArena(&context, request, &response);
    // Mapped on both sides (or failed): the name has done its job; a crash now leaks nothing.
    (*arena)->mapping().Unlink();
    if (!s.ok()) {
      if (link->r2w_ != nullptr) {
        // Best effort, and waited for: no call may outlive the caller's channel.
        v1::DetachArenaRequest detach;
        detach.set_arena_id(link->r2w_->id());
        v1::DetachArenaResponse detached;
        grpc::ClientContext detach_context;
        detach_context.set_deadline(std::chrono::system_clock::now() + timeout);
        (void)stub->DetachArena(&detach_context, detach, &detached);
      }
      const absl::Status status = FromGrpcStatus(s);
      return absl::Status(status.code(),
                          absl::StrCat("AttachArena ", direction, ": ", status.message()));
    }
    (std::string(direction) == "r2w" ? link->r2w_ : link->w2r_) = *std::move(arena);
  }
  return link;
}

}  // namespace dhsa::transport
