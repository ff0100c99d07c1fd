// Inputs and slow, direct computations the kernel tests compare against.
#ifndef DHSA_TESTS_KERNELS_TEST_UTIL_H_
#define DHSA_TESTS_KERNELS_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"

namespace dhsa::testing {

// A fresh seed per test run; tests print it (SCOPED_TRACE) so a failure can be replayed.
inline uint64_t FreshSeed() {
  return (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
}

// Gaussian [heads, len, dim] float32 tensor.
inline Tensor RandomTensor(std::mt19937_64& rng, int64_t heads, int64_t len, int64_t dim,
                           float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> values(static_cast<size_t>(heads * len * dim));
  for (float& x : values) x = normal(rng);
  return Tensor::FromFloats({heads, len, dim}, values);
}

// Structured [heads, len, dim] keys: segments of random length (8..80) sharing a topic direction
// per head, plus noise; returns the segment starts in `starts` when given.
inline Tensor SegmentedTensor(std::mt19937_64& rng, int64_t heads, int64_t len, int64_t dim,
                              std::vector<int64_t>* starts = nullptr, float noise = 0.3f) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> seg_len(8, 80);
  std::vector<float> values(static_cast<size_t>(heads * len * dim));
  std::vector<float> topic(static_cast<size_t>(heads * dim));
  int64_t next = 0;
  for (int64_t t = 0; t < len; ++t) {
    if (t == next) {
      if (starts != nullptr) starts->push_back(t);
      for (float& x : topic) x = normal(rng);
      next = t + seg_len(rng);
    }
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t c = 0; c < dim; ++c) {
        values[static_cast<size_t>((h * len + t) * dim + c)] =
            topic[static_cast<size_t>(h * dim + c)] + noise * normal(rng);
      }
    }
  }
  return Tensor::FromFloats({heads, len, dim}, values);
}

// Dense causal attention, the textbook way: full score row, softmax, weighted sum, in double.
// o [hq, lq, dim], lse [hq, lq]; queries are positions lk - lq ...
inline void NaiveDenseAttention(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                std::vector<double>* o, std::vector<double>* lse) {
  const int64_t hq = q.shape[0], lq = q.shape[1], d = q.shape[2];
  const int64_t hkv = k.shape[0], lk = k.shape[1];
  const int64_t t0 = lk - lq;
  o->assign(static_cast<size_t>(hq * lq * d), 0.0);
  lse->assign(static_cast<size_t>(hq * lq), 0.0);
  for (int64_t g = 0; g < hq; ++g) {
    const int64_t h = g / (hq / hkv);
    for (int64_t r = 0; r < lq; ++r) {
      const int64_t p = t0 + r;
      std::vector<double> s(static_cast<size_t>(p + 1));
      double m = -INFINITY;
      for (int64_t t = 0; t <= p; ++t) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) {
          dot += static_cast<double>(q.Get((g * lq + r) * d + c)) * k.Get((h * lk + t) * d + c);
        }
        s[t] = dot * scale;
        m = std::max(m, s[t]);
      }
      double z = 0;
      for (double& x : s) z += (x = std::exp(x - m));
      for (int64_t t = 0; t <= p; ++t) {
        for (int64_t c = 0; c < d; ++c) {
          (*o)[static_cast<size_t>((g * lq + r) * d + c)] += s[t] / z * v.Get((h * lk + t) * d + c);
        }
      }
      (*lse)[static_cast<size_t>(g * lq + r)] = m + std::log(z);
    }
  }
}

// max |a - b| over elements, with b in double.
inline double MaxAbsDiff(const Tensor& a, const std::vector<double>& b) {
  double worst = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(a.Get(static_cast<int64_t>(i))) - b[i]));
  }
  return worst;
}

inline double MaxAbsDiff(const Tensor& a, const Tensor& b) {
  double worst = 0;
  for (int64_t i = 0; i < a.NumElements(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(a.Get(i)) - b.Get(i)));
  }
  return worst;
}

// The spans of `sel` cut to the positions in `held` ([begin, end) ranges, sorted).
inline Selection ClipToHeld(Selection sel, const std::vector<std::pair<int64_t, int64_t>>& held) {
  for (std::vector<Span>& spans : sel.spans) {
    std::vector<Span> clipped;
    for (const Span& s : spans) {
      for (const auto& [begin, end] : held) {
        const int64_t b = std::max(s.begin, begin), e = std::min(s.end, end);
        if (b < e) clipped.push_back({b, e});
      }
    }
    spans = clipped;
  }
  return sel;
}

}  // namespace dhsa::testing

#endif  // DHSA_TESTS_KERNELS_TEST_UTIL_H_
