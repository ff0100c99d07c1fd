// Where a KvStore keeps the bytes of its stripes: host memory (the CPU backend) or the memory of a
// CUDA device (the CUDA backend, services/worker/cuda_backend.cc). The store only allocates,
// copies rows in (from host tensors) and copies rows between its own blocks; readers get the raw
// pointers through LayerSnapshot and hand them to the backend's kernel.
#ifndef DHSA_SERVICES_WORKER_KV_MEMORY_H_
#define DHSA_SERVICES_WORKER_KV_MEMORY_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dhsa {

// One allocation of a KvMemory; freed when destroyed.
class KvBlock {
 public:
  virtual ~KvBlock() = default;
  virtual void* data() const = 0;
  virtual size_t size() const = 0;
};

class KvMemory {
 public:
  virtual ~KvMemory() = default;

  // "host" or "cuda".
  virtual std::string name() const = 0;

  // `bytes` (> 0) of memory. Host memory comes uninitialised (the CPU kernel reads only the rows
  // of a stripe's length); device memory comes zero-filled (see cuda_backend.cc). ResourceExhausted
  // when the memory is full.
  virtual absl::StatusOr<std::unique_ptr<KvBlock>> Allocate(size_t bytes) = 0;

  // `rows` rows of `width` bytes: row r from src + r * src_pitch to dst + r * dst_pitch (the
  // layout of cudaMemcpy2D). CopyIn reads host memory, CopyWithin this memory's own blocks. Both
  // complete before they return.
  virtual absl::Status CopyIn(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                              size_t width, size_t rows) = 0;
  virtual absl::Status CopyWithin(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                                  size_t width, size_t rows) = 0;
};

// Plain host memory (std::memcpy).
class HostKvMemory final : public KvMemory {
 public:
  std::string name() const override { return "host"; }
  absl::StatusOr<std::unique_ptr<KvBlock>> Allocate(size_t bytes) override;
  absl::Status CopyIn(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                      size_t rows) override;
  absl::Status CopyWithin(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                          size_t width, size_t rows) override;
};

}  // namespace dhsa

#endif  // DHSA_SERVICES_WORKER_KV_MEMORY_H_
