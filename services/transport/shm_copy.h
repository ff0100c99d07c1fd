// Bulk copies into and out of shared memory (the client regions, the router's arenas), through
// the kernel: process_vm_writev/readv on this very process.
//
// On the development VM (a guest with shadow page tables) the first access of a process to each
// 4 KiB page of a mapping costs an exit to the host, even when the page is allocated and mapped
// (MAP_POPULATE): memcpy of 128 MiB into a freshly mapped shared-memory region took 0.61-0.69 s,
// the same bytes through process_vm_writev 0.05-0.07 s (the kernel reaches the pages through its
// own mapping), and later copies into the same pages 0.017-0.025 s by memcpy against 0.025-0.042 s
// through the kernel (bench/results/2026-11-29-service-cpu.md). The kernel's copy costs about the
// same once the pages are warm and never pays the first touch, which every new client's region and
// every arena range a call reaches for the first time would pay.
//
// process_vm_readv/writev on one's own pid needs no privilege; where the system refuses them (a
// seccomp filter, an old kernel) the copy falls back to memcpy, same bytes.
#ifndef DHSA_SERVICES_TRANSPORT_SHM_COPY_H_
#define DHSA_SERVICES_TRANSPORT_SHM_COPY_H_

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace dhsa::transport {
namespace shm_copy_internal {

inline std::atomic<bool>& KernelCopyRefused() {
  static std::atomic<bool> refused{false};
  return refused;
}

// `write`: local -> remote (process_vm_writev), else remote -> local (process_vm_readv); the
// "remote" side is the one reached through the kernel's mapping. Bytes the kernel did not copy are
// copied by memcpy.
inline void Copy(void* local, void* remote, size_t n, bool write) {
  constexpr size_t kChunk = size_t{1} << 30;  // Below the kernel's per-call limit (MAX_RW_COUNT).
  size_t done = 0;
  if (!KernelCopyRefused().load(std::memory_order_relaxed)) {
    const pid_t self = getpid();
    while (done < n) {
      const size_t len = std::min(kChunk, n - done);
      iovec l{static_cast<uint8_t*>(local) + done, len};
      iovec r{static_cast<uint8_t*>(remote) + done, len};
      const ssize_t got = write ? process_vm_writev(self, &l, 1, &r, 1, 0)
                                : process_vm_readv(self, &l, 1, &r, 1, 0);
      if (got <= 0) {
        if (got < 0 && (errno == ENOSYS || errno == EPERM)) {
          KernelCopyRefused().store(true, std::memory_order_relaxed);
        }
        break;
      }
      done += static_cast<size_t>(got);
    }
  }
  if (done < n) {
    if (write) {
      std::memcpy(static_cast<uint8_t*>(remote) + done, static_cast<uint8_t*>(local) + done,
                  n - done);
    } else {
      std::memcpy(static_cast<uint8_t*>(local) + done, static_cast<uint8_t*>(remote) + done,
                  n - done);
    }
  }
}

}  // namespace shm_copy_internal

// memcpy(dst, src, n) into shared memory `dst`.
inline void CopyIntoShared(void* dst, const void* src, size_t n) {
  if (n == 0) return;
  shm_copy_internal::Copy(const_cast<void*>(src), dst, n, /*write=*/true);
}

// memcpy(dst, src, n) out of shared memory `src`.
inline void CopyFromShared(void* dst, const void* src, size_t n) {
  if (n == 0) return;
  shm_copy_internal::Copy(dst, const_cast<void*>(src), n, /*write=*/false);
}

}  // namespace dhsa::transport

#endif  // DHSA_SERVICES_TRANSPORT_SHM_COPY_H_
