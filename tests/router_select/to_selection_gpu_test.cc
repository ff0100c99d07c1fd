// DeviceDhsaSelection::ToSelection (packed on the device, pinned download, reserved unpack)
// against ToSelectionReference (every entry at span_cap stride, span by span): equal to the bit,
// unpacked on one thread or over ranges, on random inputs of odd sizes, GQA, both chunk scores,
// and on a second call that reuses the object's buffers. (Kappa's per-head download is checked
// against the CPU's kappa, to the bit, by router_selection_gpu_test.) Skipped without a CUDA
// device.
#include <cuda_runtime_api.h>

#include <functional>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_cuda.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

bool HaveCudaDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct Case {
  int64_t hq, hkv, d, len;
  DType dtype;
  ChunkScore score;
  int64_t q_block, budget;
};

TEST(ToSelectionGpuTest, PackedDownloadEqualsTheStridedOne) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Case cases[] = {
      {8, 2, 128, 4107, DType::kBF16, ChunkScore::kMass, 16, 1024},
      {4, 4, 64, 777, DType::kF16, ChunkScore::kMass, 16, 256},
      {12, 4, 128, 2049, DType::kF16, ChunkScore::kPaper, 128, 512},
      {32, 8, 128, 3001, DType::kBF16, ChunkScore::kMass, 16, 512},
      {8, 8, 128, 1, DType::kBF16, ChunkScore::kMass, 16, 512},
      {8, 2, 64, 65, DType::kBF16, ChunkScore::kPaper, 128, 512},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << "hq " << c.hq << " hkv " << c.hkv << " d " << c.d << " len " << c.len);
    DhsaConfig config;
    config.chunk_score = c.score;
    config.q_block = c.q_block;
    config.budget = c.budget;
    if (c.score == ChunkScore::kPaper) {
      config.chunk_min = 8;
      config.chunk_max = 128;
      config.score_rows = 16;
    }
    config.local = std::max<int64_t>(config.q_block, 64);
    config.sink = 32;
    const AttentionShape shape{c.hq, c.hkv, c.d, c.len, c.len};
    const Tensor q = testing::RandomTensor(rng, c.hq, c.len, c.d).ConvertTo(c.dtype);
    const Tensor k = testing::RandomTensor(rng, c.hkv, c.len, c.d).ConvertTo(c.dtype);
    absl::StatusOr<DeviceBuffer> dq = DeviceBuffer::FromHost(q.data(), q.bytes.size());
    absl::StatusOr<DeviceBuffer> dk = DeviceBuffer::FromHost(k.data(), k.bytes.size());
    ASSERT_TRUE(dq.ok() && dk.ok());
    absl::StatusOr<DeviceDhsaSelection> sel = DeviceDhsaSelection::Create(config, shape, c.dtype);
    ASSERT_TRUE(sel.ok()) << sel.status();
    for (int call = 0; call < 2; ++call) {  // The second call reuses the packing buffers.
      ASSERT_TRUE(sel->Poison().ok());
      ASSERT_TRUE(sel->Run(dq->data(), dk->data(), nullptr).ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      DeviceDhsaSelection::SelectionTimes times;
      absl::StatusOr<Selection> fast = sel->ToSelection(&times);
      absl::StatusOr<Selection> ref = sel->ToSelectionReference();
      ASSERT_TRUE(fast.ok() && ref.ok()) << fast.status() << " " << ref.status();
      EXPECT_EQ(fast->unit, ref->unit);
      EXPECT_EQ(fast->block_size, ref->block_size);
      EXPECT_EQ(fast->first_block, ref->first_block);
      EXPECT_EQ(fast->num_blocks, ref->num_blocks);
      EXPECT_EQ(fast->num_heads, ref->num_heads);
      EXPECT_EQ(fast->group, ref->group);
      EXPECT_TRUE(fast->spans == ref->spans);
      // Unpacked over ranges (7 uneven ones, in reverse order, as threads might take them).
      const DeviceDhsaSelection::RangeRunner ranges =
          [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
            for (int64_t p = 6; p >= 0; --p) body(n * p * p / 49, n * (p + 1) * (p + 1) / 49);
          };
      absl::StatusOr<Selection> split = sel->ToSelection(&times, &ranges);
      ASSERT_TRUE(split.ok()) << split.status();
      EXPECT_TRUE(split->spans == ref->spans);
    }
  }
}

}  // namespace
}  // namespace dhsa
