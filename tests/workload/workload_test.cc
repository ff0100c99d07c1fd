#include "bench/workload/workload.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/io/npy.h"
#include "nlohmann/json.hpp"

namespace dhsa {
namespace {

using ::testing::HasSubstr;

WorkloadConfig Small() {
  WorkloadConfig c;
  c.len = 2048;
  c.hq = 4;
  c.hkv = 2;
  c.dim = 64;
  return c;
}

Workload Generate(const WorkloadConfig& c) {
  absl::StatusOr<Workload> w = GenerateWorkload(c);
  EXPECT_TRUE(w.ok()) << w.status();
  return std::move(w).value();
}

// Dense causal softmax weights of query row (g, p) over keys [0, p], scale 1/sqrt(dim), in double.
std::vector<double> DenseWeights(const Workload& w, int64_t g, int64_t p) {
  const int64_t len = w.config.len, dim = w.config.dim;
  const int64_t h = g / (w.config.hq / w.config.hkv);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> logits(static_cast<size_t>(p + 1));
  for (int64_t t = 0; t <= p; ++t) {
    double dot = 0.0;
    for (int64_t c = 0; c < dim; ++c) {
      dot += static_cast<double>(w.q.Get((g * len + p) * dim + c)) *
             static_cast<double>(w.k.Get((h * len + t) * dim + c));
    }
    logits[t] = scale * dot;
  }
  const double m = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (double& x : logits) {
    x = std::exp(x - m);
    sum += x;
  }
  for (double& x : logits) x /= sum;
  return logits;
}

TEST(WorkloadTest, ShapesAndDefaults) {
  const Workload w = Generate(Small());
  EXPECT_EQ(w.q.shape, (std::vector<int64_t>{4, 2048, 64}));
  EXPECT_EQ(w.k.shape, (std::vector<int64_t>{2, 2048, 64}));
  EXPECT_EQ(w.v.shape, (std::vector<int64_t>{2, 2048, 64}));
  EXPECT_EQ(w.q.dtype, DType::kF32);
  EXPECT_EQ(w.q.bytes.size(), 4u * 4 * 2048 * 64);
  EXPECT_EQ(w.k.bytes.size(), 4u * 2 * 2048 * 64);
  EXPECT_EQ(w.v.bytes.size(), w.k.bytes.size());
  EXPECT_EQ(w.retrieved.size(), w.segments.size());
  EXPECT_EQ(static_cast<int>(w.needles.size()), w.config.needles);
  for (const Tensor* t : {&w.q, &w.k, &w.v}) {
    for (float x : t->ToFloats()) ASSERT_TRUE(std::isfinite(x));
  }
}

TEST(WorkloadTest, Deterministic) {
  const Workload a = Generate(Small());
  const Workload b = Generate(Small());
  EXPECT_EQ(a.q.bytes, b.q.bytes);
  EXPECT_EQ(a.k.bytes, b.k.bytes);
  EXPECT_EQ(a.v.bytes, b.v.bytes);
  EXPECT_EQ(WorkloadMetaJson(a), WorkloadMetaJson(b));

  WorkloadConfig other = Small();
  other.seed = 2;
  const Workload c = Generate(other);
  EXPECT_NE(a.q.bytes, c.q.bytes);
  EXPECT_NE(a.k.bytes, c.k.bytes);
  EXPECT_NE(a.v.bytes, c.v.bytes);
  EXPECT_NE(WorkloadMetaJson(a), WorkloadMetaJson(c));
}

TEST(WorkloadTest, SegmentsCoverInOrder) {
  for (uint64_t seed : {1, 7, 99}) {
    WorkloadConfig c = Small();
    c.seed = seed;
    const Workload w = Generate(c);
    ASSERT_FALSE(w.segments.empty());
    EXPECT_EQ(w.segments.front().begin, 0);
    EXPECT_EQ(w.segments.back().end, c.len);
    for (size_t s = 0; s < w.segments.size(); ++s) {
      EXPECT_LT(w.segments[s].begin, w.segments[s].end);
      if (s > 0) {
        EXPECT_EQ(w.segments[s].begin, w.segments[s - 1].end);
      }
    }
    // Log-normal lengths around the mean: the count is in a plausible range.
    const double mean_len = static_cast<double>(c.len) / static_cast<double>(w.segments.size());
    EXPECT_GT(mean_len, 0.6 * c.segment_mean);
    EXPECT_LT(mean_len, 1.6 * c.segment_mean);
    for (size_t s = 0; s < w.retrieved.size(); ++s) {
      const std::vector<int>& r = w.retrieved[s];
      EXPECT_EQ(r.size(), std::min<size_t>(c.retrieve, s));
      EXPECT_TRUE(std::is_sorted(r.begin(), r.end()));
      EXPECT_EQ(std::adjacent_find(r.begin(), r.end()), r.end());
      for (int j : r) {
        EXPECT_GE(j, 0);
        EXPECT_LT(j, static_cast<int>(s));
      }
    }
  }
}

TEST(WorkloadTest, NeedlesOrderedAndDisjoint) {
  const Workload w = Generate(Small());
  ASSERT_EQ(w.needles.size(), 8u);
  std::vector<int> used(static_cast<size_t>(w.config.len), 0);
  for (size_t n = 0; n < w.needles.size(); ++n) {
    const Needle& nd = w.needles[n];
    EXPECT_GE(nd.key_begin, 1);
    EXPECT_EQ(nd.key_end - nd.key_begin, kNeedleKeys);
    EXPECT_EQ(nd.query_end - nd.query_begin, kNeedleQueries);
    EXPECT_LE(nd.key_end, nd.query_begin);
    EXPECT_LE(nd.query_end, w.config.len);
    if (n > 0) {
      EXPECT_LT(w.needles[n - 1].key_begin, nd.key_begin);
    }
    for (int64_t t = nd.key_begin; t < nd.key_end; ++t) EXPECT_EQ(used[t]++, 0) << t;
    for (int64_t t = nd.query_begin; t < nd.query_end; ++t) EXPECT_EQ(used[t]++, 0) << t;
  }
}

TEST(WorkloadTest, InvalidConfigsRejected) {
  struct Case {
    std::function<void(WorkloadConfig&)> edit;
    const char* message;
  };
  const std::vector<Case> cases = {
      {[](WorkloadConfig& c) { c.len = 0; }, "len"},
      {[](WorkloadConfig& c) {
         c.hq = 6;
         c.hkv = 4;
       },
       "multiple of hkv"},
      {[](WorkloadConfig& c) { c.hkv = 0; }, "hkv"},
      {[](WorkloadConfig& c) { c.dim = 0; }, "dim"},
      {[](WorkloadConfig& c) { c.rope_dims = 31; }, "rope_dims"},
      {[](WorkloadConfig& c) { c.rope_dims = 66; }, "rope_dims"},
      {[](WorkloadConfig& c) { c.segment_mean = 0.5; }, "segment_mean"},
      {[](WorkloadConfig& c) { c.segment_sigma = -1; }, "segment_sigma"},
      {[](WorkloadConfig& c) { c.topic_strength = 0; }, "topic_strength"},
      {[](WorkloadConfig& c) { c.noise = std::nan(""); }, "noise"},
      {[](WorkloadConfig& c) { c.retrieve = -1; }, "retrieve"},
      {[](WorkloadConfig& c) { c.query_locality = 1.5; }, "query_locality"},
      {[](WorkloadConfig& c) { c.sink_strength = -1; }, "sink_strength"},
      {[](WorkloadConfig& c) { c.needles = -1; }, "needles"},
      {[](WorkloadConfig& c) { c.len = 100; }, "too short"},
  };
  for (const Case& k : cases) {
    WorkloadConfig c = Small();
    k.edit(c);
    absl::StatusOr<Workload> w = GenerateWorkload(c);
    ASSERT_FALSE(w.ok()) << k.message;
    EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(w.status().message()), HasSubstr(k.message));
  }
  // Edge cases that are valid.
  WorkloadConfig c = Small();
  c.len = 100;
  c.needles = 0;
  c.rope_dims = 0;
  c.retrieve = 0;
  EXPECT_TRUE(GenerateWorkload(c).ok());
  c.len = 1;
  EXPECT_TRUE(GenerateWorkload(c).ok());
}

TEST(WorkloadTest, Float16MatchesFloat32) {
  WorkloadConfig c = Small();
  const Workload f32 = Generate(c);
  c.dtype = DType::kF16;
  const Workload f16 = Generate(c);
  EXPECT_EQ(f16.q.dtype, DType::kF16);
  EXPECT_EQ(f16.q.bytes.size(), f32.q.bytes.size() / 2);
  EXPECT_EQ(f16.k.bytes, f32.k.ConvertTo(DType::kF16).bytes);
  EXPECT_EQ(f16.v.bytes, f32.v.ConvertTo(DType::kF16).bytes);
  EXPECT_EQ(f16.q.bytes, f32.q.ConvertTo(DType::kF16).bytes);
}

// The point of the generator: attention is concentrated, and needle queries find their needles.
TEST(WorkloadTest, AttentionIsStructured) {
  const Workload w = Generate(Small());
  const int64_t len = w.config.len;
  double top_share = 0.0, sink_share = 0.0;
  int rows = 0;
  for (int64_t g = 0; g < w.config.hq; ++g) {
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t p = len / 4 + i * (len - len / 4) / 16 + 7;
      std::vector<double> a = DenseWeights(w, g, p);
      sink_share += a[0];
      std::sort(a.begin(), a.end(), std::greater<double>());
      const size_t top = (a.size() + 9) / 10;
      top_share += std::accumulate(a.begin(), a.begin() + top, 0.0);
      ++rows;
    }
  }
  top_share /= rows;
  sink_share /= rows;

  double needle_share = 0.0, needle_min = 1.0;
  int needle_rows = 0;
  for (const Needle& nd : w.needles) {
    for (int64_t g = 0; g < w.config.hq; ++g) {
      for (int64_t p = nd.query_begin; p < nd.query_end; ++p) {
        const std::vector<double> a = DenseWeights(w, g, p);
        const double share = std::accumulate(a.begin() + nd.key_begin, a.begin() + nd.key_end, 0.0);
        needle_share += share;
        needle_min = std::min(needle_min, share);
        ++needle_rows;
      }
    }
  }
  needle_share /= needle_rows;
  std::printf("top-10%% keys hold %.3f of the weight; sink %.3f; needle keys %.3f (min %.3f)\n",
              top_share, sink_share, needle_share, needle_min);
  RecordProperty("top10_share", std::to_string(top_share));
  RecordProperty("sink_share", std::to_string(sink_share));
  RecordProperty("needle_share", std::to_string(needle_share));
  EXPECT_GT(top_share, 0.5);
  EXPECT_GT(needle_share, 0.3);
  EXPECT_GT(sink_share, 0.01);  // A moderate sink: noticeable, not dominant.
  EXPECT_LT(sink_share, 0.5);
}

// Query heads of one group look at the same segments with different emphasis.
TEST(WorkloadTest, HeadsOfAGroupDiffer) {
  const Workload w = Generate(Small());
  double tv = 0.0;
  int rows = 0;
  for (int64_t p = 600; p < w.config.len; p += 97) {
    const std::vector<double> a = DenseWeights(w, 0, p);
    const std::vector<double> b = DenseWeights(w, 1, p);  // Same KV head (G = 2).
    double d = 0.0;
    for (size_t t = 0; t < a.size(); ++t) d += std::abs(a[t] - b[t]);
    tv += 0.5 * d;
    ++rows;
  }
  tv /= rows;
  std::printf("mean total-variation distance between heads 0 and 1: %.3f\n", tv);
  EXPECT_GT(tv, 0.1);
  EXPECT_LT(tv, 0.95);
}

TEST(WorkloadTest, WritesFilesAndMeta) {
  const std::string dir =
      (std::filesystem::path(::testing::TempDir()) / "workload_test" / "nested").string();
  std::filesystem::remove_all(dir);
  WorkloadConfig c = Small();
  c.dtype = DType::kF16;
  const Workload w = Generate(c);
  ASSERT_TRUE(WriteWorkload(w, dir).ok());
  for (const char* name : {"q.npy", "k.npy", "v.npy", "meta.json"}) {
    EXPECT_TRUE(std::filesystem::is_regular_file(std::filesystem::path(dir) / name)) << name;
  }
  absl::StatusOr<Tensor> k = ReadNpy((std::filesystem::path(dir) / "k.npy").string());
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->dtype, DType::kF16);
  EXPECT_EQ(k->shape, w.k.shape);
  EXPECT_EQ(k->bytes, w.k.bytes);

  std::ifstream in(std::filesystem::path(dir) / "meta.json");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const nlohmann::json meta = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(meta.is_discarded());
  EXPECT_EQ(meta["config"]["len"], 2048);
  EXPECT_EQ(meta["config"]["dtype"], "float16");
  EXPECT_EQ(meta["segments"].size(), w.segments.size());
  EXPECT_EQ(meta["segments"][0][0], 0);
  EXPECT_EQ(meta["needles"].size(), w.needles.size());
  EXPECT_EQ(meta["needles"][0]["key_begin"], w.needles[0].key_begin);
  EXPECT_EQ(meta["retrieved"].size(), w.segments.size());
  EXPECT_EQ(meta["shapes"]["q"], nlohmann::json({4, 2048, 64}));
  std::filesystem::remove_all(dir);
}

TEST(WorkloadTest, Bfloat16CannotBeWritten) {
  WorkloadConfig c = Small();
  c.len = 512;
  c.dtype = DType::kBF16;
  const Workload w = Generate(c);
  EXPECT_EQ(w.q.dtype, DType::kBF16);
  const std::string dir = (std::filesystem::path(::testing::TempDir()) / "workload_bf16").string();
  std::filesystem::remove_all(dir);
  const absl::Status s = WriteWorkload(w, dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(dir));
}

}  // namespace
}  // namespace dhsa
