#include "kernels/cpu/boundaries.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vector_ops.h"

namespace dhsa {
namespace {

absl::Status CheckRange(const HeadsView& k, int64_t begin, int64_t end) {
  if (begin < 0 || end <= begin) {
    return absl::InvalidArgumentError(
        absl::StrCat("key range [", begin, ", ", end, ") to segment is empty or negative"));
  }
  if (begin < k.offset || end > k.offset + k.len) {
    return absl::InvalidArgumentError(absl::StrCat("key range [", begin, ", ", end,
                                                   ") is not inside the keys held [", k.offset,
                                                   ", ", k.offset + k.len, ")"));
  }
  return absl::OkStatus();
}

// Row (h, absolute position t) of `k` as float: in place for float32, else converted into `buffer`.
const float* KeyRow(const HeadsView& k, int64_t h, int64_t t, float* buffer) {
  if (k.dtype == DType::kF32) return static_cast<const float*>(k.data) + k.Index(h, t - k.offset);
  cpu::ToFloat(static_cast<const char*>(k.data) + k.Index(h, t - k.offset) * DTypeSize(k.dtype),
               k.dtype, k.dim, buffer);
  return buffer;
}

// Greedy 1-D NMS (spec Step 1): gaps by descending delta, ties to the lower position; a gap is
// accepted when at least `min_gap` from every accepted one and from begin and end, until `wanted`
// are accepted. Candidates are ranked a batch at a time (nth_element, then a sort of the batch),
// which visits them in exactly the order of a full sort.
std::vector<int64_t> GreedyGaps(const std::vector<double>& delta, int64_t begin, int64_t end,
                                int64_t wanted, int64_t min_gap) {
  std::set<int64_t> accepted = {begin, end};
  if (wanted <= 0) return {accepted.begin(), accepted.end()};
  std::vector<int64_t> order(delta.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  auto before = [&](int64_t a, int64_t b) {
    const double da = delta[static_cast<size_t>(a)], db = delta[static_cast<size_t>(b)];
    return da > db || (da == db && a < b);
  };
  int64_t taken = 0;
  size_t ranked = 0;
  size_t batch = static_cast<size_t>(std::max<int64_t>(64, 4 * wanted));
  while (taken < wanted && ranked < order.size()) {
    const size_t stop = std::min(order.size(), ranked + batch);
    if (stop < order.size()) {
      std::nth_element(order.begin() + static_cast<std::ptrdiff_t>(ranked),
                       order.begin() + static_cast<std::ptrdiff_t>(stop), order.end(), before);
    }
    std::sort(order.begin() + static_cast<std::ptrdiff_t>(ranked),
              order.begin() + static_cast<std::ptrdiff_t>(stop), before);
    for (; ranked < stop && taken < wanted; ++ranked) {
      const int64_t t = begin + 1 + order[ranked];
      const auto next = accepted.lower_bound(t);  // First accepted position >= t; end is there.
      const auto prev = std::prev(next);
      if (*next - t < min_gap || t - *prev < min_gap) continue;
      accepted.insert(t);
      ++taken;
    }
    batch *= 2;
  }
  return {accepted.begin(), accepted.end()};
}

}  // namespace

std::vector<double> GapDissimilarityCpu(const HeadsView& k, int64_t begin, int64_t end,
                                        int64_t window, int num_threads) {
  std::vector<double> delta;
  if (end - begin < 2) return delta;
  const int64_t n = end - begin, heads = k.heads, dim = k.dim, features = heads * dim;
  // 1 / ||k[h][t]|| per key and head (0 for a zero row, which then adds nothing).
  std::vector<double> inv_norm(static_cast<size_t>(n * heads));
  cpu::ParallelForRanges(n, num_threads, [&](int64_t a, int64_t b) {
    std::vector<float> buffer(static_cast<size_t>(dim));
    for (int64_t i = a; i < b; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        const double norm2 = cpu::SumSquaresF64(KeyRow(k, h, begin + i, buffer.data()), dim);
        inv_norm[static_cast<size_t>(i * heads + h)] = norm2 == 0.0 ? 0.0 : 1.0 / std::sqrt(norm2);
      }
    }
  });
  delta.resize(static_cast<size_t>(n - 1));
  cpu::ParallelForRanges(n - 1, num_threads, [&](int64_t a, int64_t b) {
    std::vector<double> left(static_cast<size_t>(features)), right(left.size());
    std::vector<float> buffer(static_cast<size_t>(dim));
    auto add_keys = [&](int64_t from, int64_t to, std::vector<double>& acc) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t s = from; s < to; ++s) {
        for (int64_t h = 0; h < heads; ++h) {
          const double inv = inv_norm[static_cast<size_t>((s - begin) * heads + h)];
          if (inv == 0.0) continue;
          cpu::AccumulateScaledF64(KeyRow(k, h, s, buffer.data()), inv, dim, acc.data() + h * dim);
        }
      }
    };
    for (int64_t i = a; i < b; ++i) {
      const int64_t t = begin + 1 + i;
      // Means and sums have the same cosine, so the sums are used directly.
      add_keys(std::max(begin, t - window), t, left);
      add_keys(t, std::min(end, t + window), right);
      const double dot = cpu::DotF64(left.data(), right.data(), features);
      const double nl = cpu::DotF64(left.data(), left.data(), features);
      const double nr = cpu::DotF64(right.data(), right.data(), features);
      delta[static_cast<size_t>(i)] = nl == 0.0 || nr == 0.0 ? 0.0 : 1.0 - dot / std::sqrt(nl * nr);
    }
  });
  return delta;
}

absl::StatusOr<std::vector<int64_t>> SegmentKeysCpu(const HeadsView& k, int64_t begin, int64_t end,
                                                    const DhsaConfig& config, int num_threads) {
  if (config.boundary_mode == BoundaryMode::kFixed) {
    if (begin < 0 || end <= begin) {
      return absl::InvalidArgumentError(
          absl::StrCat("key range [", begin, ", ", end, ") to segment is empty or negative"));
    }
    return FixedBoundaries(begin, end, config.chunk_mean);
  }
  absl::Status range = CheckRange(k, begin, end);
  if (!range.ok()) return range;
  const int64_t wanted = (end - begin + config.chunk_mean - 1) / config.chunk_mean - 1;
  const std::vector<double> delta =
      GapDissimilarityCpu(k, begin, end, config.boundary_window, num_threads);
  return SplitLongChunks(GreedyGaps(delta, begin, end, wanted, config.chunk_min), config.chunk_max);
}

absl::StatusOr<std::vector<int64_t>> AppendPrefillBoundariesCpu(const HeadsView& k,
                                                                const std::vector<int64_t>& old,
                                                                int64_t new_end,
                                                                const DhsaConfig& config,
                                                                int num_threads) {
  const int64_t begin = old.empty() ? 0 : old.back();
  auto fresh = SegmentKeysCpu(k, begin, new_end, config, num_threads);
  if (!fresh.ok()) return fresh.status();
  std::vector<int64_t> out = old.size() > 1 ? old : std::vector<int64_t>{};
  if (!out.empty()) out.pop_back();
  out.insert(out.end(), fresh->begin(), fresh->end());
  return out;
}

absl::StatusOr<std::vector<int64_t>> AppendDecodeBoundariesCpu(const HeadsView& k,
                                                               const std::vector<int64_t>& old,
                                                               int64_t new_end,
                                                               const DhsaConfig& config,
                                                               int num_threads) {
  const int64_t old_end = old.empty() ? 0 : old.back();
  if (new_end <= old_end) {
    return absl::InvalidArgumentError(absl::StrCat("decode must append keys: new end ", new_end,
                                                   " is not after the stored end ", old_end));
  }
  // Boundaries before the tail chunk stay; the tail [tail_begin, new_end) grows.
  std::vector<int64_t> out(old.begin(), old.end());
  if (!out.empty()) out.pop_back();
  const int64_t tail_begin = out.empty() ? 0 : out.back();
  if (!out.empty()) out.pop_back();
  std::vector<int64_t> tail = {tail_begin, new_end};
  if (config.boundary_mode == BoundaryMode::kFixed || new_end - tail_begin > config.chunk_max) {
    auto seg = SegmentKeysCpu(k, tail_begin, new_end, config, num_threads);
    if (!seg.ok()) return seg.status();
    tail = *std::move(seg);
  }
  out.insert(out.end(), tail.begin(), tail.end());
  return out;
}

}  // namespace dhsa
