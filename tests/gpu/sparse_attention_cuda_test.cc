// The CUDA sparse attention against the fp64 reference (SparseAttentionReference), on fresh random
// and structured inputs of odd lengths, every policy the kernels serve, both storage types, head
// dims 64 and 128, groups of 1 to 16 heads, prefill, chunked prefill (t0 > 0), decode (Lq = 1) and
// a worker's stripe of keys (rows with no key). Skipped without a CUDA device.
//
// Tolerance (FlashAttention's rule): the kernel's max error against fp64 attention on the original
// fp32 inputs is at most twice that of the same math done naively in the storage precision:
// inputs rounded to bf16/fp16, scores, softmax and sums in fp32, and P rounded to the storage type
// before P V (the tensor cores take P in that type, as FlashAttention's reference does), plus a
// floor of 1e-6 (o) and 1e-5 (lse) for fp32 rounding when the naive error is tiny.
#include "kernels/cuda/sparse_attention_cuda.h"

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

#include "bench/gpu/reference_selection.h"
#include "gtest/gtest.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_csr.h"
#include "kernels/cuda/sparse_attention_variants.h"
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

int Threads() { return static_cast<int>(std::max(2u, std::thread::hardware_concurrency())); }

float RoundTo(DType dtype, float x) {
  return dtype == DType::kBF16 ? BFloat16ToFloat(FloatToBFloat16(x)) : HalfToFloat(FloatToHalf(x));
}

// Attention over `selection` in the storage precision (see the file comment). q, k, v hold the
// rounded inputs; k.offset is the absolute position of k's first row.
void NaiveStorageAttention(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                           const Selection& selection, float scale, DType dtype,
                           std::vector<float>* o, std::vector<float>* lse) {
  const int64_t d = q.dim, group = q.heads / k.heads, rows = q.heads * q.len;
  o->assign(static_cast<size_t>(rows * d), 0.0f);
  lse->assign(static_cast<size_t>(rows), 0.0f);
  auto work = [&](int64_t first, int64_t last) {
    std::vector<float> qr(static_cast<size_t>(d)), kr(static_cast<size_t>(d)),
        vr(static_cast<size_t>(d)), acc(static_cast<size_t>(d));
    std::vector<int64_t> keys;
    std::vector<float> s;
    for (int64_t n = first; n < last; ++n) {
      const int64_t g = n / q.len, r = n % q.len, h = g / group, pos = q.offset + r;
      keys.clear();
      for (const Span& span : selection.ForQuery(g, pos)) {
        for (int64_t t = std::max(span.begin, k.offset);
             t < std::min({span.end, pos + 1, k.offset + k.len}); ++t) {
          keys.push_back(t);
        }
      }
      float* out = o->data() + n * d;
      if (keys.empty()) {
        (*lse)[static_cast<size_t>(n)] = -std::numeric_limits<float>::infinity();
        continue;
      }
      q.Row(g, r, qr.data());
      s.resize(keys.size());
      float m = -std::numeric_limits<float>::infinity();
      for (size_t i = 0; i < keys.size(); ++i) {
        k.Row(h, keys[i] - k.offset, kr.data());
        float dot = 0.0f;
        for (int64_t c = 0; c < d; ++c) dot += qr[c] * kr[c];
        s[i] = dot * scale;
        m = std::max(m, s[i]);
      }
      float sum = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (size_t i = 0; i < keys.size(); ++i) {
        const float p = std::exp(s[i] - m);
        sum += p;
        const float p_stored = RoundTo(dtype, p);
        v.Row(h, keys[i] - k.offset, vr.data());
        for (int64_t c = 0; c < d; ++c) acc[c] += p_stored * vr[c];
      }
      for (int64_t c = 0; c < d; ++c) out[c] = acc[c] / sum;
      (*lse)[static_cast<size_t>(n)] = m + std::log(sum);
    }
  };
  const int threads = Threads();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back(work, rows * t / threads, rows * (t + 1) / threads);
  }
  for (std::thread& t : pool) t.join();
}

// max |a - b| over elements whose reference is finite.
double MaxAbsError(const std::vector<float>& a, const std::vector<float>& ref) {
  double worst = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(ref[i])) continue;
    worst = std::max(worst, std::abs(static_cast<double>(a[i]) - ref[i]));
  }
  return worst;
}

struct DeviceResult {
  std::vector<float> o;
  std::vector<float> lse;
};

// Uploads the stored inputs and the selection, runs the kernel on NaN-poisoned outputs, returns
// them. k_s/v_s hold keys [k_offset, k_offset + len). variant >= 0 runs that Hopper tuning variant
// (sparse_attention_variants.h) instead of `kernel`.
absl::StatusOr<DeviceResult> RunCuda(const Tensor& q_s, const Tensor& k_s, const Tensor& v_s,
                                     const Selection& selection, int64_t q_offset, int64_t k_offset,
                                     float scale, SparseAttentionCudaKernel kernel,
                                     int variant = -1) {
  const int64_t hq = q_s.shape[0], lq = q_s.shape[1], d = q_s.shape[2];
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer q, DeviceBuffer::FromHost(q_s.data(), q_s.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer k, DeviceBuffer::FromHost(k_s.data(), k_s.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer v, DeviceBuffer::FromHost(v_s.data(), v_s.bytes.size()));
  DeviceResult result;
  result.o.resize(static_cast<size_t>(hq * lq * d));
  result.lse.resize(static_cast<size_t>(hq * lq));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer o, DeviceBuffer::Allocate(result.o.size() * sizeof(float)));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer lse,
                        DeviceBuffer::Allocate(result.lse.size() * sizeof(float)));
  DHSA_RETURN_IF_ERROR(o.Fill(0xFF));  // NaN: catches every element the kernel does not write.
  DHSA_RETURN_IF_ERROR(lse.Fill(0xFF));
  DHSA_ASSIGN_OR_RETURN(DeviceSelection device_selection, DeviceSelection::Upload(selection));

  SparseAttentionCudaParams p;
  p.dtype = q_s.dtype;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.as<float>();
  p.lse = lse.as<float>();
  p.hq = hq;
  p.hkv = k_s.shape[0];
  p.head_dim = d;
  p.lq = lq;
  p.lk = k_s.shape[1];
  p.q_offset = q_offset;
  p.k_offset = k_offset;
  p.scale = scale;
  p.kernel = kernel;
  DHSA_RETURN_IF_ERROR(device_selection.Attach(&p));
  if (variant >= 0) {
    DHSA_RETURN_IF_ERROR(SparseAttentionCudaHopperVariant(p, variant, nullptr));
  } else {
    DHSA_RETURN_IF_ERROR(SparseAttentionCuda(p, nullptr));
  }
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "sparse attention kernel"));
  DHSA_RETURN_IF_ERROR(o.CopyToHost(result.o.data(), result.o.size() * sizeof(float)));
  DHSA_RETURN_IF_ERROR(lse.CopyToHost(result.lse.data(), result.lse.size() * sizeof(float)));
  return result;
}

struct AttentionCase {
  const char* name;
  int64_t hq, hkv, lq, lk, d;
  DType dtype;
  Policy policy;
  bool structured = false;   // Segmented keys and sharper queries (peaked softmax).
  bool small_budget = true;  // budget 512, sink 32, local 128 (else the spec's defaults).
  int64_t q_block = 128;
  int64_t k_begin = 0;  // Keys held: [k_begin, lk), a worker's stripe when > 0.
  bool decode = false;
};

// gtest prints the case by name, not as bytes.
void PrintTo(const AttentionCase& c, std::ostream* os) { *os << c.name; }

// Kernel choice: kAuto is the Hopper kernel where it can run (sm_90a build, sm_90 device), else
// the portable one; kHopper is served exactly there, kHopperSerial has bf16 d = 128 only.
// CanImplement reads no device memory, so placeholder (aligned, never dereferenced) pointers do.
TEST(SparseAttentionCudaKernelChoice, HopperWhereAvailable) {
  alignas(16) static float placeholder[16];
  SparseAttentionCudaParams p;
  p.dtype = DType::kBF16;
  p.q = p.k = p.v = placeholder;
  p.o = p.lse = placeholder;
  p.hq = 4;
  p.hkv = 1;
  p.head_dim = 128;
  p.lq = 1;
  p.lk = 1;
  p.scale = 0.125f;
  p.block_size = 128;
  p.num_blocks = 1;
  static const int64_t offsets[2] = {0, 0};
  p.entry_offsets = offsets;
  ASSERT_TRUE(CanImplement(p).ok()) << CanImplement(p);
  EXPECT_EQ(ChosenKernel(p), SparseAttentionCudaHopperAvailable()
                                 ? SparseAttentionCudaKernel::kHopper
                                 : SparseAttentionCudaKernel::kPortable);
  p.dtype = DType::kF16;
  p.head_dim = 64;
  EXPECT_EQ(ChosenKernel(p), SparseAttentionCudaHopperAvailable()
                                 ? SparseAttentionCudaKernel::kHopper
                                 : SparseAttentionCudaKernel::kPortable);
  p.dtype = DType::kBF16;
  p.head_dim = 128;
  p.kernel = SparseAttentionCudaKernel::kHopper;
  EXPECT_EQ(CanImplement(p).ok(), SparseAttentionCudaHopperAvailable()) << CanImplement(p);
  EXPECT_EQ(ChosenKernel(p), SparseAttentionCudaKernel::kHopper);
  p.kernel = SparseAttentionCudaKernel::kHopperSerial;
  EXPECT_EQ(CanImplement(p).ok(), SparseAttentionCudaHopperAvailable()) << CanImplement(p);
  p.dtype = DType::kF16;
  EXPECT_EQ(CanImplement(p).code(), absl::StatusCode::kUnimplemented);
}

class SparseAttentionCudaTest : public ::testing::TestWithParam<AttentionCase> {};

// One kernel (or Hopper tuning variant, variant >= 0) to check.
struct KernelRun {
  SparseAttentionCudaKernel kernel;
  int variant;
  std::string name;
};

// One case's fresh inputs: fp32 q and the keys held (reference), their storage-precision copies
// (kernels), the selection and the scale.
struct CaseInputs {
  Tensor q, k_held, v_held, q_s, k_s, v_s;
  Selection selection;
  int64_t t0 = 0;
  float scale = 0.0f;
};

absl::StatusOr<CaseInputs> MakeInputs(const AttentionCase& c, std::mt19937_64& rng) {
  CaseInputs in;
  in.q = testing::RandomTensor(rng, c.hq, c.lq, c.d, c.structured ? 2.0f : 1.0f);
  const Tensor k = c.structured ? testing::SegmentedTensor(rng, c.hkv, c.lk, c.d)
                                : testing::RandomTensor(rng, c.hkv, c.lk, c.d);
  const Tensor v = testing::RandomTensor(rng, c.hkv, c.lk, c.d);
  in.t0 = c.lk - c.lq;
  DhsaConfig config;
  config.policy = c.policy;
  config.q_block = c.q_block;
  if (c.small_budget) {
    config.budget = 512;
    config.sink = 32;
    config.local = 128;
  }
  DHSA_ASSIGN_OR_RETURN(in.selection, ReferenceSelection(in.q, k, config, c.decode));
  in.scale = EffectiveScale(config, c.d);
  in.k_held = SliceTokens(k, c.k_begin, c.lk);
  in.v_held = SliceTokens(v, c.k_begin, c.lk);
  in.q_s = in.q.ConvertTo(c.dtype);
  in.k_s = in.k_held.ConvertTo(c.dtype);
  in.v_s = in.v_held.ConvertTo(c.dtype);
  return in;
}

// Every run of `kernels` on case `c` against the reference (see the file comment).
void CheckKernels(const AttentionCase& c, const std::vector<KernelRun>& kernels) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  absl::StatusOr<CaseInputs> inputs = MakeInputs(c, rng);
  ASSERT_TRUE(inputs.ok()) << inputs.status();
  const Tensor &q = inputs->q, &k_held = inputs->k_held, &v_held = inputs->v_held;
  const Tensor &q_s = inputs->q_s, &k_s = inputs->k_s, &v_s = inputs->v_s;
  const Selection* selection = &inputs->selection;
  const int64_t t0 = inputs->t0;
  const float scale = inputs->scale;

  auto view = [&](const Tensor& t, int64_t offset) {
    HeadsView h = HeadsView::Of(t, "t").value();
    h.offset = offset;
    return h;
  };
  std::vector<float> ref_o(static_cast<size_t>(c.hq * c.lq * c.d)),
      ref_lse(static_cast<size_t>(c.hq * c.lq));
  SparseAttentionParams ref;
  ref.q = view(q, t0);
  ref.k = view(k_held, c.k_begin);
  ref.v = view(v_held, c.k_begin);
  ref.selection = &*selection;
  ref.scale = scale;
  ref.o = {ref_o.data(), c.hq, c.lq, c.d};
  ref.lse = {ref_lse.data(), c.hq, c.lq, 1};
  ref.num_threads = Threads();
  ASSERT_TRUE(SparseAttentionReference(ref).ok());

  std::vector<float> naive_o, naive_lse;
  NaiveStorageAttention(view(q_s, t0), view(k_s, c.k_begin), view(v_s, c.k_begin), *selection,
                        scale, c.dtype, &naive_o, &naive_lse);

  for (const KernelRun& k : kernels) {
    const SparseAttentionCudaKernel kernel = k.kernel;
    const char* kernel_name = k.name.c_str();
    SCOPED_TRACE(kernel_name);
    const absl::StatusOr<DeviceResult> run =
        RunCuda(q_s, k_s, v_s, *selection, t0, c.k_begin, scale, kernel, k.variant);
    ASSERT_TRUE(run.ok()) << run.status();

    // Every element written; rows without keys exactly o = 0, lse = -inf, as the reference.
    int64_t unwritten = 0, empty_rows = 0;
    for (float x : run->o) unwritten += std::isfinite(x) ? 0 : 1;
    for (size_t i = 0; i < ref_lse.size(); ++i) {
      if (std::isinf(ref_lse[i]) && ref_lse[i] < 0) {
        ++empty_rows;
        EXPECT_TRUE(std::isinf(run->lse[i]) && run->lse[i] < 0)
            << "row " << i << ": " << run->lse[i];
        for (int64_t col = 0; col < c.d; ++col) {
          EXPECT_EQ(run->o[i * c.d + col], 0.0f) << "row " << i;
        }
      } else {
        unwritten += std::isfinite(run->lse[i]) ? 0 : 1;
      }
    }
    EXPECT_EQ(unwritten, 0) << "non-finite (unwritten) outputs";

    const double o_err = MaxAbsError(run->o, ref_o), o_naive = MaxAbsError(naive_o, ref_o);
    const double lse_err = MaxAbsError(run->lse, ref_lse),
                 lse_naive = MaxAbsError(naive_lse, ref_lse);
    EXPECT_LE(o_err, 2.0 * o_naive + 1e-6) << "o: kernel " << o_err << ", naive " << o_naive;
    EXPECT_LE(lse_err, 2.0 * lse_naive + 1e-5)
        << "lse: kernel " << lse_err << ", naive " << lse_naive;
    std::printf(
        "RESULT %-40s o_err %.3e naive %.3e ratio %.2f  lse_err %.3e naive %.3e  empty %lld  %s\n",
        c.name, o_err, o_naive, o_naive > 0 ? o_err / o_naive : 0.0, lse_err, lse_naive,
        static_cast<long long>(empty_rows), kernel_name);

    // A second run gives the same bits: no race, no read of memory nothing wrote.
    const absl::StatusOr<DeviceResult> again =
        RunCuda(q_s, k_s, v_s, *selection, t0, c.k_begin, scale, kernel, k.variant);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(std::memcmp(again->o.data(), run->o.data(), run->o.size() * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(again->lse.data(), run->lse.data(), run->lse.size() * sizeof(float)), 0);
  }
}

// The portable kernel; on a Hopper device with sm_90a code also the Hopper kernel and (bf16,
// d = 128) its serial variant.
TEST_P(SparseAttentionCudaTest, MatchesReferenceWithinStoragePrecision) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const AttentionCase c = GetParam();
  std::vector<KernelRun> kernels = {{SparseAttentionCudaKernel::kPortable, -1, "portable"}};
  if (SparseAttentionCudaHopperAvailable()) {
    kernels.push_back({SparseAttentionCudaKernel::kHopper, -1, "hopper"});
    if (c.dtype == DType::kBF16 && c.d == 128) {
      kernels.push_back({SparseAttentionCudaKernel::kHopperSerial, -1, "hopper_serial"});
    }
  }
  CheckKernels(c, kernels);
}

// The Hopper kernel's tuning variants (bf16, d = 128; all but the diagnostics), which a tuned
// kernel may become.
TEST_P(SparseAttentionCudaTest, HopperVariantsMatchReference) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const AttentionCase c = GetParam();
  if (!SparseAttentionCudaHopperAvailable() || c.dtype != DType::kBF16 || c.d != 128) {
    GTEST_SKIP() << "variants exist for bf16, d = 128 on sm_90a builds and devices only";
  }
  std::vector<KernelRun> kernels;
  for (int i = 0; i < SparseAttentionHopperVariantCount(); ++i) {
    const std::string name = SparseAttentionHopperVariantName(i);
    if (name.rfind("diag_", 0) == 0) continue;
    kernels.push_back({SparseAttentionCudaKernel::kHopper, i, "variant_" + name});
  }
  CheckKernels(c, kernels);
}

// The TMA producers (variants ws_tma*, and the default Hopper kernel, which is one of them) put the
// same bytes in shared memory as the cp.async producer (variant ws), so their outputs equal ws's
// bit for bit on the same inputs.
TEST_P(SparseAttentionCudaTest, HopperTmaVariantsEqualCpAsyncBitForBit) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const AttentionCase c = GetParam();
  if (!SparseAttentionCudaHopperAvailable() || c.dtype != DType::kBF16 || c.d != 128) {
    GTEST_SKIP() << "variants exist for bf16, d = 128 on sm_90a builds and devices only";
  }
  int cp_async = -1;
  std::vector<int> tma;
  for (int i = 0; i < SparseAttentionHopperVariantCount(); ++i) {
    const std::string name = SparseAttentionHopperVariantName(i);
    if (name == "ws") cp_async = i;
    if (name.rfind("ws_tma", 0) == 0) tma.push_back(i);
  }
  ASSERT_GE(cp_async, 0);
  ASSERT_FALSE(tma.empty());
  tma.push_back(-1);  // The default Hopper kernel.
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  absl::StatusOr<CaseInputs> in = MakeInputs(c, rng);
  ASSERT_TRUE(in.ok()) << in.status();
  const absl::StatusOr<DeviceResult> want =
      RunCuda(in->q_s, in->k_s, in->v_s, in->selection, in->t0, c.k_begin, in->scale,
              SparseAttentionCudaKernel::kHopper, cp_async);
  ASSERT_TRUE(want.ok()) << want.status();
  for (int variant : tma) {
    const char* name = variant >= 0 ? SparseAttentionHopperVariantName(variant) : "hopper";
    SCOPED_TRACE(name);
    const absl::StatusOr<DeviceResult> got =
        RunCuda(in->q_s, in->k_s, in->v_s, in->selection, in->t0, c.k_begin, in->scale,
                SparseAttentionCudaKernel::kHopper, variant);
    ASSERT_TRUE(got.ok()) << got.status();
    int64_t differing = 0;
    for (size_t i = 0; i < want->o.size(); ++i) {
      differing += std::memcmp(&got->o[i], &want->o[i], sizeof(float)) != 0 ? 1 : 0;
    }
    for (size_t i = 0; i < want->lse.size(); ++i) {
      differing += std::memcmp(&got->lse[i], &want->lse[i], sizeof(float)) != 0 ? 1 : 0;
    }
    EXPECT_EQ(differing, 0) << "elements differing from variant ws";
    std::printf("RESULT %-40s %s == ws: %lld of %zu elements differ\n", c.name, name,
                static_cast<long long>(differing), want->o.size() + want->lse.size());
  }
}

constexpr DType kBf16 = DType::kBF16, kF16 = DType::kF16;

// name, hq, hkv, lq, lk, d, dtype, policy, structured, small_budget, q_block, k_begin, decode
INSTANTIATE_TEST_SUITE_P(
    Cases, SparseAttentionCudaTest,
    ::testing::Values(
        AttentionCase{"dense_97_g1_d64_bf16", 2, 2, 97, 97, 64, kBf16, Policy::kDense},
        AttentionCase{"dense_97_g4_d128_f16", 4, 1, 97, 97, 128, kF16, Policy::kDense},
        AttentionCase{"dhsa_1025_g4_d128_bf16", 8, 2, 1025, 1025, 128, kBf16, Policy::kDhsa, true},
        AttentionCase{"streaming_1025_g1_d64_f16", 2, 2, 1025, 1025, 64, kF16, Policy::kStreaming},
        AttentionCase{"dhsa_1025_g3_d64_bf16", 6, 2, 1025, 1025, 64, kBf16, Policy::kDhsa, true},
        AttentionCase{"dense_1025_g16_d64_bf16", 16, 1, 1025, 1025, 64, kBf16, Policy::kDense},
        AttentionCase{"dhsa_4099_t0_qblock64_g4_d64_f16", 4, 1, 1500, 4099, 64, kF16, Policy::kDhsa,
                      true, true, 64},
        AttentionCase{"dhsa_4099_qblock64_g8_d128_bf16", 16, 2, 4099, 4099, 128, kBf16,
                      Policy::kDhsa, true, true, 64},
        AttentionCase{"dhsa_4099_qblock16_g4_d128_bf16", 8, 2, 4099, 4099, 128, kBf16,
                      Policy::kDhsa, true, true, 16},
        AttentionCase{"dhsa_1025_qblock16_g8_d64_f16", 8, 1, 1025, 1025, 64, kF16, Policy::kDhsa,
                      true, true, 16},
        AttentionCase{"dense_4099_t0_g1_d128_bf16", 2, 2, 333, 4099, 128, kBf16, Policy::kDense},
        AttentionCase{"block_topk_4099_g2_d128_f16", 4, 2, 4099, 4099, 128, kF16,
                      Policy::kBlockTopk, true},
        AttentionCase{"decode_dhsa_4099_g4_d128_bf16", 8, 2, 1, 4099, 128, kBf16, Policy::kDhsa,
                      true, true, 128, 0, true},
        AttentionCase{"decode_streaming_1025_g1_d64_f16", 2, 2, 1, 1025, 64, kF16,
                      Policy::kStreaming, false, true, 128, 0, true},
        AttentionCase{"stripe_dense_4099_g4_d64_bf16", 4, 1, 3074, 4099, 64, kBf16, Policy::kDense,
                      false, true, 128, 2000},
        AttentionCase{"stripe_dhsa_4099_g1_d128_f16", 2, 2, 4099, 4099, 128, kF16, Policy::kDhsa,
                      true, true, 128, 1000},
        AttentionCase{"long_dhsa_32771_g4_d128_bf16", 4, 1, 32771, 32771, 128, kBf16, Policy::kDhsa,
                      true, false},
        // Issue 5's longest odd length, every kernel against the fp64 reference (2 heads keep the
        // CPU reference to seconds).
        AttentionCase{"long_dhsa_131071_g2_d128_bf16", 2, 1, 131071, 131071, 128, kBf16,
                      Policy::kDhsa, true},
        AttentionCase{"long_streaming_32771_t0_g4_d64_f16", 4, 1, 2051, 32771, 64, kF16,
                      Policy::kStreaming, true, false},
        AttentionCase{"long_dense_32771_t0_g4_d64_f16", 4, 1, 257, 32771, 64, kF16, Policy::kDense},
        AttentionCase{"long_decode_dense_32771_g4_d128_bf16", 8, 2, 1, 32771, 128, kBf16,
                      Policy::kDense, true, false, 128, 0, true}),
    [](const ::testing::TestParamInfo<AttentionCase>& info) {
      return std::string(info.param.name);
    });

}  // namespace
}  // namespace dhsa
