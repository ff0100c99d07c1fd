// The router's shared-memory regions for clients on the same host (services/common/
// shared_region.h; rpcs OpenSharedMemory / CloseSharedMemory, PrefillHeader.shared).
#ifndef DHSA_SERVICES_ROUTER_SHARED_REGIONS_H_
#define DHSA_SERVICES_ROUTER_SHARED_REGIONS_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <unordered_map>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dhsa/v1/attention.pb.h"
#include "services/common/shared_region.h"

namespace dhsa::router {

class SharedRegions {
 public:
  struct Options {
    int64_t max_bytes_per_client = int64_t{4} << 30;  // 0 turns shared memory off.
    int max_regions_per_client = 4;
    absl::Duration idle = absl::Minutes(10);  // Unused this long: closed.
  };
  explicit SharedRegions(Options options) : options_(options) {}
  // Takes mu_ once, so that the handlers' last writes are ordered before the members go.
  ~SharedRegions() { std::lock_guard<std::mutex> lock(mu_); }

  absl::StatusOr<v1::OpenSharedMemoryResponse> Open(const std::string& client, int64_t bytes);
  absl::Status Close(const std::string& client, const std::string& id);
  // The region `id` of `client` for a call (NotFound otherwise). Its descriptor is closed now:
  // the client has mapped it before naming it, and nobody may open it after.
  absl::StatusOr<std::shared_ptr<SharedRegion>> Use(const std::string& client,
                                                    const std::string& id);

  int64_t held_bytes() const;

 private:
  struct Entry {
    std::string client;
    std::shared_ptr<SharedRegion> region;  // Calls using it hold it past a Close.
    absl::Time last_used;
  };
  void ReapIdleLocked(absl::Time now);

  const Options options_;
  mutable std::mutex mu_;
  std::unordered_map<std::string, Entry> regions_;  // By id; guarded by mu_.
  uint64_t next_id_ = 1;                            // Guarded by mu_.
  std::mt19937_64 random_{std::random_device{}()};  // Guarded by mu_.
};

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_SHARED_REGIONS_H_
