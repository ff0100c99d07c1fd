// A memory region a router shares with a client on the same host, so that a prefill's tensors
// cross between them as one memcpy each way instead of a gRPC stream of 4 MiB messages.
//
// The router creates it (memfd, sealed against shrinking and growing, so a client can never make
// the router's reads fault) and offers it as a /proc/<pid>/fd/<n> path plus a random nonce; the
// client opens that path, maps it and checks the nonce (a client in another PID namespace or on
// another host cannot open it or finds another file: it falls back to gRPC bytes). Once the client
// has mapped it the router closes its descriptor, so nobody else can open it any more. Layout: one
// 4 KiB header page holding the nonce, then `size()` data bytes; offsets are data offsets.
#ifndef DHSA_SERVICES_COMMON_SHARED_REGION_H_
#define DHSA_SERVICES_COMMON_SHARED_REGION_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dhsa {

class SharedRegion {
 public:
  static constexpr int64_t kHeaderBytes = 4096;
  static constexpr int kNonceBytes = 16;

  // Router side: a region of `data_bytes` (> 0) data bytes. ResourceExhausted when the system
  // refuses the memory, Unimplemented where memfd is missing.
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Create(int64_t data_bytes);
  // Client side: opens `path`, checks that it holds `data_bytes` data bytes and `nonce`.
  // FailedPrecondition (with the reason) when it is not the region the router offered.
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Open(const std::string& path,
                                                            absl::string_view nonce,
                                                            int64_t data_bytes);
  ~SharedRegion();
  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;

  // Where a client opens it ("" once CloseDescriptor has run).
  std::string path() const;
  const std::string& nonce() const { return nonce_; }
  uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }
  // Router side: no further opens; the mappings stay.
  void CloseDescriptor();

  // OK when [offset, offset + bytes) lies in the data area; InvalidArgument naming `what`.
  absl::Status CheckRange(int64_t offset, int64_t bytes, absl::string_view what) const;

 private:
  SharedRegion() = default;

  int fd_ = -1;
  uint8_t* base_ = nullptr;  // The whole mapping (header + data).
  uint8_t* data_ = nullptr;
  int64_t size_ = 0;
  std::string nonce_;
};

}  // namespace dhsa

#endif  // DHSA_SERVICES_COMMON_SHARED_REGION_H_
