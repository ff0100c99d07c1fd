// An owning device allocation (cudaMalloc / cudaFree) with checked host copies.
#ifndef DHSA_KERNELS_CUDA_DEVICE_BUFFER_H_
#define DHSA_KERNELS_CUDA_DEVICE_BUFFER_H_

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dhsa {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  // `bytes` of device memory (uninitialised; cudaMalloc aligns to at least 256 bytes). Zero bytes
  // gives an empty buffer whose data() is null.
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  // A buffer holding a copy of host memory [src, src + bytes).
  static absl::StatusOr<DeviceBuffer> FromHost(const void* src, size_t bytes);

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return size_; }

  // Synchronous copies of the first `bytes` (<= size()).
  absl::Status CopyFromHost(const void* src, size_t bytes);
  absl::Status CopyToHost(void* dst, size_t bytes) const;
  // Sets every byte to `value` (0xFF makes every float a NaN: the poison of the tests).
  absl::Status Fill(int value);

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace dhsa

#endif  // DHSA_KERNELS_CUDA_DEVICE_BUFFER_H_
