// The Highway kernels are compiled for several SIMD targets and dispatched at run time: every
// target this machine can run must give results within the tolerance rule, not just the best one.
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "hwy/targets.h"
#include "kernels/cpu/sparse_attention.h"
#include "kernels/cpu/summaries.h"
#include "kernels/cpu/vector_ops.h"
#include "tests/cpu/cpu_test_util.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

TEST(SimdTargetsTest, EveryTargetThisMachineRunsMatchesFp64) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const int64_t hq = 4, hkv = 2, l = 700, d = 72;
  const Tensor q = testing::RandomTensor(rng, hq, l, d).ConvertTo(DType::kBF16);
  const Tensor k = testing::SegmentedTensor(rng, hkv, l, d).ConvertTo(DType::kBF16);
  const Tensor v = testing::RandomTensor(rng, hkv, l, d).ConvertTo(DType::kBF16);
  SparseAttentionParams p;
  p.q = *HeadsView::Of(q, "q");
  p.k = *HeadsView::Of(k, "k");
  p.v = *HeadsView::Of(v, "v");
  DhsaConfig config;
  config.budget = 256;
  config.sink = 16;
  config.local = 64;
  config.q_block = 32;
  const Selection sel = testing::ReferenceSelection(p.q, p.k, config);
  p.selection = &sel;
  p.scale = 0.125f;
  p.num_threads = 2;
  const testing::AttentionValues fp64 = testing::SelectedAttention<double>(p);
  const testing::AttentionValues naive = testing::SelectedAttention<float>(p);
  const std::vector<int64_t> b = *SegmentKeysReference(p.k, 0, l, config);
  const Summaries kappa = ChunkSummariesReference(p.k, b, SummaryNorm::kSqrt);

  int tested = 0;
  const int64_t supported = hwy::SupportedTargets();  // Before the mock below changes it.
  // The targets kernels/CMakeLists.txt builds dhsa_cpu for, where this machine supports them.
  for (int64_t target : {int64_t{HWY_AVX3}, int64_t{HWY_AVX2}, int64_t{HWY_SCALAR}}) {
    if ((supported & target) == 0) continue;
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    EXPECT_STREQ(cpu::SimdTargetName(), hwy::TargetName(target));
    testing::PoisonedOutputs out(hq, l, d);
    out.Attach(p, hq, l, d);
    ASSERT_TRUE(SparseAttentionCpu(p).ok());
    testing::ExpectWithinTolerance(out.o.data(), fp64.o, naive.o, "o");
    testing::ExpectWithinTolerance(out.lse.data(), fp64.lse, naive.lse, "lse");
    EXPECT_EQ(ChunkSummariesCpu(p.k, b, SummaryNorm::kSqrt).data, kappa.data);
    EXPECT_TRUE(cpu::AllFinite(k.data(), k.dtype, k.NumElements()));
    ++tested;
  }
  hwy::SetSupportedTargetsForTest(0);
  EXPECT_GE(tested, 2) << "expected the best target and the portable fallback at least";
}

}  // namespace
}  // namespace dhsa
