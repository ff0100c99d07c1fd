// The device selection with dhsa's mass chunk score (ChunkScore::kMass: kernels/cuda/
// selection_mass.cu and the selection after it) against the reference steps
// (kernels/{boundaries,summaries,selection}/reference.cc), on fresh random and segmented inputs of
// odd lengths (97, 1025, 4099, 4107 keys), head dims 64 and 128 (and 32, 256), groups of 1 to 32
// query heads, fresh and chunked prefill (t0 > 0, with and without the prior boundaries passed),
// blocks with fewer rows than a piece (decode-like: Lq = 1, 3, 7, one mean query per KV head,
// scored by logit), rows of one block over several of the kernel's 64-row tiles, and the new
// defaults (q_block 16, score_rows 8, chunks 4-16 around a mean of 32). Then the whole call on the
// device (selection and sparse attention) against the reference's with those defaults. Device
// results are poisoned (0xFF) before each run. Skipped without a CUDA device.
//
// Boundaries and summaries must be equal (fp64 sums rounded once, as the reference). The mass
// scores are fp32 on the device (as on the CPU backend), so selections are compared up to ties:
// where a (KV head, query block) entry differs, every differing key must lie in a chunk whose
// reference score ties with the lowest score taken within 2 * kMassScoreTolerance of the entry's
// largest score (tests/cpu/cpu_test_util.h ExpectSameUpToTies, the CPU backend's rule).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_csr.h"
#include "kernels/cuda/selection_cuda.h"
#include "kernels/cuda/sparse_attention_cuda.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"
#include "tests/cpu/cpu_test_util.h"
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

// The defaults the lead is moving DhsaConfig to (docs/fidelity.md "Recommended configuration"),
// set here explicitly so that the tests do not depend on DhsaConfig{}.
DhsaConfig MassDefaults() {
  DhsaConfig c;
  c.policy = Policy::kDhsa;
  c.chunk_score = ChunkScore::kMass;
  c.q_block = 16;
  c.score_rows = 8;
  c.chunk_mean = 32;
  c.chunk_min = 4;
  c.chunk_max = 16;
  return c;
}

struct MassCase {
  const char* name;
  int64_t hq, hkv, lq, lk, d;
  DType dtype;
  bool segmented;
  int64_t budget;        // With sink budget / 16 and local budget / 4 (at least q_block).
  bool prior = false;    // Chunked prefill with the stored keys' boundaries passed in.
  int64_t q_block = 16;  // 0: MassDefaults' (16).
  int64_t score_rows = 8;
  BoundaryMode mode = BoundaryMode::kDynamic;
  int64_t wave = 0;  // Query blocks per wave of scores (0: the selection's own).
};

void PrintTo(const MassCase& c, std::ostream* os) { *os << c.name; }

DhsaConfig ConfigFor(const MassCase& c) {
  DhsaConfig config = MassDefaults();
  config.q_block = c.q_block;
  config.score_rows = c.score_rows;
  config.boundary_mode = c.mode;
  config.budget = c.budget;
  config.sink = c.budget / 16;
  config.local = std::max(c.q_block, c.budget / 4);
  return config;
}

// The reference's steps for the call: boundaries, chunk means, piece means, the selection.
struct Reference {
  std::vector<int64_t> prior, boundaries;
  Summaries kappa, rho;
  SelectionInputs in;
  Selection selection;
};

absl::Status ReferenceSteps(const Tensor& q_t, const Tensor& k_t, const DhsaConfig& config,
                            Reference* r) {
  DHSA_ASSIGN_OR_RETURN(HeadsView q, HeadsView::Of(q_t, "Q"));
  DHSA_ASSIGN_OR_RETURN(HeadsView k, HeadsView::Of(k_t, "K"));
  DHSA_ASSIGN_OR_RETURN(AttentionShape shape, CheckShapes(q, k, k));
  q.offset = shape.t0();
  r->prior = {0};
  if (shape.t0() > 0) {
    DHSA_ASSIGN_OR_RETURN(r->prior, SegmentKeysReference(k, 0, shape.t0(), config));
  }
  DHSA_ASSIGN_OR_RETURN(r->boundaries,
                        AppendPrefillBoundariesReference(k, r->prior, shape.lk, config));
  r->kappa = ChunkSummariesReference(k, r->boundaries, ChunkSummaryNorm(config));
  r->rho = ScoreQuerySummariesReference(q, shape.hkv, config);
  r->in.shape = shape;
  r->in.boundaries = &r->boundaries;
  r->in.kappa = &r->kappa;
  r->in.rho = &r->rho;
  DHSA_ASSIGN_OR_RETURN(r->selection, SelectSpansReference(r->in, config));
  return absl::OkStatus();
}

int64_t MismatchedFloats(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::max(a.size(), b.size()));
  int64_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += a[i] == b[i] ? 0 : 1;  // NaN never equals.
  return bad;
}

int64_t DifferingEntries(const Selection& a, const Selection& b) {
  int64_t n = 0;
  for (size_t e = 0; e < a.spans.size() && e < b.spans.size(); ++e) {
    n += a.spans[e] == b.spans[e] ? 0 : 1;
  }
  return n;
}

// The device selection of one call on poisoned buffers, downloaded.
struct DeviceRun {
  std::vector<int64_t> boundaries;
  Summaries kappa, rho;
  Selection selection;
};

absl::Status RunDevice(DeviceDhsaSelection& sel, const DeviceBuffer& q, const DeviceBuffer& k,
                       const std::vector<int64_t>* prior, DeviceRun* out) {
  DHSA_RETURN_IF_ERROR(sel.Poison());
  DHSA_RETURN_IF_ERROR(sel.Run(q.data(), k.data(), nullptr, prior));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "device selection"));
  DHSA_ASSIGN_OR_RETURN(out->boundaries, sel.Boundaries());
  DHSA_ASSIGN_OR_RETURN(out->kappa, sel.Kappa());
  DHSA_ASSIGN_OR_RETURN(out->rho, sel.Rho());
  DHSA_ASSIGN_OR_RETURN(out->selection, sel.ToSelection());
  return absl::OkStatus();
}

// One variant of the device selection against the reference steps (see the test below).
void CheckDevice(const MassCase& c, const DhsaConfig& config, const AttentionShape& shape,
                 int64_t prior_chunks, int variant, const DeviceBuffer* dq, const DeviceBuffer* dk,
                 const DeviceBuffer* dv, const Reference& ref);

class MassSelectionCudaTest : public ::testing::TestWithParam<MassCase> {};

TEST_P(MassSelectionCudaTest, EqualsTheReferenceUpToTies) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const MassCase c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, c.hq, c.lq, c.d).ConvertTo(c.dtype);
  const Tensor k = (c.segmented ? testing::SegmentedTensor(rng, c.hkv, c.lk, c.d)
                                : testing::RandomTensor(rng, c.hkv, c.lk, c.d))
                       .ConvertTo(c.dtype);
  const Tensor v = testing::RandomTensor(rng, c.hkv, c.lk, c.d).ConvertTo(c.dtype);
  const DhsaConfig config = ConfigFor(c);
  Reference ref;
  const absl::Status steps = ReferenceSteps(q, k, config, &ref);
  ASSERT_TRUE(steps.ok()) << steps;

  const AttentionShape shape{c.hq, c.hkv, c.d, c.lq, c.lk};
  ASSERT_TRUE(DeviceSelectionSupported(config, shape, c.dtype).ok())
      << DeviceSelectionSupported(config, shape, c.dtype);
  const int64_t prior_chunks = c.prior ? static_cast<int64_t>(ref.prior.size()) - 1 : 0;
  absl::StatusOr<DeviceBuffer> dq = DeviceBuffer::FromHost(q.data(), q.bytes.size());
  absl::StatusOr<DeviceBuffer> dk = DeviceBuffer::FromHost(k.data(), k.bytes.size());
  absl::StatusOr<DeviceBuffer> dv = DeviceBuffer::FromHost(v.data(), v.bytes.size());
  ASSERT_TRUE(dq.ok() && dk.ok() && dv.ok());
  // 0: fp32 FMA products, the cut on shared-memory copies without the early exit; 1: the first
  // kernel's 3xTF32 products, shared-memory copies with the early exit and per-warp histogram
  // adds; 2: the defaults (the tiled kernel, the cut on global memory with the early exit); 3: the
  // tiled kernel with the short split.
  for (const int variant : {0, 1, 2, 3}) {
    SCOPED_TRACE(::testing::Message() << "variant " << variant);
    CheckDevice(c, config, shape, prior_chunks, variant, &*dq, &*dk, &*dv, ref);
  }
}

void CheckDevice(const MassCase& c, const DhsaConfig& config, const AttentionShape& shape,
                 int64_t prior_chunks, int variant, const DeviceBuffer* dq, const DeviceBuffer* dk,
                 const DeviceBuffer* dv, const Reference& ref) {
  absl::StatusOr<DeviceDhsaSelection> sel =
      DeviceDhsaSelection::Create(config, shape, c.dtype, prior_chunks);
  ASSERT_TRUE(sel.ok()) << sel.status();
  if (c.wave > 0) sel->set_mass_wave_blocks(c.wave);
  sel->set_mass_tensor_cores(variant > 0);
  sel->set_mass_tiled(variant >= 2);
  sel->set_mass_short_split(variant == 3);
  sel->set_select_global_scores(variant >= 2);
  sel->set_select_early_exit(variant > 0);
  sel->set_select_aggregate(variant == 1);
  DeviceRun got;
  const absl::Status run = RunDevice(*sel, *dq, *dk, c.prior ? &ref.prior : nullptr, &got);
  ASSERT_TRUE(run.ok()) << run;

  EXPECT_EQ(got.boundaries, ref.boundaries);
  if (got.boundaries == ref.boundaries) {
    EXPECT_EQ(MismatchedFloats(got.kappa.data, ref.kappa.data), 0) << "kappa (chunk means)";
  }
  EXPECT_EQ(got.rho.heads, ref.rho.heads);
  EXPECT_EQ(got.rho.count, ref.rho.count);
  EXPECT_EQ(MismatchedFloats(got.rho.data, ref.rho.data), 0) << "rho (piece means)";
  ASSERT_TRUE(CheckSelection(got.selection, shape).ok()) << CheckSelection(got.selection, shape);
  ASSERT_EQ(got.selection.spans.size(), ref.selection.spans.size());
  testing::ExpectSameUpToTies(got.selection, ref.selection, ref.in, config);
  const int64_t differing = DifferingEntries(got.selection, ref.selection);
  int64_t keys = 0;
  for (const std::vector<Span>& spans : ref.selection.spans) {
    for (const Span& s : spans) keys += s.size();
  }
  std::printf("RESULT %-44s %-4s chunks %zu entries %zu keys %lld tie-differing entries %lld\n",
              c.name,
              variant == 0   ? "fma"
              : variant == 1 ? "tf32"
              : variant == 2 ? "tile"
                             : "tils",
              got.boundaries.size() - 1, got.selection.spans.size(), static_cast<long long>(keys),
              static_cast<long long>(differing));

  // A second run (poisoned again) gives the same selection: nothing read that nothing wrote.
  DeviceRun again;
  const absl::Status rerun = RunDevice(*sel, *dq, *dk, c.prior ? &ref.prior : nullptr, &again);
  ASSERT_TRUE(rerun.ok()) << rerun;
  EXPECT_EQ(DifferingEntries(again.selection, got.selection), 0) << "second run";

  // Attention over the device selection (attached, spans read in place) equals attention over
  // the same selection uploaded from the host, bit for bit.
  if (c.d != 64 && c.d != 128) return;
  const int64_t rows = c.hq * c.lq;
  std::vector<std::vector<float>> o(2, std::vector<float>(static_cast<size_t>(rows * c.d))),
      lse(2, std::vector<float>(static_cast<size_t>(rows)));
  absl::StatusOr<DeviceSelection> uploaded = DeviceSelection::Upload(got.selection);
  ASSERT_TRUE(uploaded.ok()) << uploaded.status();
  for (int pass = 0; pass < 2; ++pass) {
    absl::StatusOr<DeviceBuffer> od = DeviceBuffer::Allocate(rows * c.d * sizeof(float));
    absl::StatusOr<DeviceBuffer> ld = DeviceBuffer::Allocate(rows * sizeof(float));
    ASSERT_TRUE(od.ok() && ld.ok());
    ASSERT_TRUE(od->Fill(0xFF).ok() && ld->Fill(0xFF).ok());
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
    p.o = od->as<float>();
    p.lse = ld->as<float>();
    ASSERT_TRUE((pass == 0 ? sel->Attach(&p) : uploaded->Attach(&p)).ok());
    ASSERT_TRUE(SparseAttentionCuda(p, nullptr).ok());
    ASSERT_TRUE(CudaStatus(cudaDeviceSynchronize(), "attention").ok());
    ASSERT_TRUE(od->CopyToHost(o[pass].data(), o[pass].size() * sizeof(float)).ok());
    ASSERT_TRUE(ld->CopyToHost(lse[pass].data(), lse[pass].size() * sizeof(float)).ok());
  }
  EXPECT_EQ(MismatchedFloats(o[0], o[1]), 0) << "o";
  EXPECT_EQ(MismatchedFloats(lse[0], lse[1]), 0) << "lse";
}

constexpr DType kBF16 = DType::kBF16, kF16 = DType::kF16;
constexpr bool kSeg = true, kRand = false;

INSTANTIATE_TEST_SUITE_P(
    Cases, MassSelectionCudaTest,
    ::testing::Values(
        MassCase{"rand_97_g1_d64_bf16", 2, 2, 97, 97, 64, kBF16, kRand, 64},
        MassCase{"seg_97_g4_d128_f16", 8, 2, 97, 97, 128, kF16, kSeg, 64},
        MassCase{"rand_1025_g4_d128_bf16", 8, 2, 1025, 1025, 128, kBF16, kRand, 256},
        MassCase{"seg_1025_g2_d64_f16", 4, 2, 1025, 1025, 64, kF16, kSeg, 256},
        MassCase{"seg_4099_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBF16, kSeg, 512},
        MassCase{"rand_4099_g3_d64_bf16", 6, 2, 4099, 4099, 64, kBF16, kRand, 512},
        MassCase{"seg_4099_g8_d128_f16", 16, 2, 4099, 4099, 128, kF16, kSeg, 1024},
        MassCase{"seg_4099_g1_d32_bf16", 3, 3, 4099, 4099, 32, kBF16, kSeg, 512},
        MassCase{"rand_1025_g1_d256_f16", 1, 1, 1025, 1025, 256, kF16, kRand, 256},
        MassCase{"chunked_4099_t0_2000_g4_d128_bf16", 8, 2, 2099, 4099, 128, kBF16, kSeg, 512},
        MassCase{"chunked_prior_4099_t0_1111_g2_d64_f16", 4, 2, 2988, 4099, 64, kF16, kSeg, 512,
                 true},
        MassCase{"decode_prior_4099_lq1_g4_d128_bf16", 8, 2, 1, 4099, 128, kBF16, kSeg, 512, true},
        MassCase{"decode_prior_4099_lq3_g2_d64_f16", 4, 2, 3, 4099, 64, kF16, kSeg, 512, true},
        MassCase{"few_rows_two_pieces_4107_lq7_g4_d128_bf16", 8, 2, 7, 4107, 128, kBF16, kSeg, 512,
                 true},
        MassCase{"chunked_4107_lq11_g4_d128_bf16", 8, 2, 11, 4107, 128, kBF16, kRand, 512},
        MassCase{"q128_r16_4099_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBF16, kSeg, 512, false, 128,
                 16},
        MassCase{"q64_r8_1025_g32_d64_bf16_tiles", 32, 1, 1025, 1025, 64, kBF16, kSeg, 256, false,
                 64, 8},
        MassCase{"q16_r1_1025_g4_d64_f16", 8, 2, 1025, 1025, 64, kF16, kRand, 256, false, 16, 1},
        MassCase{"fixed_4099_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBF16, kSeg, 512, false, 16, 8,
                 BoundaryMode::kFixed},
        MassCase{"waves_of_7_4099_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBF16, kSeg, 512, false, 16,
                 8, BoundaryMode::kDynamic, 7},
        MassCase{"waves_of_5_chunked_prior_4099_t0_1111_g2_d64_f16", 4, 2, 2988, 4099, 64, kF16,
                 kSeg, 512, true, 16, 8, BoundaryMode::kDynamic, 5}),
    [](const ::testing::TestParamInfo<MassCase>& info) { return std::string(info.param.name); });

// Attention over `selection` in the storage precision (P rounded to the storage type before P V,
// as the tensor cores take it): the yardstick of the GPU attention tests' tolerance rule
// (tests/gpu/sparse_attention_cuda_test.cc).
void NaiveStorageAttention(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                           const Selection& selection, float scale, DType dtype,
                           std::vector<float>* o, std::vector<float>* lse) {
  const int64_t d = q.dim, group = q.heads / k.heads, rows = q.heads * q.len;
  o->assign(static_cast<size_t>(rows * d), 0.0f);
  lse->assign(static_cast<size_t>(rows), 0.0f);
  auto round = [dtype](float x) {
    return dtype == DType::kBF16 ? BFloat16ToFloat(FloatToBFloat16(x))
                                 : HalfToFloat(FloatToHalf(x));
  };
  auto work = [&](int64_t first, int64_t last) {
    std::vector<float> qr(static_cast<size_t>(d)), kr(static_cast<size_t>(d)),
        vr(static_cast<size_t>(d)), acc(static_cast<size_t>(d)), s;
    for (int64_t n = first; n < last; ++n) {
      const int64_t g = n / q.len, r = n % q.len, h = g / group, pos = q.offset + r;
      std::vector<int64_t> keys;
      for (const Span& span : selection.ForQuery(g, pos)) {
        for (int64_t t = span.begin; t < std::min(span.end, pos + 1); ++t) keys.push_back(t);
      }
      q.Row(g, r, qr.data());
      s.resize(keys.size());
      float m = -std::numeric_limits<float>::infinity();
      for (size_t i = 0; i < keys.size(); ++i) {
        k.Row(h, keys[i], kr.data());
        float dot = 0.0f;
        for (int64_t x = 0; x < d; ++x) dot += qr[x] * kr[x];
        s[i] = dot * scale;
        m = std::max(m, s[i]);
      }
      float sum = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (size_t i = 0; i < keys.size(); ++i) {
        const float w = std::exp(s[i] - m);
        sum += w;
        const float stored = round(w);
        v.Row(h, keys[i], vr.data());
        for (int64_t x = 0; x < d; ++x) acc[x] += stored * vr[x];
      }
      float* out = o->data() + n * d;
      for (int64_t x = 0; x < d; ++x) out[x] = acc[x] / sum;
      (*lse)[static_cast<size_t>(n)] = m + std::log(sum);
    }
  };
  const int threads = static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back(work, rows * t / threads, rows * (t + 1) / threads);
  }
  for (std::thread& t : pool) t.join();
}

struct AttendCase {
  const char* name;
  int64_t hq, hkv, lq, lk, d;
  DType dtype;
  int64_t budget;  // 0: DhsaConfig's budget, sink and local.
  bool prior;
  bool tensor = false;  // The mass products in 3xTF32 on the tensor cores.
};

void PrintTo(const AttendCase& c, std::ostream* os) { *os << c.name; }

class MassAttendCudaTest : public ::testing::TestWithParam<AttendCase> {};

// The whole call on the device with the new defaults (selection, then the sparse attention over
// it) against the reference call (reference steps, then SparseAttentionReference in fp64) with the
// same config: selections equal up to ties, and on
// the rows whose selection is the reference's, the device's error within twice that of the naive
// storage-precision attention (the GPU attention tests' rule).
TEST_P(MassAttendCudaTest, DeviceCallEqualsTheReferenceWithTheNewDefaults) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const AttendCase c = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const Tensor q = testing::RandomTensor(rng, c.hq, c.lq, c.d).ConvertTo(c.dtype);
  const Tensor k = testing::SegmentedTensor(rng, c.hkv, c.lk, c.d).ConvertTo(c.dtype);
  const Tensor v = testing::RandomTensor(rng, c.hkv, c.lk, c.d).ConvertTo(c.dtype);
  DhsaConfig config = MassDefaults();
  if (c.budget > 0) {
    config.budget = c.budget;
    config.sink = c.budget / 16;
    config.local = c.budget / 4;
  }
  Reference ref;
  const absl::Status steps = ReferenceSteps(q, k, config, &ref);
  ASSERT_TRUE(steps.ok()) << steps;
  // The reference call: the reference steps' selection (with the prior boundaries when chunked),
  // then the reference sparse attention over it in fp64, on the stored inputs.
  absl::StatusOr<HeadsView> qv = HeadsView::Of(q, "Q");
  absl::StatusOr<HeadsView> kv = HeadsView::Of(k, "K");
  absl::StatusOr<HeadsView> vv = HeadsView::Of(v, "V");
  ASSERT_TRUE(qv.ok() && kv.ok() && vv.ok());
  qv->offset = c.lk - c.lq;
  std::vector<float> want_o(static_cast<size_t>(c.hq * c.lq * c.d)),
      want_lse(static_cast<size_t>(c.hq * c.lq));
  SparseAttentionParams rp;
  rp.q = *qv;
  rp.k = *kv;
  rp.v = *vv;
  rp.selection = &ref.selection;
  rp.scale = EffectiveScale(config, c.d);
  rp.o = {want_o.data(), c.hq, c.lq, c.d};
  rp.lse = {want_lse.data(), c.hq, c.lq, 1};
  rp.num_threads = static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
  ASSERT_TRUE(SparseAttentionReference(rp).ok());

  const AttentionShape shape{c.hq, c.hkv, c.d, c.lq, c.lk};
  const int64_t prior_chunks = c.prior ? static_cast<int64_t>(ref.prior.size()) - 1 : 0;
  absl::StatusOr<DeviceDhsaSelection> sel =
      DeviceDhsaSelection::Create(config, shape, c.dtype, prior_chunks);
  ASSERT_TRUE(sel.ok()) << sel.status();
  sel->set_mass_tensor_cores(c.tensor);
  absl::StatusOr<DeviceBuffer> dq = DeviceBuffer::FromHost(q.data(), q.bytes.size());
  absl::StatusOr<DeviceBuffer> dk = DeviceBuffer::FromHost(k.data(), k.bytes.size());
  absl::StatusOr<DeviceBuffer> dv = DeviceBuffer::FromHost(v.data(), v.bytes.size());
  const int64_t rows = c.hq * c.lq;
  absl::StatusOr<DeviceBuffer> od = DeviceBuffer::Allocate(rows * c.d * sizeof(float));
  absl::StatusOr<DeviceBuffer> ld = DeviceBuffer::Allocate(rows * sizeof(float));
  ASSERT_TRUE(dq.ok() && dk.ok() && dv.ok() && od.ok() && ld.ok());
  ASSERT_TRUE(sel->Poison().ok() && od->Fill(0xFF).ok() && ld->Fill(0xFF).ok());
  SparseAttentionCudaParams p;
  p.dtype = c.dtype;
  p.q = dq->data();
  p.k = dk->data();
  p.v = dv->data();
  p.o = od->as<float>();
  p.lse = ld->as<float>();
  p.hq = c.hq;
  p.hkv = c.hkv;
  p.head_dim = c.d;
  p.lq = c.lq;
  p.lk = c.lk;
  p.q_offset = c.lk - c.lq;
  p.scale = EffectiveScale(config, c.d);
  ASSERT_TRUE(sel->Attach(&p).ok());
  // One enqueued sequence, no host round trip between the steps.
  ASSERT_TRUE(sel->Run(dq->data(), dk->data(), nullptr, c.prior ? &ref.prior : nullptr).ok());
  ASSERT_TRUE(SparseAttentionCuda(p, nullptr).ok());
  ASSERT_TRUE(CudaStatus(cudaDeviceSynchronize(), "device call").ok());
  std::vector<float> o(static_cast<size_t>(rows * c.d)), lse(static_cast<size_t>(rows));
  ASSERT_TRUE(od->CopyToHost(o.data(), o.size() * sizeof(float)).ok());
  ASSERT_TRUE(ld->CopyToHost(lse.data(), lse.size() * sizeof(float)).ok());
  absl::StatusOr<Selection> got = sel->ToSelection();
  ASSERT_TRUE(got.ok()) << got.status();
  testing::ExpectSameUpToTies(*got, ref.selection, ref.in, config);

  // Rows whose (KV head, query block) entry took a tie the other way are left out of the
  // comparison (their keys differ); the rest must meet the tolerance rule.
  std::vector<float> naive_o, naive_lse;
  NaiveStorageAttention(*qv, *kv, *vv, ref.selection, p.scale, c.dtype, &naive_o, &naive_lse);
  double o_err = 0, o_naive = 0, lse_err = 0, lse_naive = 0;
  int64_t skipped = 0, unwritten = 0;
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t g = n / c.lq, pos = c.lk - c.lq + n % c.lq;
    const int64_t entry =
        (g / (c.hq / c.hkv)) * got->num_blocks + pos / config.q_block - got->first_block;
    if (got->spans[static_cast<size_t>(entry)] != ref.selection.spans[static_cast<size_t>(entry)]) {
      ++skipped;
      continue;
    }
    unwritten += std::isfinite(lse[n]) ? 0 : 1;
    lse_err = std::max(lse_err, std::abs(double(lse[n]) - want_lse[n]));
    lse_naive = std::max(lse_naive, std::abs(double(naive_lse[n]) - want_lse[n]));
    for (int64_t x = n * c.d; x < (n + 1) * c.d; ++x) {
      unwritten += std::isfinite(o[x]) ? 0 : 1;
      o_err = std::max(o_err, std::abs(double(o[x]) - want_o[x]));
      o_naive = std::max(o_naive, std::abs(double(naive_o[x]) - want_o[x]));
    }
  }
  EXPECT_EQ(unwritten, 0);
  EXPECT_LT(skipped, rows / 10) << "most rows must share the reference's selection";
  EXPECT_LE(o_err, 2.0 * o_naive + 1e-6) << "o: device " << o_err << ", naive " << o_naive;
  EXPECT_LE(lse_err, 2.0 * lse_naive + 1e-5)
      << "lse: device " << lse_err << ", naive " << lse_naive;
  std::printf(
      "RESULT %-44s o_err %.3e naive %.3e  lse_err %.3e naive %.3e  rows %lld skipped "
      "(ties) %lld\n",
      c.name, o_err, o_naive, lse_err, lse_naive, static_cast<long long>(rows),
      static_cast<long long>(skipped));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MassAttendCudaTest,
    ::testing::Values(
        AttendCase{"defaults_4099_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBF16, 0, false},
        AttendCase{"b512_4099_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBF16, 512, false},
        AttendCase{"b512_chunked_prior_4099_t0_1111_g2_d64_f16", 4, 2, 2988, 4099, 64, kF16, 512,
                   true},
        AttendCase{"b256_1025_g8_d64_bf16", 16, 2, 1025, 1025, 64, kBF16, 256, false},
        AttendCase{"defaults_4099_g4_d128_bf16_tensor_cores", 8, 2, 4099, 4099, 128, kBF16, 0,
                   false, true},
        AttendCase{"b512_chunked_prior_4099_t0_1111_g2_d64_f16_tensor_cores", 4, 2, 2988, 4099, 64,
                   kF16, 512, true, true}),
    [](const ::testing::TestParamInfo<AttendCase>& info) { return std::string(info.param.name); });

TEST(MassSelectionSupportedTest, TheMassScoreRunsOnTheDevice) {
  const AttentionShape shape{32, 8, 128, 131072, 131072};
  EXPECT_TRUE(DeviceSelectionSupported(MassDefaults(), shape, DType::kBF16).ok());
  EXPECT_EQ(DeviceSelectionSupported(MassDefaults(), shape, DType::kBF16, /*decode=*/true).code(),
            absl::StatusCode::kUnimplemented);
  DhsaConfig shared = MassDefaults();
  shared.shared_heads = true;
  EXPECT_EQ(DeviceSelectionSupported(shared, shape, DType::kBF16).code(),
            absl::StatusCode::kUnimplemented);
  DhsaConfig bad = MassDefaults();
  bad.score_rows = 5;  // Does not divide q_block.
  EXPECT_EQ(DeviceSelectionSupported(bad, shape, DType::kBF16).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dhsa
