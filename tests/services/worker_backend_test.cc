// The worker's backend selection (services/worker/backend.h) and the KV store over a KvMemory other
// than plain host memory, without a GPU: what CI checks of the CUDA backend's plumbing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>

#include "dhsa/v1/worker.grpc.pb.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/merge/merge.h"
#include "services/worker/backend.h"
#include "services/worker/kv_store.h"
#include "services/worker/partial_attention.h"
#include "services/worker/worker_server.h"
#include "tests/services/worker_test_util.h"

namespace dhsa {
namespace {

using ::testing::HasSubstr;

TEST(WorkerBackend, CpuIsAlwaysThere) {
  absl::StatusOr<std::unique_ptr<WorkerBackend>> cpu = CreateWorkerBackend("cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->name(), "cpu");
  EXPECT_EQ((*cpu)->memory()->name(), "host");
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    EXPECT_TRUE((*cpu)->CheckLayout(5, dtype).ok());
  }
  absl::StatusOr<DeviceMemoryInfo> device = (*cpu)->DeviceMemory();
  ASSERT_TRUE(device.ok());
  EXPECT_EQ(device->total_bytes, 0);
  EXPECT_EQ(device->free_bytes, 0);
}

TEST(WorkerBackend, UnknownNamesAreInvalid) {
  for (const char* name : {"tpu", "", "CPU", "cuda "}) {
    absl::Status s = CreateWorkerBackend(name).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_THAT(std::string(s.message()), HasSubstr("expected \"cpu\" or \"cuda\"")) << name;
    EXPECT_EQ(DefaultCapacityBytes(name, 1).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

// Without CUDA in the build, "cuda" is a configuration error that names the build option; with
// it, either a device is there or the error says there is none.
TEST(WorkerBackend, CudaNeedsTheBuildOptionAndADevice) {
  absl::StatusOr<std::unique_ptr<WorkerBackend>> cuda = CreateWorkerBackend("cuda");
  if (!WorkerBackendCudaBuilt()) {
    ASSERT_EQ(cuda.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(cuda.status().message()), HasSubstr("-DDHSA_WITH_CUDA=ON"));
    EXPECT_THAT(std::string(cuda.status().message()), HasSubstr("--backend=cpu"));
    EXPECT_EQ(DefaultCapacityBytes("cuda", 1).status().code(), absl::StatusCode::kInvalidArgument);
    WorkerOptions o;
    o.listen_address = "127.0.0.1:0";
    o.backend = "cuda";
    EXPECT_EQ(WorkerServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
    return;
  }
  if (!cuda.ok()) {
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition) << cuda.status();
    EXPECT_THAT(std::string(cuda.status().message()), HasSubstr("no usable CUDA device"));
    return;
  }
  EXPECT_EQ((*cuda)->name(), "cuda");
  EXPECT_EQ((*cuda)->memory()->name(), "cuda");
  EXPECT_TRUE((*cuda)->CheckLayout(128, DType::kBF16).ok());
  EXPECT_TRUE((*cuda)->CheckLayout(64, DType::kF16).ok());
  const absl::Status f32 = (*cuda)->CheckLayout(128, DType::kF32);
  EXPECT_EQ(f32.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(f32.message()), HasSubstr("--backend=cpu"));
  EXPECT_EQ((*cuda)->CheckLayout(96, DType::kBF16).code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<DeviceMemoryInfo> device = (*cuda)->DeviceMemory();
  ASSERT_TRUE(device.ok()) << device.status();
  EXPECT_GT(device->total_bytes, 0);
  absl::StatusOr<int64_t> capacity = DefaultCapacityBytes("cuda", 2);
  ASSERT_TRUE(capacity.ok());
  EXPECT_GT(*capacity, 0);
  EXPECT_LE(*capacity, device->total_bytes / 4);
}

TEST(WorkerBackend, CpuDefaultCapacityIsHalfThePhysicalMemoryShared) {
  absl::StatusOr<int64_t> one = DefaultCapacityBytes("cpu", 1);
  absl::StatusOr<int64_t> four = DefaultCapacityBytes("cpu", 4);
  ASSERT_TRUE(one.ok() && four.ok());
  const int64_t physical = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  EXPECT_EQ(*one, physical / 2);
  EXPECT_EQ(*four, std::max<int64_t>(int64_t{1} << 26, physical / 2 / 4));
}

// Host memory with a byte budget that counts allocations and copies, and fails on demand: the
// store's path through a KvMemory that can run out (as a device does).
class TestMemory final : public KvMemory {
 public:
  explicit TestMemory(size_t budget) : budget_(budget) {}
  std::string name() const override { return "test"; }
  absl::StatusOr<std::unique_ptr<KvBlock>> Allocate(size_t bytes) override {
    if (bytes > budget_ - used_) return absl::ResourceExhaustedError("test memory is full");
    used_ += bytes;
    ++allocations;
    return host_.Allocate(bytes);
  }
  absl::Status CopyIn(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                      size_t rows) override {
    if (fail_copies) return absl::InternalError("test copy failure");
    ++copies_in;
    last_rows = rows;
    last_dst_pitch = dst_pitch;
    return host_.CopyIn(dst, dst_pitch, src, src_pitch, width, rows);
  }
  absl::Status CopyWithin(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                          size_t width, size_t rows) override {
    ++copies_within;
    return host_.CopyWithin(dst, dst_pitch, src, src_pitch, width, rows);
  }

  int allocations = 0, copies_in = 0, copies_within = 0;
  size_t last_rows = 0, last_dst_pitch = 0;
  bool fail_copies = false;

 private:
  HostKvMemory host_;
  const size_t budget_;
  size_t used_ = 0;
};

KvWrite Write(int64_t begin, int64_t n, bool append) {
  KvWrite w;
  w.sequence_id = "s";
  w.begin = begin;
  w.num_tokens = n;
  w.kv_heads = 3;
  w.head_dim = 4;
  w.dtype = DType::kBF16;
  w.append = append;
  return w;
}

absl::Status Store(KvStore& store, const KvWrite& w, const Tensor& all) {
  absl::StatusOr<KvReservation> r = store.Reserve(w);
  if (!r.ok()) return r.status();
  const Tensor part = SliceRows(all, w.begin, w.begin + w.num_tokens);
  return store.Commit(std::move(*r), part, part).status();
}

// Keys of stripe 0 of the snapshot, read back row by row through its view (head stride included).
Tensor ReadKeys(const LayerSnapshot& snap) {
  const HeadsView k = snap.Keys(0);
  const size_t row = static_cast<size_t>(k.dim) * DTypeSize(k.dtype);
  Tensor out = Tensor::Zeros(k.dtype, {k.heads, k.len, k.dim});
  for (int64_t h = 0; h < k.heads; ++h) {
    for (int64_t r = 0; r < k.len; ++r) {
      std::memcpy(out.bytes.data() + (h * k.len + r) * row,
                  static_cast<const uint8_t*>(k.data) + (h * k.head_stride + r * k.dim) * 2, row);
    }
  }
  return out;
}

TEST(KvStoreOverMemory, AppendsUsePitchedCopiesAndGrowWithinTheMemory) {
  std::mt19937_64 rng(std::random_device{}());
  auto memory = std::make_shared<TestMemory>(size_t{1} << 20);
  KvStore store(1 << 20, memory);
  const Tensor all = RandomNormal(DType::kBF16, {3, 21, 4}, rng);
  ASSERT_TRUE(Store(store, Write(0, 5, false), all).ok());
  EXPECT_EQ(memory->allocations, 2);  // k and v.
  for (int64_t pos = 5; pos < 21; ++pos) ASSERT_TRUE(Store(store, Write(pos, 1, true), all).ok());
  // Capacity 5 -> 10 -> 20 -> 40: three growths, each a k and a v block copied within.
  EXPECT_EQ(memory->allocations, 8);
  EXPECT_EQ(memory->copies_within, 6);
  // An append writes one row per head, at the buffer's pitch.
  EXPECT_EQ(memory->last_rows, 3u);
  EXPECT_EQ(memory->last_dst_pitch, 40u * 4 * 2);
  const LayerSnapshot snap = store.Snapshot("s", 0).value();
  EXPECT_EQ(snap.stripes[0].buffer->capacity_tokens, 40);
  EXPECT_EQ(ReadKeys(snap).bytes, all.bytes);
}

TEST(KvStoreOverMemory, AFullMemoryFailsTheCommitAndStoresNothing) {
  std::mt19937_64 rng(std::random_device{}());
  // The capacity allows 100 tokens, the memory only 2 blocks of 10 tokens (3 heads x 4 x 2 bytes).
  auto memory = std::make_shared<TestMemory>(2 * 10 * 3 * 4 * 2);
  KvStore store(100 * 2 * 3 * 4 * 2, memory);
  const Tensor all = RandomNormal(DType::kBF16, {3, 30, 4}, rng);
  ASSERT_TRUE(Store(store, Write(0, 10, false), all).ok());
  const absl::Status s = Store(store, Write(10, 10, true), all);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  const absl::Status fresh = Store(store, Write(20, 5, false), all);
  EXPECT_EQ(fresh.code(), absl::StatusCode::kResourceExhausted) << fresh;
  const KvStats stats = store.Stats();
  EXPECT_EQ(stats.held_bytes, 10 * 2 * 3 * 4 * 2);
  EXPECT_EQ(stats.stripes, 1);
  const LayerSnapshot snap = store.Snapshot("s", 0).value();
  ASSERT_EQ(snap.stripes.size(), 1u);
  EXPECT_EQ(snap.stripes[0].len, 10);
  EXPECT_EQ(ReadKeys(snap).bytes, SliceRows(all, 0, 10).bytes);
  // Nothing stays reserved: the whole capacity minus what is held can still be reserved.
  EXPECT_TRUE(store.Reserve(Write(10, 90, true)).ok());
}

TEST(KvStoreOverMemory, AFailedCopyStoresNothing) {
  std::mt19937_64 rng(std::random_device{}());
  auto memory = std::make_shared<TestMemory>(size_t{1} << 20);
  KvStore store(1 << 20, memory);
  const Tensor all = RandomNormal(DType::kBF16, {3, 30, 4}, rng);
  ASSERT_TRUE(Store(store, Write(0, 10, false), all).ok());
  memory->fail_copies = true;
  EXPECT_EQ(Store(store, Write(10, 3, true), all).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(Store(store, Write(20, 3, false), all).code(), absl::StatusCode::kInternal);
  memory->fail_copies = false;
  const LayerSnapshot snap = store.Snapshot("s", 0).value();
  ASSERT_EQ(snap.stripes.size(), 1u);
  EXPECT_EQ(snap.stripes[0].len, 10);
  EXPECT_EQ(store.Stats().held_bytes, 10 * 2 * 3 * 4 * 2);
  ASSERT_TRUE(Store(store, Write(10, 3, true), all).ok());
  EXPECT_EQ(ReadKeys(store.Snapshot("s", 0).value()).bytes, SliceRows(all, 0, 13).bytes);
}

TEST(WorkerStats, ReportBackendAndDeviceMemory) {
  WorkerOptions o;
  o.listen_address = "127.0.0.1:0";
  o.capacity_bytes = 1 << 20;
  o.threads = 1;
  absl::StatusOr<std::unique_ptr<WorkerServer>> server = WorkerServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Worker::NewStub((*server)->InProcessChannel());
  grpc::ClientContext context;
  v1::StatsResponse stats;
  ASSERT_TRUE(stub->Stats(&context, v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.backend(), "cpu");
  EXPECT_EQ(stats.capacity_bytes(), 1 << 20);
  EXPECT_EQ(stats.device_memory_total_bytes(), 0);
  EXPECT_EQ(stats.device_memory_free_bytes(), 0);
}

// The CUDA backend's decomposition, checked with the reference kernel on the host: each stripe
// attended alone over SelectionForStripe's cut (the blocks of the query rows only, spans cut to the
// stripe and to the last row), the partials merged by LSE, equals the worker's one-call partial
// over the whole selection. Random stripes (new and appended), random rows (decode included),
// selections covering more blocks than the rows.
TEST(SelectionForStripe, PerStripePartialsMergeToTheWholePartial) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  constexpr int64_t kHkv = 3, kGroup = 2, kDim = 5, kLen = 61, kBlock = 8;
  for (int trial = 0; trial < 40; ++trial) {
    SCOPED_TRACE(::testing::Message() << "trial " << trial);
    KvStore store(1 << 20);
    const Tensor all = RandomNormal(DType::kF32, {kHkv, kLen, kDim}, rng);
    // Stripes of random lengths; some grown by appends.
    for (int64_t pos = 0; pos < kLen;) {
      const int64_t n =
          std::min<int64_t>(kLen - pos, std::uniform_int_distribution<int64_t>(1, 17)(rng));
      KvWrite w;
      w.sequence_id = "s";
      w.begin = pos;
      w.num_tokens = n;
      w.kv_heads = kHkv;
      w.head_dim = kDim;
      w.dtype = DType::kF32;
      w.append = pos > 0 && std::uniform_int_distribution<int>(0, 2)(rng) == 0;
      absl::StatusOr<KvReservation> r = store.Reserve(w);
      ASSERT_TRUE(r.ok()) << r.status();
      const Tensor part = SliceRows(all, pos, pos + n);
      ASSERT_TRUE(store.Commit(std::move(*r), part, part).ok());
      pos += n;
    }
    const LayerSnapshot snap = store.Snapshot("s", 0).value();
    const int64_t lq = trial % 4 == 0 ? 1 : std::uniform_int_distribution<int64_t>(1, 20)(rng);
    const int64_t q_begin = std::uniform_int_distribution<int64_t>(0, kLen - lq)(rng);
    const int64_t sel_begin = std::max<int64_t>(0, q_begin - 9);  // More blocks than the rows.
    const Selection sel =
        RandomSelection(kHkv, kGroup, kBlock, sel_begin, q_begin + lq - sel_begin, kLen, rng);
    const Tensor q = RandomNormal(DType::kF32, {kHkv * kGroup, lq, kDim}, rng);
    ASSERT_TRUE(CheckSpansHeld(sel, snap, "s", 0).ok());

    PartialAttentionInputs in;
    in.q = &q;
    in.q_begin = q_begin;
    in.selection = &sel;
    in.keys = &snap;
    in.scale = 0.7f;
    absl::StatusOr<PartialAttention> whole = ComputePartialAttention(in);
    ASSERT_TRUE(whole.ok()) << whole.status();

    const int64_t first = q_begin / kBlock, count = (q_begin + lq - 1) / kBlock - first + 1;
    const int64_t rows = kHkv * kGroup * lq;
    std::vector<std::vector<float>> part_o, part_lse;
    for (size_t i = 0; i < snap.stripes.size(); ++i) {
      const StripeSnapshot& s = snap.stripes[i];
      const int64_t hi = std::min(s.end(), q_begin + lq);
      bool any = false;
      const Selection cut = SelectionForStripe(sel, first, count, s.begin, hi, &any);
      ASSERT_EQ(cut.first_block, first);
      ASSERT_EQ(cut.num_blocks, count);
      bool seen = false;
      for (const std::vector<Span>& spans : cut.spans) {
        for (const Span& span : spans) {
          EXPECT_LE(s.begin, span.begin);
          EXPECT_LT(span.begin, span.end);
          EXPECT_LE(span.end, hi);
          seen = true;
        }
      }
      EXPECT_EQ(any, seen);
      if (!any) continue;
      SparseAttentionParams p;
      p.q = HeadsView::Of(q, "q").value();
      p.q.offset = q_begin;
      p.k = snap.Keys(i);
      p.v = snap.Values(i);
      p.selection = &cut;
      p.scale = 0.7f;
      part_o.emplace_back(static_cast<size_t>(rows * kDim));
      part_lse.emplace_back(static_cast<size_t>(rows));
      p.o = OutputView{part_o.back().data(), kHkv * kGroup, lq, kDim};
      p.lse = OutputView{part_lse.back().data(), kHkv * kGroup, lq, 1};
      ASSERT_TRUE(SparseAttentionReference(p).ok());
    }
    ReferenceResult merged;
    merged.o = Tensor::Zeros(DType::kF32, {kHkv * kGroup, lq, kDim});
    merged.lse = Tensor::Zeros(DType::kF32, {kHkv * kGroup, lq});
    std::vector<PartialView> views;
    for (size_t i = 0; i < part_o.size(); ++i)
      views.push_back({part_o[i].data(), part_lse[i].data()});
    if (views.empty()) {
      float* lse = static_cast<float*>(merged.lse.data());
      std::fill(lse, lse + rows, -std::numeric_limits<float>::infinity());
    } else {
      ASSERT_TRUE(MergePartialsReference(views, rows, kDim, static_cast<float*>(merged.o.data()),
                                         static_cast<float*>(merged.lse.data()))
                      .ok());
    }
    ExpectMatchesReference(whole->o, whole->lse, merged);
  }
}

}  // namespace
}  // namespace dhsa
