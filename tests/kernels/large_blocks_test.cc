#include "kernels/common/large_blocks.h"

#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/tensor.h"

namespace dhsa::large_blocks {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

class LargeBlocksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    saved_limit_ = CacheLimit();
    SetCacheLimit(0);  // Start from an empty cache.
    SetCacheLimit(64 * kMiB);
  }
  void TearDown() override { SetCacheLimit(saved_limit_); }
  size_t saved_limit_ = 0;
};

TEST_F(LargeBlocksTest, BlocksAreAlignedWritableAndReusedBySize) {
  const Stats before = GetStats();
  void* a = Allocate(3 * kMiB + 5);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % (2 * kMiB), 0u);
  std::memset(a, 0xab, 3 * kMiB + 5);
  Free(a, 3 * kMiB + 5);
  EXPECT_EQ(GetStats().cached_bytes, 4 * kMiB);  // Rounded to whole 2 MiB pages.

  // Any size that rounds to the same 4 MiB reuses the block, contents and all.
  void* b = Allocate(4 * kMiB);
  EXPECT_EQ(b, a);
  EXPECT_EQ(static_cast<unsigned char*>(b)[3 * kMiB], 0xab);
  EXPECT_EQ(GetStats().cached_bytes, 0u);
  // Another size maps new memory.
  void* c = Allocate(6 * kMiB);
  EXPECT_NE(c, b);
  const Stats after = GetStats();
  EXPECT_EQ(after.reused - before.reused, 1);
  EXPECT_EQ(after.mapped - before.mapped, 2);
  Free(b, 4 * kMiB);
  Free(c, 6 * kMiB);
  EXPECT_EQ(GetStats().cached_bytes, 10 * kMiB);
}

TEST_F(LargeBlocksTest, CacheStaysWithinItsLimitDroppingTheOldest) {
  SetCacheLimit(8 * kMiB);
  void* a = Allocate(4 * kMiB);
  void* b = Allocate(4 * kMiB);
  void* c = Allocate(4 * kMiB);
  Free(a, 4 * kMiB);
  Free(b, 4 * kMiB);
  Free(c, 4 * kMiB);  // a is unmapped to make room.
  EXPECT_EQ(GetStats().cached_bytes, 8 * kMiB);
  void* x = Allocate(4 * kMiB);
  void* y = Allocate(4 * kMiB);
  EXPECT_TRUE((x == b && y == c) || (x == c && y == b));
  EXPECT_EQ(GetStats().cached_bytes, 0u);
  // A block over the limit is never cached.
  void* big = Allocate(10 * kMiB);
  Free(big, 10 * kMiB);
  EXPECT_EQ(GetStats().cached_bytes, 0u);
  Free(x, 4 * kMiB);
  Free(y, 4 * kMiB);
  // Lowering the limit gives memory back at once; 0 turns caching off.
  SetCacheLimit(0);
  EXPECT_EQ(GetStats().cached_bytes, 0u);
  void* z = Allocate(2 * kMiB);
  Free(z, 2 * kMiB);
  EXPECT_EQ(GetStats().cached_bytes, 0u);
}

TEST_F(LargeBlocksTest, TensorStorageUsesItAboveTheThreshold) {
  const Stats before = GetStats();
  {
    // Small tensors go through operator new.
    Tensor small = Tensor::Uninitialized(DType::kF32, {1, 1000, 16});
    EXPECT_EQ(GetStats().mapped, before.mapped);
    Tensor t = Tensor::Zeros(DType::kF32, {3, 1001, 129});  // 1.5 MB, odd sizes.
    EXPECT_EQ(GetStats().mapped, before.mapped + 1);
    for (uint8_t byte : t.bytes) ASSERT_EQ(byte, 0);
    // Growth copies what was there.
    for (size_t i = 0; i < t.bytes.size(); ++i) t.bytes[i] = static_cast<uint8_t>(i * 7);
    const size_t n = t.bytes.size();
    t.bytes.resize(3 * n);
    for (size_t i = 0; i < n; i += 4099) ASSERT_EQ(t.bytes[i], static_cast<uint8_t>(i * 7));
  }
  // A reused block is zeroed by Zeros even though the cache hands out old bytes.
  Tensor again = Tensor::Zeros(DType::kF32, {3, 1001, 129});
  EXPECT_GT(GetStats().reused, before.reused);
  for (uint8_t byte : again.bytes) ASSERT_EQ(byte, 0);
}

}  // namespace
}  // namespace dhsa::large_blocks
