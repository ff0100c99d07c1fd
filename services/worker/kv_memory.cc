#include "services/worker/kv_memory.h"

#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "kernels/common/tensor.h"

namespace dhsa {
namespace {

class HostBlock final : public KvBlock {
 public:
  explicit HostBlock(size_t bytes) : bytes_(bytes) {}
  void* data() const override { return const_cast<uint8_t*>(bytes_.data()); }
  size_t size() const override { return bytes_.size(); }

 private:
  ByteBuffer bytes_;
};

void Copy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
            size_t rows) {
  for (size_t r = 0; r < rows; ++r) {
    std::memcpy(static_cast<uint8_t*>(dst) + r * dst_pitch,
                static_cast<const uint8_t*>(src) + r * src_pitch, width);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvBlock>> HostKvMemory::Allocate(size_t bytes) {
  try {
    return std::make_unique<HostBlock>(bytes);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host allocation of ", bytes, " bytes for a KV stripe failed"));
  }
}

absl::Status HostKvMemory::CopyIn(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                                  size_t width, size_t rows) {
  Copy2D(dst, dst_pitch, src, src_pitch, width, rows);
  return absl::OkStatus();
}

absl::Status HostKvMemory::CopyWithin(void* dst, size_t dst_pitch, const void* src,
                                      size_t src_pitch, size_t width, size_t rows) {
  Copy2D(dst, dst_pitch, src, src_pitch, width, rows);
  return absl::OkStatus();
}

}  // namespace dhsa
