// Host-side parts of the CUDA backend, no device needed: the selection's CSR form and
// CanImplement.
#include "kernels/cuda/selection_csr.h"

#include <cstdint>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cuda/sparse_attention_cuda.h"

namespace dhsa {
namespace {

Selection TwoHeadsTwoBlocks() {
  Selection s;
  s.unit = SelectionUnit::kKvHeadBlock;
  s.block_size = 64;
  s.first_block = 1;
  s.num_blocks = 2;
  s.num_heads = 2;
  s.group = 4;
  s.spans = {{{0, 16}, {40, 40}, {64, 128}},  // The empty span is dropped.
             {{0, 192}},
             {},
             {{5, 6}, {100, 150}, {160, 170}}};
  return s;
}

TEST(SelectionToCsrTest, OffsetsAndPackedStartsPerEntry) {
  const absl::StatusOr<SelectionCsr> csr = SelectionToCsr(TwoHeadsTwoBlocks());
  ASSERT_TRUE(csr.ok()) << csr.status();
  EXPECT_EQ(csr->block_size, 64);
  EXPECT_EQ(csr->first_block, 1);
  EXPECT_EQ(csr->num_blocks, 2);
  EXPECT_EQ(csr->num_heads, 2);
  EXPECT_THAT(csr->entry_offsets, ::testing::ElementsAre(0, 2, 3, 3, 6));
  std::vector<int32_t> begins, ends;
  for (const CudaSpan& s : csr->spans) {
    begins.push_back(s.begin);
    ends.push_back(s.end);
  }
  EXPECT_THAT(begins, ::testing::ElementsAre(0, 64, 0, 5, 100, 160));
  EXPECT_THAT(ends, ::testing::ElementsAre(16, 128, 192, 6, 150, 170));
  EXPECT_THAT(csr->span_starts, ::testing::ElementsAre(0, 16, 0, 0, 1, 51));
}

TEST(SelectionToCsrTest, RejectsOverlapsNegativePositionsAndRowSelections) {
  Selection overlap = TwoHeadsTwoBlocks();
  overlap.spans[1] = {{0, 10}, {5, 20}};
  EXPECT_EQ(SelectionToCsr(overlap).status().code(), absl::StatusCode::kInvalidArgument);
  Selection negative = TwoHeadsTwoBlocks();
  negative.spans[0] = {{-1, 3}};
  EXPECT_EQ(SelectionToCsr(negative).status().code(), absl::StatusCode::kInvalidArgument);
  Selection rows = TwoHeadsTwoBlocks();
  rows.unit = SelectionUnit::kQueryHeadRow;
  EXPECT_EQ(SelectionToCsr(rows).status().code(), absl::StatusCode::kInvalidArgument);
  Selection short_entries = TwoHeadsTwoBlocks();
  short_entries.spans.pop_back();
  EXPECT_EQ(SelectionToCsr(short_entries).status().code(), absl::StatusCode::kInvalidArgument);
}

// Params that pass: fake, aligned device addresses (CanImplement reads no device memory).
SparseAttentionCudaParams ValidParams() {
  SparseAttentionCudaParams p;
  p.dtype = DType::kBF16;
  p.q = reinterpret_cast<const void*>(uintptr_t{1} << 20);
  p.k = reinterpret_cast<const void*>(uintptr_t{2} << 20);
  p.v = reinterpret_cast<const void*>(uintptr_t{3} << 20);
  p.o = reinterpret_cast<float*>(uintptr_t{4} << 20);
  p.lse = reinterpret_cast<float*>(uintptr_t{5} << 20);
  p.hq = 32;
  p.hkv = 8;
  p.head_dim = 128;
  p.lq = 1000;
  p.lk = 1100;
  p.q_offset = 100;
  p.scale = 0.088f;
  p.block_size = 128;
  p.first_block = 0;
  p.num_blocks = 9;  // Positions [100, 1100) lie in blocks 0 .. 8.
  p.entry_offsets = reinterpret_cast<const int64_t*>(uintptr_t{6} << 20);
  return p;
}

TEST(CanImplementTest, AcceptsTheServedShapes) {
  EXPECT_TRUE(CanImplement(ValidParams()).ok()) << CanImplement(ValidParams());
  SparseAttentionCudaParams p = ValidParams();
  p.dtype = DType::kF16;
  p.head_dim = 64;
  p.hq = 8;
  EXPECT_TRUE(CanImplement(p).ok()) << CanImplement(p);
}

TEST(CanImplementTest, DeclinesWhatHasNoKernel) {
  SparseAttentionCudaParams p = ValidParams();
  p.head_dim = 96;
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kUnimplemented);
  p = ValidParams();
  p.dtype = DType::kF32;
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kUnimplemented);
  p = ValidParams();
  p.hq = 256 * 8;
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kUnimplemented);
}

TEST(CanImplementTest, RejectsInconsistentParams) {
  SparseAttentionCudaParams p = ValidParams();
  p.hq = 30;  // Not a multiple of hkv.
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kInvalidArgument);
  p = ValidParams();
  p.num_blocks = 8;  // Misses the last query block.
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kInvalidArgument);
  p = ValidParams();
  p.first_block = 1;
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kInvalidArgument);
  p = ValidParams();
  p.k = reinterpret_cast<const void*>((uintptr_t{2} << 20) + 8);  // Not 16-byte aligned.
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kInvalidArgument);
  p = ValidParams();
  p.scale = 0.0f;
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kInvalidArgument);
  p = ValidParams();
  p.entry_offsets = nullptr;
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dhsa
