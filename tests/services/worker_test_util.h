// Random inputs and reference results for the worker tests.
#ifndef DHSA_TESTS_SERVICES_WORKER_TEST_UTIL_H_
#define DHSA_TESTS_SERVICES_WORKER_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention/sparse_attention.h"
#include "kernels/common/tensor.h"
#include "kernels/selection/selection.h"

namespace dhsa {

// Standard-normal entries of `shape`, rounded to `dtype`.
inline Tensor RandomNormal(DType dtype, std::vector<int64_t> shape, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  Tensor t = Tensor::Zeros(DType::kF32, std::move(shape));
  float* data = static_cast<float*>(t.data());
  for (int64_t i = 0; i < t.NumElements(); ++i) data[i] = normal(rng);
  return dtype == DType::kF32 ? t : t.ConvertTo(dtype);
}

// Rows [begin, end) of every head of a [heads, len, dim] tensor.
inline Tensor SliceRows(const Tensor& t, int64_t begin, int64_t end) {
  const int64_t heads = t.shape[0], len = t.shape[1], dim = t.shape[2];
  const size_t row = static_cast<size_t>(dim) * DTypeSize(t.dtype);
  Tensor out = Tensor::Zeros(t.dtype, {heads, end - begin, dim});
  for (int64_t h = 0; h < heads; ++h) {
    std::memcpy(out.bytes.data() + h * (end - begin) * row,
                t.bytes.data() + (h * len + begin) * row, (end - begin) * row);
  }
  return out;
}

// `t` ([heads, len, dim]) with rows [begin, end) of every head replaced by those of `src` (same
// shape and dtype).
inline Tensor WithRows(Tensor t, const Tensor& src, int64_t begin, int64_t end) {
  const int64_t heads = t.shape[0], len = t.shape[1], dim = t.shape[2];
  const size_t row = static_cast<size_t>(dim) * DTypeSize(t.dtype);
  for (int64_t h = 0; h < heads; ++h) {
    std::memcpy(t.bytes.data() + (h * len + begin) * row,
                src.bytes.data() + (h * len + begin) * row, (end - begin) * row);
  }
  return t;
}

// Up to `max_spans` random sorted disjoint spans inside [0, lk).
inline std::vector<Span> RandomSpans(int64_t lk, int max_spans, std::mt19937_64& rng) {
  const int n = std::uniform_int_distribution<int>(0, max_spans)(rng);
  std::vector<int64_t> cuts;
  for (int i = 0; i < 2 * n; ++i)
    cuts.push_back(std::uniform_int_distribution<int64_t>(0, lk)(rng));
  std::sort(cuts.begin(), cuts.end());
  std::vector<Span> spans;
  for (int i = 0; i < n; ++i) {
    if (cuts[2 * i] < cuts[2 * i + 1]) spans.push_back({cuts[2 * i], cuts[2 * i + 1]});
  }
  return spans;
}

// A per-KV-head selection over query rows [q_begin, q_begin + lq) with random spans in [0, lk).
inline Selection RandomSelection(int64_t hkv, int64_t group, int64_t block_size, int64_t q_begin,
                                 int64_t lq, int64_t lk, std::mt19937_64& rng) {
  Selection sel;
  sel.block_size = block_size;
  sel.first_block = q_begin / block_size;
  sel.num_blocks = (q_begin + lq - 1) / block_size - sel.first_block + 1;
  sel.num_heads = hkv;
  sel.group = group;
  sel.spans.resize(static_cast<size_t>(hkv * sel.num_blocks));
  for (std::vector<Span>& spans : sel.spans) spans = RandomSpans(lk, 4, rng);
  return sel;
}

struct ReferenceResult {
  Tensor o;    // [Hq, Lq, d] float32.
  Tensor lse;  // [Hq, Lq] float32.
};

// Sparse attention over all keys k, v [Hkv, Lk, d] (offset 0).
inline ReferenceResult Reference(const Tensor& q, int64_t q_begin, const Tensor& k, const Tensor& v,
                                 const Selection& selection, float scale) {
  SparseAttentionParams p;
  p.q = HeadsView::Of(q, "q").value();
  p.q.offset = q_begin;
  p.k = HeadsView::Of(k, "k").value();
  p.v = HeadsView::Of(v, "v").value();
  p.selection = &selection;
  p.scale = scale;
  ReferenceResult r;
  r.o = Tensor::Zeros(DType::kF32, {q.shape[0], q.shape[1], q.shape[2]});
  r.lse = Tensor::Zeros(DType::kF32, {q.shape[0], q.shape[1]});
  p.o = OutputView{static_cast<float*>(r.o.data()), q.shape[0], q.shape[1], q.shape[2]};
  p.lse = OutputView{static_cast<float*>(r.lse.data()), q.shape[0], q.shape[1], 1};
  const absl::Status s = SparseAttentionReference(p);
  EXPECT_TRUE(s.ok()) << s;
  return r;
}

// O rows within 1e-5 relative (L2 per row), LSE within 1e-5; empty rows exactly (0, -inf).
inline void ExpectMatchesReference(const Tensor& o, const Tensor& lse, const ReferenceResult& ref) {
  ASSERT_EQ(o.shape, ref.o.shape);
  ASSERT_EQ(lse.shape, ref.lse.shape);
  ASSERT_EQ(o.dtype, DType::kF32);
  ASSERT_EQ(lse.dtype, DType::kF32);
  const int64_t rows = lse.NumElements(), d = o.shape[2];
  const float* got_o = static_cast<const float*>(o.data());
  const float* got_lse = static_cast<const float*>(lse.data());
  const float* want_o = static_cast<const float*>(ref.o.data());
  const float* want_lse = static_cast<const float*>(ref.lse.data());
  int failures = 0;
  for (int64_t r = 0; r < rows && failures < 5; ++r) {
    if (std::isinf(want_lse[r])) {
      bool zero = true;
      for (int64_t c = 0; c < d; ++c) zero = zero && got_o[r * d + c] == 0.0f;
      if (!(std::isinf(got_lse[r]) && got_lse[r] < 0) || !zero) {
        ADD_FAILURE() << "row " << r << " saw no key: want lse -inf and o 0, got lse "
                      << got_lse[r];
        ++failures;
      }
      continue;
    }
    double err = 0, norm = 0;
    for (int64_t c = 0; c < d; ++c) {
      err += std::pow(double{got_o[r * d + c]} - want_o[r * d + c], 2);
      norm += std::pow(double{want_o[r * d + c]}, 2);
    }
    const double rel = std::sqrt(err) / std::max(std::sqrt(norm), 1e-6);
    if (rel > 1e-5 || !(std::fabs(double{got_lse[r]} - want_lse[r]) <= 1e-5)) {
      ADD_FAILURE() << "row " << r << ": o relative error " << rel << ", lse " << got_lse[r]
                    << " vs " << want_lse[r];
      ++failures;
    }
  }
}

}  // namespace dhsa

#endif  // DHSA_TESTS_SERVICES_WORKER_TEST_UTIL_H_
