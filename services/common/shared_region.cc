#include "services/common/shared_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"

namespace dhsa {
namespace {

std::string ErrnoText(int err) { return std::strerror(err); }

// Both sides map with MAP_POPULATE: the pages are allocated and mapped in one pass when the region
// opens, not by a fault per 4 KiB during the first prefill (tmpfs gets no huge pages by default,
// and on a VM each fault is costly: measured as seconds of a 32K-token layer).

std::string RandomNonce() {
  std::random_device device;
  std::string nonce(SharedRegion::kNonceBytes, '\0');
  for (char& c : nonce) c = static_cast<char>(device() & 0xff);
  return nonce;
}

// Largest region: far above any prefill, low enough that offsets never overflow.
constexpr int64_t kMaxDataBytes = int64_t{1} << 40;

}  // namespace

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::Create(int64_t data_bytes) {
  if (data_bytes <= 0 || data_bytes > kMaxDataBytes) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory region size must be in [1, ",
                                                   kMaxDataBytes, "] bytes; got ", data_bytes));
  }
  std::unique_ptr<SharedRegion> region(new SharedRegion);
  region->fd_ = memfd_create("dhsa-client-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (region->fd_ < 0) {
    return absl::UnimplementedError(
        absl::StrCat("memfd_create failed: ", ErrnoText(errno), "; shared memory is off"));
  }
  const int64_t total = kHeaderBytes + data_bytes;
  if (ftruncate(region->fd_, total) != 0) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot size a shared-memory region of ",
                                                     total, " bytes: ", ErrnoText(errno)));
  }
  // Sealed: nobody (the client included) can shrink it under the router's reads (SIGBUS) or grow
  // it, and the seals themselves are final.
  if (fcntl(region->fd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return absl::InternalError(
        absl::StrCat("cannot seal a shared-memory region: ", ErrnoText(errno)));
  }
  void* base = mmap(nullptr, static_cast<size_t>(total), PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_POPULATE, region->fd_, 0);
  if (base == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot map a shared-memory region of ", total, " bytes: ", ErrnoText(errno)));
  }
  region->base_ = static_cast<uint8_t*>(base);
  region->data_ = region->base_ + kHeaderBytes;
  region->size_ = data_bytes;
  region->nonce_ = RandomNonce();
  std::memcpy(region->base_, region->nonce_.data(), region->nonce_.size());
  return region;
}

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::Open(const std::string& path,
                                                                 absl::string_view nonce,
                                                                 int64_t data_bytes) {
  if (nonce.size() != kNonceBytes || data_bytes <= 0 || data_bytes > kMaxDataBytes) {
    return absl::FailedPreconditionError("the router's shared-memory offer is malformed");
  }
  std::unique_ptr<SharedRegion> region(new SharedRegion);
  region->fd_ = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (region->fd_ < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open the router's shared memory '", path, "': ", ErrnoText(errno),
                     " (router on another host or in another PID namespace?)"));
  }
  struct stat st;
  const int64_t total = kHeaderBytes + data_bytes;
  if (fstat(region->fd_, &st) != 0 || st.st_size != total) {
    return absl::FailedPreconditionError(
        absl::StrCat("'", path, "' is not the router's shared memory (size differs)"));
  }
  // Only a sealed file is safe to map: an unsealed one could shrink under us.
  const int seals = fcntl(region->fd_, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("'", path, "' is not the router's shared memory (not sealed)"));
  }
  void* base = mmap(nullptr, static_cast<size_t>(total), PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_POPULATE, region->fd_, 0);
  if (base == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot map the router's shared memory: ", ErrnoText(errno)));
  }
  region->base_ = static_cast<uint8_t*>(base);
  region->data_ = region->base_ + kHeaderBytes;
  region->size_ = data_bytes;
  if (std::memcmp(region->base_, nonce.data(), kNonceBytes) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("'", path, "' is not the router's shared memory (nonce differs)"));
  }
  region->nonce_ = std::string(nonce);
  // The client needs no descriptor once mapped.
  region->CloseDescriptor();
  return region;
}

SharedRegion::~SharedRegion() {
  if (base_ != nullptr) munmap(base_, static_cast<size_t>(kHeaderBytes + size_));
  CloseDescriptor();
}

std::string SharedRegion::path() const {
  if (fd_ < 0) return "";
  return absl::StrCat("/proc/", getpid(), "/fd/", fd_);
}

void SharedRegion::CloseDescriptor() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

absl::Status SharedRegion::CheckRange(int64_t offset, int64_t bytes, absl::string_view what) const {
  if (offset < 0 || bytes < 0 || offset > size_ || bytes > size_ - offset) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory range of '", what, "' [", offset,
                                                   ", +", bytes, ") is outside the region of ",
                                                   size_, " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace dhsa
