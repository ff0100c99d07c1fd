// Step 1's device kernels apart (kernels/cuda/selection_boundaries.cu). The gap dissimilarities:
// the windowed kernel with per-warp norms (the default) bit for bit against the one with the
// block's norm phase, and both against GapDissimilarityReference to rounding, on random keys with
// zero rows, bf16 and f16, 1-8 KV heads, d 64 and 128, segments from 0 and later. The boundary
// NMS (LaunchNmsAndSplit) on given gap dissimilarities, against the reference's greedy (the loop of
// SegmentKeysReference in kernels/boundaries/reference.cc, repeated below on the same deltas) and
// SplitLongChunks: the serial warp alone, the parallel rounds with the default round count, and
// with 0, 1 and 2 rounds (the serial warp then takes most gaps from the first undecided one on).
// Inputs the rounds find hard: monotone deltas (one long chain of decisions), plateaus of equal
// deltas (priority by position), ties from a few values, sawtooth ramps, plus random and
// smooth-with-noise deltas; odd lengths 2 .. 131071 keys, segments that start at 0 and later
// (chunked prefill's forced boundary), min_chunk 1 .. 80, chunk_mean 16 and 32, max_chunk 128 and
// 24 (many splits). Skipped without a CUDA device.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/common/tensor.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_cuda_launch.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

namespace kernel = selection_kernel;

bool HaveCudaDevice() {
  static const bool have = [] {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  }();
  return have;
}

// SegmentKeysReference's NMS and split on `delta` (gap t = begin + 1 + i has delta[i]).
std::vector<int64_t> ReferenceNms(const std::vector<double>& delta, int64_t begin, int64_t end,
                                  int64_t mean, int64_t min_chunk, int64_t max_chunk) {
  const int64_t n = end - begin;
  const int64_t wanted = (n + mean - 1) / mean - 1;
  std::vector<int64_t> order(delta.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = begin + 1 + static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return delta[static_cast<size_t>(a - begin - 1)] > delta[static_cast<size_t>(b - begin - 1)];
  });
  std::set<int64_t> accepted = {begin, end};
  int64_t taken = 0;
  for (int64_t t : order) {
    if (taken >= wanted) break;
    auto next = accepted.lower_bound(t);
    auto prev = std::prev(next);
    if (*next - t < min_chunk || t - *prev < min_chunk) continue;
    accepted.insert(t);
    ++taken;
  }
  return SplitLongChunks(std::vector<int64_t>(accepted.begin(), accepted.end()), max_chunk);
}

enum class Pattern { kRandom, kRising, kFalling, kPlateau, kFewValues, kSawtooth, kSmooth };

const char* PatternName(Pattern p) {
  switch (p) {
    case Pattern::kRandom:
      return "random";
    case Pattern::kRising:
      return "rising";
    case Pattern::kFalling:
      return "falling";
    case Pattern::kPlateau:
      return "plateau";
    case Pattern::kFewValues:
      return "few_values";
    case Pattern::kSawtooth:
      return "sawtooth";
    case Pattern::kSmooth:
      return "smooth";
  }
  return "?";
}

std::vector<double> Deltas(Pattern p, int64_t gaps, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> uniform(0.0, 2.0);
  std::uniform_int_distribution<int> pick(0, 2);
  std::normal_distribution<double> noise(0.0, 0.05);
  std::vector<double> d(static_cast<size_t>(gaps));
  const int period = std::uniform_int_distribution<int>(5, 70)(rng);
  for (int64_t i = 0; i < gaps; ++i) {
    double v = 0.0;
    switch (p) {
      case Pattern::kRandom:
        v = uniform(rng);
        break;
      case Pattern::kRising:
        v = static_cast<double>(i) / static_cast<double>(gaps);
        break;
      case Pattern::kFalling:
        v = 1.0 - static_cast<double>(i) / static_cast<double>(gaps);
        break;
      case Pattern::kPlateau:  // Equal runs of random length and value: mostly ties.
        v = i == 0 || std::uniform_int_distribution<int>(0, 200)(rng) != 0
                ? (i == 0 ? 0.5 : d[static_cast<size_t>(i - 1)])
                : uniform(rng);
        break;
      case Pattern::kFewValues:
        v = 0.5 * pick(rng);
        break;
      case Pattern::kSawtooth:
        v = static_cast<double>(i % period) / period;
        break;
      case Pattern::kSmooth:  // Quantised, so that neighbours tie often.
        v = std::round((1.0 + std::sin(0.013 * static_cast<double>(i)) + noise(rng)) * 64.0) / 64.0;
        break;
    }
    d[static_cast<size_t>(i)] = v;
  }
  return d;
}

struct NmsConfig {
  int64_t mean, min_chunk, max_chunk;
};

// Runs the device sort and NMS on `delta` for the segment [begin, end); returns the boundaries it
// appended after begin (begin first).
absl::StatusOr<std::vector<int64_t>> DeviceNms(const std::vector<double>& delta, int64_t begin,
                                               int64_t end, const NmsConfig& c, bool parallel,
                                               int32_t max_rounds) {
  const int64_t gaps = end - begin - 1;
  const int64_t n = end - begin;
  const int64_t wanted = (n + c.mean - 1) / c.mean - 1;
  const int64_t room = std::max<int64_t>(1, gaps);
  std::vector<int32_t> pos(static_cast<size_t>(room));
  for (int64_t i = 0; i < gaps; ++i)
    pos[static_cast<size_t>(i)] = static_cast<int32_t>(begin + 1 + i);
  std::vector<double> padded = delta;
  padded.resize(static_cast<size_t>(room));
  const size_t temp_bytes = std::max<size_t>(16, kernel::SortGapsTempBytes(room));
  const int64_t cap = n + 8;  // Boundary list room: far more than NMS and splits make.
  absl::StatusOr<DeviceBuffer> d_delta = DeviceBuffer::FromHost(padded.data(), 8 * padded.size());
  absl::StatusOr<DeviceBuffer> d_pos = DeviceBuffer::FromHost(pos.data(), 4 * pos.size());
  absl::StatusOr<DeviceBuffer> d_delta_sorted = DeviceBuffer::Allocate(8 * room);
  absl::StatusOr<DeviceBuffer> d_pos_sorted = DeviceBuffer::Allocate(4 * room);
  absl::StatusOr<DeviceBuffer> temp = DeviceBuffer::Allocate(temp_bytes);
  absl::StatusOr<DeviceBuffer> rank = DeviceBuffer::Allocate(4 * room);
  absl::StatusOr<DeviceBuffer> state = DeviceBuffer::Allocate(room);
  absl::StatusOr<DeviceBuffer> sorted_state = DeviceBuffer::Allocate((room + 15) / 16 * 16);
  absl::StatusOr<DeviceBuffer> scratch =
      DeviceBuffer::Allocate(4 * (wanted + 2 > 0 ? wanted + 2 : 1));
  absl::StatusOr<DeviceBuffer> list = DeviceBuffer::Allocate(4 * (cap + 1));
  for (auto* b : {&d_delta, &d_pos, &d_delta_sorted, &d_pos_sorted, &temp, &rank, &state,
                  &sorted_state, &scratch, &list}) {
    if (!b->ok()) return b->status();
  }
  for (DeviceBuffer* b : {&*rank, &*state, &*sorted_state, &*list}) {
    absl::Status s = b->Fill(0xFF);  // Poison: anything read before written shows.
    if (!s.ok()) return s;
  }
  // The list so far: {0} or {0, begin}, its length at list[cap].
  std::vector<int32_t> head = {0, static_cast<int32_t>(begin)};
  const int32_t head_len = begin == 0 ? 1 : 2;
  absl::Status up = list->CopyFromHost(head.data(), sizeof(int32_t) * head_len);
  if (!up.ok()) return up;
  int32_t* l = list->as<int32_t>();
  int32_t* count = l + cap;
  absl::Status s = CudaStatus(kernel::LaunchInitBoundaries(l, count, head_len, false, nullptr),
                              "init boundaries");
  if (!s.ok()) return s;
  s = CudaStatus(kernel::SortGaps(temp->data(), temp_bytes, d_delta->as<double>(),
                                  d_delta_sorted->as<double>(), d_pos->as<int32_t>(),
                                  d_pos_sorted->as<int32_t>(), gaps, nullptr),
                 "sort");
  if (!s.ok()) return s;
  kernel::NmsWorkspace work;
  work.rank = rank->as<int32_t>();
  work.state = state->as<uint8_t>();
  work.sorted_state = sorted_state->as<uint8_t>();
  work.max_rounds = max_rounds;
  s = CudaStatus(kernel::LaunchNmsAndSplit(d_pos_sorted->as<int32_t>(), static_cast<int32_t>(gaps),
                                           static_cast<int32_t>(begin), static_cast<int32_t>(end),
                                           static_cast<int32_t>(c.min_chunk),
                                           static_cast<int32_t>(c.max_chunk),
                                           static_cast<int32_t>(wanted), parallel ? &work : nullptr,
                                           scratch->as<int32_t>(), l, count, nullptr),
                 "nms");
  if (!s.ok()) return s;
  s = CudaStatus(cudaDeviceSynchronize(), "nms run");
  if (!s.ok()) return s;
  std::vector<int32_t> all(static_cast<size_t>(cap + 1));
  s = list->CopyToHost(all.data(), all.size() * sizeof(int32_t));
  if (!s.ok()) return s;
  const int32_t len = all.back();
  if (len < head_len || len > cap) {
    return absl::InternalError("device boundary list length " + std::to_string(len));
  }
  return std::vector<int64_t>(all.begin() + (head_len - 1), all.begin() + len);
}

TEST(SelectionNmsCudaTest, EqualsTheReferenceGreedy) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  const std::vector<Pattern> patterns = {Pattern::kRandom,  Pattern::kRising,    Pattern::kFalling,
                                         Pattern::kPlateau, Pattern::kFewValues, Pattern::kSawtooth,
                                         Pattern::kSmooth};
  const std::vector<NmsConfig> configs = {{32, 8, 128}, {16, 3, 24}, {32, 1, 128}, {32, 17, 128}};
  struct Run {
    bool parallel;
    int32_t rounds;
  };
  const std::vector<Run> runs = {{false, 0}, {true, 64}, {true, 0}, {true, 1}, {true, 2}};
  int64_t checked = 0, failures = 0;
  for (const int64_t len : {2, 31, 97, 1025, 4099, 131071}) {
    for (const int64_t begin : {int64_t{0}, int64_t{5003}}) {
      for (const Pattern p : patterns) {
        for (const NmsConfig& c : configs) {
          if (len == 131071 && (begin != 0 || c.min_chunk != 8) && p != Pattern::kRising &&
              p != Pattern::kPlateau) {
            continue;  // The longest segment: the spec's config, plus the hardest patterns.
          }
          const int64_t end = begin + len;
          const std::vector<double> delta = Deltas(p, len - 1, rng);
          const std::vector<int64_t> want =
              ReferenceNms(delta, begin, end, c.mean, c.min_chunk, c.max_chunk);
          for (const Run& r : runs) {
            absl::StatusOr<std::vector<int64_t>> got =
                DeviceNms(delta, begin, end, c, r.parallel, r.rounds);
            ASSERT_TRUE(got.ok()) << got.status();
            ++checked;
            if (*got != want && failures++ < 5) {
              ADD_FAILURE() << PatternName(p) << " len " << len << " begin " << begin << " mean "
                            << c.mean << " min " << c.min_chunk << " max " << c.max_chunk
                            << (r.parallel ? " parallel, rounds " : " serial, rounds ") << r.rounds
                            << ": device " << got->size() << " boundaries, reference "
                            << want.size();
            }
          }
        }
      }
    }
  }
  EXPECT_EQ(failures, 0);
  std::printf("RESULT nms: %lld device runs against the reference greedy, %lld differing\n",
              static_cast<long long>(checked), static_cast<long long>(failures));
}

// min_chunk past kMaxParallelNmsMinChunk takes the serial warp even when the parallel workspace is
// given: still the reference's boundaries.
TEST(SelectionNmsCudaTest, WideMinChunkEqualsTheReference) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(testing::FreshSeed());
  const NmsConfig c{256, kernel::kMaxParallelNmsMinChunk + 16, 1024};
  const std::vector<double> delta = Deltas(Pattern::kRandom, 40000, rng);
  const std::vector<int64_t> want = ReferenceNms(delta, 0, 40001, c.mean, c.min_chunk, c.max_chunk);
  absl::StatusOr<std::vector<int64_t>> got = DeviceNms(delta, 0, 40001, c, true, 64);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, want);
}

TEST(SelectionGapsCudaTest, WarpNormsEqualBlockNormsBitForBit) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  struct GapCase {
    int64_t hkv, lk, d, begin;
    DType dtype;
  };
  const std::vector<GapCase> cases = {
      {1, 97, 64, 0, DType::kBF16},     {2, 1025, 128, 0, DType::kF16},
      {8, 4099, 128, 0, DType::kBF16},  {8, 4099, 128, 37, DType::kBF16},
      {4, 3001, 64, 1000, DType::kF16}, {8, 131, 128, 3, DType::kBF16}};
  for (const GapCase& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << "hkv " << c.hkv << " lk " << c.lk << " d " << c.d << " begin " << c.begin);
    std::vector<float> x = testing::RandomTensor(rng, c.hkv, c.lk, c.d).ToFloats();
    // Zero rows (the norm's zero case) and a row of negative zeros.
    for (int64_t t : {c.begin + 2, c.begin + 3, c.lk - 1, c.begin + 40}) {
      if (t >= c.lk) continue;
      for (int64_t h = 0; h < c.hkv; ++h) {
        for (int64_t i = 0; i < c.d; ++i) {
          x[static_cast<size_t>((h * c.lk + t) * c.d + i)] = t == c.begin + 40 ? -0.0f : 0.0f;
        }
      }
    }
    const Tensor k = Tensor::FromFloats({c.hkv, c.lk, c.d}, x).ConvertTo(c.dtype);
    absl::StatusOr<HeadsView> view = HeadsView::Of(k, "K");
    ASSERT_TRUE(view.ok()) << view.status();
    const std::vector<double> ref = GapDissimilarityReference(*view, c.begin, c.lk, 4);
    const int64_t gaps = c.lk - c.begin - 1;
    absl::StatusOr<DeviceBuffer> dk = DeviceBuffer::FromHost(k.data(), k.bytes.size());
    absl::StatusOr<DeviceBuffer> delta = DeviceBuffer::Allocate(8 * gaps);
    absl::StatusOr<DeviceBuffer> pos = DeviceBuffer::Allocate(4 * gaps);
    ASSERT_TRUE(dk.ok() && delta.ok() && pos.ok());
    std::vector<std::vector<double>> got;
    for (const bool warp_norms : {false, true}) {
      ASSERT_TRUE(delta->Fill(0xFF).ok());
      ASSERT_TRUE(CudaStatus(kernel::LaunchGapDissimilarity(c.dtype, dk->data(), c.hkv, c.lk, c.d,
                                                            static_cast<int32_t>(c.begin),
                                                            static_cast<int32_t>(c.lk), 4,
                                                            delta->as<double>(), pos->as<int32_t>(),
                                                            false, warp_norms, nullptr),
                             "gaps")
                      .ok());
      ASSERT_TRUE(CudaStatus(cudaDeviceSynchronize(), "gaps run").ok());
      std::vector<double> d(static_cast<size_t>(gaps));
      std::vector<int32_t> p(static_cast<size_t>(gaps));
      ASSERT_TRUE(delta->CopyToHost(d.data(), 8 * d.size()).ok());
      ASSERT_TRUE(pos->CopyToHost(p.data(), 4 * p.size()).ok());
      for (int64_t i = 0; i < gaps; ++i) {
        ASSERT_EQ(p[static_cast<size_t>(i)], c.begin + 1 + i);
        ASSERT_NEAR(d[static_cast<size_t>(i)], ref[static_cast<size_t>(i)], 1e-12) << "gap " << i;
      }
      got.push_back(d);
    }
    int64_t differ = 0;
    for (int64_t i = 0; i < gaps; ++i) {
      differ += std::memcmp(&got[0][static_cast<size_t>(i)], &got[1][static_cast<size_t>(i)],
                            sizeof(double)) != 0;
    }
    EXPECT_EQ(differ, 0) << "of " << gaps << " gaps";
  }
}

}  // namespace
}  // namespace dhsa
