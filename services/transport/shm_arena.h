// The shared-memory data plane, for a router and workers on one host (the embedded `dhsa serve`,
// loopback deployments): tensors move through POSIX shared-memory arenas, the gRPC messages carry
// only their descriptors (v1::ShmRegion).
//
// Life of an arena. At connect time the router creates one arena per worker and direction
// ("r2w": q, k and v; "w2r": o and lse), with shm_open(O_CREAT | O_EXCL, 0600) under a fresh random
// name and ftruncate to its size (sparse: nothing is touched yet). The worker maps it by name
// (Worker.AttachArena) and checks a random cookie the router wrote at its start (same memory, not
// a namesake on another host: there the open fails and the worker stays on gRPC bytes). Then the
// router unlinks the name, whatever the answer: from then on only the two mappings hold the memory,
// so a process that dies leaks nothing (the kernel frees the memory once the other side unmaps).
//
// Regions. The router allocates every region of both arenas (a first-fit allocator): the inputs it
// writes and the outputs a worker writes for it; a region is freed when the call that took it
// ends. Backing memory is committed (fallocate) only as far as the highest region used, in 64 MiB
// steps, and prefaulted there once (MADV_POPULATE_WRITE), so transfers reuse mapped pages instead
// of faulting fresh ones; a full /dev/shm is an allocation failure (the transfer falls back to gRPC
// bytes), never a SIGBUS. An arena with no room for a tensor answers no region (same fallback);
// nothing waits for room.
//
// Leases. Each region starts with a 64-byte lease word in the shared memory, then its data. The
// router sets it to the region's lease number when allocating; a worker pins a region before it
// reads or writes it (compare-and-swap lease -> lease | 1) and unpins it after. A region whose call
// ended while the worker had it pinned (a cancelled or timed-out call) is not reused until the
// worker unpins it; a worker that finds the lease gone (the router freed the region) fails its call
// with ABORTED instead of reading or writing memory that may belong to another call.
//
// Page-locking. A worker whose backend copies between host memory and a device (the CUDA worker)
// gives its ShmPeerArenas a HostMemoryLocker (cudaHostRegister); regions it pins with `lock` are
// then page-locked in place, kShmLockChunkBytes chunks of its mapping at a time, each chunk once
// for the mapping's life (the first call that reaches it pays for it), so the device copies q from
// the arena and o and lse into it at page-locked speed, without a staging copy. The worker maps
// arenas at addresses aligned to kShmLockChunkBytes, so a chunk's bounds are multiples of it in
// the address space too (copies cut there never span two registrations). Chunks stay inside what
// the router committed (it commits in kShmCommitStepBytes steps, the same size). Every chunk is
// unlocked before the mapping is unmapped (detach, a router gone, worker shutdown). A lock that
// fails is logged once and never retried for that mapping: its pins report !locked() and the
// worker copies as before.
#ifndef DHSA_SERVICES_TRANSPORT_SHM_ARENA_H_
#define DHSA_SERVICES_TRANSPORT_SHM_ARENA_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "dhsa/v1/worker.pb.h"

namespace dhsa::transport {

inline constexpr int64_t kShmHeaderBytes = 4096;  // Arena header: magic and cookie.
inline constexpr int64_t kShmAlignBytes = 4096;   // Regions start on page boundaries.
inline constexpr int64_t kShmLeaseBytes = 64;     // Lease word before each region's data.
inline constexpr int64_t kShmCommitStepBytes = int64_t{64} << 20;
inline constexpr int kShmCookieBytes = 16;
inline constexpr int64_t kShmLockChunkBytes = kShmCommitStepBytes;

// Page-locks host memory for a device's copies (the CUDA worker: cudaHostRegister /
// cudaHostUnregister). Called with chunks of a worker's arena mappings.
class HostMemoryLocker {
 public:
  virtual ~HostMemoryLocker() = default;
  virtual absl::Status Lock(void* data, size_t bytes) = 0;
  // Of a range Lock locked (by its start), before that memory is unmapped.
  virtual void Unlock(void* data) = 0;
};

// Bytes of arena mappings page-locked now in this process (all ShmPeerArenas together).
int64_t ShmLockedBytes();

// One mapping of an arena (router or worker side).
class ShmMapping {
 public:
  // Router: a new object "/dhsa-<pid>-<n>-<random>" of `size` bytes (O_CREAT | O_EXCL, 0600,
  // sparse), mapped, with the header written. InvalidArgument for a size below 1 MiB.
  static absl::StatusOr<std::unique_ptr<ShmMapping>> Create(int64_t size);
  // Worker: maps the object `name`, which must have `size` bytes and carry `cookie` in its
  // header. FailedPrecondition when it does not exist (another host) or differs.
  static absl::StatusOr<std::unique_ptr<ShmMapping>> Open(const std::string& name, int64_t size,
                                                          const std::string& cookie);
  ~ShmMapping();
  ShmMapping(const ShmMapping&) = delete;
  ShmMapping& operator=(const ShmMapping&) = delete;

  // Removes the name (the memory stays while mapped). Idempotent.
  void Unlink();
  // Backs [0, end) with memory (fallocate in kShmCommitStepBytes steps, then prefaulted).
  // ResourceExhausted when the shared-memory file system is full. Router side.
  absl::Status Commit(int64_t end);
  // Prefaults [0, end) in this process's page tables (the worker side; best effort).
  void Populate(int64_t end);

  uint8_t* base() const { return base_; }
  int64_t size() const { return size_; }
  const std::string& name() const { return name_; }
  const std::string& cookie() const { return cookie_; }
  int64_t committed() const { return committed_.load(); }

  // Page-locks the kShmLockChunkBytes chunks of [0, size) that [begin, end) reaches and that are
  // not locked yet, through `locker` (the first one given stays this mapping's and unlocks them
  // all before the unmap). False when a lock failed, now or before (then never tried again; the
  // failure is logged once).
  bool Lock(int64_t begin, int64_t end, const std::shared_ptr<HostMemoryLocker>& locker);

 private:
  ShmMapping() = default;
  void UnlockAll();

  std::string name_;
  std::string cookie_;
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  int64_t size_ = 0;
  bool unlinked_ = false;
  std::mutex commit_mu_;
  std::atomic<int64_t> committed_{0};  // Backed and prefaulted bytes from 0.
  std::mutex lock_mu_;
  std::shared_ptr<HostMemoryLocker> locker_;  // Guarded by lock_mu_.
  std::vector<bool> locked_;                  // Guarded by lock_mu_: per chunk.
  bool lock_failed_ = false;                  // Guarded by lock_mu_.
};

class ShmArena;

// A region of an arena taken by one transfer; freed (or quarantined, while a worker has it
// pinned) when destroyed.
class ShmRegion {
 public:
  ~ShmRegion();
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;

  uint8_t* data() const;
  int64_t bytes() const { return bytes_; }
  // The descriptor the peer receives.
  void Describe(v1::ShmRegion* out) const;

 private:
  friend class ShmArena;
  ShmRegion(std::shared_ptr<ShmArena> arena, int64_t start, int64_t span, int64_t bytes,
            uint64_t lease)
      : arena_(std::move(arena)), start_(start), span_(span), bytes_(bytes), lease_(lease) {}

  std::shared_ptr<ShmArena> arena_;
  int64_t start_;  // Of the lease word; data at start_ + kShmLeaseBytes.
  int64_t span_;
  int64_t bytes_;
  uint64_t lease_;
};

struct ShmArenaStats {
  int64_t size_bytes = 0;
  int64_t committed_bytes = 0;
  int64_t used_bytes = 0;          // In regions now (quarantined ones too).
  int64_t regions = 0;             // Allocated now.
  int64_t quarantined = 0;         // Freed while pinned by the worker.
  int64_t allocations = 0;         // Since creation.
  int64_t failed_allocations = 0;  // No room (the transfer went over gRPC bytes).
};

// The router's side of one arena: the mapping and the allocator.
class ShmArena : public std::enable_shared_from_this<ShmArena> {
 public:
  // `id` names the arena in descriptors (unique per router and worker connection).
  static absl::StatusOr<std::shared_ptr<ShmArena>> Create(std::string id, int64_t size);

  // A region of `bytes` data bytes (> 0), or null when the arena has no room for it or the memory
  // cannot be committed.
  std::unique_ptr<ShmRegion> Allocate(int64_t bytes);

  const std::string& id() const { return id_; }
  ShmMapping& mapping() { return *mapping_; }
  ShmArenaStats Stats() const;

 private:
  friend class ShmRegion;
  ShmArena(std::string id, std::unique_ptr<ShmMapping> mapping);
  std::atomic<uint64_t>* LeaseWord(int64_t start) const;
  void Free(int64_t start, int64_t span, uint64_t lease);
  void InsertFreeLocked(int64_t start, int64_t span);
  void ReclaimLocked();

  const std::string id_;
  const std::unique_ptr<ShmMapping> mapping_;
  mutable std::mutex mu_;
  std::map<int64_t, int64_t> free_;  // Guarded by mu_: start -> span, coalesced.
  struct Quarantined {
    int64_t start, span;
    uint64_t lease;
  };
  std::vector<Quarantined> quarantine_;  // Guarded by mu_.
  uint64_t next_lease_ = 1;              // Guarded by mu_.
  int64_t used_ = 0;                     // Guarded by mu_.
  int64_t regions_ = 0;                  // Guarded by mu_.
  int64_t allocations_ = 0;              // Guarded by mu_.
  int64_t failed_ = 0;                   // Guarded by mu_.
};

// A worker's pin on a region: the region's data, readable and writable until destroyed.
class ShmPin {
 public:
  ShmPin() = default;
  ShmPin(ShmPin&& other) noexcept;
  ShmPin& operator=(ShmPin&& other) noexcept;
  ~ShmPin();

  uint8_t* data() const { return data_; }
  int64_t bytes() const { return bytes_; }
  // Page-locked for the device's copies (pinned with `lock` and the lock succeeded). Copies from or
  // into it must be cut at kShmLockChunkBytes-aligned addresses (one registration each).
  bool locked() const { return locked_; }

 private:
  friend class ShmPeerArenas;
  void Release();

  std::shared_ptr<ShmMapping> mapping_;
  std::atomic<uint64_t>* word_ = nullptr;
  uint64_t lease_ = 0;
  uint8_t* data_ = nullptr;
  int64_t bytes_ = 0;
  bool locked_ = false;
};

// A worker's side: the arenas routers attached (Worker.AttachArena).
class ShmPeerArenas {
 public:
  // Maps the arena of `request`. FailedPrecondition when the name cannot be opened (another host)
  // or the memory is not the router's (size or cookie differ); AlreadyExists for a known id;
  // InvalidArgument for missing fields. Arenas of routers that have exited (owner_pid gone) are
  // forgotten first.
  absl::StatusOr<v1::ArenaInfo> Attach(const v1::AttachArenaRequest& request);
  bool Detach(const std::string& arena_id);
  // Pins the region `region` names, which must hold exactly `bytes` bytes (InvalidArgument
  // otherwise, or for one outside its arena); FailedPrecondition for an unknown arena (the worker
  // restarted), Aborted when the router already freed the region (its call ended). `write`: the
  // worker will write it (counted as bytes written, else read). `lock`: page-lock the region (see
  // the top of this file) when a locker is set; a failed lock is not an error (!pin.locked()).
  absl::StatusOr<ShmPin> Pin(const v1::ShmRegion& region, int64_t bytes, bool write,
                             bool lock = false);
  // The locker for Pin(..., lock = true) (the worker's device backend's); null: none.
  void SetLocker(std::shared_ptr<HostMemoryLocker> locker);
  bool has_locker() const;
  void FillStats(v1::StatsResponse* response) const;
  size_t size() const;

 private:
  struct Entry {
    std::shared_ptr<ShmMapping> mapping;
    v1::ArenaInfo info;
  };
  mutable std::mutex mu_;
  std::map<std::string, Entry> arenas_;       // Guarded by mu_.
  std::shared_ptr<HostMemoryLocker> locker_;  // Guarded by mu_.
};

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_SHM_ARENA_H_
