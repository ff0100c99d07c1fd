// The CUDA worker's one-pass per-stripe selection CSRs (StripeSelectionCsrs) against the per-stripe
// cuts they replace, SelectionToCsr(SelectionForStripe(...)) for each stripe with a span left: on
// fresh random selections and stripe layouts (gaps between stripes, stripes past the last query
// row, odd block sizes, empty entries, spans crossing several stripes) and structured ones. Pure
// host code: needs no GPU.
#include <algorithm>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "services/worker/cuda_backend.h"
#include "services/worker/partial_attention.h"
#include "tests/kernels/test_util.h"

namespace dhsa {
namespace {

void ExpectSameCsr(const SelectionCsr& got, const SelectionCsr& want) {
  EXPECT_EQ(got.block_size, want.block_size);
  EXPECT_EQ(got.first_block, want.first_block);
  EXPECT_EQ(got.num_blocks, want.num_blocks);
  EXPECT_EQ(got.num_heads, want.num_heads);
  EXPECT_EQ(got.entry_offsets, want.entry_offsets);
  ASSERT_EQ(got.spans.size(), want.spans.size());
  for (size_t i = 0; i < got.spans.size(); ++i) {
    EXPECT_EQ(got.spans[i].begin, want.spans[i].begin) << i;
    EXPECT_EQ(got.spans[i].end, want.spans[i].end) << i;
  }
  EXPECT_EQ(got.span_starts, want.span_starts);
}

// The per-stripe cuts, as the CUDA backend made them before.
std::vector<std::pair<size_t, SelectionCsr>> Reference(const Selection& selection,
                                                       int64_t first_block, int64_t num_blocks,
                                                       const LayerSnapshot& keys, int64_t q_end) {
  std::vector<std::pair<size_t, SelectionCsr>> out;
  for (size_t i = 0; i < keys.stripes.size(); ++i) {
    const StripeSnapshot& s = keys.stripes[i];
    bool any = false;
    const Selection cut = SelectionForStripe(selection, first_block, num_blocks, s.begin,
                                             std::min(s.end(), q_end), &any);
    if (!any) continue;
    absl::StatusOr<SelectionCsr> csr = SelectionToCsr(cut);
    EXPECT_TRUE(csr.ok()) << csr.status();
    if (csr.ok()) out.emplace_back(i, *std::move(csr));
  }
  return out;
}

void Check(const Selection& selection, int64_t first_block, int64_t num_blocks,
           const LayerSnapshot& keys, int64_t q_end) {
  const auto want = Reference(selection, first_block, num_blocks, keys, q_end);
  absl::StatusOr<std::vector<std::pair<size_t, SelectionCsr>>> got =
      StripeSelectionCsrs(selection, first_block, num_blocks, keys, q_end);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "stripe " << want[i].first);
    EXPECT_EQ((*got)[i].first, want[i].first);
    ExpectSameCsr((*got)[i].second, want[i].second);
  }
}

// Sorted disjoint spans in [0, limit), some entries empty, some spans long.
std::vector<Span> RandomSpans(std::mt19937_64& rng, int64_t limit) {
  std::vector<Span> spans;
  const int count = static_cast<int>(rng() % 7);
  int64_t at = 0;
  for (int i = 0; i < count && at < limit; ++i) {
    const int64_t begin = at + static_cast<int64_t>(rng() % static_cast<uint64_t>(limit / 4 + 1));
    if (begin >= limit) break;
    const int64_t len = 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(limit / 3 + 1));
    const int64_t end = std::min(limit, begin + len);
    spans.push_back({begin, end});
    at = end + static_cast<int64_t>(rng() % 3);  // Adjacent spans too.
  }
  return spans;
}

TEST(StripeSelectionCsrs, EqualsThePerStripeCutsOnRandomLayouts) {
  const uint64_t seed = ::dhsa::testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 300; ++trial) {
    SCOPED_TRACE(::testing::Message() << "trial " << trial);
    const int64_t block_size = std::vector<int64_t>{1, 3, 16, 64}[rng() % 4];
    const int64_t heads = 1 + static_cast<int64_t>(rng() % 4);
    const int64_t t0 = static_cast<int64_t>(rng() % 300);
    const int64_t lq = 1 + static_cast<int64_t>(rng() % 500);
    const int64_t lk = t0 + lq;
    Selection selection;
    selection.block_size = block_size;
    selection.num_heads = heads;
    selection.group = 2;
    // The selection may cover more blocks than the call's rows (as a router's does).
    selection.first_block = std::max<int64_t>(0, t0 / block_size - static_cast<int64_t>(rng() % 2));
    const int64_t last = (lk - 1) / block_size + static_cast<int64_t>(rng() % 2);
    selection.num_blocks = last - selection.first_block + 1;
    selection.spans.resize(static_cast<size_t>(heads * selection.num_blocks));
    for (auto& spans : selection.spans) spans = RandomSpans(rng, lk + 5);
    // Stripes: pieces of [0, lk + extra) with gaps, some of them past the last query row.
    LayerSnapshot keys;
    int64_t at = static_cast<int64_t>(rng() % 4);
    while (at < lk + 40) {
      StripeSnapshot s;
      s.begin = at;
      s.len = 1 + static_cast<int64_t>(rng() % 97);
      keys.stripes.push_back(s);
      at = s.end() + static_cast<int64_t>(rng() % 3);
    }
    const int64_t first = t0 / block_size, num = (lk - 1) / block_size - first + 1;
    Check(selection, first, num, keys, lk);
  }
}

TEST(StripeSelectionCsrs, StructuredLayouts) {
  // One span over every stripe; stripes of one token; no stripe reached; no stripes at all.
  Selection selection;
  selection.block_size = 16;
  selection.num_heads = 2;
  selection.first_block = 0;
  selection.num_blocks = 4;
  selection.spans.resize(8);
  selection.spans[0] = {{0, 64}};
  selection.spans[3] = {{5, 6}, {7, 30}, {40, 41}};
  selection.spans[7] = {{63, 64}};
  LayerSnapshot one_token;
  for (int64_t p = 0; p < 64; ++p) one_token.stripes.push_back({p, 1, nullptr});
  Check(selection, 0, 4, one_token, 64);
  Check(selection, 1, 3, one_token, 50);  // Rows [16, 50): stripes past row 49 see nothing.
  LayerSnapshot far;
  far.stripes.push_back({100, 50, nullptr});
  Check(selection, 0, 4, far, 64);
  Check(selection, 0, 4, LayerSnapshot{}, 64);
  LayerSnapshot halves;
  halves.stripes.push_back({0, 32, nullptr});
  halves.stripes.push_back({32, 32, nullptr});
  Check(selection, 0, 4, halves, 64);
}

TEST(StripeSelectionCsrs, RejectsWhatSelectionToCsrRejects) {
  Selection selection;
  selection.block_size = 4;
  selection.num_heads = 1;
  selection.num_blocks = 2;
  selection.spans = {{{5, 9}, {3, 4}}, {}};  // Out of order.
  LayerSnapshot keys;
  keys.stripes.push_back({0, 16, nullptr});
  EXPECT_FALSE(StripeSelectionCsrs(selection, 0, 2, keys, 8).ok());
  selection.spans = {{{0, 4}}, {}};
  EXPECT_FALSE(StripeSelectionCsrs(selection, 0, 3, keys, 8).ok());  // Blocks past the selection.
  selection.unit = SelectionUnit::kQueryHeadRow;
  EXPECT_FALSE(StripeSelectionCsrs(selection, 0, 2, keys, 8).ok());
}

}  // namespace
}  // namespace dhsa
