// tinylm's C++ forward pass against an independent slow path: the README's formulas written as
// plain loops in double, with attention as an explicit masked softmax.
#include "bench/lm/tinylm.h"

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench/lm/lm_eval.h"
#include "bench/lm/lm_policies.h"
#include "gtest/gtest.h"
#include "kernels/io/file.h"
#include "kernels/io/safetensors.h"
#include "kernels/selection/selection.h"

namespace dhsa {
namespace {

using Mat = std::vector<double>;  // Row-major.

// y[n, out] = x[n, in] W^T.
Mat MatMulT(const Mat& x, int64_t n, int64_t in, const std::vector<float>& w, int64_t out) {
  Mat y(static_cast<size_t>(n * out), 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) s += x[t * in + i] * w[o * in + i];
      y[t * out + o] = s;
    }
  }
  return y;
}

Mat Rms(const Mat& x, int64_t n, int64_t d, const std::vector<float>& w) {
  Mat y(x.size());
  for (int64_t t = 0; t < n; ++t) {
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += x[t * d + c] * x[t * d + c];
    const double r = 1.0 / std::sqrt(ss / d + 1.1920928955078125e-7);
    for (int64_t c = 0; c < d; ++c) y[t * d + c] = x[t * d + c] * r * w[c];
  }
  return y;
}

// Rotary on column block [h*hd, (h+1)*hd) of row t.
void Rope(Mat& x, int64_t n, int64_t heads, int64_t hd, double base) {
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      double* a = x.data() + (t * heads + h) * hd;
      for (int64_t i = 0; i < hd / 2; ++i) {
        const double ang = t * std::pow(base, -2.0 * i / hd);
        const double x1 = a[i], x2 = a[i + hd / 2];
        a[i] = x1 * std::cos(ang) - x2 * std::sin(ang);
        a[i + hd / 2] = x1 * std::sin(ang) + x2 * std::cos(ang);
      }
    }
  }
}

// Logits [n, vocab]; query p of head g sees key t iff t <= p and allowed(g, p, t).
Mat SlowLogits(const TinyLm& m, const std::vector<uint8_t>& bytes,
               const std::function<bool(int64_t, int64_t, int64_t)>& allowed) {
  const TinyLmConfig& c = m.config;
  const int64_t n = static_cast<int64_t>(bytes.size()), d = c.d_model, hd = c.head_dim;
  const int64_t group = c.n_head / c.n_kv_head;
  Mat x(static_cast<size_t>(n * d));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < d; ++i) x[t * d + i] = m.emb[bytes[t] * d + i];
  }
  for (const TinyLmLayer& l : m.layers) {
    Mat h = Rms(x, n, d, l.n1);
    Mat q = MatMulT(h, n, d, l.wq, c.n_head * hd);
    Mat k = MatMulT(h, n, d, l.wk, c.n_kv_head * hd);
    Mat v = MatMulT(h, n, d, l.wv, c.n_kv_head * hd);
    Rope(q, n, c.n_head, hd, c.rope_base);
    Rope(k, n, c.n_kv_head, hd, c.rope_base);
    Mat att(static_cast<size_t>(n * c.n_head * hd), 0.0);
    for (int64_t g = 0; g < c.n_head; ++g) {
      const int64_t kh = g / group;
      for (int64_t p = 0; p < n; ++p) {
        std::vector<double> w(static_cast<size_t>(p + 1), -INFINITY);
        double mx = -INFINITY;
        for (int64_t t = 0; t <= p; ++t) {
          if (!allowed(g, p, t)) continue;
          double s = 0;
          for (int64_t i = 0; i < hd; ++i) {
            s += q[(p * c.n_head + g) * hd + i] * k[(t * c.n_kv_head + kh) * hd + i];
          }
          w[t] = s / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, w[t]);
        }
        double z = 0;
        for (int64_t t = 0; t <= p; ++t) z += std::isinf(w[t]) ? 0.0 : std::exp(w[t] - mx);
        for (int64_t t = 0; t <= p; ++t) {
          if (std::isinf(w[t])) continue;
          const double a = std::exp(w[t] - mx) / z;
          for (int64_t i = 0; i < hd; ++i) {
            att[(p * c.n_head + g) * hd + i] += a * v[(t * c.n_kv_head + kh) * hd + i];
          }
        }
      }
    }
    Mat o = MatMulT(att, n, c.n_head * hd, l.wo, d);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = Rms(x, n, d, l.n2);
    Mat a = MatMulT(h, n, d, l.w1, c.d_ff);
    Mat b = MatMulT(h, n, d, l.w3, c.d_ff);
    for (size_t i = 0; i < a.size(); ++i) a[i] = a[i] / (1.0 + std::exp(-a[i])) * b[i];
    Mat y = MatMulT(a, n, c.d_ff, l.w2, d);
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
  }
  return MatMulT(Rms(x, n, d, m.nf), n, d, m.head, c.vocab);
}

Tensor RandomF16(std::mt19937_64& rng, std::vector<int64_t> shape, double sigma) {
  Tensor t = Tensor::Zeros(DType::kF32, shape);
  std::normal_distribution<float> dist(0.0f, static_cast<float>(sigma));
  float* p = static_cast<float*>(t.data());
  for (int64_t i = 0; i < t.NumElements(); ++i) p[i] = dist(rng);
  return t.ConvertTo(DType::kF16);
}

// A small random model in tinylm's file format (float16, config in the metadata).
std::string WriteRandomModel(std::mt19937_64& rng) {
  const int64_t d = 40, hd = 64, hq = 4, hkv = 2, ff = 56, layers = 2;
  SafetensorsFile f;
  f.metadata["config"] =
      "{\"vocab\": 256, \"n_layer\": 2, \"d_model\": 40, \"n_head\": 4, \"n_kv_head\": 2, "
      "\"head_dim\": 64, \"d_ff\": 56, \"ctx\": 8192, \"rope_base\": 10000.0}";
  f.tensors["emb.weight"] = RandomF16(rng, {256, d}, 1.0);
  f.tensors["head.weight"] = RandomF16(rng, {256, d}, 0.3);
  f.tensors["nf.weight"] = RandomF16(rng, {d}, 1.0);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    f.tensors[p + "n1.weight"] = RandomF16(rng, {d}, 1.0);
    f.tensors[p + "n2.weight"] = RandomF16(rng, {d}, 1.0);
    // Large q/k weights make attention peaked, so a wrong mask or rotary shows.
    f.tensors[p + "wq.weight"] = RandomF16(rng, {hq * hd, d}, 0.6);
    f.tensors[p + "wk.weight"] = RandomF16(rng, {hkv * hd, d}, 0.6);
    f.tensors[p + "wv.weight"] = RandomF16(rng, {hkv * hd, d}, 0.3);
    f.tensors[p + "wo.weight"] = RandomF16(rng, {d, hq * hd}, 0.1);
    f.tensors[p + "w1.weight"] = RandomF16(rng, {ff, d}, 0.3);
    f.tensors[p + "w3.weight"] = RandomF16(rng, {ff, d}, 0.3);
    f.tensors[p + "w2.weight"] = RandomF16(rng, {d, ff}, 0.2);
  }
  const std::string path = testing::TempDir() + "/random_tinylm.safetensors";
  EXPECT_TRUE(WriteSafetensors(path, f).ok());
  return path;
}

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, int64_t n) {
  std::vector<uint8_t> b(static_cast<size_t>(n));
  for (auto& x : b) x = static_cast<uint8_t>(rng() % 256);
  return b;
}

// Max |fast - slow| over max |slow|.
double RelativeMaxError(const std::vector<float>& fast, const Mat& slow) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < slow.size(); ++i) {
    err = std::max(err, std::abs(fast[i] - slow[i]));
    scale = std::max(scale, std::abs(slow[i]));
  }
  return err / scale;
}

std::vector<float> FastLogits(const TinyLm& m, const std::vector<uint8_t>& bytes,
                              const LmPolicy& policy) {
  absl::StatusOr<std::vector<float>> logits = TinyLmForward(
      m, bytes,
      [&](int64_t, const Tensor& q, const Tensor& k, const Tensor& v) {
        return LmAttention(policy, q, k, v, 2);
      },
      2);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return logits.ok() ? *logits : std::vector<float>();
}

TEST(TinyLmTest, RandomModelDenseMatchesSlowPath) {
  std::mt19937_64 rng(std::random_device{}());
  absl::StatusOr<TinyLm> m = LoadTinyLm(WriteRandomModel(rng));
  ASSERT_TRUE(m.ok()) << m.status();
  for (int64_t n : {1, 37, 130}) {
    const std::vector<uint8_t> bytes = RandomBytes(rng, n);
    absl::StatusOr<LmPolicy> dense = ParseLmPolicy("dense", DhsaConfig(), 2048);
    ASSERT_TRUE(dense.ok());
    const Mat slow = SlowLogits(*m, bytes, [](int64_t, int64_t, int64_t) { return true; });
    EXPECT_LT(RelativeMaxError(FastLogits(*m, bytes, *dense), slow), 1e-4) << "n = " << n;
  }
}

TEST(TinyLmTest, LocalPolicyMatchesMaskedSlowPath) {
  std::mt19937_64 rng(std::random_device{}());
  absl::StatusOr<TinyLm> m = LoadTinyLm(WriteRandomModel(rng));
  ASSERT_TRUE(m.ok()) << m.status();
  DhsaConfig c;
  c.q_block = 16;
  c.sink = 4;
  c.local = 16;
  const int64_t budget = 24, n = 101;
  absl::StatusOr<LmPolicy> local = ParseLmPolicy("local", c, budget);
  ASSERT_TRUE(local.ok()) << local.status();
  const std::vector<uint8_t> bytes = RandomBytes(rng, n);
  const Mat slow = SlowLogits(*m, bytes, [&](int64_t, int64_t p, int64_t t) {
    const int64_t e = std::min(n, (p / c.q_block + 1) * c.q_block);
    return t >= e - budget;
  });
  const Mat dense = SlowLogits(*m, bytes, [](int64_t, int64_t, int64_t) { return true; });
  const std::vector<float> fast = FastLogits(*m, bytes, *local);
  EXPECT_LT(RelativeMaxError(fast, slow), 1e-4);
  EXPECT_GT(RelativeMaxError(fast, dense), 1e-3);  // The mask matters on this input.
}

TEST(TinyLmTest, ChunkAttentionMassMatchesSoftmaxSums) {
  std::mt19937_64 rng(std::random_device{}());
  const int64_t hq = 4, hkv = 2, n = 75, dim = 64, q_block = 16;
  std::normal_distribution<float> dist(0.0f, 0.5f);
  std::vector<float> qv(hq * n * dim), kv(hkv * n * dim);
  for (float& x : qv) x = dist(rng);
  for (float& x : kv) x = dist(rng);
  const Tensor q = Tensor::FromFloats({hq, n, dim}, qv), k = Tensor::FromFloats({hkv, n, dim}, kv);
  const std::vector<int64_t> b = {0, 5, 9, 20, 33, 34, 50, 75};
  const float scale = 0.125f;
  const auto mass = ChunkAttentionMass(q, k, b, q_block, scale, 2);
  const int64_t blocks = (n + q_block - 1) / q_block;
  ASSERT_EQ(mass.size(), static_cast<size_t>(hkv * blocks));
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t eligible = EligibleChunks(b, i * q_block);
      std::vector<double> want(eligible, 0.0);
      for (int64_t g = h * 2; g < h * 2 + 2; ++g) {
        for (int64_t p = i * q_block; p < std::min(n, (i + 1) * q_block); ++p) {
          std::vector<double> s(p + 1);
          double z = 0;
          for (int64_t t = 0; t <= p; ++t) {
            double dot = 0;
            for (int64_t c = 0; c < dim; ++c)
              dot += qv[(g * n + p) * dim + c] * kv[(h * n + t) * dim + c];
            s[t] = std::exp(scale * dot);
            z += s[t];
          }
          for (int64_t j = 0; j < eligible; ++j) {
            for (int64_t t = b[j]; t < b[j + 1]; ++t) want[j] += s[t] / z;
          }
        }
      }
      const std::vector<float>& got = mass[h * blocks + i];
      ASSERT_EQ(got.size(), want.size());
      for (int64_t j = 0; j < eligible; ++j) EXPECT_NEAR(got[j], want[j], 1e-5) << h << " " << i;
    }
  }
}

TEST(TinyLmTest, TrainedModelMatchesSlowPath) {
  absl::StatusOr<TinyLm> m = LoadTinyLm(DHSA_TINYLM_PATH);
  if (!m.ok() && absl::IsNotFound(m.status())) GTEST_SKIP() << "no tinylm at " DHSA_TINYLM_PATH;
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->config.n_layer, 4);
  EXPECT_EQ(m->config.n_head, 6);
  EXPECT_EQ(m->config.n_kv_head, 2);
  const std::string text =
      "import os\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n    return path\n";
  const std::vector<uint8_t> bytes(text.begin(), text.end());
  absl::StatusOr<LmPolicy> dense = ParseLmPolicy("dense", DhsaConfig(), 2048);
  ASSERT_TRUE(dense.ok());
  const Mat slow = SlowLogits(*m, bytes, [](int64_t, int64_t, int64_t) { return true; });
  const std::vector<float> fast = FastLogits(*m, bytes, *dense);
  EXPECT_LT(RelativeMaxError(fast, slow), 1e-4);
  // A trained model predicts Python well: far below 8 bits per byte.
  EXPECT_LT(BitsPerByte(fast, 256, bytes, 1), 3.0);
}

TEST(TinyLmTest, BadModelFilesAreInvalidArgument) {
  std::mt19937_64 rng(std::random_device{}());
  SafetensorsFile f;
  f.tensors["emb.weight"] = RandomF16(rng, {256, 8}, 1.0);
  const std::string path = testing::TempDir() + "/no_config.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, f).ok());
  EXPECT_EQ(LoadTinyLm(path).status().code(), absl::StatusCode::kInvalidArgument);
  f.metadata["config"] =
      "{\"vocab\": 256, \"n_layer\": 1, \"d_model\": 8, \"n_head\": 2, \"n_kv_head\": 1, "
      "\"head_dim\": 64, \"d_ff\": 8}";
  ASSERT_TRUE(WriteSafetensors(path, f).ok());
  absl::Status s = LoadTinyLm(path).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("head.weight"), std::string::npos) << s;
}

TEST(TinyLmTest, EvenWindowOffsets) {
  EXPECT_EQ(*EvenWindowOffsets(100, 10, 1), std::vector<int64_t>({0}));
  EXPECT_EQ(*EvenWindowOffsets(100, 10, 4), std::vector<int64_t>({0, 30, 60, 90}));
  EXPECT_FALSE(EvenWindowOffsets(5, 10, 2).ok());
}

}  // namespace
}  // namespace dhsa
