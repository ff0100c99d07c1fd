// The worker's storage and partial attention, without gRPC.
#include "services/worker/kv_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "services/worker/partial_attention.h"
#include "tests/services/worker_test_util.h"

namespace dhsa {
namespace {

using ::testing::HasSubstr;

KvWrite Write(int64_t begin, int64_t n, bool append) {
  KvWrite w;
  w.sequence_id = "s";
  w.begin = begin;
  w.num_tokens = n;
  w.kv_heads = 3;
  w.head_dim = 5;
  w.dtype = DType::kF32;
  w.append = append;
  return w;
}

class KvStoreTest : public ::testing::Test {
 protected:
  KvStoreTest() : seed_(std::random_device{}()), rng_(seed_) {}
  std::string Seed() const { return absl::StrCat("seed ", seed_); }

  absl::Status Store(KvStore& store, const KvWrite& w, const Tensor& all) {
    absl::StatusOr<KvReservation> r = store.Reserve(w);
    if (!r.ok()) return r.status();
    const Tensor part = SliceRows(all, w.begin, w.begin + w.num_tokens);
    return store.Commit(std::move(*r), part, part).status();
  }

  const uint64_t seed_;
  std::mt19937_64 rng_;
};

TEST_F(KvStoreTest, AppendsGrowInPlaceAndSnapshotsStayValid) {
  SCOPED_TRACE(Seed());
  KvStore store(1 << 20);
  const Tensor all = RandomNormal(DType::kF32, {3, 40, 5}, rng_);
  ASSERT_TRUE(Store(store, Write(0, 3, false), all).ok());
  const LayerSnapshot first = store.Snapshot("s", 0).value();
  for (int64_t pos = 3; pos < 40; ++pos) ASSERT_TRUE(Store(store, Write(pos, 1, true), all).ok());
  const LayerSnapshot last = store.Snapshot("s", 0).value();
  ASSERT_EQ(first.stripes.size(), 1u);
  ASSERT_EQ(last.stripes.size(), 1u);
  EXPECT_EQ(first.stripes[0].len, 3);
  EXPECT_EQ(last.stripes[0].len, 40);
  EXPECT_GE(last.stripes[0].buffer->capacity_tokens, 40);
  const HeadsView old_view = first.Keys(0), view = last.Keys(0),
                  all_view = HeadsView::Of(all, "k").value();
  for (int64_t h = 0; h < 3; ++h) {
    for (int64_t t = 0; t < 40; ++t) {
      for (int64_t c = 0; c < 5; ++c) {
        ASSERT_EQ(view.At(h, t, c), all_view.At(h, t, c)) << h << " " << t << " " << c;
        if (t < 3) {
          ASSERT_EQ(old_view.At(h, t, c), all_view.At(h, t, c));
        }
      }
    }
  }
  const KvStats stats = store.Stats();
  EXPECT_EQ(stats.held_bytes, 2 * 3 * 40 * 5 * 4);
  EXPECT_EQ(stats.allocated_bytes, 2 * 3 * last.stripes[0].buffer->capacity_tokens * 5 * 4);
}

TEST_F(KvStoreTest, ReservationsAreReleasedAndRechecked) {
  SCOPED_TRACE(Seed());
  const Tensor all = RandomNormal(DType::kF32, {3, 40, 5}, rng_);
  KvStore store(2 * 3 * 20 * 5 * 4);  // Room for 20 tokens.
  {
    absl::StatusOr<KvReservation> r = store.Reserve(Write(0, 20, false));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(store.Reserve(Write(20, 1, false)).status().code(),
              absl::StatusCode::kResourceExhausted);
  }  // Abandoned: released.
  absl::StatusOr<KvReservation> a = store.Reserve(Write(0, 10, false));
  absl::StatusOr<KvReservation> b =
      store.Reserve(Write(5, 10, false));  // Overlaps a, not yet held.
  ASSERT_TRUE(a.ok() && b.ok());
  const Tensor part = SliceRows(all, 0, 10);
  ASSERT_TRUE(store.Commit(std::move(*a), part, part).ok());
  const absl::Status s = store.Commit(std::move(*b), part, part).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("[0, 10)"));
  EXPECT_EQ(store.Stats().held_bytes, 2 * 3 * 10 * 5 * 4);
  EXPECT_TRUE(store.Reserve(Write(10, 10, true)).ok());  // b's bytes came back.
}

TEST_F(KvStoreTest, CancelledBetweenStripes) {
  SCOPED_TRACE(Seed());
  KvStore store(1 << 20);
  const Tensor all = RandomNormal(DType::kF32, {3, 40, 5}, rng_);
  for (int64_t b : {0, 10, 25}) {
    ASSERT_TRUE(Store(store, Write(b, b == 25 ? 15 : (b == 0 ? 10 : 15), false), all).ok());
  }
  const LayerSnapshot keys = store.Snapshot("s", 0).value();
  const Tensor q = RandomNormal(DType::kF32, {6, 4, 5}, rng_);
  Selection sel = RandomSelection(3, 2, 8, 36, 4, 40, rng_);
  for (std::vector<Span>& spans : sel.spans) spans = {{0, 40}};
  ASSERT_TRUE(CheckSpansHeld(sel, keys, "s", 0).ok());
  PartialAttentionInputs in;
  in.q = &q;
  in.q_begin = 36;
  in.selection = &sel;
  in.keys = &keys;
  in.scale = 0.5f;
  int polls = 0;
  in.cancelled = [&] { return ++polls > 1; };
  const absl::Status s = ComputePartialAttention(in).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(std::string(s.message()), HasSubstr("after 1 of 3 stripes"));

  in.cancelled = nullptr;
  absl::StatusOr<PartialAttention> full = ComputePartialAttention(in);
  ASSERT_TRUE(full.ok()) << full.status();
  ExpectMatchesReference(full->o, full->lse, Reference(q, 36, all, all, sel, 0.5f));
}

}  // namespace
}  // namespace dhsa
