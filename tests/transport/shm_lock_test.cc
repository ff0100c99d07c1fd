// Page-locking of a worker's shared-memory arena mappings (services/transport/shm_arena.h), with a
// recording locker in place of cudaHostRegister (no GPU needed): chunks locked once each, on
// kShmLockChunkBytes-aligned addresses inside the mapping, only when asked and a locker is set;
// every chunk unlocked while still mapped, when the last holder of the mapping lets go; a failing
// lock degrades to unlocked pins, logged once and never retried.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "gtest/gtest.h"
#include "services/transport/shm_arena.h"

namespace dhsa::transport {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;

class RecordingLocker final : public HostMemoryLocker {
 public:
  explicit RecordingLocker(int fail_at = -1) : fail_at_(fail_at) {}
  absl::Status Lock(void* data, size_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++calls_;
    if (calls_ == fail_at_) return absl::InternalError("test: refused");
    EXPECT_EQ(reinterpret_cast<uintptr_t>(data) % kShmLockChunkBytes, 0u);
    EXPECT_TRUE(locked_.emplace(data, bytes).second) << "locked twice";
    return absl::OkStatus();
  }
  void Unlock(void* data) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = locked_.find(data);
    ASSERT_NE(it, locked_.end()) << "unlocking what was not locked";
    // Still mapped: msync answers ENOMEM for an unmapped range.
    EXPECT_EQ(msync(data, static_cast<size_t>(getpagesize()), MS_ASYNC), 0)
        << "unlocked after the unmap";
    locked_.erase(it);
    ++unlocks_;
  }
  int calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }
  int unlocks() {
    std::lock_guard<std::mutex> lock(mu_);
    return unlocks_;
  }
  std::map<void*, size_t> locked() {
    std::lock_guard<std::mutex> lock(mu_);
    return locked_;
  }

 private:
  const int fail_at_;
  std::mutex mu_;
  int calls_ = 0, unlocks_ = 0;
  std::map<void*, size_t> locked_;
};

v1::AttachArenaRequest AttachRequest(ShmArena& arena) {
  v1::AttachArenaRequest r;
  r.set_arena_id(arena.id());
  r.set_shm_name(arena.mapping().name());
  r.set_size_bytes(arena.mapping().size());
  r.set_cookie(arena.mapping().cookie());
  r.set_owner_pid(getpid());
  r.set_direction("r2w");
  return r;
}

v1::ShmRegion Describe(const ShmRegion& region) {
  v1::ShmRegion d;
  region.Describe(&d);
  return d;
}

TEST(ShmLock, NothingLockedWithoutALockerOrWithoutAsking) {
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("a", 8 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status();
  ShmPeerArenas peer;
  ASSERT_TRUE(peer.Attach(AttachRequest(**arena)).ok());
  std::unique_ptr<ShmRegion> r = (*arena)->Allocate(3 * kMiB + 5);
  ASSERT_NE(r, nullptr);
  EXPECT_FALSE(peer.has_locker());
  absl::StatusOr<ShmPin> pin = peer.Pin(Describe(*r), r->bytes(), false, true);
  ASSERT_TRUE(pin.ok()) << pin.status();
  EXPECT_FALSE(pin->locked());
  EXPECT_EQ(ShmLockedBytes(), 0);
  auto locker = std::make_shared<RecordingLocker>();
  peer.SetLocker(locker);
  absl::StatusOr<ShmPin> plain = peer.Pin(Describe(*r), r->bytes(), false);
  ASSERT_FALSE(plain.ok());  // Pinned twice: the lease word is taken.
  *pin = ShmPin();
  plain = peer.Pin(Describe(*r), r->bytes(), false, /*lock=*/false);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->locked());
  EXPECT_EQ(locker->calls(), 0);
}

TEST(ShmLock, ChunksLockedOnceOnAlignedAddressesAndUnlockedBeforeTheUnmap) {
  // 150 MiB + 12 KiB: two whole chunks and a short last one.
  const int64_t size = 150 * kMiB + 12 * 1024;
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("b", size);
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto locker = std::make_shared<RecordingLocker>();
  ShmPin keep;
  {
    ShmPeerArenas peer;
    peer.SetLocker(locker);
    ASSERT_TRUE(peer.Attach(AttachRequest(**arena)).ok());
    std::unique_ptr<ShmRegion> a = (*arena)->Allocate(10 * kMiB + 3);  // Chunk 0.
    std::unique_ptr<ShmRegion> b = (*arena)->Allocate(70 * kMiB);      // Chunks 0 and 1.
    std::unique_ptr<ShmRegion> c = (*arena)->Allocate(60 * kMiB);      // Chunks 1 and 2.
    ASSERT_TRUE(a != nullptr && b != nullptr && c != nullptr);
    const v1::ShmRegion da = Describe(*a), db = Describe(*b), dc = Describe(*c);
    absl::StatusOr<ShmPin> pa = peer.Pin(da, a->bytes(), true, true);
    ASSERT_TRUE(pa.ok()) << pa.status();
    EXPECT_TRUE(pa->locked());
    uint8_t* const base = pa->data() - da.offset();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(base) % kShmLockChunkBytes, 0u);
    EXPECT_EQ(locker->calls(), 1);
    EXPECT_EQ(ShmLockedBytes(), kShmLockChunkBytes);
    // Written through the locked pin, read through the router's region: the same memory.
    std::memset(pa->data(), 0x5a, static_cast<size_t>(a->bytes()));
    EXPECT_EQ(a->data()[a->bytes() - 1], 0x5a);
    *pa = ShmPin();
    pa = peer.Pin(da, a->bytes(), false, true);  // Again: nothing new to lock.
    ASSERT_TRUE(pa.ok());
    EXPECT_TRUE(pa->locked());
    EXPECT_EQ(locker->calls(), 1);
    absl::StatusOr<ShmPin> pb = peer.Pin(db, b->bytes(), true, true);
    ASSERT_TRUE(pb.ok());
    EXPECT_TRUE(pb->locked());
    EXPECT_EQ(locker->calls(), 2);
    absl::StatusOr<ShmPin> pc = peer.Pin(dc, c->bytes(), true, true);
    ASSERT_TRUE(pc.ok());
    EXPECT_TRUE(pc->locked());
    EXPECT_EQ(locker->calls(), 3);
    const std::map<void*, size_t> locked = locker->locked();
    ASSERT_EQ(locked.size(), 3u);
    int64_t k = 0;
    for (const auto& [p, bytes] : locked) {
      EXPECT_EQ(static_cast<uint8_t*>(p), base + k * kShmLockChunkBytes);
      EXPECT_EQ(static_cast<int64_t>(bytes),
                std::min(kShmLockChunkBytes, size - k * kShmLockChunkBytes));
      ++k;
    }
    EXPECT_EQ(ShmLockedBytes(), size);
    keep = std::move(*pc);  // Holds the mapping past the detach.
    EXPECT_TRUE(peer.Detach((*arena)->id()));
    EXPECT_EQ(locker->unlocks(), 0);  // Still mapped through `keep`.
  }
  EXPECT_EQ(locker->unlocks(), 0);
  keep = ShmPin();  // The last holder: every chunk unlocked, then unmapped.
  EXPECT_EQ(locker->unlocks(), 3);
  EXPECT_TRUE(locker->locked().empty());
  EXPECT_EQ(ShmLockedBytes(), 0);
}

TEST(ShmLock, AFailedLockDegradesToUnlockedPinsAndIsNotRetried) {
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("c", 140 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto locker = std::make_shared<RecordingLocker>(/*fail_at=*/2);
  {
    ShmPeerArenas peer;
    peer.SetLocker(locker);
    ASSERT_TRUE(peer.Attach(AttachRequest(**arena)).ok());
    std::unique_ptr<ShmRegion> a = (*arena)->Allocate(8 * kMiB);
    std::unique_ptr<ShmRegion> b = (*arena)->Allocate(100 * kMiB);
    ASSERT_TRUE(a != nullptr && b != nullptr);
    absl::StatusOr<ShmPin> pa = peer.Pin(Describe(*a), a->bytes(), false, true);
    ASSERT_TRUE(pa.ok());
    EXPECT_TRUE(pa->locked());
    absl::StatusOr<ShmPin> pb = peer.Pin(Describe(*b), b->bytes(), true, true);
    ASSERT_TRUE(pb.ok()) << pb.status();  // The call goes on, through pageable copies.
    EXPECT_FALSE(pb->locked());
    std::memset(pb->data(), 1, static_cast<size_t>(b->bytes()));
    EXPECT_EQ(b->data()[0], 1);
    *pa = ShmPin();
    pa = peer.Pin(Describe(*a), a->bytes(), false, true);
    ASSERT_TRUE(pa.ok());
    EXPECT_FALSE(pa->locked());  // Not retried, not even for chunks locked before.
    EXPECT_EQ(locker->calls(), 2);
  }
  EXPECT_EQ(locker->unlocks(), 1);  // The chunk locked before the failure.
  EXPECT_EQ(ShmLockedBytes(), 0);
}

}  // namespace
}  // namespace dhsa::transport
