#include "bench/workload/workload.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "kernels/io/file.h"
#include "kernels/io/npy.h"
#include "nlohmann/json.hpp"

namespace dhsa {
namespace {

// Needle queries keep this fraction of their usual (topic + locality) mix.
constexpr double kNeedleQueryKeepsMix = 0.5;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// One random stream: mt19937_64 plus our own integer and normal samplers, so values do not depend
// on the standard library's distribution implementations.
class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream) : engine_(SplitMix64(seed ^ SplitMix64(stream))) {}

  // Uniform integer in [0, n), n >= 1 (rejection, no modulo bias).
  uint64_t Below(uint64_t n) {
    const uint64_t limit = ~uint64_t{0} - (~uint64_t{0} % n);
    for (;;) {
      const uint64_t x = engine_();
      if (x < limit) return x % n;
    }
  }

  // Standard normal (Marsaglia polar method on the two 32-bit halves of one draw; the second value
  // of each pair is kept for the next call).
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    for (;;) {
      const uint64_t x = engine_();
      const double u = (static_cast<double>(x >> 32) + 0.5) * 0x1.0p-31 - 1.0;
      const double v = (static_cast<double>(x & 0xffffffffu) + 0.5) * 0x1.0p-31 - 1.0;
      const double s = u * u + v * v;
      if (s >= 1.0) continue;
      const double f = std::sqrt(-2.0 * std::log(s) / s);
      spare_ = v * f;
      has_spare_ = true;
      return u * f;
    }
  }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

// Independent streams, so that changing one part of the generator leaves the others' draws alone.
enum Stream : uint64_t {
  kSegmentsStream = 1,
  kRetrieveStream,
  kNeedleStream,
  kDirectionStream,
  kKeyStream,
  kValueStream,
  kMixStream,
  kQueryStream,
};

// A random unit vector of `dim` elements into `out`: Gaussian elements times `envelope`, with the
// component along `avoid` (a unit vector, or null) removed, normalised.
void RandomUnit(Rng& rng, const std::vector<double>& envelope, const float* avoid, float* out) {
  const size_t dim = envelope.size();
  std::vector<double> tmp(dim);
  double norm2 = 0.0;
  do {
    for (size_t c = 0; c < dim; ++c) tmp[c] = envelope[c] * rng.Normal();
    if (avoid != nullptr) {
      double dot = 0.0;
      for (size_t c = 0; c < dim; ++c) dot += tmp[c] * avoid[c];
      for (size_t c = 0; c < dim; ++c) tmp[c] -= dot * avoid[c];
    }
    norm2 = 0.0;
    for (size_t c = 0; c < dim; ++c) norm2 += tmp[c] * tmp[c];
  } while (!(norm2 > 1e-12));
  const double inv = 1.0 / std::sqrt(norm2);
  for (size_t c = 0; c < dim; ++c) out[c] = static_cast<float>(tmp[c] * inv);
}

// Rotates the first `rope_dims` elements of `row` (halves layout) for `position`.
void ApplyRope(const std::vector<double>& theta, int64_t position, float* row) {
  const size_t half = theta.size();
  for (size_t i = 0; i < half; ++i) {
    const double angle = static_cast<double>(position) * theta[i];
    const double c = std::cos(angle);
    const double s = std::sin(angle);
    const double x = row[i];
    const double y = row[i + half];
    row[i] = static_cast<float>(x * c - y * s);
    row[i + half] = static_cast<float>(x * s + y * c);
  }
}

// Stores row (h, t) of a [heads, len, dim] tensor.
void StoreRow(Tensor& t, int64_t h, int64_t pos, const float* row) {
  const int64_t len = t.shape[1];
  const int64_t dim = t.shape[2];
  const size_t base = static_cast<size_t>((h * len + pos) * dim);
  if (t.dtype == DType::kF32) {
    std::memcpy(t.bytes.data() + 4 * base, row, 4 * static_cast<size_t>(dim));
    return;
  }
  for (int64_t c = 0; c < dim; ++c) StoreFromFloat(t.data(), t.dtype, base + c, row[c]);
}

bool FiniteNonNegative(double x) { return std::isfinite(x) && x >= 0.0; }

}  // namespace

absl::Status ValidateWorkloadConfig(const WorkloadConfig& c) {
  auto bad = [](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("workload config: ", parts...));
  };
  if (c.len < 1) return bad("len must be >= 1; got ", c.len);
  if (c.hq < 1 || c.hkv < 1) return bad("hq and hkv must be >= 1; got hq=", c.hq, " hkv=", c.hkv);
  if (c.hq % c.hkv != 0) {
    return bad("hq must be a multiple of hkv (GQA); got hq=", c.hq, " hkv=", c.hkv);
  }
  if (c.dim < 2) return bad("dim must be >= 2; got ", c.dim);
  if (c.rope_dims < 0 || c.rope_dims > c.dim || c.rope_dims % 2 != 0) {
    return bad("rope_dims must be even and in [0, dim=", c.dim, "]; got ", c.rope_dims);
  }
  if (!(std::isfinite(c.rope_base) && c.rope_base > 1.0)) {
    return bad("rope_base must be finite and > 1; got ", c.rope_base);
  }
  // Element counts must fit comfortably in memory arithmetic.
  constexpr int64_t kMaxElements = int64_t{1} << 40;
  if (c.len > kMaxElements / c.dim || c.hq > kMaxElements / (c.len * c.dim)) {
    return bad("hq*len*dim is too large: hq=", c.hq, " len=", c.len, " dim=", c.dim);
  }
  if (!(std::isfinite(c.segment_mean) && c.segment_mean >= 1.0)) {
    return bad("segment_mean must be finite and >= 1 token; got ", c.segment_mean);
  }
  if (!(FiniteNonNegative(c.segment_sigma) && c.segment_sigma <= 4.0)) {
    return bad("segment_sigma must be in [0, 4]; got ", c.segment_sigma);
  }
  if (!(std::isfinite(c.topic_strength) && c.topic_strength > 0.0)) {
    return bad("topic_strength must be finite and > 0; got ", c.topic_strength);
  }
  if (c.retrieve < 0) return bad("retrieve must be >= 0; got ", c.retrieve);
  if (!(c.query_locality >= 0.0 && c.query_locality <= 1.0)) {
    return bad("query_locality must be in [0, 1]; got ", c.query_locality);
  }
  const std::pair<const char*, double> non_negative[] = {
      {"noise", c.noise},
      {"query_focus", c.query_focus},
      {"head_spread", c.head_spread},
      {"query_noise", c.query_noise},
      {"sink_strength", c.sink_strength},
      {"needle_strength", c.needle_strength},
      {"value_topic", c.value_topic},
  };
  for (const auto& [name, value] : non_negative) {
    if (!FiniteNonNegative(value)) return bad(name, " must be finite and >= 0; got ", value);
  }
  if (c.needles < 0) return bad("needles must be >= 0; got ", c.needles);
  // Needle runs are placed at random without overlap; ask for room to spare.
  const int64_t needle_room = 1 + 4 * (kNeedleKeys + kNeedleQueries) * int64_t{c.needles};
  if (c.needles > 0 && c.len < needle_room) {
    return bad("len=", c.len, " is too short for ", c.needles,
               " needles (needs len >= ", needle_room, ")");
  }
  return absl::OkStatus();
}

absl::StatusOr<Workload> GenerateWorkload(const WorkloadConfig& config) {
  DHSA_RETURN_IF_ERROR(ValidateWorkloadConfig(config));
  const WorkloadConfig& c = config;
  const int64_t len = c.len, dim = c.dim, hq = c.hq, hkv = c.hkv, group = hq / hkv;
  const double sqrt_dim = std::sqrt(static_cast<double>(dim));

  Workload w;
  w.config = config;

  // Segments: log-normal lengths with the configured mean.
  {
    Rng rng(c.seed, kSegmentsStream);
    const double sigma = c.segment_sigma;
    const double mu = std::log(c.segment_mean) - 0.5 * sigma * sigma;
    int64_t pos = 0;
    while (pos < len) {
      const double draw = std::exp(mu + sigma * rng.Normal());
      const double capped = std::min(draw, static_cast<double>(len - pos));
      const int64_t n = std::max<int64_t>(1, std::llround(capped));
      w.segments.push_back({pos, std::min(len, pos + n)});
      pos = w.segments.back().end;
    }
  }
  const int64_t num_segments = static_cast<int64_t>(w.segments.size());

  // Retrieved earlier segments.
  {
    Rng rng(c.seed, kRetrieveStream);
    w.retrieved.resize(num_segments);
    for (int64_t s = 0; s < num_segments; ++s) {
      std::vector<int>& r = w.retrieved[s];
      const int64_t n = std::min<int64_t>(c.retrieve, s);
      if (n == s) {
        for (int64_t j = 0; j < s; ++j) r.push_back(static_cast<int>(j));
      } else {
        while (static_cast<int64_t>(r.size()) < n) {
          const int j = static_cast<int>(rng.Below(static_cast<uint64_t>(s)));
          if (std::find(r.begin(), r.end(), j) == r.end()) r.push_back(j);
        }
        std::sort(r.begin(), r.end());
      }
    }
  }

  // Needles: non-overlapping runs, key run first, never on the sink key.
  std::vector<int32_t> key_needle(static_cast<size_t>(len), -1);
  std::vector<int32_t> query_needle(static_cast<size_t>(len), -1);
  {
    Rng rng(c.seed, kNeedleStream);
    std::vector<uint8_t> used(static_cast<size_t>(len), 0);
    used[0] = 1;
    auto free_run = [&](int64_t b, int64_t n) {
      for (int64_t t = b; t < b + n; ++t) {
        if (used[t]) return false;
      }
      return true;
    };
    for (int n = 0; n < c.needles; ++n) {
      bool placed = false;
      for (int attempt = 0; attempt < 100000 && !placed; ++attempt) {
        // Key run in [1, len - 12]; query run anywhere after it.
        const int64_t kb = 1 + static_cast<int64_t>(rng.Below(
                                   static_cast<uint64_t>(len - kNeedleKeys - kNeedleQueries)));
        const int64_t ke = kb + kNeedleKeys;
        const int64_t qb =
            ke +
            static_cast<int64_t>(rng.Below(static_cast<uint64_t>(len - kNeedleQueries - ke + 1)));
        if (!free_run(kb, kNeedleKeys) || !free_run(qb, kNeedleQueries)) continue;
        std::fill(used.begin() + kb, used.begin() + ke, 1);
        std::fill(used.begin() + qb, used.begin() + qb + kNeedleQueries, 1);
        w.needles.push_back({kb, ke, qb, qb + kNeedleQueries});
        placed = true;
      }
      if (!placed) {
        return absl::InvalidArgumentError(absl::StrCat(
            "workload config: could not place ", c.needles, " non-overlapping needles in len=", len,
            "; use fewer needles or a longer sequence"));
      }
    }
    std::sort(w.needles.begin(), w.needles.end(),
              [](const Needle& a, const Needle& b) { return a.key_begin < b.key_begin; });
    for (size_t n = 0; n < w.needles.size(); ++n) {
      const Needle& nd = w.needles[n];
      for (int64_t t = nd.key_begin; t < nd.key_end; ++t) key_needle[t] = static_cast<int32_t>(n);
      for (int64_t t = nd.query_begin; t < nd.query_end; ++t) {
        query_needle[t] = static_cast<int32_t>(n);
      }
    }
  }

  // Directions per KV head: one per segment, the sink, one per needle.
  const size_t udim = static_cast<size_t>(dim);
  std::vector<float> topic(static_cast<size_t>(hkv * num_segments) * udim);
  std::vector<float> sink(static_cast<size_t>(hkv) * udim);
  std::vector<float> needle_dir(static_cast<size_t>(hkv) * w.needles.size() * udim);
  // Content directions (topics, sink, needles) use the non-RoPE dims and only the lowest-frequency
  // quarter of the RoPE pairs (those rotate slowly); the other RoPE dims carry noise only. Trained
  // models likewise keep semantic q/k energy in low-frequency dims; with content spread over all
  // RoPE pairs, RoPE would scramble a large, random part of every long-range logit.
  std::vector<double> envelope(udim, 1.0);
  {
    const int64_t half = c.rope_dims / 2;
    for (int64_t i = 0; i < (3 * half) / 4; ++i) envelope[i] = envelope[i + half] = 0.0;
  }
  {
    Rng rng(c.seed, kDirectionStream);
    for (int64_t h = 0; h < hkv; ++h) {
      RandomUnit(rng, envelope, nullptr, &sink[h * udim]);
      for (int64_t s = 0; s < num_segments; ++s) {
        RandomUnit(rng, envelope, &sink[h * udim], &topic[(h * num_segments + s) * udim]);
      }
      for (size_t n = 0; n < w.needles.size(); ++n) {
        RandomUnit(rng, envelope, &sink[h * udim], &needle_dir[(h * w.needles.size() + n) * udim]);
      }
    }
  }
  auto topic_of = [&](int64_t h, int64_t s) { return &topic[(h * num_segments + s) * udim]; };
  auto needle_of = [&](int64_t h, int64_t n) {
    return &needle_dir[(h * static_cast<int64_t>(w.needles.size()) + n) * udim];
  };
  // The direction of key t of KV head h (segment s holds t).
  auto key_dir = [&](int64_t h, int64_t t, int64_t s) -> const float* {
    if (t == 0) return &sink[h * udim];
    if (key_needle[t] >= 0) return needle_of(h, key_needle[t]);
    return topic_of(h, s);
  };

  std::vector<double> theta(static_cast<size_t>(c.rope_dims / 2));
  for (size_t i = 0; i < theta.size(); ++i) {
    theta[i] =
        std::pow(c.rope_base, -2.0 * static_cast<double>(i) / static_cast<double>(c.rope_dims));
  }

  std::vector<float> row(udim);

  // Keys and values.
  w.k = Tensor::Zeros(c.dtype, {hkv, len, dim});
  w.v = Tensor::Zeros(c.dtype, {hkv, len, dim});
  {
    Rng krng(c.seed, kKeyStream);
    Rng vrng(c.seed, kValueStream);
    const double kscale = c.topic_strength * sqrt_dim;
    const double vscale = c.value_topic * sqrt_dim;
    for (int64_t h = 0; h < hkv; ++h) {
      for (int64_t s = 0; s < num_segments; ++s) {
        for (int64_t t = w.segments[s].begin; t < w.segments[s].end; ++t) {
          const float* u = key_dir(h, t, s);
          for (int64_t e = 0; e < dim; ++e) {
            row[e] = static_cast<float>(kscale * u[e] + c.noise * krng.Normal());
          }
          ApplyRope(theta, t, row.data());
          StoreRow(w.k, h, t, row.data());
          for (int64_t e = 0; e < dim; ++e) {
            row[e] = static_cast<float>(vscale * u[e] + vrng.Normal());
          }
          StoreRow(w.v, h, t, row.data());
        }
      }
    }
  }

  // Queries: per segment and query head a mix of topic directions, then per-row sink and needle
  // components, noise and RoPE.
  w.q = Tensor::Zeros(c.dtype, {hq, len, dim});
  {
    Rng mrng(c.seed, kMixStream);
    Rng qrng(c.seed, kQueryStream);
    // Multiplying a unit direction by logit/topic_strength gives keys of that direction a scaled
    // (1/sqrt(dim)) logit of `logit`, pre-RoPE.
    const double unit = 1.0 / c.topic_strength;
    std::vector<double> mix(static_cast<size_t>(hq) * udim);  // Per query head, focus included.
    std::vector<double> kv_log;
    std::vector<double> weights;
    for (int64_t s = 0; s < num_segments; ++s) {
      const std::vector<int>& ret = w.retrieved[s];
      const size_t nr = ret.size();
      for (int64_t h = 0; h < hkv; ++h) {
        kv_log.resize(nr);
        for (size_t r = 0; r < nr; ++r) kv_log[r] = c.head_spread * mrng.Normal();
        for (int64_t g = h * group; g < (h + 1) * group; ++g) {
          // Retrieved weights: log-normal per KV head and again per query head, L2-normalised.
          weights.resize(nr);
          double norm2 = 0.0;
          for (size_t r = 0; r < nr; ++r) {
            weights[r] = std::exp(kv_log[r] + 0.5 * c.head_spread * mrng.Normal());
            norm2 += weights[r] * weights[r];
          }
          const double scale = c.query_focus * unit;
          const double own = scale * (nr == 0 ? 1.0 : std::sqrt(c.query_locality));
          const double rest =
              nr == 0 ? 0.0 : scale * std::sqrt(1.0 - c.query_locality) / std::sqrt(norm2);
          double* m = &mix[g * udim];
          const float* u_own = topic_of(h, s);
          for (size_t e = 0; e < udim; ++e) m[e] = own * u_own[e];
          for (size_t r = 0; r < nr; ++r) {
            const float* u = topic_of(h, ret[r]);
            const double a = rest * weights[r];
            for (size_t e = 0; e < udim; ++e) m[e] += a * u[e];
          }
        }
      }
      const double sink_scale = c.sink_strength * unit;
      const double needle_scale = c.needle_strength * unit;
      for (int64_t g = 0; g < hq; ++g) {
        const int64_t h = g / group;
        const double* m = &mix[g * udim];
        const float* u_sink = &sink[h * udim];
        for (int64_t t = w.segments[s].begin; t < w.segments[s].end; ++t) {
          const int32_t n = query_needle[t];
          const double keep = n >= 0 ? kNeedleQueryKeepsMix : 1.0;
          for (size_t e = 0; e < udim; ++e) {
            row[e] = static_cast<float>(keep * m[e] + sink_scale * u_sink[e] +
                                        c.query_noise * qrng.Normal());
          }
          if (n >= 0) {
            const float* u = needle_of(h, n);
            for (size_t e = 0; e < udim; ++e) row[e] += static_cast<float>(needle_scale * u[e]);
          }
          ApplyRope(theta, t, row.data());
          StoreRow(w.q, g, t, row.data());
        }
      }
    }
  }
  return w;
}

std::string WorkloadMetaJson(const Workload& w) {
  const WorkloadConfig& c = w.config;
  nlohmann::json config = {
      {"len", c.len},
      {"hq", c.hq},
      {"hkv", c.hkv},
      {"dim", c.dim},
      {"seed", c.seed},
      {"segment_mean", c.segment_mean},
      {"segment_sigma", c.segment_sigma},
      {"topic_strength", c.topic_strength},
      {"noise", c.noise},
      {"retrieve", c.retrieve},
      {"query_focus", c.query_focus},
      {"query_locality", c.query_locality},
      {"head_spread", c.head_spread},
      {"query_noise", c.query_noise},
      {"sink_strength", c.sink_strength},
      {"rope_dims", c.rope_dims},
      {"rope_base", c.rope_base},
      {"needles", c.needles},
      {"needle_strength", c.needle_strength},
      {"needle_keys", kNeedleKeys},
      {"needle_queries", kNeedleQueries},
      {"value_topic", c.value_topic},
      {"dtype", std::string(DTypeName(c.dtype))},
  };
  nlohmann::json segments = nlohmann::json::array();
  for (const Segment& s : w.segments) segments.push_back({s.begin, s.end});
  nlohmann::json needles = nlohmann::json::array();
  for (const Needle& n : w.needles) {
    needles.push_back({{"key_begin", n.key_begin},
                       {"key_end", n.key_end},
                       {"query_begin", n.query_begin},
                       {"query_end", n.query_end}});
  }
  nlohmann::json retrieved = nlohmann::json::array();
  for (const std::vector<int>& r : w.retrieved) retrieved.push_back(r);
  nlohmann::json meta = {
      {"config", std::move(config)},
      {"shapes", {{"q", w.q.shape}, {"k", w.k.shape}, {"v", w.v.shape}}},
      {"segments", std::move(segments)},
      {"needles", std::move(needles)},
      {"retrieved", std::move(retrieved)},
  };
  return meta.dump() + "\n";
}

absl::Status WriteWorkload(const Workload& w, const std::string& dir) {
  for (const Tensor* t : {&w.q, &w.k, &w.v}) {
    if (t->dtype != DType::kF32 && t->dtype != DType::kF16) {
      return absl::InvalidArgumentError(absl::StrCat(
          "WriteWorkload: .npy has no ", DTypeName(t->dtype), "; generate float32 or float16"));
    }
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("WriteWorkload: cannot create directory ", dir, ": ", ec.message()));
  }
  const std::filesystem::path base(dir);
  DHSA_RETURN_IF_ERROR(WriteNpy((base / "q.npy").string(), w.q));
  DHSA_RETURN_IF_ERROR(WriteNpy((base / "k.npy").string(), w.k));
  DHSA_RETURN_IF_ERROR(WriteNpy((base / "v.npy").string(), w.v));
  return WriteFileAtomically((base / "meta.json").string(), WorkloadMetaJson(w));
}

}  // namespace dhsa
