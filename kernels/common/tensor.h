// Tensors: an owning, typed byte buffer with a shape, and a read-only view of a
// `[heads, len, dim]` row-major tensor as the kernels consume it.
#ifndef DHSA_KERNELS_COMMON_TENSOR_H_
#define DHSA_KERNELS_COMMON_TENSOR_H_

#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"
#include "kernels/common/large_blocks.h"

namespace dhsa {

// An allocator that leaves elements of a resize() uninitialised (value-initialisation becomes
// default-initialisation). Tensors of hundreds of MB are filled right after they are sized (a
// stream assembled piece by piece, a kernel's output): zeroing them first costs a pass over memory
// that, on the service's data path, was the largest single cost of the router.
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  // Large buffers come from large_blocks (huge pages, reused when freed; see there why).
  T* allocate(size_t n) {
    if (n * sizeof(T) >= large_blocks::kMinBytes) {
      return static_cast<T*>(large_blocks::Allocate(n * sizeof(T)));
    }
    return std::allocator<T>::allocate(n);
  }
  void deallocate(T* p, size_t n) {
    if (n * sizeof(T) >= large_blocks::kMinBytes) {
      large_blocks::Free(p, n * sizeof(T));
      return;
    }
    std::allocator<T>::deallocate(p, n);
  }
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible<U>::value) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// A tensor's storage: resize() does not zero; assign(n, 0) or Tensor::Zeros does.
using ByteBuffer = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;

// Owning tensor: row-major, little-endian elements of `dtype` with the given shape.
struct Tensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  ByteBuffer bytes;

  // A zero-filled tensor.
  static Tensor Zeros(DType dtype, std::vector<int64_t> shape);
  // A tensor whose bytes are unspecified: for outputs that are written whole before any read.
  static Tensor Uninitialized(DType dtype, std::vector<int64_t> shape);
  // A float32 tensor holding `values` (values.size() must equal the shape's product).
  static Tensor FromFloats(std::vector<int64_t> shape, const std::vector<float>& values);

  int64_t NumElements() const;
  const void* data() const { return bytes.data(); }
  void* data() { return bytes.data(); }
  float Get(int64_t i) const { return LoadAsFloat(bytes.data(), dtype, static_cast<size_t>(i)); }
  // A copy converted to `to` (rounding to nearest even).
  Tensor ConvertTo(DType to) const;
  // All elements as float.
  std::vector<float> ToFloats() const;
};

// Rows [begin, end) of the second axis of a 3-D `[heads, len, dim]` tensor (a copy).
Tensor SliceTokens(const Tensor& t, int64_t begin, int64_t end);

// "[8, 32768, 128]".
std::string ShapeString(const std::vector<int64_t>& shape);

// Read-only view of a `[heads, len, dim]` tensor; element (h, t, c) is at
// `h * head_stride + t * dim + c` with head_stride = len * dim unless set (a buffer with room to
// grow per head). Row t of the view is absolute position `offset + t` (a worker holding a stripe of
// keys has offset > 0; a whole sequence has offset 0).
struct HeadsView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t heads = 0;
  int64_t len = 0;
  int64_t dim = 0;
  int64_t offset = 0;
  int64_t head_stride = 0;  // Elements between heads; 0 means len * dim.

  // View over a 3-D Tensor.
  static absl::StatusOr<HeadsView> Of(const Tensor& t, absl::string_view name);

  int64_t HeadStride() const { return head_stride != 0 ? head_stride : len * dim; }
  size_t Index(int64_t h, int64_t t) const {
    return static_cast<size_t>(h * HeadStride() + t * dim);
  }
  float At(int64_t h, int64_t t, int64_t c) const {
    return LoadAsFloat(data, dtype, Index(h, t) + static_cast<size_t>(c));
  }
  // Row (h, t) converted to float into `out[0..dim)`.
  void Row(int64_t h, int64_t t, float* out) const;
};

// Mutable fp32 view of a `[heads, len, dim]` (dim = 1 for LSE) output.
struct OutputView {
  float* data = nullptr;
  int64_t heads = 0;
  int64_t len = 0;
  int64_t dim = 0;
  float* Row(int64_t h, int64_t t) const { return data + (h * len + t) * dim; }
};

}  // namespace dhsa

#endif  // DHSA_KERNELS_COMMON_TENSOR_H_
