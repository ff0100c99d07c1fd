#include "services/router/shared_regions.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace dhsa::router {

absl::StatusOr<v1::OpenSharedMemoryResponse> SharedRegions::Open(const std::string& client,
                                                                 int64_t bytes) {
  if (options_.max_bytes_per_client <= 0) {
    return absl::FailedPreconditionError(
        "shared memory is turned off on this router (--client-shm-bytes 0)");
  }
  if (bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared-memory region size must be positive; got ", bytes));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ReapIdleLocked(absl::Now());
    int64_t held = 0;
    int count = 0;
    for (const auto& [id, entry] : regions_) {
      if (entry.client != client) continue;
      held += entry.region->size();
      ++count;
    }
    if (count >= options_.max_regions_per_client || bytes > options_.max_bytes_per_client - held) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "a shared-memory region of ", bytes, " bytes would take this client past the router's ",
          "limit (", count, " regions holding ", held, " of ", options_.max_bytes_per_client,
          " bytes, at most ", options_.max_regions_per_client,
          " regions); close one or send tensors as pieces"));
    }
  }
  absl::StatusOr<std::unique_ptr<SharedRegion>> region = SharedRegion::Create(bytes);
  if (!region.ok()) return region.status();
  v1::OpenSharedMemoryResponse response;
  response.set_path((*region)->path());
  response.set_nonce((*region)->nonce());
  response.set_bytes((*region)->size());
  std::lock_guard<std::mutex> lock(mu_);
  // A counter for uniqueness and a random part, so that an id cannot be guessed by another client
  // on the host (without tokens, every client of one host has the same identity).
  const std::string id =
      absl::StrCat("shm-", next_id_++, "-", absl::Hex(random_(), absl::kZeroPad16));
  response.set_region_id(id);
  regions_[id] = Entry{client, std::move(*region), absl::Now()};
  return response;
}

absl::Status SharedRegions::Close(const std::string& client, const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end() || it->second.client != client) {
    return absl::NotFoundError(absl::StrCat("no shared-memory region '", id, "' of this client"));
  }
  regions_.erase(it);  // A call still using it keeps the mapping until it ends.
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<SharedRegion>> SharedRegions::Use(const std::string& client,
                                                                 const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end() || it->second.client != client) {
    return absl::NotFoundError(absl::StrCat("no shared-memory region '", id,
                                            "' of this client (closed after 10 minutes idle, "
                                            "or opened by another client)"));
  }
  it->second.last_used = absl::Now();
  it->second.region->CloseDescriptor();
  return it->second.region;
}

int64_t SharedRegions::held_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t held = 0;
  for (const auto& [id, entry] : regions_) held += entry.region->size();
  return held;
}

void SharedRegions::ReapIdleLocked(absl::Time now) {
  for (auto it = regions_.begin(); it != regions_.end();) {
    if (now - it->second.last_used > options_.idle) {
      it = regions_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace dhsa::router
