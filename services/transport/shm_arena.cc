#include "services/transport/shm_arena.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace dhsa::transport {
namespace {

constexpr char kMagic[8] = {'D', 'H', 'S', 'A', 'S', 'H', 'M', '1'};
constexpr int64_t kMinArenaBytes = int64_t{1} << 20;

int64_t RoundUp(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

std::string RandomBytes(int n) {
  std::random_device rd;
  std::string out(static_cast<size_t>(n), '\0');
  for (int i = 0; i < n; i += 4) {
    const uint32_t r = rd();
    for (int j = 0; j < 4 && i + j < n; ++j)
      out[static_cast<size_t>(i + j)] = static_cast<char>(r >> (8 * j));
  }
  return out;
}

std::string Errno(const char* what) { return absl::StrCat(what, ": ", std::strerror(errno)); }

std::atomic<int64_t> g_locked_bytes{0};

// Maps `size` bytes of `fd` shared at an address aligned to kShmLockChunkBytes (a PROT_NONE
// reservation of size + one chunk, the object mapped over its aligned part, the rest given back).
void* MapAligned(int fd, int64_t size) {
  const size_t reserve = static_cast<size_t>(size + kShmLockChunkBytes);
  void* r = mmap(nullptr, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) return MAP_FAILED;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(r);
  const uintptr_t aligned =
      static_cast<uintptr_t>(RoundUp(static_cast<int64_t>(begin), kShmLockChunkBytes));
  void* p = mmap(reinterpret_cast<void*>(aligned), static_cast<size_t>(size),
                 PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) {
    munmap(r, reserve);
    return MAP_FAILED;
  }
  if (aligned > begin) munmap(r, aligned - begin);
  const uintptr_t end = aligned + static_cast<uintptr_t>(RoundUp(size, kShmAlignBytes));
  if (begin + reserve > end) munmap(reinterpret_cast<void*>(end), begin + reserve - end);
  return p;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ShmMapping>> ShmMapping::Create(int64_t size) {
  if (size < kMinArenaBytes) {
    return absl::InvalidArgumentError(absl::StrCat("a shared-memory arena needs at least ",
                                                   kMinArenaBytes, " bytes; asked for ", size));
  }
  static std::atomic<uint64_t> counter{0};
  std::unique_ptr<ShmMapping> m(new ShmMapping);
  m->size_ = size;
  m->cookie_ = RandomBytes(kShmCookieBytes);
  std::string suffix;
  for (unsigned char c : RandomBytes(6)) absl::StrAppend(&suffix, absl::Hex(c, absl::kZeroPad2));
  m->name_ = absl::StrCat("/dhsa-", getpid(), "-", counter.fetch_add(1), "-", suffix);
  m->fd_ = shm_open(m->name_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (m->fd_ < 0) {
    return absl::UnavailableError(Errno(absl::StrCat("shm_open(", m->name_, ")").c_str()));
  }
  if (ftruncate(m->fd_, size) != 0) {
    const std::string why = Errno("ftruncate of a shared-memory arena");
    m->Unlink();
    return absl::ResourceExhaustedError(why);
  }
  void* p = mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_SHARED, m->fd_, 0);
  if (p == MAP_FAILED) {
    const std::string why = Errno("mmap of a shared-memory arena");
    m->Unlink();
    return absl::ResourceExhaustedError(why);
  }
  m->base_ = static_cast<uint8_t*>(p);
  absl::Status committed = m->Commit(kShmHeaderBytes);
  if (!committed.ok()) {
    m->Unlink();
    return committed;
  }
  std::memcpy(m->base_, kMagic, sizeof(kMagic));
  std::memcpy(m->base_ + sizeof(kMagic), m->cookie_.data(), kShmCookieBytes);
  return m;
}

absl::StatusOr<std::unique_ptr<ShmMapping>> ShmMapping::Open(const std::string& name, int64_t size,
                                                             const std::string& cookie) {
  if (name.empty() || name[0] != '/' || name.find('/', 1) != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared-memory name '", name, "' must be '/' followed by a name"));
  }
  if (static_cast<int>(cookie.size()) != kShmCookieBytes || size < kMinArenaBytes) {
    return absl::InvalidArgumentError(absl::StrCat("arena '", name, "' needs a ", kShmCookieBytes,
                                                   "-byte cookie and >= ", kMinArenaBytes,
                                                   " bytes; got ", cookie.size(), " and ", size));
  }
  std::unique_ptr<ShmMapping> m(new ShmMapping);
  m->name_ = name;
  m->cookie_ = cookie;
  m->size_ = size;
  m->unlinked_ = true;  // The router owns the name.
  m->fd_ = shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  if (m->fd_ < 0) {
    return absl::FailedPreconditionError(
        Errno(absl::StrCat("shm_open(", name, ") (is the router on another host?)").c_str()));
  }
  struct stat st;
  if (fstat(m->fd_, &st) != 0 || st.st_size != size) {
    return absl::FailedPreconditionError(absl::StrCat("shared-memory object ", name, " has ",
                                                      st.st_size, " bytes; expected ", size));
  }
  void* p = MapAligned(m->fd_, size);  // Lock chunks on aligned addresses (see the header).
  if (p == MAP_FAILED) return absl::ResourceExhaustedError(Errno("mmap of a shared-memory arena"));
  m->base_ = static_cast<uint8_t*>(p);
  // The router committed the header before it asked; a file of the right size is not enough.
  if (std::memcmp(m->base_, kMagic, sizeof(kMagic)) != 0 ||
      std::memcmp(m->base_ + sizeof(kMagic), cookie.data(), kShmCookieBytes) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "shared-memory object ", name, " does not carry the router's cookie (another host?)"));
  }
  return m;
}

ShmMapping::~ShmMapping() {
  UnlockAll();  // Registrations end before the memory goes.
  if (base_ != nullptr) munmap(base_, static_cast<size_t>(size_));
  if (fd_ >= 0) close(fd_);
  Unlink();
}

void ShmMapping::Unlink() {
  if (unlinked_) return;
  unlinked_ = true;
  shm_unlink(name_.c_str());
}

absl::Status ShmMapping::Commit(int64_t end) {
  if (end <= committed_.load(std::memory_order_acquire)) return absl::OkStatus();
  std::lock_guard<std::mutex> lock(commit_mu_);
  const int64_t have = committed_.load(std::memory_order_relaxed);
  if (end <= have) return absl::OkStatus();
  const int64_t to = std::min(size_, RoundUp(end, kShmCommitStepBytes));
  const int rc = posix_fallocate(fd_, have, to - have);
  if (rc != 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot back ", to - have, " more bytes of shared-memory arena ", name_, ": ",
                     std::strerror(rc), " (is /dev/shm full?)"));
  }
  // Page-table entries now, once, instead of a fault per page on the first transfers.
  madvise(base_ + have, static_cast<size_t>(to - have), MADV_POPULATE_WRITE);
  committed_.store(to, std::memory_order_release);
  return absl::OkStatus();
}

void ShmMapping::Populate(int64_t end) {
  if (end <= committed_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(commit_mu_);
  const int64_t have = committed_.load(std::memory_order_relaxed);
  if (end <= have) return;
  const int64_t to = std::min(size_, RoundUp(end, kShmCommitStepBytes));
  // Only the router's committed range is backed; populating beyond `end` could touch holes, so
  // stop at `end` rounded to a page (the rest of the step follows with later pins).
  const int64_t safe = std::min(to, RoundUp(end, kShmAlignBytes));
  madvise(base_ + have, static_cast<size_t>(safe - have), MADV_POPULATE_WRITE);
  committed_.store(safe, std::memory_order_release);
}

bool ShmMapping::Lock(int64_t begin, int64_t end, const std::shared_ptr<HostMemoryLocker>& locker) {
  std::lock_guard<std::mutex> lock(lock_mu_);
  if (lock_failed_ || locker == nullptr) return false;
  if (locker_ == nullptr) locker_ = locker;
  const int64_t chunks = (size_ + kShmLockChunkBytes - 1) / kShmLockChunkBytes;
  if (locked_.empty()) locked_.assign(static_cast<size_t>(chunks), false);
  begin = std::max<int64_t>(begin, 0);
  end = std::min(end, size_);
  int64_t newly = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t c = begin / kShmLockChunkBytes; c * kShmLockChunkBytes < end; ++c) {
    if (locked_[static_cast<size_t>(c)]) continue;
    const int64_t from = c * kShmLockChunkBytes;
    const int64_t bytes = std::min(size_, from + kShmLockChunkBytes) - from;
    const absl::Status st = locker_->Lock(base_ + from, static_cast<size_t>(bytes));
    if (!st.ok()) {
      lock_failed_ = true;
      std::fprintf(stderr,
                   "dhsa-worker: page-locking shared-memory arena %s failed (%s); its transfers "
                   "copy through pageable memory\n",
                   name_.c_str(), std::string(st.message()).c_str());
      return false;
    }
    locked_[static_cast<size_t>(c)] = true;
    g_locked_bytes.fetch_add(bytes);
    newly += bytes;
  }
  if (newly > 0 && std::getenv("DHSA_CUDA_WORKER_TIMING") != nullptr) {
    std::fprintf(
        stderr, "dhsa-worker: page-locked %lld MiB of arena %s in %.1f ms\n",
        static_cast<long long>(newly >> 20), name_.c_str(),
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3);
  }
  return true;
}

void ShmMapping::UnlockAll() {
  std::lock_guard<std::mutex> lock(lock_mu_);
  for (size_t c = 0; c < locked_.size(); ++c) {
    if (!locked_[c]) continue;
    const int64_t from = static_cast<int64_t>(c) * kShmLockChunkBytes;
    locker_->Unlock(base_ + from);
    g_locked_bytes.fetch_sub(std::min(size_, from + kShmLockChunkBytes) - from);
    locked_[c] = false;
  }
}

int64_t ShmLockedBytes() { return g_locked_bytes.load(); }

// ShmRegion ----------------------------------------------------------------------------------

ShmRegion::~ShmRegion() { arena_->Free(start_, span_, lease_); }

uint8_t* ShmRegion::data() const { return arena_->mapping().base() + start_ + kShmLeaseBytes; }

void ShmRegion::Describe(v1::ShmRegion* out) const {
  out->set_arena_id(arena_->id());
  out->set_offset(start_ + kShmLeaseBytes);
  out->set_bytes(bytes_);
  out->set_lease(lease_);
}

// ShmArena ------------------------------------------------------------------------------------

ShmArena::ShmArena(std::string id, std::unique_ptr<ShmMapping> mapping)
    : id_(std::move(id)), mapping_(std::move(mapping)) {
  InsertFreeLocked(kShmHeaderBytes,
                   mapping_->size() / kShmAlignBytes * kShmAlignBytes - kShmHeaderBytes);
}

absl::StatusOr<std::shared_ptr<ShmArena>> ShmArena::Create(std::string id, int64_t size) {
  absl::StatusOr<std::unique_ptr<ShmMapping>> m = ShmMapping::Create(size);
  if (!m.ok()) return m.status();
  return std::shared_ptr<ShmArena>(new ShmArena(std::move(id), *std::move(m)));
}

std::atomic<uint64_t>* ShmArena::LeaseWord(int64_t start) const {
  static_assert(std::atomic<uint64_t>::is_always_lock_free, "lease words must be lock-free");
  return reinterpret_cast<std::atomic<uint64_t>*>(mapping_->base() + start);
}

void ShmArena::InsertFreeLocked(int64_t start, int64_t span) {
  if (span <= 0) return;
  auto next = free_.lower_bound(start);
  if (next != free_.end() && start + span == next->first) {
    span += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      prev->second += span;
      return;
    }
  }
  free_.emplace(start, span);
}

void ShmArena::ReclaimLocked() {
  for (size_t i = 0; i < quarantine_.size();) {
    Quarantined& q = quarantine_[i];
    uint64_t expected = q.lease << 1;
    if (LeaseWord(q.start)->compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) {
      used_ -= q.span;
      InsertFreeLocked(q.start, q.span);
      quarantine_[i] = quarantine_.back();
      quarantine_.pop_back();
    } else {
      ++i;
    }
  }
}

std::unique_ptr<ShmRegion> ShmArena::Allocate(int64_t bytes) {
  if (bytes <= 0) return nullptr;
  const int64_t span = RoundUp(kShmLeaseBytes + bytes, kShmAlignBytes);
  int64_t start = -1;
  uint64_t lease = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!quarantine_.empty()) ReclaimLocked();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < span) continue;
      start = it->first;
      const int64_t rest = it->second - span;
      free_.erase(it);
      if (rest > 0) free_.emplace(start + span, rest);
      break;
    }
    if (start < 0) {
      ++failed_;
      return nullptr;
    }
    if (!mapping_->Commit(start + span).ok()) {
      InsertFreeLocked(start, span);
      ++failed_;
      return nullptr;
    }
    lease = next_lease_++;
    used_ += span;
    ++regions_;
    ++allocations_;
    LeaseWord(start)->store(lease << 1, std::memory_order_release);
  }
  return std::unique_ptr<ShmRegion>(new ShmRegion(shared_from_this(), start, span, bytes, lease));
}

void ShmArena::Free(int64_t start, int64_t span, uint64_t lease) {
  std::lock_guard<std::mutex> lock(mu_);
  --regions_;
  uint64_t expected = lease << 1;
  if (LeaseWord(start)->compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) {
    used_ -= span;
    InsertFreeLocked(start, span);
  } else {
    // The worker has it pinned (a call that ended while the worker was still at it): reuse it only
    // once the worker lets go.
    quarantine_.push_back({start, span, lease});
  }
}

ShmArenaStats ShmArena::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  ShmArenaStats s;
  s.size_bytes = mapping_->size();
  s.committed_bytes = mapping_->committed();
  s.used_bytes = used_;
  s.regions = regions_;
  s.quarantined = static_cast<int64_t>(quarantine_.size());
  s.allocations = allocations_;
  s.failed_allocations = failed_;
  return s;
}

// ShmPin ---------------------------------------------------------------------------------------

ShmPin::ShmPin(ShmPin&& other) noexcept { *this = std::move(other); }

ShmPin& ShmPin::operator=(ShmPin&& other) noexcept {
  if (this != &other) {
    Release();
    mapping_ = std::move(other.mapping_);
    word_ = std::exchange(other.word_, nullptr);
    lease_ = other.lease_;
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    locked_ = std::exchange(other.locked_, false);
  }
  return *this;
}

ShmPin::~ShmPin() { Release(); }

void ShmPin::Release() {
  if (word_ == nullptr) return;
  uint64_t expected = (lease_ << 1) | 1;
  word_->compare_exchange_strong(expected, lease_ << 1, std::memory_order_acq_rel);
  word_ = nullptr;
  data_ = nullptr;
  locked_ = false;
  mapping_.reset();
}

// ShmPeerArenas --------------------------------------------------------------------------------

absl::StatusOr<v1::ArenaInfo> ShmPeerArenas::Attach(const v1::AttachArenaRequest& request) {
  if (request.arena_id().empty() || request.shm_name().empty()) {
    return absl::InvalidArgumentError("AttachArena needs an arena_id and a shm_name");
  }
  if (request.direction() != "r2w" && request.direction() != "w2r") {
    return absl::InvalidArgumentError(absl::StrCat(
        "AttachArena direction must be \"r2w\" or \"w2r\"; got \"", request.direction(), "\""));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Arenas of routers that exited: their memory is freed once unmapped here.
    for (auto it = arenas_.begin(); it != arenas_.end();) {
      const int64_t pid = it->second.info.owner_pid();
      if (pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
        it = arenas_.erase(it);
      } else {
        ++it;
      }
    }
    if (arenas_.count(request.arena_id()) > 0) {
      return absl::AlreadyExistsError(
          absl::StrCat("this worker already holds arena '", request.arena_id(), "'"));
    }
  }
  absl::StatusOr<std::unique_ptr<ShmMapping>> m =
      ShmMapping::Open(request.shm_name(), request.size_bytes(), request.cookie());
  if (!m.ok()) return m.status();
  Entry e;
  e.mapping = *std::move(m);
  e.info.set_arena_id(request.arena_id());
  e.info.set_direction(request.direction());
  e.info.set_size_bytes(request.size_bytes());
  e.info.set_owner_pid(request.owner_pid());
  e.info.set_created_unix_micros(absl::ToUnixMicros(absl::Now()));
  v1::ArenaInfo info = e.info;
  std::lock_guard<std::mutex> lock(mu_);
  if (!arenas_.emplace(request.arena_id(), std::move(e)).second) {
    return absl::AlreadyExistsError(
        absl::StrCat("this worker already holds arena '", request.arena_id(), "'"));
  }
  return info;
}

bool ShmPeerArenas::Detach(const std::string& arena_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return arenas_.erase(arena_id) > 0;
}

void ShmPeerArenas::SetLocker(std::shared_ptr<HostMemoryLocker> locker) {
  std::lock_guard<std::mutex> lock(mu_);
  locker_ = std::move(locker);
}

bool ShmPeerArenas::has_locker() const {
  std::lock_guard<std::mutex> lock(mu_);
  return locker_ != nullptr;
}

absl::StatusOr<ShmPin> ShmPeerArenas::Pin(const v1::ShmRegion& region, int64_t bytes, bool write,
                                          bool lock_pages) {
  std::shared_ptr<ShmMapping> mapping;
  std::shared_ptr<HostMemoryLocker> locker;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (lock_pages) locker = locker_;
    auto it = arenas_.find(region.arena_id());
    if (it == arenas_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("this worker holds no shared-memory arena '", region.arena_id(),
                       "' (restarted?); the router reconnects on its next probe"));
    }
    mapping = it->second.mapping;
    it->second.info.set_transfers(it->second.info.transfers() + 1);
    if (write) {
      it->second.info.set_bytes_written(it->second.info.bytes_written() + bytes);
    } else {
      it->second.info.set_bytes_read(it->second.info.bytes_read() + bytes);
    }
  }
  const int64_t off = region.offset();
  if (region.bytes() != bytes || bytes <= 0 || off < kShmHeaderBytes + kShmLeaseBytes ||
      (off - kShmLeaseBytes) % kShmAlignBytes != 0 || off > mapping->size() - bytes ||
      region.lease() == 0 || region.lease() >= (uint64_t{1} << 62)) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared-memory region at offset ", off, " of ", region.bytes(),
                     " bytes (lease ", region.lease(), ") does not fit arena '", region.arena_id(),
                     "' of ", mapping->size(), " bytes or the ", bytes, " bytes expected"));
  }
  mapping->Populate(off + bytes);
  ShmPin pin;
  pin.word_ = reinterpret_cast<std::atomic<uint64_t>*>(mapping->base() + off - kShmLeaseBytes);
  uint64_t expected = region.lease() << 1;
  if (!pin.word_->compare_exchange_strong(expected, (region.lease() << 1) | 1,
                                          std::memory_order_acq_rel)) {
    pin.word_ = nullptr;
    return absl::AbortedError(
        absl::StrCat("shared-memory region at offset ", off, " of arena '", region.arena_id(),
                     "' is no longer this call's (the router ended the call)"));
  }
  pin.lease_ = region.lease();
  // Pinned first: the router keeps the region (hence its committed chunks) while it is ours.
  if (locker != nullptr) pin.locked_ = mapping->Lock(off, off + bytes, locker);
  pin.data_ = mapping->base() + off;
  pin.bytes_ = bytes;
  pin.mapping_ = std::move(mapping);
  return pin;
}

void ShmPeerArenas::FillStats(v1::StatsResponse* response) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<const v1::ArenaInfo*> infos;
  for (const auto& [id, e] : arenas_) infos.push_back(&e.info);
  std::sort(infos.begin(), infos.end(), [](const v1::ArenaInfo* a, const v1::ArenaInfo* b) {
    return a->created_unix_micros() < b->created_unix_micros();
  });
  for (const v1::ArenaInfo* i : infos) *response->add_arenas() = *i;
}

size_t ShmPeerArenas::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return arenas_.size();
}

}  // namespace dhsa::transport
