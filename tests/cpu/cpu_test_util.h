// What the CPU backend's tests judge it by: fp64 and naive fp32 computations of sparse attention,
// and the tolerance rule (spec/STYLE.md): the error against fp64 may be at most twice that of the
// same math done naively in fp32.
#ifndef DHSA_TESTS_CPU_CPU_TEST_UTIL_H_
#define DHSA_TESTS_CPU_CPU_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/cpu/selection.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"

namespace dhsa::testing {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// o [Hq * Lq * d] and lse [Hq * Lq] of one attention call, in double.
struct AttentionValues {
  std::vector<double> o, lse;
};

// The keys row r of query head g sees: selected, inside K's rows, at or before its position.
inline std::vector<int64_t> VisibleKeys(const SparseAttentionParams& p, int64_t g, int64_t r) {
  const int64_t pos = p.q.offset + r;
  std::vector<int64_t> keys;
  for (const Span& s : p.selection->ForQuery(g, pos)) {
    for (int64_t t = std::max(s.begin, p.k.offset);
         t < std::min({s.end, pos + 1, p.k.offset + p.k.len}); ++t) {
      keys.push_back(t);
    }
  }
  return keys;
}

// Sparse attention over the rows `rows` of every query head (all rows when empty), textbook
// two-pass softmax, with every operation in `Real` (double: the fp64 judge; float: the naive fp32
// computation whose error sets the tolerance). Rows not computed hold NaN.
template <typename Real>
AttentionValues SelectedAttention(const SparseAttentionParams& p, std::vector<int64_t> rows = {}) {
  const int64_t hq = p.q.heads, lq = p.q.len, d = p.q.dim, group = p.q.heads / p.k.heads;
  if (rows.empty()) {
    for (int64_t r = 0; r < lq; ++r) rows.push_back(r);
  }
  AttentionValues out;
  out.o.assign(static_cast<size_t>(hq * lq * d), std::nan(""));
  out.lse.assign(static_cast<size_t>(hq * lq), std::nan(""));
  for (int64_t g = 0; g < hq; ++g) {
    const int64_t h = g / group;
    for (int64_t r : rows) {
      const std::vector<int64_t> keys = VisibleKeys(p, g, r);
      double* o = out.o.data() + (g * lq + r) * d;
      if (keys.empty()) {
        std::fill(o, o + d, 0.0);
        out.lse[static_cast<size_t>(g * lq + r)] = -kInf;
        continue;
      }
      std::vector<Real> s(keys.size()), acc(static_cast<size_t>(d), Real{0});
      Real m = -std::numeric_limits<Real>::infinity(), z = 0;
      for (size_t i = 0; i < keys.size(); ++i) {
        Real dot = 0;
        for (int64_t c = 0; c < d; ++c) {
          dot += static_cast<Real>(p.q.At(g, r, c)) *
                 static_cast<Real>(p.k.At(h, keys[i] - p.k.offset, c));
        }
        s[i] = dot * static_cast<Real>(p.scale);
        m = std::max(m, s[i]);
      }
      for (size_t i = 0; i < keys.size(); ++i) {
        const Real w = std::exp(s[i] - m);
        z += w;
        for (int64_t c = 0; c < d; ++c) {
          acc[static_cast<size_t>(c)] += w * static_cast<Real>(p.v.At(h, keys[i] - p.k.offset, c));
        }
      }
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<double>(acc[static_cast<size_t>(c)] / z);
      out.lse[static_cast<size_t>(g * lq + r)] = static_cast<double>(m + std::log(z));
    }
  }
  return out;
}

// max |got - want| over the elements where want is not NaN (not computed); -inf must match
// exactly (error +inf otherwise), and a NaN in got is error +inf.
inline double MaxError(const float* got, const std::vector<double>& want) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(want[i])) continue;
    if (std::isnan(got[i])) return kInf;
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      if (static_cast<double>(got[i]) != want[i]) return kInf;
      continue;
    }
    worst = std::max(worst, std::abs(static_cast<double>(got[i]) - want[i]));
  }
  return worst;
}

inline double MaxError(const std::vector<double>& got, const std::vector<double>& want) {
  std::vector<float> rounded(got.begin(), got.end());
  return MaxError(rounded.data(), want);
}

// The tolerance rule for `got` (fp32, from the code under test) against the fp64 judge, with the
// naive fp32 computation's error as the yardstick. The floor is one fp32 rounding of the largest
// value: what storing the fp64 result itself in fp32 may cost, so that a case the naive
// computation happens to get exactly right does not demand more than exactness.
inline void ExpectWithinTolerance(const float* got, const std::vector<double>& fp64,
                                  const std::vector<double>& naive, const std::string& what) {
  double largest = 0;
  for (double x : fp64) {
    if (std::isfinite(x)) largest = std::max(largest, std::abs(x));
  }
  const double error = MaxError(got, fp64);
  const double naive_error = MaxError(naive, fp64);
  ASSERT_TRUE(std::isfinite(naive_error)) << what << ": the naive computation is broken";
  EXPECT_LE(error, 2 * naive_error + largest * std::ldexp(1.0, -24))
      << what << ": error " << error << " vs naive fp32 " << naive_error << " (largest |x| "
      << largest << ")";
}

// Attention outputs filled with NaN, so that an element the kernel does not write shows.
struct PoisonedOutputs {
  std::vector<float> o, lse;
  PoisonedOutputs(int64_t hq, int64_t lq, int64_t d)
      : o(static_cast<size_t>(hq * lq * d), std::nanf("")),
        lse(static_cast<size_t>(hq * lq), std::nanf("")) {}
  void Attach(SparseAttentionParams& p, int64_t hq, int64_t lq, int64_t d) {
    p.o = {o.data(), hq, lq, d};
    p.lse = {lse.data(), hq, lq, 1};
  }
};

// The reference's dhsa (or block_topk, streaming, dense) selection for queries [lk - q.len, lk).
inline Selection ReferenceSelection(const HeadsView& q, const HeadsView& k, const DhsaConfig& c) {
  AttentionShape shape;
  shape.hq = q.heads;
  shape.hkv = k.heads;
  shape.dim = q.dim;
  shape.lq = q.len;
  shape.lk = k.len;
  DhsaConfig seg = c;
  if (c.policy == Policy::kBlockTopk) {
    seg.boundary_mode = BoundaryMode::kFixed;
    seg.chunk_mean = c.block;
  }
  const std::vector<int64_t> b = *SegmentKeysReference(k, 0, k.len, seg);
  // The summaries `c`'s chunk score reads (paper or mass; block_topk: plain means).
  const Summaries kappa = ChunkSummariesReference(k, b, ChunkSummaryNorm(c));
  const Summaries rho = ScoreQuerySummariesReference(q, k.heads, c);
  SelectionInputs in;
  in.shape = shape;
  in.boundaries = &b;
  in.kappa = &kappa;
  in.rho = &rho;
  return *SelectSpansReference(in, c);
}

// Selections compared as sets of keys per entry. Where they differ, every differing key must lie
// in a chunk (dhsa) or block (block_topk) whose score ties, to fp32 rounding, with the lowest
// score the reference took: a tie the two rankings may break differently.
inline void ExpectSameUpToTies(const Selection& got, const Selection& want,
                               const SelectionInputs& in, const DhsaConfig& c) {
  const std::vector<int64_t>& boundaries = *in.boundaries;
  ASSERT_EQ(got.num_blocks, want.num_blocks);
  ASSERT_EQ(got.num_heads, want.num_heads);
  ASSERT_EQ(got.first_block, want.first_block);
  for (int64_t h = 0; h < want.num_heads; ++h) {
    for (int64_t b = 0; b < want.num_blocks; ++b) {
      if (got.At(h, b) == want.At(h, b)) continue;
      const int64_t block = want.first_block + b;
      const int64_t e = std::min((block + 1) * c.q_block, in.shape.lk);
      ASSERT_TRUE(c.policy == Policy::kDhsa || c.policy == Policy::kBlockTopk)
          << "entry (" << h << ", " << block << ") differs under a policy without scores";
      const std::vector<float> scores = ChunkScoresReference(in, c, h, block);
      auto chunk_of = [&](int64_t t) {
        return static_cast<int64_t>(std::upper_bound(boundaries.begin(), boundaries.end(), t) -
                                    boundaries.begin()) -
               1;
      };
      std::vector<int> in_got(static_cast<size_t>(e), 0), in_want(static_cast<size_t>(e), 0);
      for (const Span& s : got.At(h, b)) std::fill(&in_got[s.begin], &in_got[0] + s.end, 1);
      for (const Span& s : want.At(h, b)) std::fill(&in_want[s.begin], &in_want[0] + s.end, 1);
      // The cut: the lowest score of a chunk the reference took keys of for the budget (keys of
      // the sink and the local window are kept whatever their chunk's score).
      const int64_t chunk_lo = std::min(c.sink, e), chunk_hi = std::max<int64_t>(0, e - c.local);
      float cut = INFINITY, largest = 0;
      for (int64_t t = chunk_lo; t < chunk_hi; ++t) {
        const int64_t j = chunk_of(t);
        if (in_want[t] && j < static_cast<int64_t>(scores.size())) cut = std::min(cut, scores[j]);
      }
      for (float s : scores) largest = std::max(largest, std::abs(s));
      for (int64_t t = 0; t < e; ++t) {
        if (in_got[t] == in_want[t]) continue;
        const int64_t j = chunk_of(t);
        ASSERT_LT(j, static_cast<int64_t>(scores.size())) << "key " << t << " is not eligible";
        // The CPU mass score is fp32, within kMassScoreTolerance of the reference on each side.
        const float tie = c.policy == Policy::kDhsa && c.chunk_score == ChunkScore::kMass
                              ? 2 * kMassScoreTolerance
                              : 1e-6f;
        EXPECT_LE(std::abs(scores[j] - cut), tie * largest)
            << "entry (" << h << ", " << block << "): key " << t << " of chunk " << j
            << " differs and its score " << scores[j] << " does not tie the cut " << cut;
      }
    }
  }
}

}  // namespace dhsa::testing

#endif  // DHSA_TESTS_CPU_CPU_TEST_UTIL_H_
