// Reference chunk boundaries: direct loops in double precision, written to be checked by eye.
#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "kernels/boundaries/boundaries.h"

namespace dhsa {
namespace {

// Adds the key at absolute position `t` (all KV heads, each L2-normalised) into `acc`.
void AddNormalisedKey(const HeadsView& k, int64_t t, std::vector<double>& acc,
                      std::vector<float>& row) {
  for (int64_t h = 0; h < k.heads; ++h) {
    k.Row(h, t - k.offset, row.data());
    double norm2 = 0.0;
    for (int64_t c = 0; c < k.dim; ++c) norm2 += static_cast<double>(row[c]) * row[c];
    if (norm2 == 0.0) continue;
    const double inv = 1.0 / std::sqrt(norm2);
    for (int64_t c = 0; c < k.dim; ++c) acc[h * k.dim + c] += row[c] * inv;
  }
}

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

}  // namespace

std::vector<int64_t> SplitLongChunks(const std::vector<int64_t>& b, int64_t max_len) {
  std::vector<int64_t> out = {b.front()};
  for (size_t j = 0; j + 1 < b.size(); ++j) {
    const int64_t len = b[j + 1] - b[j];
    const int64_t parts = (len + max_len - 1) / max_len;
    for (int64_t p = 1; p < parts; ++p) out.push_back(b[j] + p * len / parts);
    out.push_back(b[j + 1]);
  }
  return out;
}

std::vector<int64_t> FixedBoundaries(int64_t begin, int64_t end, int64_t chunk) {
  std::vector<int64_t> b = {begin};
  for (int64_t t = (begin / chunk + 1) * chunk; t < end; t += chunk) b.push_back(t);
  b.push_back(end);
  return b;
}

std::vector<double> GapDissimilarityReference(const HeadsView& k, int64_t begin, int64_t end,
                                              int64_t window) {
  std::vector<double> delta;
  if (end - begin < 2) return delta;
  delta.reserve(static_cast<size_t>(end - begin - 1));
  const size_t features = static_cast<size_t>(k.heads * k.dim);
  std::vector<double> left(features), right(features);
  std::vector<float> row(static_cast<size_t>(k.dim));
  for (int64_t t = begin + 1; t < end; ++t) {
    std::fill(left.begin(), left.end(), 0.0);
    std::fill(right.begin(), right.end(), 0.0);
    // Means and sums have the same cosine, so the sums are used directly.
    for (int64_t s = std::max(begin, t - window); s < t; ++s) AddNormalisedKey(k, s, left, row);
    for (int64_t s = t; s < std::min(end, t + window); ++s) AddNormalisedKey(k, s, right, row);
    double dot = 0.0, nl = 0.0, nr = 0.0;
    for (size_t f = 0; f < features; ++f) {
      dot += left[f] * right[f];
      nl += left[f] * left[f];
      nr += right[f] * right[f];
    }
    delta.push_back(nl == 0.0 || nr == 0.0 ? 0.0 : 1.0 - dot / std::sqrt(nl * nr));
  }
  return delta;
}

absl::StatusOr<std::vector<int64_t>> SegmentKeysReference(const HeadsView& k, int64_t begin,
                                                          int64_t end, const DhsaConfig& config) {
  if (config.boundary_mode == BoundaryMode::kFixed) {
    if (begin < 0 || end <= begin) {
      return absl::InvalidArgumentError(
          absl::StrCat("key range [", begin, ", ", end, ") to segment is empty or negative"));
    }
    return FixedBoundaries(begin, end, config.chunk_mean);
  }
  absl::Status range = CheckRange(k, begin, end);
  if (!range.ok()) return range;
  const int64_t n = end - begin;
  const int64_t wanted = (n + config.chunk_mean - 1) / config.chunk_mean - 1;
  const std::vector<double> delta =
      GapDissimilarityReference(k, begin, end, config.boundary_window);

  // Gaps by descending dissimilarity; ties to the lower position.
  std::vector<int64_t> order(delta.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = begin + 1 + static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return delta[static_cast<size_t>(a - begin - 1)] > delta[static_cast<size_t>(b - begin - 1)];
  });

  std::set<int64_t> accepted = {begin, end};
  int64_t taken = 0;
  for (int64_t t : order) {
    if (taken >= wanted) break;
    auto next = accepted.lower_bound(t);  // First accepted position >= t; end is always there.
    auto prev = std::prev(next);
    if (*next - t < config.chunk_min || t - *prev < config.chunk_min) continue;
    accepted.insert(t);
    ++taken;
  }
  return SplitLongChunks(std::vector<int64_t>(accepted.begin(), accepted.end()), config.chunk_max);
}

absl::StatusOr<std::vector<int64_t>> AppendPrefillBoundariesReference(
    const HeadsView& k, const std::vector<int64_t>& old, int64_t new_end,
    const DhsaConfig& config) {
  const int64_t begin = old.empty() ? 0 : old.back();
  auto fresh = SegmentKeysReference(k, begin, new_end, config);
  if (!fresh.ok()) return fresh.status();
  std::vector<int64_t> out = old.size() > 1 ? old : std::vector<int64_t>{};
  if (!out.empty()) out.pop_back();
  out.insert(out.end(), fresh->begin(), fresh->end());
  return out;
}

absl::StatusOr<std::vector<int64_t>> AppendDecodeBoundariesReference(
    const HeadsView& k, const std::vector<int64_t>& old, int64_t new_end,
    const DhsaConfig& config) {
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
    auto seg = SegmentKeysReference(k, tail_begin, new_end, config);
    if (!seg.ok()) return seg.status();
    tail = *std::move(seg);
  }
  out.insert(out.end(), tail.begin(), tail.end());
  return out;
}

}  // namespace dhsa
