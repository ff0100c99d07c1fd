// Storage for large tensors: 2 MiB-aligned anonymous mappings advised for transparent huge pages,
// and a process-wide cache of freed ones so that the next tensor of the same size reuses memory
// that is already mapped.
//
// Why: the service moves hundreds of MB per layer through freshly allocated buffers (a tensor
// assembled from a stream, a kernel's output, a merge). glibc maps every allocation over 32 MiB
// anew and unmaps it on free, so each such buffer costs one page fault per 4 KiB page when it is
// first written (on the development VM a page fault is the single largest cost of the router's
// data path). Huge pages cut the faults 512-fold; the cache removes them for the repeating sizes of
// a layer-by-layer prefill.
#ifndef DHSA_KERNELS_COMMON_LARGE_BLOCKS_H_
#define DHSA_KERNELS_COMMON_LARGE_BLOCKS_H_

#include <cstddef>
#include <cstdint>

namespace dhsa::large_blocks {

// Allocations of at least this many bytes go through here (smaller ones through operator new).
inline constexpr size_t kMinBytes = size_t{1} << 20;

// A block of at least `bytes` (>= kMinBytes) bytes, 2 MiB aligned; the contents are unspecified
// (zero when freshly mapped, the previous user's bytes when reused). Throws std::bad_alloc when the
// system has no memory, as operator new does.
void* Allocate(size_t bytes);
// Gives back a block from Allocate(bytes) (the same `bytes`). Cached while the cache stays within
// its limit, unmapped otherwise.
void Free(void* block, size_t bytes);

// Bytes the cache may hold (default 1 GiB, or DHSA_TENSOR_CACHE_MB from the environment at the
// first allocation); 0 turns caching off. Lowering it unmaps cached blocks at once.
void SetCacheLimit(size_t bytes);
size_t CacheLimit();

struct Stats {
  size_t cached_bytes = 0;  // Held by the cache, not in use.
  int64_t reused = 0;       // Allocations served from the cache.
  int64_t mapped = 0;       // Allocations that mapped new memory.
};
Stats GetStats();

}  // namespace dhsa::large_blocks

#endif  // DHSA_KERNELS_COMMON_LARGE_BLOCKS_H_
