// The worker's storage and partial attention, without gRPC.
#include "services/worker/kv_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
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

// Cancellation is polled before the kernel and between its tiles.
TEST_F(KvStoreTest, CancelledBeforeOrDuringTheKernel) {
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
  for (int allowed : {0, 1, 2}) {
    SCOPED_TRACE(::testing::Message() << allowed << " polls answered false");
    std::atomic<int> polls{0};
    in.cancelled = [&] { return ++polls > allowed; };
    const absl::Status s = ComputePartialAttention(in).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
    EXPECT_THAT(std::string(s.message()), HasSubstr("Attend cancelled by the client"));
  }

  in.cancelled = nullptr;
  absl::StatusOr<PartialAttention> full = ComputePartialAttention(in);
  ASSERT_TRUE(full.ok()) << full.status();
  ExpectMatchesReference(full->o, full->lse, Reference(q, 36, all, all, sel, 0.5f));
}

// Attention of `q` (rows from q_begin) over every key `store` holds for ("s", 0), with every entry
// selecting [0, lk), against the reference over `keys` (k = v = keys, as Store writes them).
void ExpectAttendsLike(const KvStore& store, const Tensor& keys, int64_t lk, std::mt19937_64& rng) {
  const LayerSnapshot snap = store.Snapshot("s", 0).value();
  const int64_t lq = 4, q_begin = lk - lq;
  const Tensor q = RandomNormal(DType::kF32, {6, lq, 5}, rng);
  Selection sel = RandomSelection(3, 2, 8, q_begin, lq, lk, rng);
  for (std::vector<Span>& spans : sel.spans) spans = {{0, lk}};
  ASSERT_TRUE(CheckSpansHeld(sel, snap, "s", 0).ok());
  PartialAttentionInputs in;
  in.q = &q;
  in.q_begin = q_begin;
  in.selection = &sel;
  in.keys = &snap;
  in.scale = 0.5f;
  absl::StatusOr<PartialAttention> got = ComputePartialAttention(in);
  ASSERT_TRUE(got.ok()) << got.status();
  const Tensor prefix = SliceRows(keys, 0, lk);
  ExpectMatchesReference(got->o, got->lse, Reference(q, q_begin, prefix, prefix, sel, 0.5f));
}

// Bytes of n tokens of Write()'s shapes.
constexpr int64_t Tokens(int64_t n) { return 2 * 3 * n * 5 * 4; }

TEST_F(KvStoreTest, TruncateCutsStripesAndAppendsResume) {
  SCOPED_TRACE(Seed());
  KvStore store(1 << 20);
  const Tensor all = RandomNormal(DType::kF32, {3, 60, 5}, rng_);
  // Stripe A [0, 20), stripe B [20, 45) grown by an append to [20, 50).
  ASSERT_TRUE(Store(store, Write(0, 20, false), all).ok());
  ASSERT_TRUE(Store(store, Write(20, 25, false), all).ok());
  ASSERT_TRUE(Store(store, Write(45, 5, true), all).ok());
  const int64_t allocated = store.Stats().allocated_bytes;
  const LayerSnapshot before = store.Snapshot("s", 0).value();

  // In the middle of B: B keeps [20, 30) and its buffer.
  absl::StatusOr<KvTruncation> cut = store.Truncate("s", 0, 30);
  ASSERT_TRUE(cut.ok()) << cut.status();
  EXPECT_EQ(cut->freed_bytes, Tokens(20));
  EXPECT_EQ(cut->held_bytes, Tokens(30));
  KvStats stats = store.Stats();
  EXPECT_EQ(stats.held_bytes, Tokens(30));
  EXPECT_EQ(stats.allocated_bytes, allocated);
  EXPECT_EQ(stats.stripes, 2);
  LayerSnapshot snap = store.Snapshot("s", 0).value();
  ASSERT_EQ(snap.stripes.size(), 2u);
  EXPECT_EQ(snap.stripes[1].begin, 20);
  EXPECT_EQ(snap.stripes[1].len, 10);
  // Again, and past the end: nothing more goes.
  EXPECT_EQ(store.Truncate("s", 0, 30)->freed_bytes, 0);
  EXPECT_EQ(store.Truncate("s", 0, 1000)->freed_bytes, 0);
  EXPECT_EQ(store.Stats().held_bytes, Tokens(30));
  // Positions past the cut are no longer held: appending must start at 30 exactly.
  EXPECT_EQ(store.Reserve(Write(50, 1, true)).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // Other keys at the cut point. `before` still reads B's old rows [30, 50): the append writes a
  // copy of the buffer, not over them.
  const Tensor fresh = RandomNormal(DType::kF32, {3, 60, 5}, rng_);
  ASSERT_TRUE(Store(store, Write(30, 25, true), fresh).ok());
  EXPECT_EQ(store.Stats().held_bytes, Tokens(55));
  const HeadsView old_b = before.Keys(1), all_view = HeadsView::Of(all, "k").value();
  for (int64_t h = 0; h < 3; ++h) {
    for (int64_t t = 20; t < 50; ++t) {
      for (int64_t c = 0; c < 5; ++c) ASSERT_EQ(old_b.At(h, t - 20, c), all_view.At(h, t, c));
    }
  }
  const Tensor keys = WithRows(all, fresh, 30, 55);
  ExpectAttendsLike(store, keys, 55, rng_);

  // At a stripe start: B goes whole (and its buffers with it); A takes the next tokens.
  cut = store.Truncate("s", 0, 20);
  ASSERT_TRUE(cut.ok());
  EXPECT_EQ(cut->freed_bytes, Tokens(35));
  stats = store.Stats();
  EXPECT_EQ(stats.held_bytes, Tokens(20));
  EXPECT_EQ(stats.stripes, 1);
  EXPECT_EQ(stats.allocated_bytes, Tokens(20));  // A alone, never grown.
  ASSERT_TRUE(Store(store, Write(20, 15, true), fresh).ok());
  ExpectAttendsLike(store, WithRows(all, fresh, 20, 35), 35, rng_);

  // Another layer and unknown ids are untouched; bad arguments are refused.
  KvWrite other = Write(0, 7, false);
  other.layer = 1;
  ASSERT_TRUE(Store(store, other, all).ok());
  EXPECT_EQ(store.Truncate("s", 2, 0)->freed_bytes, 0);
  EXPECT_EQ(store.Truncate("nope", 0, 0)->freed_bytes, 0);
  EXPECT_EQ(store.Truncate("", 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Truncate("s", -1, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Truncate("s", 0, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Stats().held_bytes, Tokens(35 + 7));

  // To 0: the layer goes, then the sequence with its last layer.
  EXPECT_EQ(store.Truncate("s", 0, 0)->freed_bytes, Tokens(35));
  EXPECT_EQ(store.Snapshot("s", 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.Stats().sequences, 1);
  EXPECT_EQ(store.Truncate("s", 1, 0)->freed_bytes, Tokens(7));
  stats = store.Stats();
  EXPECT_EQ(stats.held_bytes, 0);
  EXPECT_EQ(stats.allocated_bytes, 0);
  EXPECT_EQ(stats.sequences, 0);
  EXPECT_EQ(stats.stripes, 0);
}

TEST_F(KvStoreTest, TruncateFencesWritesInFlight) {
  SCOPED_TRACE(Seed());
  KvStore store(Tokens(40));
  const Tensor all = RandomNormal(DType::kF32, {3, 40, 5}, rng_);
  ASSERT_TRUE(Store(store, Write(0, 10, false), all).ok());
  // Reserved before the truncate: an append to layer 0, a new stripe of layer 1.
  absl::StatusOr<KvReservation> stale = store.Reserve(Write(10, 10, true));
  KvWrite layer1 = Write(0, 10, false);
  layer1.layer = 1;
  absl::StatusOr<KvReservation> elsewhere = store.Reserve(layer1);
  ASSERT_TRUE(stale.ok() && elsewhere.ok());
  ASSERT_EQ(store.Truncate("s", 0, 10)->freed_bytes, 0);  // Nothing to cut; the write is fenced.
  const Tensor part = SliceRows(all, 10, 20);
  const absl::Status s = store.Commit(std::move(*stale), part, part).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("truncated while this write was in flight"));
  EXPECT_TRUE(store.Commit(std::move(*elsewhere), part, part).ok());  // Other layer: not fenced.
  EXPECT_EQ(store.Stats().held_bytes, Tokens(20));
  // A write reserved after the truncate lands, and the fenced bytes came back: 20 tokens fit.
  ASSERT_TRUE(Store(store, Write(10, 20, true), all).ok());
  EXPECT_EQ(store.Stats().held_bytes, Tokens(40));
}

}  // namespace
}  // namespace dhsa
