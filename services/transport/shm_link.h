// The router's shared-memory connection with one worker: two arenas (shm_arena.h), "r2w" for the
// tensors the router sends (q, k, v) and "w2r" for those the worker returns (o, lse), attached on
// the worker with Worker.AttachArena and unlinked right after. The owner of the link tells the
// worker to unmap them (Worker.DetachArena with the arenas' ids) when it drops the link.
#ifndef DHSA_SERVICES_TRANSPORT_SHM_LINK_H_
#define DHSA_SERVICES_TRANSPORT_SHM_LINK_H_

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "dhsa/v1/worker.grpc.pb.h"
#include "services/transport/shm_arena.h"

namespace dhsa::transport {

class ShmLink {
 public:
  // Creates both arenas of `arena_bytes` each, named "<name>/w<worker>/<generation>/r2w|w2r", and
  // attaches them on the worker (each AttachArena bounded by `timeout`); the names are unlinked
  // before this returns, whatever happened. FailedPrecondition when the worker cannot map them
  // (another host), other codes as the worker or the system answered.
  static absl::StatusOr<std::shared_ptr<ShmLink>> Connect(v1::Worker::Stub* stub,
                                                          const std::string& name, int worker,
                                                          int generation, int64_t arena_bytes,
                                                          std::chrono::milliseconds timeout);

  ShmArena& r2w() { return *r2w_; }
  ShmArena& w2r() { return *w2r_; }
  const std::shared_ptr<ShmArena>& r2w_ptr() const { return r2w_; }
  const std::shared_ptr<ShmArena>& w2r_ptr() const { return w2r_; }

 private:
  ShmLink() = default;
  std::shared_ptr<ShmArena> r2w_;
  std::shared_ptr<ShmArena> w2r_;
};

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_SHM_LINK_H_
