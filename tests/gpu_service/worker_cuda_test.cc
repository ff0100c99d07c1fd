// The service with CUDA workers (dhsa-worker --backend=cuda, here embedded): for prefill, chunked
// prefill and decode, with bf16 and fp16 keys, head dims 64 and 128, GQA groups and several
// stripes per worker, the router's O and LSE equal
// - the in-process reference (AttendReference on the same stored-precision inputs) within the
//   CUDA kernels' tolerance rule (tests/gpu/sparse_attention_cuda_test.cc): max error at most
//   twice that of the same math done naively in the storage precision (P rounded to the storage
//   type before P V), plus 1e-6 (o) / 1e-5 (lse);
// - a service with CPU workers within the same rule (the CPU workers match the reference to 1e-4
//   of max |o|, as tests/router/e2e_test.cc checks).
// Also: Stats of a CUDA worker, and layouts the CUDA kernel does not serve refused up front.
// Skipped without a CUDA device.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "dhsa/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "kernels/common/tensor.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router_test {
namespace {

using ::dhsa::testing::FreshSeed;

bool HaveCudaDevice() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

float RoundTo(DType dtype, float x) {
  return dtype == DType::kBF16 ? BFloat16ToFloat(FloatToBFloat16(x)) : HalfToFloat(FloatToHalf(x));
}

// Attention over `selection` in the storage precision: q, k, v are the stored (rounded) inputs,
// queries are the last q.shape[1] positions of k; scores, softmax and sums in fp32, P rounded to
// `dtype` before P V (as tests/gpu/sparse_attention_cuda_test.cc's NaiveStorageAttention).
void NaiveStorageAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                           const Selection& selection, float scale, DType dtype,
                           std::vector<float>* o, std::vector<float>* lse) {
  const int64_t hq = q.shape[0], lq = q.shape[1], d = q.shape[2];
  const int64_t hkv = k.shape[0], lk = k.shape[1], group = hq / hkv, t0 = lk - lq;
  o->assign(static_cast<size_t>(hq * lq * d), 0.0f);
  lse->assign(static_cast<size_t>(hq * lq), 0.0f);
  auto work = [&](int64_t first, int64_t last) {
    std::vector<int64_t> keys;
    std::vector<float> s, acc(static_cast<size_t>(d));
    for (int64_t n = first; n < last; ++n) {
      const int64_t g = n / lq, r = n % lq, h = g / group, pos = t0 + r;
      keys.clear();
      for (const Span& span : selection.ForQuery(g, pos)) {
        for (int64_t t = span.begin; t < std::min(span.end, pos + 1); ++t) keys.push_back(t);
      }
      if (keys.empty()) {
        (*lse)[static_cast<size_t>(n)] = -std::numeric_limits<float>::infinity();
        continue;
      }
      s.resize(keys.size());
      float m = -std::numeric_limits<float>::infinity();
      for (size_t i = 0; i < keys.size(); ++i) {
        float dot = 0.0f;
        for (int64_t c = 0; c < d; ++c) {
          dot += q.Get((g * lq + r) * d + c) * k.Get((h * lk + keys[i]) * d + c);
        }
        s[i] = dot * scale;
        m = std::max(m, s[i]);
      }
      float sum = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (size_t i = 0; i < keys.size(); ++i) {
        const float p = std::exp(s[i] - m);
        sum += p;
        const float p_stored = RoundTo(dtype, p);
        for (int64_t c = 0; c < d; ++c) acc[c] += p_stored * v.Get((h * lk + keys[i]) * d + c);
      }
      for (int64_t c = 0; c < d; ++c) (*o)[static_cast<size_t>(n * d + c)] = acc[c] / sum;
      (*lse)[static_cast<size_t>(n)] = m + std::log(sum);
    }
  };
  const int64_t rows = hq * lq;
  const int threads = static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back(work, rows * t / threads, rows * (t + 1) / threads);
  for (std::thread& t : pool) t.join();
}

// max |a - ref| over elements whose reference is finite; a must be -inf where ref is.
double MaxAbsError(const Tensor& a, const std::vector<float>& ref) {
  double worst = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const float x = a.Get(static_cast<int64_t>(i));
    if (!std::isfinite(ref[i])) {
      if (x != ref[i]) return std::numeric_limits<double>::infinity();
      continue;
    }
    worst = std::max(worst, std::abs(static_cast<double>(x) - ref[i]));
  }
  return worst;
}

std::vector<float> Floats(const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.NumElements()));
  for (int64_t i = 0; i < t.NumElements(); ++i) out[static_cast<size_t>(i)] = t.Get(i);
  return out;
}

Harness StartService(const std::string& backend, int workers, int64_t stripe_tokens) {
  EmbeddedOptions options;
  options.num_workers = workers;
  options.stripe_tokens = stripe_tokens;
  options.threads = 2;
  options.capacity_bytes_per_worker = int64_t{256} << 20;
  options.backend = backend;
  Harness h;
  absl::StatusOr<std::unique_ptr<EmbeddedService>> service = EmbeddedService::Start(options);
  EXPECT_TRUE(service.ok()) << service.status();
  if (!service.ok()) return h;
  h.service = *std::move(service);
  absl::StatusOr<Client> client = Client::Connect(h.service->router_address());
  EXPECT_TRUE(client.ok()) << client.status();
  if (client.ok()) h.client = std::make_unique<Client>(*std::move(client));
  return h;
}

struct Case {
  const char* name;
  DType dtype;
  int hq, hkv, dim;
};

class CudaWorkerTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  }
};

// The CUDA service's output against the reference (kernel rule) and the CPU service's.
void Check(const char* case_name, const AttentionOutput& cuda, const AttentionOutput& cpu,
           const AttendResult& want, const Tensor& q, const Tensor& k, const Tensor& v,
           const DhsaConfig& config, DType dtype, bool with_lse, const std::string& what) {
  SCOPED_TRACE(what);
  ExpectMatches(cpu, want, with_lse, what + " (cpu workers vs reference)");
  ASSERT_EQ(cuda.o.shape, want.o.shape);
  std::vector<float> naive_o, naive_lse;
  const float scale =
      config.scale > 0 ? config.scale : 1.0f / std::sqrt(static_cast<float>(q.shape[2]));
  NaiveStorageAttention(q, k, v, want.selection, scale, dtype, &naive_o, &naive_lse);
  const std::vector<float> ref_o = Floats(want.o), ref_lse = Floats(want.lse);
  Tensor naive_o_t = Tensor::FromFloats(want.o.shape, naive_o);
  const double o_naive = MaxAbsError(naive_o_t, ref_o);
  const double o_err = MaxAbsError(cuda.o, ref_o);
  const double o_vs_cpu = MaxAbsError(cuda.o, Floats(cpu.o));
  double max_o = 0;
  for (float x : ref_o) max_o = std::max(max_o, std::abs(static_cast<double>(x)));
  EXPECT_LE(o_err, 2.0 * o_naive + 1e-6) << "o: cuda workers " << o_err << ", naive " << o_naive;
  // Both within their bounds of the reference: the CUDA workers' and the CPU workers' (1e-4).
  EXPECT_LE(o_vs_cpu, 2.0 * o_naive + 1e-6 + 1e-4 * max_o) << "o: cuda vs cpu workers " << o_vs_cpu;
  double lse_err = 0, lse_naive = 0;
  if (with_lse) {
    ASSERT_EQ(cuda.lse.shape, want.lse.shape);
    lse_naive = MaxAbsError(Tensor::FromFloats(want.lse.shape, naive_lse), ref_lse);
    lse_err = MaxAbsError(cuda.lse, ref_lse);
    EXPECT_LE(lse_err, 2.0 * lse_naive + 1e-5)
        << "lse: cuda " << lse_err << ", naive " << lse_naive;
  }
  std::printf(
      "RESULT %-28s %-26s o_err %.3e naive %.3e ratio %.2f vs_cpu %.3e lse_err %.3e naive %.3e\n",
      case_name, what.c_str(), o_err, o_naive, o_naive > 0 ? o_err / o_naive : 0.0, o_vs_cpu,
      lse_err, lse_naive);
}

TEST_P(CudaWorkerTest, MatchesReferenceAndCpuWorkersThroughPrefillChunkedPrefillAndDecode) {
  const Case c = GetParam();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << c.name << ", seed " << seed);
  std::mt19937_64 rng(seed);
  // Stripes of 96 tokens over 2 workers: every worker holds several stripes of each layer, and
  // appends (decode) grow the last one.
  Harness cuda = StartService("cuda", 2, 96);
  Harness cpu = StartService("cpu", 2, 96);
  ASSERT_NE(cuda.client, nullptr);
  ASSERT_NE(cpu.client, nullptr);
  constexpr int64_t kLen = 1001, kFirst = 433, kSteps = 3;
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  // Inputs in the storage type: the service stores them so, the reference reads the same values.
  const Inputs in = MakeInputs(rng, c.hq, c.hkv, kLen + kSteps, c.dim, c.dtype);
  Sequence on_cuda = cuda.Create(config, /*layers=*/2, c.hq, c.hkv, c.dim, c.dtype);
  Sequence on_cpu = cpu.Create(config, /*layers=*/2, c.hq, c.hkv, c.dim, c.dtype);

  auto both = [&](auto&& call) {
    auto a = call(on_cuda);
    auto b = call(on_cpu);
    return std::make_pair(std::move(a), std::move(b));
  };
  // Layer 0: one prefill.
  {
    const Tensor q = Rows(in.q, 0, kLen), k = Rows(in.k, 0, kLen), v = Rows(in.v, 0, kLen);
    auto [got, got_cpu] = both([&](Sequence& s) { return s.Prefill(0, q, k, v, true); });
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(got_cpu.ok()) << got_cpu.status();
    auto want = AttendReference(q, k, v, config);
    ASSERT_TRUE(want.ok()) << want.status();
    Check(c.name, *got, *got_cpu, *want, q, k, v, config, c.dtype, true, "layer 0 prefill");
    EXPECT_EQ(got->stats.computed_pairs(), want->computed_pairs);
  }
  // Layer 1: chunked prefill, then decode.
  const Tensor q1 = Rows(in.q, 0, kFirst), k1 = Rows(in.k, 0, kFirst), v1 = Rows(in.v, 0, kFirst);
  auto [first, first_cpu] = both([&](Sequence& s) { return s.Prefill(1, q1, k1, v1, true); });
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(first_cpu.ok()) << first_cpu.status();
  auto want = AttendReference(q1, k1, v1, config);
  ASSERT_TRUE(want.ok()) << want.status();
  Check(c.name, *first, *first_cpu, *want, q1, k1, v1, config, c.dtype, true,
        "layer 1 first prefill");
  std::vector<int64_t> boundaries = want->boundaries;

  const Tensor q2 = Rows(in.q, kFirst, kLen), k2 = Rows(in.k, kFirst, kLen),
               v2 = Rows(in.v, kFirst, kLen);
  auto [second, second_cpu] = both([&](Sequence& s) { return s.Prefill(1, q2, k2, v2, true); });
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE(second_cpu.ok()) << second_cpu.status();
  AttendOptions chunked;
  chunked.prior_boundaries = &boundaries;
  const Tensor k_all = Rows(in.k, 0, kLen), v_all = Rows(in.v, 0, kLen);
  want = AttendReference(q2, k_all, v_all, config, chunked);
  ASSERT_TRUE(want.ok()) << want.status();
  Check(c.name, *second, *second_cpu, *want, q2, k_all, v_all, config, c.dtype, true,
        "layer 1 chunked prefill");
  boundaries = want->boundaries;

  for (int64_t end = kLen + 1; end <= kLen + kSteps; ++end) {
    const Tensor q = Rows(in.q, end - 1, end), k = Rows(in.k, end - 1, end),
                 v = Rows(in.v, end - 1, end);
    auto [got, got_cpu] = both([&](Sequence& s) { return s.Decode(1, q, k, v, true); });
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(got_cpu.ok()) << got_cpu.status();
    AttendOptions decode;
    decode.prior_boundaries = &boundaries;
    decode.decode = true;
    const Tensor k_to = Rows(in.k, 0, end), v_to = Rows(in.v, 0, end);
    want = AttendReference(q, k_to, v_to, config, decode);
    ASSERT_TRUE(want.ok()) << want.status();
    Check(c.name, *got, *got_cpu, *want, q, k_to, v_to, config, c.dtype, true,
          "decode to " + std::to_string(end));
    boundaries = want->boundaries;
  }

  // Stats of a CUDA worker: its backend, its device's memory, the stripes it holds.
  auto stub = v1::Worker::NewStub(cuda.service->worker(0).InProcessChannel());
  grpc::ClientContext context;
  v1::StatsResponse stats;
  ASSERT_TRUE(stub->Stats(&context, v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.backend(), "cuda");
  EXPECT_GT(stats.device_memory_total_bytes(), 0);
  EXPECT_GT(stats.device_memory_free_bytes(), 0);
  EXPECT_LE(stats.device_memory_free_bytes(), stats.device_memory_total_bytes());
  EXPECT_GT(stats.held_bytes(), 0);
  EXPECT_GE(stats.stripes(), 4);
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaWorkerTest,
                         ::testing::Values(Case{"bf16_d128_group4", DType::kBF16, 8, 2, 128},
                                           Case{"f16_d64_group2", DType::kF16, 6, 3, 64},
                                           Case{"bf16_d64_group1", DType::kBF16, 2, 2, 64},
                                           Case{"f16_d128_group8", DType::kF16, 8, 1, 128}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(info.param.name);
                         });

TEST(CudaWorker, RefusesLayoutsTheKernelDoesNotServe) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  Harness cuda = StartService("cuda", 1, 96);
  ASSERT_NE(cuda.client, nullptr);
  std::mt19937_64 rng(FreshSeed());
  for (const auto& [dtype, dim] :
       {std::make_pair(DType::kF32, 64), std::make_pair(DType::kBF16, 32)}) {
    SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " d" << dim);
    const Inputs in = MakeInputs(rng, 2, 1, 50, dim, dtype);
    Sequence seq = cuda.Create(SmallConfig(Policy::kDhsa), 1, 2, 1, dim, dtype);
    auto got = seq.Prefill(0, in.q, in.k, in.v, false);
    ASSERT_FALSE(got.ok());
    EXPECT_NE(std::string(got.status().message()).find("--backend=cpu"), std::string::npos)
        << got.status();
  }
}

}  // namespace
}  // namespace dhsa::router_test
