// The shared-memory arena (services/transport/shm_arena.h) on its own: creation and mapping by
// name, the unlinked name, the allocator (fit, coalescing, exhaustion, odd sizes), leases (pins,
// quarantine of a region freed while pinned, a pin after the free), descriptor checks, and the
// copies through the kernel (shm_copy.h).
#include "services/transport/shm_arena.h"

#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "services/transport/shm_copy.h"

namespace dhsa::transport {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;

// Names under /dev/shm made by this process's arenas.
std::vector<std::string> OurShmNames() {
  std::vector<std::string> out;
  const std::string prefix = "dhsa-" + std::to_string(getpid()) + "-";
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return out;
  while (dirent* e = readdir(dir)) {
    if (std::string(e->d_name).rfind(prefix, 0) == 0) out.push_back(e->d_name);
  }
  closedir(dir);
  return out;
}

v1::AttachArenaRequest AttachRequest(const ShmArena& arena, const std::string& direction = "r2w") {
  v1::AttachArenaRequest r;
  r.set_arena_id(arena.id());
  r.set_shm_name(const_cast<ShmArena&>(arena).mapping().name());
  r.set_size_bytes(const_cast<ShmArena&>(arena).mapping().size());
  r.set_cookie(const_cast<ShmArena&>(arena).mapping().cookie());
  r.set_owner_pid(getpid());
  r.set_direction(direction);
  return r;
}

TEST(ShmArenaTest, WorkerSeesTheRoutersBytesAndTheNameIsGoneAfterUnlink) {
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("a/r2w", 8 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status();
  EXPECT_EQ(OurShmNames().size(), 1u);
  ShmPeerArenas peer;
  absl::StatusOr<v1::ArenaInfo> info = peer.Attach(AttachRequest(**arena));
  ASSERT_TRUE(info.ok()) << info.status();
  (*arena)->mapping().Unlink();
  EXPECT_TRUE(OurShmNames().empty());  // Only the mappings hold the memory now.

  std::mt19937_64 rng(7);
  for (int64_t bytes : {int64_t{1}, int64_t{63}, int64_t{4097}, 3 * kMiB + 5}) {
    SCOPED_TRACE(bytes);
    std::unique_ptr<ShmRegion> region = (*arena)->Allocate(bytes);
    ASSERT_NE(region, nullptr);
    for (int64_t i = 0; i < bytes; ++i) region->data()[i] = static_cast<uint8_t>(rng());
    v1::ShmRegion d;
    region->Describe(&d);
    absl::StatusOr<ShmPin> pin = peer.Pin(d, bytes, /*write=*/false);
    ASSERT_TRUE(pin.ok()) << pin.status();
    EXPECT_EQ(std::memcmp(pin->data(), region->data(), static_cast<size_t>(bytes)), 0);
    EXPECT_NE(pin->data(), region->data());  // Two mappings of the same memory.
    pin->data()[bytes - 1] ^= 0xff;          // The worker writes; the router sees it.
    EXPECT_EQ(pin->data()[bytes - 1], region->data()[bytes - 1]);
  }
  v1::StatsResponse stats;
  peer.FillStats(&stats);
  ASSERT_EQ(stats.arenas_size(), 1);
  EXPECT_EQ(stats.arenas(0).transfers(), 4);
  EXPECT_EQ(stats.arenas(0).bytes_read(), 1 + 63 + 4097 + 3 * kMiB + 5);
  EXPECT_EQ(peer.Attach(AttachRequest(**arena)).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(peer.Detach((*arena)->id()));
  EXPECT_FALSE(peer.Detach((*arena)->id()));
}

TEST(ShmArenaTest, OpenFailsForAnotherHostsNameOrForeignMemory) {
  ShmPeerArenas peer;
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("b/r2w", 2 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status();
  v1::AttachArenaRequest r = AttachRequest(**arena);
  v1::AttachArenaRequest missing = r;
  missing.set_shm_name("/dhsa-no-such-arena-" + std::to_string(getpid()));
  EXPECT_EQ(peer.Attach(missing).status().code(), absl::StatusCode::kFailedPrecondition);
  v1::AttachArenaRequest cookie = r;
  std::string c = cookie.cookie();
  c[3] ^= 1;
  cookie.set_cookie(c);
  EXPECT_EQ(peer.Attach(cookie).status().code(), absl::StatusCode::kFailedPrecondition);
  v1::AttachArenaRequest size = r;
  size.set_size_bytes(4 * kMiB);
  EXPECT_EQ(peer.Attach(size).status().code(), absl::StatusCode::kFailedPrecondition);
  v1::AttachArenaRequest direction = r;
  direction.set_direction("sideways");
  EXPECT_EQ(peer.Attach(direction).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(peer.size(), 0u);
  EXPECT_EQ(ShmArena::Create("tiny", 4096).status().code(), absl::StatusCode::kInvalidArgument);
  // Destroying the router's side unlinks a name never attached.
  arena->reset();
  EXPECT_TRUE(OurShmNames().empty());
}

TEST(ShmArenaTest, AllocatorFitsCoalescesAndAnswersNullWhenFull) {
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("c", 4 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status();
  // Room: 4 MiB minus the 4 KiB header; each region takes its bytes + 64, rounded to 4 KiB.
  std::unique_ptr<ShmRegion> a = (*arena)->Allocate(kMiB);
  std::unique_ptr<ShmRegion> b = (*arena)->Allocate(kMiB);
  std::unique_ptr<ShmRegion> c = (*arena)->Allocate(kMiB);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ((*arena)->Allocate(kMiB), nullptr);  // 3 * (1 MiB + 4 KiB) + 4 KiB leaves < 1 MiB.
  EXPECT_EQ((*arena)->Stats().failed_allocations, 1);
  EXPECT_EQ((*arena)->Allocate(0), nullptr);
  // Disjoint.
  EXPECT_GE(b->data() - a->data(), kMiB);
  EXPECT_GE(c->data() - b->data(), kMiB);
  // Freeing a and b coalesces them: a region of 2 MiB fits now.
  a.reset();
  b.reset();
  std::unique_ptr<ShmRegion> big = (*arena)->Allocate(2 * kMiB);
  ASSERT_NE(big, nullptr);
  EXPECT_EQ((*arena)->Stats().regions, 2);
  big.reset();
  c.reset();
  const ShmArenaStats s = (*arena)->Stats();
  EXPECT_EQ(s.used_bytes, 0);
  EXPECT_EQ(s.regions, 0);
  // Everything free again: the whole room in one region.
  EXPECT_NE((*arena)->Allocate(4 * kMiB - kShmHeaderBytes - kShmLeaseBytes), nullptr);
  // Random sizes, random frees: never overlapping, all freed in the end.
  std::mt19937_64 rng(11);
  std::vector<std::unique_ptr<ShmRegion>> live;
  for (int i = 0; i < 400; ++i) {
    if (!live.empty() && rng() % 3 == 0) {
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(rng() % live.size()));
      continue;
    }
    std::unique_ptr<ShmRegion> r = (*arena)->Allocate(1 + static_cast<int64_t>(rng() % 300000));
    if (r == nullptr) continue;
    std::memset(r->data(), static_cast<int>(i & 0xff), static_cast<size_t>(r->bytes()));
    for (const auto& o : live) {
      const bool apart = r->data() + r->bytes() <= o->data() || o->data() + o->bytes() <= r->data();
      ASSERT_TRUE(apart);
    }
    live.push_back(std::move(r));
  }
  live.clear();
  EXPECT_EQ((*arena)->Stats().used_bytes, 0);
}

// The copies through the kernel (shm_copy.h) move the same bytes as memcpy, into and out of an
// arena, at odd sizes and offsets, and across 4 KiB page edges.
TEST(ShmCopyTest, CopiesThroughTheKernelEqualMemcpy) {
  std::mt19937_64 rng(0x5eed);
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("g", 32 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status();
  std::unique_ptr<ShmRegion> region = (*arena)->Allocate(20 * kMiB);
  ASSERT_NE(region, nullptr);
  for (const size_t n : {size_t{0}, size_t{1}, size_t{63}, size_t{4095}, size_t{4097},
                         size_t{1000003}, size_t{20 * kMiB - 5}}) {
    SCOPED_TRACE(n);
    const size_t at = n == 0 ? 0 : static_cast<size_t>(rng() % (20 * kMiB - n + 1));
    std::vector<uint8_t> src(n + 1), back(n + 2, 0xAB);
    for (uint8_t& x : src) x = static_cast<uint8_t>(rng());
    std::memset(region->data(), 0x5A, static_cast<size_t>(region->bytes()));
    CopyIntoShared(region->data() + at, src.data() + 1, n);  // Unaligned source too.
    EXPECT_EQ(std::memcmp(region->data() + at, src.data() + 1, n), 0);
    if (at > 0) {  // Nothing before or after.
      EXPECT_EQ(region->data()[at - 1], 0x5A);
    }
    if (at + n < static_cast<size_t>(region->bytes())) {
      EXPECT_EQ(region->data()[at + n], 0x5A);
    }
    CopyFromShared(back.data() + 1, region->data() + at, n);
    EXPECT_EQ(std::memcmp(back.data() + 1, src.data() + 1, n), 0);
    EXPECT_EQ(back[0], 0xAB);
    EXPECT_EQ(back[n + 1], 0xAB);
  }
}

TEST(ShmArenaTest, RegionFreedWhilePinnedIsQuarantinedAndAPinAfterTheFreeIsAborted) {
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("d", 2 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status();
  ShmPeerArenas peer;
  ASSERT_TRUE(peer.Attach(AttachRequest(**arena, "w2r")).ok());
  const int64_t room = 2 * kMiB - kShmHeaderBytes - kShmLeaseBytes;

  // Freed while the worker holds it: not reused until the worker lets go.
  std::unique_ptr<ShmRegion> r = (*arena)->Allocate(room);
  ASSERT_NE(r, nullptr);
  v1::ShmRegion d;
  r->Describe(&d);
  absl::StatusOr<ShmPin> pin = peer.Pin(d, room, /*write=*/true);
  ASSERT_TRUE(pin.ok()) << pin.status();
  r.reset();  // The call ended (cancelled) while the worker was writing.
  EXPECT_EQ((*arena)->Stats().quarantined, 1);
  EXPECT_EQ((*arena)->Allocate(4096), nullptr);  // Still the worker's.
  std::memset(pin->data(), 1, 16);               // Writing is still safe: nobody else has it.
  *pin = ShmPin();                               // The worker lets go.
  std::unique_ptr<ShmRegion> again = (*arena)->Allocate(room);
  ASSERT_NE(again, nullptr);
  EXPECT_EQ((*arena)->Stats().quarantined, 0);

  // A region freed before the worker pins it: the pin fails, the new owner's bytes are untouched.
  v1::ShmRegion stale;
  again->Describe(&stale);
  again.reset();
  std::unique_ptr<ShmRegion> other = (*arena)->Allocate(room);
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(peer.Pin(stale, room, true).status().code(), absl::StatusCode::kAborted);
  // The same offset under its new lease pins fine.
  v1::ShmRegion fresh;
  other->Describe(&fresh);
  EXPECT_EQ(fresh.offset(), stale.offset());
  EXPECT_TRUE(peer.Pin(fresh, room, true).ok());
}

TEST(ShmArenaTest, ArenasOfARouterThatExitedAreForgottenAtTheNextAttach) {
  // A "router" process that has exited: its pid no longer runs.
  const pid_t dead = fork();
  if (dead == 0) _exit(0);
  ASSERT_GT(dead, 0);
  ASSERT_EQ(waitpid(dead, nullptr, 0), dead);
  absl::StatusOr<std::shared_ptr<ShmArena>> a = ShmArena::Create("gone/r2w", 2 * kMiB);
  absl::StatusOr<std::shared_ptr<ShmArena>> b = ShmArena::Create("live/r2w", 2 * kMiB);
  ASSERT_TRUE(a.ok() && b.ok());
  ShmPeerArenas peer;
  v1::AttachArenaRequest from_dead = AttachRequest(**a);
  from_dead.set_owner_pid(dead);
  ASSERT_TRUE(peer.Attach(from_dead).ok());
  EXPECT_EQ(peer.size(), 1u);
  ASSERT_TRUE(peer.Attach(AttachRequest(**b)).ok());
  EXPECT_EQ(peer.size(), 1u);  // The dead router's arena was unmapped.
  v1::StatsResponse stats;
  peer.FillStats(&stats);
  ASSERT_EQ(stats.arenas_size(), 1);
  EXPECT_EQ(stats.arenas(0).arena_id(), "live/r2w");
}

TEST(ShmArenaTest, PinChecksTheDescriptor) {
  absl::StatusOr<std::shared_ptr<ShmArena>> arena = ShmArena::Create("e", 2 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status();
  ShmPeerArenas peer;
  ASSERT_TRUE(peer.Attach(AttachRequest(**arena)).ok());
  std::unique_ptr<ShmRegion> r = (*arena)->Allocate(1000);
  ASSERT_NE(r, nullptr);
  v1::ShmRegion d;
  r->Describe(&d);
  EXPECT_EQ(peer.Pin(d, 999, false).status().code(), absl::StatusCode::kInvalidArgument);
  v1::ShmRegion bad = d;
  bad.set_offset(2 * kMiB - 10);
  EXPECT_EQ(peer.Pin(bad, 1000, false).status().code(), absl::StatusCode::kInvalidArgument);
  bad = d;
  bad.set_offset(d.offset() + 64);  // Not a region start.
  EXPECT_EQ(peer.Pin(bad, 1000, false).status().code(), absl::StatusCode::kInvalidArgument);
  bad = d;
  bad.set_offset(0);  // The header.
  EXPECT_EQ(peer.Pin(bad, 1000, false).status().code(), absl::StatusCode::kInvalidArgument);
  bad = d;
  bad.set_lease(d.lease() + 1);
  EXPECT_EQ(peer.Pin(bad, 1000, false).status().code(), absl::StatusCode::kAborted);
  bad = d;
  bad.set_arena_id("unknown");
  EXPECT_EQ(peer.Pin(bad, 1000, false).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(peer.Pin(d, 1000, false).ok());
}

}  // namespace
}  // namespace dhsa::transport
