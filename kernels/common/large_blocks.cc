#include "kernels/common/large_blocks.h"

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace dhsa::large_blocks {
namespace {

constexpr size_t kAlign = size_t{2} << 20;  // One x86-64 huge page.

size_t Rounded(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

struct Cached {
  void* block;
  size_t bytes;  // Rounded size.
};

struct Cache {
  std::mutex mu;
  bool limit_set = false;
  size_t limit = size_t{1} << 30;
  size_t held = 0;
  std::vector<Cached> blocks;  // Oldest first; a few dozen at most.
  Stats stats;

  // Called with mu held.
  void ReadLimitOnce() {
    if (limit_set) return;
    limit_set = true;
    if (const char* mb = std::getenv("DHSA_TENSOR_CACHE_MB"); mb != nullptr && *mb != '\0') {
      char* end = nullptr;
      const unsigned long long v = std::strtoull(mb, &end, 10);
      if (end != nullptr && *end == '\0') limit = static_cast<size_t>(v) << 20;
    }
  }

  // Unmaps the oldest blocks until `held` is at most `target`; mu held.
  void ShrinkTo(size_t target) {
    size_t drop = 0;
    while (drop < blocks.size() && held > target) {
      munmap(blocks[drop].block, blocks[drop].bytes);
      held -= blocks[drop].bytes;
      ++drop;
    }
    blocks.erase(blocks.begin(), blocks.begin() + static_cast<std::ptrdiff_t>(drop));
  }
};

Cache& TheCache() {
  static Cache* cache = new Cache;  // Never destroyed: blocks may be freed during exit.
  return *cache;
}

void* MapAligned(size_t bytes) {
  // Map one huge page more than needed and cut the ends, so the block starts on a 2 MiB boundary
  // (huge pages only back aligned 2 MiB ranges).
  const size_t span = bytes + kAlign;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kAlign - 1) / kAlign * kAlign;
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = aligned + bytes;
  const uintptr_t end = start + span;
  if (end > tail) munmap(reinterpret_cast<void*>(tail), end - tail);
  void* block = reinterpret_cast<void*>(aligned);
  // Advice only: without transparent huge pages the block works the same with 4 KiB pages.
  madvise(block, bytes, MADV_HUGEPAGE);
  return block;
}

}  // namespace

void* Allocate(size_t bytes) {
  const size_t size = Rounded(bytes);
  Cache& cache = TheCache();
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    cache.ReadLimitOnce();
    // The newest block of the size: the most likely to be resident still.
    for (size_t i = cache.blocks.size(); i-- > 0;) {
      if (cache.blocks[i].bytes == size) {
        void* block = cache.blocks[i].block;
        cache.blocks.erase(cache.blocks.begin() + static_cast<std::ptrdiff_t>(i));
        cache.held -= size;
        ++cache.stats.reused;
        return block;
      }
    }
    ++cache.stats.mapped;
  }
  void* block = MapAligned(size);
  if (block == nullptr) {
    // Cached blocks of other sizes may be what the system is missing: drop them and try once more.
    {
      std::lock_guard<std::mutex> lock(cache.mu);
      cache.ShrinkTo(0);
    }
    block = MapAligned(size);
    if (block == nullptr) throw std::bad_alloc();
  }
  return block;
}

void Free(void* block, size_t bytes) {
  if (block == nullptr) return;
  const size_t size = Rounded(bytes);
  Cache& cache = TheCache();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.ReadLimitOnce();
  if (size > cache.limit) {
    munmap(block, size);
    return;
  }
  cache.ShrinkTo(cache.limit - size);
  cache.blocks.push_back({block, size});
  cache.held += size;
}

void SetCacheLimit(size_t bytes) {
  Cache& cache = TheCache();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.limit_set = true;
  cache.limit = bytes;
  cache.ShrinkTo(bytes);
}

size_t CacheLimit() {
  Cache& cache = TheCache();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.ReadLimitOnce();
  return cache.limit;
}

Stats GetStats() {
  Cache& cache = TheCache();
  std::lock_guard<std::mutex> lock(cache.mu);
  Stats s = cache.stats;
  s.cached_bytes = cache.held;
  return s;
}

}  // namespace dhsa::large_blocks
