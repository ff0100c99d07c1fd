// The device selection (kernels/cuda/selection_cuda.h: boundaries, summaries, scores and top
// chunks on the GPU) against the reference step functions, on fresh random, segmented and
// repeated-passage inputs of odd lengths (97, 1025, 4099, 131071), prefill and chunked prefill;
// the device merge against MergePartialsReference; and the attention over the device selection
// against the attention over the reference selection. Device results are poisoned (0xFF) before
// each run. Skipped without a CUDA device.
//
// The device computes the reference's function in the same arithmetic (fp64 sums, scores in the
// reference's order, rounded once), so boundaries, summaries and selections must be equal, not
// close: selections are compared as key sets per (KV head, query block).
#include "kernels/cuda/selection_cuda.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_csr.h"
#include "kernels/cuda/sparse_attention_cuda.h"
#include "kernels/merge/merge.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

bool HaveCudaDevice() {
  static const bool have = [] {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  }();
  return have;
}

enum class Input { kRandom, kSegmented, kRepeated };

struct SelectionCase {
  const char* name;
  int64_t hq, hkv, lq, lk, d;
  DType dtype;
  Input input;
  int64_t budget = 512;  // With sink 32, local 128 (below 160: 8 and 32; 0: the spec's defaults).
  bool prior = false;    // Chunked prefill with the stored keys' boundaries passed in.
  BoundaryMode mode = BoundaryMode::kDynamic;
  int64_t q_block = 128;
  int64_t window = 4;        // Boundary window w (1-8: the windowed gap kernel; wider: the first).
  bool legacy_gaps = false;  // The first gap kernel whatever the window.
  bool overlap = false;      // Query-block summaries on the selection's second stream.
  bool batched = false;      // Batched scores.
  bool warp_norms = false;   // The windowed gap kernel with per-warp norms.
  int nms_rounds = -1;       // -1: the default NMS; 0: the serial warp alone; else parallel rounds.
  bool cut_variants = false;  // The cut with uniform per-warp histogram adds, heavy blocks first.
  // Scores: 0 the defaults (tiled product read in place by the cut), 1 tiled with shared-memory
  // copies in the cut, 2 tiled in waves of 3 query blocks. `batched` (or 3) computes them in the
  // cut kernel (the previous path).
  int scores = 0;
};

void PrintTo(const SelectionCase& c, std::ostream* os) { *os << c.name; }

// Keys for a case: Gaussian, segmented topics, or a segmented first half repeated exactly (equal
// windows, chunks and scores: ties everywhere).
Tensor Keys(std::mt19937_64& rng, const SelectionCase& c) {
  switch (c.input) {
    case Input::kRandom:
      return testing::RandomTensor(rng, c.hkv, c.lk, c.d);
    case Input::kSegmented:
      return testing::SegmentedTensor(rng, c.hkv, c.lk, c.d);
    case Input::kRepeated: {
      Tensor k = testing::SegmentedTensor(rng, c.hkv, c.lk, c.d);
      std::vector<float> x = k.ToFloats();
      const int64_t half = c.lk / 2;
      for (int64_t h = 0; h < c.hkv; ++h) {
        for (int64_t t = half; t < c.lk; ++t) {
          for (int64_t i = 0; i < c.d; ++i) {
            x[static_cast<size_t>((h * c.lk + t) * c.d + i)] =
                x[static_cast<size_t>((h * c.lk + t - half) * c.d + i)];
          }
        }
      }
      return Tensor::FromFloats({c.hkv, c.lk, c.d}, x);
    }
  }
  return Tensor();
}

// Keys selected for query block `block` of KV head `h`, as a sorted list of positions.
std::vector<int64_t> KeySet(const std::vector<Span>& spans) {
  std::vector<int64_t> keys;
  for (const Span& s : spans) {
    for (int64_t t = s.begin; t < s.end; ++t) keys.push_back(t);
  }
  return keys;
}

struct Reference {
  std::vector<int64_t> boundaries;
  Summaries kappa, rho;
  Selection selection;
};

absl::StatusOr<Reference> ReferenceSteps(const Tensor& q_t, const Tensor& k_t,
                                         const DhsaConfig& config,
                                         std::vector<int64_t>* prior_out) {
  DHSA_ASSIGN_OR_RETURN(HeadsView q, HeadsView::Of(q_t, "Q"));
  DHSA_ASSIGN_OR_RETURN(HeadsView k, HeadsView::Of(k_t, "K"));
  DHSA_ASSIGN_OR_RETURN(AttentionShape shape, CheckShapes(q, k, k));
  q.offset = shape.t0();
  Reference r;
  std::vector<int64_t> prior = {0};
  if (shape.t0() > 0) {
    DHSA_ASSIGN_OR_RETURN(prior, SegmentKeysReference(k, 0, shape.t0(), config));
  }
  if (prior_out != nullptr) *prior_out = prior;
  DHSA_ASSIGN_OR_RETURN(r.boundaries, AppendPrefillBoundariesReference(k, prior, shape.lk, config));
  r.kappa = ChunkSummariesReference(k, r.boundaries, config.summary_norm);
  r.rho = QueryBlockSummariesReference(q, shape.hkv, config.q_block, config.summary_norm);
  SelectionInputs in;
  in.shape = shape;
  in.boundaries = &r.boundaries;
  in.kappa = &r.kappa;
  in.rho = &r.rho;
  DHSA_ASSIGN_OR_RETURN(r.selection, SelectSpansReference(in, config));
  return r;
}

int64_t MismatchedFloats(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::max(a.size(), b.size()));
  int64_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += a[i] == b[i] ? 0 : 1;  // NaN never equals.
  return bad;
}

class SelectionCudaTest : public ::testing::TestWithParam<SelectionCase> {};

TEST_P(SelectionCudaTest, EqualsTheReferenceSteps) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const SelectionCase c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, c.hq, c.lq, c.d).ConvertTo(c.dtype);
  const Tensor k = Keys(rng, c).ConvertTo(c.dtype);
  const Tensor v = testing::RandomTensor(rng, c.hkv, c.lk, c.d).ConvertTo(c.dtype);
  DhsaConfig config;
  // The paper's score and chunk lengths, whatever DhsaConfig's defaults are (the mass score has
  // tests/gpu/selection_mass_cuda_test.cc).
  config.chunk_score = ChunkScore::kPaper;
  config.chunk_min = 8;
  config.chunk_max = 128;
  config.q_block = c.q_block;
  config.boundary_mode = c.mode;
  config.boundary_window = c.window;
  if (c.budget > 0) {
    config.budget = c.budget;
    config.sink = c.budget < 160 ? 8 : 32;
    config.local = c.budget < 160 ? 32 : 128;
  }
  std::vector<int64_t> prior;
  absl::StatusOr<Reference> ref = ReferenceSteps(q, k, config, &prior);
  ASSERT_TRUE(ref.ok()) << ref.status();

  AttentionShape shape{c.hq, c.hkv, c.d, c.lq, c.lk};
  ASSERT_TRUE(DeviceSelectionSupported(config, shape, c.dtype).ok());
  const int64_t prior_chunks = c.prior ? static_cast<int64_t>(prior.size()) - 1 : 0;
  absl::StatusOr<DeviceDhsaSelection> sel =
      DeviceDhsaSelection::Create(config, shape, c.dtype, prior_chunks);
  ASSERT_TRUE(sel.ok()) << sel.status();
  sel->set_legacy_gap_kernel(c.legacy_gaps);
  sel->set_overlap_query_summaries(c.overlap);
  sel->set_batched_scores(c.batched);
  sel->set_gap_warp_norms(c.warp_norms);
  if (c.nms_rounds == 0) sel->set_parallel_nms(false);
  if (c.nms_rounds > 0) sel->set_parallel_nms(true, c.nms_rounds);
  if (c.batched || c.scores == 3) sel->set_paper_tiled_scores(false);
  if (c.scores == 1) sel->set_paper_tiled_scores(true, false);
  if (c.scores == 2) sel->set_mass_wave_blocks(3);
  if (c.cut_variants) {
    sel->set_select_uniform_aggregate(true);
    sel->set_select_heavy_first(true);
  }
  absl::StatusOr<DeviceBuffer> dq = DeviceBuffer::FromHost(q.data(), q.bytes.size());
  absl::StatusOr<DeviceBuffer> dk = DeviceBuffer::FromHost(k.data(), k.bytes.size());
  absl::StatusOr<DeviceBuffer> dv = DeviceBuffer::FromHost(v.data(), v.bytes.size());
  ASSERT_TRUE(dq.ok() && dk.ok() && dv.ok());
  ASSERT_TRUE(sel->Poison().ok());
  absl::Status run = sel->Run(dq->data(), dk->data(), nullptr, c.prior ? &prior : nullptr);
  ASSERT_TRUE(run.ok()) << run;
  ASSERT_TRUE(CudaStatus(cudaDeviceSynchronize(), "device selection").ok());

  absl::StatusOr<std::vector<int64_t>> boundaries = sel->Boundaries();
  ASSERT_TRUE(boundaries.ok()) << boundaries.status();
  EXPECT_EQ(*boundaries, ref->boundaries);
  absl::StatusOr<Summaries> kappa = sel->Kappa();
  absl::StatusOr<Summaries> rho = sel->Rho();
  ASSERT_TRUE(kappa.ok() && rho.ok());
  if (*boundaries == ref->boundaries) {
    EXPECT_EQ(MismatchedFloats(kappa->data, ref->kappa.data), 0) << "kappa";
  }
  EXPECT_EQ(MismatchedFloats(rho->data, ref->rho.data), 0) << "rho";

  absl::StatusOr<Selection> got = sel->ToSelection();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->spans.size(), ref->selection.spans.size());
  EXPECT_EQ(got->first_block, ref->selection.first_block);
  EXPECT_EQ(got->num_blocks, ref->selection.num_blocks);
  int64_t differing = 0, keys = 0;
  for (size_t e = 0; e < got->spans.size(); ++e) {
    const std::vector<int64_t> a = KeySet(got->spans[e]), b = KeySet(ref->selection.spans[e]);
    keys += static_cast<int64_t>(b.size());
    if (a != b) {
      if (differing < 3) {
        ADD_FAILURE() << "entry " << e << " (head " << e / got->num_blocks << ", block "
                      << got->first_block + static_cast<int64_t>(e) % got->num_blocks
                      << "): device selects " << a.size() << " keys, reference " << b.size();
      }
      ++differing;
    }
    // Spans as the attention wants them: sorted, disjoint, not adjacent.
    for (size_t i = 1; i < got->spans[e].size(); ++i) {
      EXPECT_LT(got->spans[e][i - 1].end, got->spans[e][i].begin) << "entry " << e;
    }
  }
  EXPECT_EQ(differing, 0);
  std::printf("RESULT %-40s chunks %zu entries %zu keys %lld differing %lld\n", c.name,
              boundaries->size() - 1, got->spans.size(), static_cast<long long>(keys),
              static_cast<long long>(differing));

  // Attention over the device selection equals attention over the reference selection (the same
  // kernel on the same spans: bit for bit).
  if (c.d != 64 && c.d != 128) return;
  const int64_t rows = c.hq * c.lq;
  absl::StatusOr<DeviceBuffer> o1 = DeviceBuffer::Allocate(rows * c.d * sizeof(float));
  absl::StatusOr<DeviceBuffer> o2 = DeviceBuffer::Allocate(rows * c.d * sizeof(float));
  absl::StatusOr<DeviceBuffer> l1 = DeviceBuffer::Allocate(rows * sizeof(float));
  absl::StatusOr<DeviceBuffer> l2 = DeviceBuffer::Allocate(rows * sizeof(float));
  ASSERT_TRUE(o1.ok() && o2.ok() && l1.ok() && l2.ok());
  for (DeviceBuffer* b : {&*o1, &*o2, &*l1, &*l2}) ASSERT_TRUE(b->Fill(0xFF).ok());
  SparseAttentionCudaParams p;
  p.dtype = c.dtype;
  p.q = dq->data();
  p.k = dk->data();
  p.v = dv->data();
  p.hq = c.hq;
  p.hkv = c.hkv;
  p.head_dim = c.d;
  p.lq = c.lq;
  p.lk = c.lk;
  p.q_offset = c.lk - c.lq;
  p.scale = EffectiveScale(config, c.d);
  SparseAttentionCudaParams p2 = p;
  p.o = o1->as<float>();
  p.lse = l1->as<float>();
  ASSERT_TRUE(sel->Attach(&p).ok());
  ASSERT_TRUE(SparseAttentionCuda(p, nullptr).ok());
  absl::StatusOr<DeviceSelection> uploaded = DeviceSelection::Upload(ref->selection);
  ASSERT_TRUE(uploaded.ok()) << uploaded.status();
  p2.o = o2->as<float>();
  p2.lse = l2->as<float>();
  ASSERT_TRUE(uploaded->Attach(&p2).ok());
  ASSERT_TRUE(SparseAttentionCuda(p2, nullptr).ok());
  ASSERT_TRUE(CudaStatus(cudaDeviceSynchronize(), "attention").ok());
  std::vector<float> a(static_cast<size_t>(rows * c.d)), b(a.size()), la(static_cast<size_t>(rows)),
      lb(la.size());
  ASSERT_TRUE(o1->CopyToHost(a.data(), a.size() * sizeof(float)).ok());
  ASSERT_TRUE(o2->CopyToHost(b.data(), b.size() * sizeof(float)).ok());
  ASSERT_TRUE(l1->CopyToHost(la.data(), la.size() * sizeof(float)).ok());
  ASSERT_TRUE(l2->CopyToHost(lb.data(), lb.size() * sizeof(float)).ok());
  if (differing == 0) {
    EXPECT_EQ(MismatchedFloats(a, b), 0) << "o";
    EXPECT_EQ(MismatchedFloats(la, lb), 0) << "lse";
  }
}

constexpr DType kBF16 = DType::kBF16, kF16 = DType::kF16;
constexpr Input kRand = Input::kRandom, kSeg = Input::kSegmented, kRep = Input::kRepeated;

INSTANTIATE_TEST_SUITE_P(
    Cases, SelectionCudaTest,
    ::testing::Values(
        SelectionCase{"rand_97_g1_d64_bf16", 2, 2, 97, 97, 64, kBF16, kRand},
        SelectionCase{"seg_97_g4_d128_f16", 8, 2, 97, 97, 128, kF16, kSeg, 64, false,
                      BoundaryMode::kDynamic, 32},
        SelectionCase{"rand_1025_g4_d128_bf16", 8, 2, 1025, 1025, 128, kBF16, kRand, 256, false,
                      BoundaryMode::kDynamic, 64},
        SelectionCase{"seg_1025_g2_d64_f16", 4, 2, 1025, 1025, 64, kF16, kSeg},
        SelectionCase{"rep_4099_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBF16, kRep},
        SelectionCase{"seg_4099_g3_d64_bf16_spec", 6, 2, 4099, 4099, 64, kBF16, kSeg, 0},
        SelectionCase{"rand_4099_g1_d256_f16", 1, 1, 4099, 4099, 256, kF16, kRand},
        SelectionCase{"fixed_4099_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBF16, kSeg, 512, false,
                      BoundaryMode::kFixed},
        SelectionCase{"chunked_4099_t0_2000_g4_d128_bf16", 8, 2, 2099, 4099, 128, kBF16, kSeg},
        SelectionCase{"chunked_prior_4099_t0_1111_g2_d64_f16", 4, 2, 2988, 4099, 64, kF16, kSeg,
                      512, true},
        SelectionCase{"seg_131071_g4_d128_bf16_spec", 8, 2, 131071, 131071, 128, kBF16, kSeg, 0},
        SelectionCase{"rep_131071_g2_d64_f16", 4, 2, 131071, 131071, 64, kF16, kRep, 4096},
        SelectionCase{"seg_4099_w1_g2_d64_bf16", 4, 2, 4099, 4099, 64, kBF16, kSeg, 512, false,
                      BoundaryMode::kDynamic, 128, 1},
        SelectionCase{"rand_1025_w7_g4_d128_f16", 8, 2, 1025, 1025, 128, kF16, kRand, 256, false,
                      BoundaryMode::kDynamic, 64, 7},
        SelectionCase{"rep_4099_w8_g1_d256_bf16", 3, 3, 4099, 4099, 256, kBF16, kRep, 512, false,
                      BoundaryMode::kDynamic, 128, 8},
        SelectionCase{"seg_4099_w12_g2_d128_bf16", 4, 2, 4099, 4099, 128, kBF16, kSeg, 512, false,
                      BoundaryMode::kDynamic, 128, 12},
        SelectionCase{"rep_4099_g4_d128_bf16_first_gap_kernel", 8, 2, 4099, 4099, 128, kBF16, kRep,
                      512, false, BoundaryMode::kDynamic, 128, 4, true},
        SelectionCase{"chunked_prior_4099_t0_1111_w3_g2_d128_bf16", 4, 2, 2988, 4099, 128, kBF16,
                      kSeg, 512, true, BoundaryMode::kDynamic, 128, 3},
        SelectionCase{"rand_4099_g4_d128_bf16_overlap", 8, 2, 4099, 4099, 128, kBF16, kRand, 512,
                      false, BoundaryMode::kDynamic, 128, 4, false, true},
        SelectionCase{"chunked_prior_4099_t0_1111_g2_d64_f16_overlap", 4, 2, 2988, 4099, 64, kF16,
                      kSeg, 512, true, BoundaryMode::kDynamic, 128, 4, false, true},
        SelectionCase{"seg_32771_g4_d128_bf16_spec_overlap_batched_warp_norms", 8, 2, 32771, 32771,
                      128, kBF16, kSeg, 0, false, BoundaryMode::kDynamic, 128, 4, false, true, true,
                      true},
        SelectionCase{"rep_4099_g4_d128_bf16_warp_norms", 8, 2, 4099, 4099, 128, kBF16, kRep, 512,
                      false, BoundaryMode::kDynamic, 128, 4, false, false, false, true},
        SelectionCase{"rand_97_g1_d64_bf16_warp_norms", 2, 2, 97, 97, 64, kBF16, kRand, 512, false,
                      BoundaryMode::kDynamic, 128, 4, false, false, false, true},
        SelectionCase{"rand_4099_g1_d256_f16_warp_norms", 1, 1, 4099, 4099, 256, kF16, kRand, 512,
                      false, BoundaryMode::kDynamic, 128, 4, false, false, false, true},
        SelectionCase{"chunked_prior_4099_t0_1111_g2_d64_f16_warp_norms", 4, 2, 2988, 4099, 64,
                      kF16, kSeg, 512, true, BoundaryMode::kDynamic, 128, 4, false, false, false,
                      true},
        SelectionCase{"rep_4099_g4_d128_bf16_batched", 8, 2, 4099, 4099, 128, kBF16, kRep, 512,
                      false, BoundaryMode::kDynamic, 128, 4, false, false, true},
        SelectionCase{"seg_4099_g3_d64_bf16_spec_batched", 6, 2, 4099, 4099, 64, kBF16, kSeg, 0,
                      false, BoundaryMode::kDynamic, 128, 4, false, false, true},
        SelectionCase{"rand_4099_g1_d256_f16_batched", 1, 1, 4099, 4099, 256, kF16, kRand, 512,
                      false, BoundaryMode::kDynamic, 128, 4, false, false, true},
        SelectionCase{"seg_1025_g2_d16_f16_batched", 4, 2, 1025, 1025, 16, kF16, kSeg, 256, false,
                      BoundaryMode::kDynamic, 64, 4, false, false, true},
        SelectionCase{"chunked_4099_t0_2000_g4_d128_bf16_batched", 8, 2, 2099, 4099, 128, kBF16,
                      kSeg, 512, false, BoundaryMode::kDynamic, 128, 4, false, false, true},
        SelectionCase{"rep_4099_g4_d128_bf16_serial_nms", 8, 2, 4099, 4099, 128, kBF16, kRep, 512,
                      false, BoundaryMode::kDynamic, 128, 4, false, false, false, false, 0},
        SelectionCase{"chunked_prior_4099_t0_1111_g2_d64_f16_nms_rounds_1", 4, 2, 2988, 4099, 64,
                      kF16, kSeg, 512, true, BoundaryMode::kDynamic, 128, 4, false, false, false,
                      false, 1},
        SelectionCase{"chunked_4099_t0_2000_g4_d128_bf16_nms_rounds_2", 8, 2, 2099, 4099, 128,
                      kBF16, kSeg, 512, false, BoundaryMode::kDynamic, 128, 4, false, false, false,
                      true, 2},
        SelectionCase{"rep_4099_g4_d128_bf16_cut_variants", 8, 2, 4099, 4099, 128, kBF16, kRep, 512,
                      false, BoundaryMode::kDynamic, 128, 4, false, false, true, true, -1, true},
        SelectionCase{"seg_32771_g2_d64_f16_cut_variants", 4, 2, 32771, 32771, 64, kF16, kSeg, 2048,
                      false, BoundaryMode::kDynamic, 128, 4, false, false, true, true, -1, true},
        SelectionCase{"chunked_prior_4099_t0_1111_g2_d64_f16_cut_variants_overlap", 4, 2, 2988,
                      4099, 64, kF16, kSeg, 512, true, BoundaryMode::kDynamic, 128, 4, false, true,
                      false, false, -1, true},
        SelectionCase{"rand_4099_g4_d128_bf16_scores_copies",
                      8,
                      2,
                      4099,
                      4099,
                      128,
                      kBF16,
                      kRand,
                      512,
                      false,
                      BoundaryMode::kDynamic,
                      128,
                      4,
                      false,
                      false,
                      false,
                      false,
                      -1,
                      false,
                      1},
        SelectionCase{"chunked_prior_4099_t0_1111_g2_d64_f16_scores_waves",
                      4,
                      2,
                      2988,
                      4099,
                      64,
                      kF16,
                      kSeg,
                      512,
                      true,
                      BoundaryMode::kDynamic,
                      64,
                      4,
                      false,
                      false,
                      false,
                      false,
                      -1,
                      false,
                      2},
        SelectionCase{"rep_4099_g4_d128_bf16_scores_in_kernel",
                      8,
                      2,
                      4099,
                      4099,
                      128,
                      kBF16,
                      kRep,
                      512,
                      false,
                      BoundaryMode::kDynamic,
                      128,
                      4,
                      false,
                      false,
                      false,
                      false,
                      -1,
                      false,
                      3},
        SelectionCase{"seg_1025_g2_d16_f16_scores_waves",
                      4,
                      2,
                      1025,
                      1025,
                      16,
                      kF16,
                      kSeg,
                      256,
                      false,
                      BoundaryMode::kDynamic,
                      64,
                      4,
                      false,
                      false,
                      false,
                      false,
                      -1,
                      false,
                      2},
        SelectionCase{"seg_32771_g4_d128_bf16_spec_scores_copies",
                      8,
                      2,
                      32771,
                      32771,
                      128,
                      kBF16,
                      kSeg,
                      0,
                      false,
                      BoundaryMode::kDynamic,
                      128,
                      4,
                      false,
                      false,
                      false,
                      true,
                      -1,
                      true,
                      1}),
    [](const ::testing::TestParamInfo<SelectionCase>& info) {
      return std::string(info.param.name);
    });

TEST(DeviceSelectionSupportedTest, DeclinesWhatItDoesNotImplement) {
  AttentionShape shape{8, 2, 128, 4096, 4096};
  DhsaConfig config;
  EXPECT_TRUE(DeviceSelectionSupported(config, shape, DType::kBF16).ok());
  EXPECT_TRUE(DeviceSelectionSupported(config, shape, DType::kF16).ok());
  EXPECT_EQ(DeviceSelectionSupported(config, shape, DType::kF32).code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(DeviceSelectionSupported(config, shape, DType::kBF16, /*decode=*/true).code(),
            absl::StatusCode::kUnimplemented);
  for (Policy policy :
       {Policy::kBlockTopk, Policy::kStreaming, Policy::kDense, Policy::kOracleTopk}) {
    DhsaConfig other = config;
    other.policy = policy;
    EXPECT_EQ(DeviceSelectionSupported(other, shape, DType::kBF16).code(),
              absl::StatusCode::kUnimplemented)
        << PolicyName(policy);
  }
  DhsaConfig mass = config;
  mass.chunk_score = ChunkScore::kMass;
  EXPECT_TRUE(DeviceSelectionSupported(mass, shape, DType::kBF16).ok());
  DhsaConfig shared = config;
  shared.shared_heads = true;
  EXPECT_EQ(DeviceSelectionSupported(shared, shape, DType::kBF16).code(),
            absl::StatusCode::kUnimplemented);
  AttentionShape odd_dim = shape;
  odd_dim.dim = 96;
  EXPECT_EQ(DeviceSelectionSupported(config, odd_dim, DType::kBF16).code(),
            absl::StatusCode::kUnimplemented);
  DhsaConfig bad = config;
  bad.budget = 100;  // Below sink + local.
  EXPECT_EQ(DeviceSelectionSupported(bad, shape, DType::kBF16).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MergeCudaTest, EqualsTheReferenceMerge) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  constexpr int64_t kRows = 1031, kDim = 128, kParts = 3;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<std::vector<float>> o(kParts, std::vector<float>(kRows * kDim)),
      lse(kParts, std::vector<float>(kRows));
  for (int64_t s = 0; s < kParts; ++s) {
    for (float& x : o[s]) x = normal(rng);
    for (int64_t r = 0; r < kRows; ++r) {
      // Rows empty in some parts (every part for r % 7 == 0), the rest finite.
      const bool empty = r % 7 == 0 || (r + s) % 3 == 0;
      lse[s][r] = empty ? -std::numeric_limits<float>::infinity() : normal(rng);
      if (empty) std::fill_n(o[s].begin() + r * kDim, kDim, 0.0f);
    }
  }
  std::vector<PartialView> views;
  for (int64_t s = 0; s < kParts; ++s) views.push_back({o[s].data(), lse[s].data()});
  std::vector<float> want_o(kRows * kDim), want_lse(kRows);
  ASSERT_TRUE(MergePartialsReference(views, kRows, kDim, want_o.data(), want_lse.data()).ok());

  std::vector<DeviceBuffer> buffers;
  std::vector<const float*> part_o, part_lse;
  for (int64_t s = 0; s < kParts; ++s) {
    absl::StatusOr<DeviceBuffer> bo = DeviceBuffer::FromHost(o[s].data(), o[s].size() * 4);
    absl::StatusOr<DeviceBuffer> bl = DeviceBuffer::FromHost(lse[s].data(), lse[s].size() * 4);
    ASSERT_TRUE(bo.ok() && bl.ok());
    part_o.push_back(bo->as<const float>());
    part_lse.push_back(bl->as<const float>());
    buffers.push_back(*std::move(bo));
    buffers.push_back(*std::move(bl));
  }
  absl::StatusOr<DeviceBuffer> out_o = DeviceBuffer::Allocate(kRows * kDim * 4);
  absl::StatusOr<DeviceBuffer> out_lse = DeviceBuffer::Allocate(kRows * 4);
  ASSERT_TRUE(out_o.ok() && out_lse.ok());
  ASSERT_TRUE(out_o->Fill(0xFF).ok() && out_lse->Fill(0xFF).ok());
  const absl::Status merged = MergePartialsCuda(part_o, part_lse, kRows, kDim, out_o->as<float>(),
                                                out_lse->as<float>(), nullptr);
  ASSERT_TRUE(merged.ok()) << merged;
  std::vector<float> got_o(kRows * kDim), got_lse(kRows);
  ASSERT_TRUE(out_o->CopyToHost(got_o.data(), got_o.size() * 4).ok());
  ASSERT_TRUE(out_lse->CopyToHost(got_lse.data(), got_lse.size() * 4).ok());
  double worst = 0;
  for (size_t i = 0; i < got_o.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got_o[i])) << i;
    worst = std::max(worst, std::abs(double(got_o[i]) - want_o[i]));
  }
  EXPECT_LT(worst, 1e-5);
  for (int64_t r = 0; r < kRows; ++r) {
    if (std::isinf(want_lse[r])) {
      EXPECT_EQ(got_lse[r], want_lse[r]) << r;
    } else {
      EXPECT_NEAR(got_lse[r], want_lse[r], 1e-5) << r;
    }
  }

  // A +inf or NaN partial lse is an error, not a value.
  lse[1][5] = std::numeric_limits<float>::infinity();
  ASSERT_TRUE(buffers[3].CopyFromHost(lse[1].data(), lse[1].size() * 4).ok());
  EXPECT_EQ(MergePartialsCuda(part_o, part_lse, kRows, kDim, out_o->as<float>(),
                              out_lse->as<float>(), nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dhsa
