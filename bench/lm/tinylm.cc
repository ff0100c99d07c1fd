#include "bench/lm/tinylm.h"

#include <chrono>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/parallel.h"
#include "kernels/io/safetensors.h"
#include "nlohmann/json.hpp"

namespace dhsa {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

absl::StatusOr<std::vector<float>> Weight(const SafetensorsFile& f, const std::string& name,
                                          const std::vector<int64_t>& shape) {
  auto it = f.tensors.find(name);
  if (it == f.tensors.end()) {
    return absl::InvalidArgumentError(absl::StrCat("the model has no tensor '", name, "'"));
  }
  if (it->second.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has shape ",
                                                   ShapeString(it->second.shape), "; expected ",
                                                   ShapeString(shape)));
  }
  return it->second.ToFloats();
}

absl::StatusOr<TinyLmConfig> ParseConfig(const SafetensorsFile& f, const std::string& path) {
  auto it = f.metadata.find("config");
  if (it == f.metadata.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": no \"config\" in the safetensors metadata (a tinylm file has one)"));
  }
  const nlohmann::json j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  TinyLmConfig c;
  const char* ints[] = {"vocab", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_ff"};
  int64_t* fields[] = {&c.vocab,     &c.n_layer,  &c.d_model, &c.n_head,
                       &c.n_kv_head, &c.head_dim, &c.d_ff};
  if (!j.is_object()) return absl::InvalidArgumentError(path + ": metadata config is not JSON");
  for (size_t i = 0; i < 7; ++i) {
    if (!j.contains(ints[i]) || !j[ints[i]].is_number_integer() || j[ints[i]].get<int64_t>() <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": metadata config needs a positive integer \"", ints[i], "\""));
    }
    *fields[i] = j[ints[i]].get<int64_t>();
  }
  if (j.contains("rope_base") && j["rope_base"].is_number()) c.rope_base = j["rope_base"];
  if (c.n_head % c.n_kv_head != 0 || c.head_dim % 2 != 0 || c.vocab != 256) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": config needs n_head divisible by n_kv_head, an even head_dim and vocab 256"));
  }
  return c;
}

// y[rows, out] = x[rows, in] W^T with W [out, in], tiles of rows over threads.
absl::Status Linear(const float* x, int64_t rows, int64_t in, const std::vector<float>& w,
                    int64_t out, float* y, int threads) {
  constexpr int64_t kTile = 128;
  const int64_t tiles = (rows + kTile - 1) / kTile;
  std::vector<absl::Status> status(static_cast<size_t>(tiles));
  cpu::ParallelFor(tiles, threads, [&](int64_t t, int) {
    const int64_t r = t * kTile, m = std::min(kTile, rows - r);
    status[static_cast<size_t>(t)] =
        cpu::GemmF32(true, m, out, in, 1.0f, x + r * in, in, w.data(), in, 0.0f, y + r * out, out);
  });
  for (const absl::Status& s : status) DHSA_RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, eps = float32 machine epsilon.
void RmsNorm(const std::vector<float>& x, int64_t rows, int64_t d, const std::vector<float>& w,
             std::vector<float>& y) {
  y.resize(x.size());
  const double eps = std::numeric_limits<float>::epsilon();
  for (int64_t t = 0; t < rows; ++t) {
    const float* a = x.data() + t * d;
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += static_cast<double>(a[c]) * a[c];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    float* b = y.data() + t * d;
    for (int64_t c = 0; c < d; ++c) b[c] = a[c] * inv * w[static_cast<size_t>(c)];
  }
}

// Rotary ("halves" layout) on every head of x [rows, heads * hd], written as [heads, rows, hd].
Tensor RopeToHeads(const std::vector<float>& x, int64_t rows, int64_t heads, int64_t hd,
                   const std::vector<float>& cos_table, const std::vector<float>& sin_table) {
  Tensor t = Tensor::Zeros(DType::kF32, {heads, rows, hd});
  float* out = static_cast<float*>(t.data());
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t p = 0; p < rows; ++p) {
      const float* a = x.data() + (p * heads + h) * hd;
      float* b = out + (h * rows + p) * hd;
      const float* cs = cos_table.data() + p * half;
      const float* sn = sin_table.data() + p * half;
      for (int64_t i = 0; i < half; ++i) {
        b[i] = a[i] * cs[i] - a[i + half] * sn[i];
        b[i + half] = a[i] * sn[i] + a[i + half] * cs[i];
      }
    }
  }
  return t;
}

}  // namespace

absl::StatusOr<TinyLm> LoadTinyLm(const std::string& path) {
  DHSA_ASSIGN_OR_RETURN(SafetensorsFile f, ReadSafetensors(path));
  TinyLm m;
  DHSA_ASSIGN_OR_RETURN(m.config, ParseConfig(f, path));
  const TinyLmConfig& c = m.config;
  const int64_t d = c.d_model, qd = c.n_head * c.head_dim, kd = c.n_kv_head * c.head_dim;
  DHSA_ASSIGN_OR_RETURN(m.emb, Weight(f, "emb.weight", {c.vocab, d}));
  DHSA_ASSIGN_OR_RETURN(m.head, Weight(f, "head.weight", {c.vocab, d}));
  DHSA_ASSIGN_OR_RETURN(m.nf, Weight(f, "nf.weight", {d}));
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = absl::StrCat("blocks.", i, ".");
    TinyLmLayer l;
    DHSA_ASSIGN_OR_RETURN(l.n1, Weight(f, p + "n1.weight", {d}));
    DHSA_ASSIGN_OR_RETURN(l.n2, Weight(f, p + "n2.weight", {d}));
    DHSA_ASSIGN_OR_RETURN(l.wq, Weight(f, p + "wq.weight", {qd, d}));
    DHSA_ASSIGN_OR_RETURN(l.wk, Weight(f, p + "wk.weight", {kd, d}));
    DHSA_ASSIGN_OR_RETURN(l.wv, Weight(f, p + "wv.weight", {kd, d}));
    DHSA_ASSIGN_OR_RETURN(l.wo, Weight(f, p + "wo.weight", {d, qd}));
    DHSA_ASSIGN_OR_RETURN(l.w1, Weight(f, p + "w1.weight", {c.d_ff, d}));
    DHSA_ASSIGN_OR_RETURN(l.w3, Weight(f, p + "w3.weight", {c.d_ff, d}));
    DHSA_ASSIGN_OR_RETURN(l.w2, Weight(f, p + "w2.weight", {d, c.d_ff}));
    m.layers.push_back(std::move(l));
  }
  return m;
}

absl::StatusOr<std::vector<float>> TinyLmForward(const TinyLm& model,
                                                 const std::vector<uint8_t>& bytes,
                                                 const LayerAttention& attention, int num_threads,
                                                 const LayerTap& tap, ForwardTimes* times) {
  const TinyLmConfig& c = model.config;
  const int64_t n = static_cast<int64_t>(bytes.size()), d = c.d_model, hd = c.head_dim;
  const int64_t qd = c.n_head * hd, kd = c.n_kv_head * hd, half = hd / 2;
  if (n == 0) return absl::InvalidArgumentError("the text is empty");
  ForwardTimes local_times;
  ForwardTimes& t = times != nullptr ? *times : local_times;
  const Clock::time_point start = Clock::now();
  double attention_seconds = 0;

  std::vector<float> cos_table(static_cast<size_t>(n * half)), sin_table(cos_table.size());
  for (int64_t p = 0; p < n; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle =
          static_cast<double>(p) *
          std::pow(c.rope_base, -static_cast<double>(i) / static_cast<double>(half));
      cos_table[static_cast<size_t>(p * half + i)] = static_cast<float>(std::cos(angle));
      sin_table[static_cast<size_t>(p * half + i)] = static_cast<float>(std::sin(angle));
    }
  }
  std::vector<float> x(static_cast<size_t>(n * d));
  for (int64_t p = 0; p < n; ++p) {
    std::copy_n(model.emb.data() + bytes[static_cast<size_t>(p)] * d, d, x.data() + p * d);
  }
  std::vector<float> h, q(static_cast<size_t>(n * qd)), k(static_cast<size_t>(n * kd)),
      v(static_cast<size_t>(n * kd)), o(static_cast<size_t>(n * qd)), y(x.size()),
      a(static_cast<size_t>(n * c.d_ff)), b(a.size());
  for (int64_t layer = 0; layer < c.n_layer; ++layer) {
    const TinyLmLayer& w = model.layers[static_cast<size_t>(layer)];
    RmsNorm(x, n, d, w.n1, h);
    DHSA_RETURN_IF_ERROR(Linear(h.data(), n, d, w.wq, qd, q.data(), num_threads));
    DHSA_RETURN_IF_ERROR(Linear(h.data(), n, d, w.wk, kd, k.data(), num_threads));
    DHSA_RETURN_IF_ERROR(Linear(h.data(), n, d, w.wv, kd, v.data(), num_threads));
    const Tensor qh = RopeToHeads(q, n, c.n_head, hd, cos_table, sin_table);
    const Tensor kh = RopeToHeads(k, n, c.n_kv_head, hd, cos_table, sin_table);
    Tensor vh = Tensor::Zeros(DType::kF32, {c.n_kv_head, n, hd});
    for (int64_t g = 0; g < c.n_kv_head; ++g) {
      for (int64_t p = 0; p < n; ++p) {
        std::copy_n(v.data() + (p * c.n_kv_head + g) * hd, hd,
                    static_cast<float*>(vh.data()) + (g * n + p) * hd);
      }
    }
    if (tap) DHSA_RETURN_IF_ERROR(tap(layer, qh, kh, vh));
    const Clock::time_point attention_start = Clock::now();
    DHSA_ASSIGN_OR_RETURN(Tensor oh, attention(layer, qh, kh, vh));
    attention_seconds += SecondsSince(attention_start);
    if (oh.dtype != DType::kF32 || oh.shape != std::vector<int64_t>{c.n_head, n, hd}) {
      return absl::InternalError(absl::StrCat("attention of layer ", layer, " returned ",
                                              ShapeString(oh.shape), "; expected ",
                                              ShapeString({c.n_head, n, hd}), " float32"));
    }
    const float* op = static_cast<const float*>(oh.data());
    for (int64_t g = 0; g < c.n_head; ++g) {
      for (int64_t p = 0; p < n; ++p) {
        std::copy_n(op + (g * n + p) * hd, hd, o.data() + (p * c.n_head + g) * hd);
      }
    }
    DHSA_RETURN_IF_ERROR(Linear(o.data(), n, qd, w.wo, d, y.data(), num_threads));
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
    RmsNorm(x, n, d, w.n2, h);
    DHSA_RETURN_IF_ERROR(Linear(h.data(), n, d, w.w1, c.d_ff, a.data(), num_threads));
    DHSA_RETURN_IF_ERROR(Linear(h.data(), n, d, w.w3, c.d_ff, b.data(), num_threads));
    for (size_t i = 0; i < a.size(); ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
    DHSA_RETURN_IF_ERROR(Linear(a.data(), n, c.d_ff, w.w2, d, y.data(), num_threads));
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
  }
  RmsNorm(x, n, d, model.nf, h);
  std::vector<float> logits(static_cast<size_t>(n * c.vocab));
  DHSA_RETURN_IF_ERROR(Linear(h.data(), n, d, model.head, c.vocab, logits.data(), num_threads));
  t.attention += attention_seconds;
  t.other += SecondsSince(start) - attention_seconds;
  return logits;
}

double BitsPerByte(const std::vector<float>& logits, int64_t vocab,
                   const std::vector<uint8_t>& bytes, int64_t first) {
  const int64_t n = static_cast<int64_t>(bytes.size());
  double bits = 0;
  int64_t count = 0;
  for (int64_t p = std::max<int64_t>(1, first); p < n; ++p) {
    const float* row = logits.data() + (p - 1) * vocab;
    double m = row[0];
    for (int64_t c = 1; c < vocab; ++c) m = std::max(m, static_cast<double>(row[c]));
    double sum = 0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(static_cast<double>(row[c]) - m);
    const double log_p =
        static_cast<double>(row[bytes[static_cast<size_t>(p)]]) - m - std::log(sum);
    bits -= log_p / std::log(2.0);
    ++count;
  }
  return count > 0 ? bits / static_cast<double>(count) : 0.0;
}

}  // namespace dhsa
