// The CUDA worker backend's device I/O, as the NCCL data plane uses it: q received into an
// AllocateDevice buffer and o, lse left on the device (PartialAttentionInputs::q_device,
// outputs_on_device) give the same bits as the host path (q uploaded from host memory, o and lse
// downloaded) on fresh random stripes (several per call, appended ones too), selections (empty
// entries, spans crossing stripes, more blocks than the rows) and row ranges (decode included);
// rows that see no key are o = 0, lse = -inf on the device too; a q of the wrong dtype or size is
// refused. One GPU (label gpu); skipped without a CUDA device.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "services/worker/cuda_backend.h"
#include "services/worker/kv_store.h"
#include "tests/kernels/test_util.h"
#include "tests/services/worker_test_util.h"

namespace dhsa {
namespace {

std::vector<uint8_t> Download(const WorkerDeviceBuffer& b) {
  std::vector<uint8_t> out(static_cast<size_t>(b.bytes()));
  EXPECT_EQ(cudaMemcpy(out.data(), b.data(), out.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  return out;
}

// Random per-(KV head, block) spans, sorted and disjoint, within [0, min(block end, len)).
Selection RandomSelection(int64_t hkv, int64_t group, int64_t block, int64_t first_block,
                          int64_t num_blocks, int64_t len, bool empty, std::mt19937_64& rng) {
  Selection s;
  s.block_size = block;
  s.num_heads = hkv;
  s.group = group;
  s.first_block = first_block;
  s.num_blocks = num_blocks;
  s.spans.resize(static_cast<size_t>(hkv * num_blocks));
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t b = 0; b < num_blocks; ++b) {
      if (empty || rng() % 7 == 0) continue;
      const int64_t limit = std::min(len, (first_block + b + 1) * block);
      int64_t at = 0;
      while (at < limit) {
        const int64_t begin = at + static_cast<int64_t>(rng() % static_cast<uint64_t>(block * 3));
        if (begin >= limit) break;
        const int64_t end =
            std::min(limit, begin + 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(90)));
        s.At(h, b).push_back({begin, end});
        at = end + 1;
      }
    }
  }
  return s;
}

TEST(CudaDeviceIo, SameBitsAsTheHostPath) {
  absl::StatusOr<std::unique_ptr<WorkerBackend>> created = CreateCudaWorkerBackend();
  if (!created.ok()) GTEST_SKIP() << created.status();
  WorkerBackend& backend = **created;
  const uint64_t seed = ::dhsa::testing::FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 24; ++trial) {
    const DType dtype = trial % 2 == 0 ? DType::kBF16 : DType::kF16;
    const int64_t hkv = 1 + trial % 3, group = 1 + trial % 4, d = trial % 3 == 0 ? 64 : 128;
    const int64_t block = trial % 4 == 0 ? 16 : 64;
    const int64_t len = 200 + static_cast<int64_t>(rng() % 900);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << " " << DTypeName(dtype) << " hkv "
                                      << hkv << " group " << group << " d " << d << " len " << len);
    KvStore store(int64_t{1} << 30, backend.memory());
    const Tensor k = RandomNormal(dtype, {hkv, len, d}, rng);
    const Tensor v = RandomNormal(dtype, {hkv, len, d}, rng);
    for (int64_t pos = 0; pos < len;) {
      const int64_t n = std::min<int64_t>(len - pos, 1 + static_cast<int64_t>(rng() % 300));
      KvWrite w;
      w.sequence_id = "s";
      w.begin = pos;
      w.num_tokens = n;
      w.kv_heads = hkv;
      w.head_dim = d;
      w.dtype = dtype;
      w.append = pos > 0 && rng() % 3 == 0;
      absl::StatusOr<KvReservation> r = store.Reserve(w);
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_TRUE(
          store.Commit(std::move(*r), SliceRows(k, pos, pos + n), SliceRows(v, pos, pos + n)).ok());
      pos += n;
    }
    const LayerSnapshot snap = store.Snapshot("s", 0).value();
    const int64_t lq = trial % 5 == 0 ? 1 : 1 + static_cast<int64_t>(rng() % 150);
    const int64_t q_begin = len - lq - static_cast<int64_t>(rng() % 2);  // Not always the end.
    const int64_t first = std::max<int64_t>(0, q_begin / block - 1);
    const int64_t num = (q_begin + lq - 1) / block - first + 1;
    const bool empty = trial == 7;  // No span at all: o = 0, lse = -inf.
    const Selection sel = RandomSelection(hkv, group, block, first, num, len, empty, rng);
    ASSERT_TRUE(CheckSpansHeld(sel, snap, "s", 0).ok());
    const Tensor q = RandomNormal(dtype, {hkv * group, lq, d}, rng);

    PartialAttentionInputs in;
    in.q = &q;
    in.q_begin = q_begin;
    in.selection = &sel;
    in.keys = &snap;
    in.scale = 0.09f;
    absl::StatusOr<PartialAttention> host = backend.Compute(in);
    ASSERT_TRUE(host.ok()) << host.status();

    absl::StatusOr<std::shared_ptr<WorkerDeviceBuffer>> q_dev =
        backend.AllocateDevice(static_cast<int64_t>(q.bytes.size()));
    ASSERT_TRUE(q_dev.ok()) << q_dev.status();
    ASSERT_EQ(cudaMemcpy((*q_dev)->data(), q.data(), q.bytes.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
    Tensor shape_only;
    shape_only.dtype = q.dtype;
    shape_only.shape = q.shape;
    in.q = &shape_only;
    in.q_device = q_dev->get();
    in.outputs_on_device = true;
    absl::StatusOr<PartialAttention> dev = backend.Compute(in);
    ASSERT_TRUE(dev.ok()) << dev.status();
    ASSERT_NE(dev->o_device, nullptr);
    ASSERT_NE(dev->lse_device, nullptr);
    EXPECT_TRUE(dev->o.bytes.empty());
    const std::vector<uint8_t> o = Download(*dev->o_device), lse = Download(*dev->lse_device);
    ASSERT_EQ(o.size(), host->o.bytes.size());
    ASSERT_EQ(lse.size(), host->lse.bytes.size());
    EXPECT_EQ(std::memcmp(o.data(), host->o.bytes.data(), o.size()), 0);
    EXPECT_EQ(std::memcmp(lse.data(), host->lse.bytes.data(), lse.size()), 0);
    EXPECT_EQ(dev->computed_pairs, host->computed_pairs);
    if (empty) {
      const float* l = reinterpret_cast<const float*>(lse.data());
      EXPECT_EQ(l[0], -std::numeric_limits<float>::infinity());
      EXPECT_EQ(reinterpret_cast<const float*>(o.data())[0], 0.0f);
    }
    // q of another dtype than the keys', or too small, is refused.
    Tensor wrong = shape_only;
    wrong.dtype = dtype == DType::kBF16 ? DType::kF16 : DType::kBF16;
    in.q = &wrong;
    EXPECT_EQ(backend.Compute(in).status().code(), absl::StatusCode::kInvalidArgument);
    absl::StatusOr<std::shared_ptr<WorkerDeviceBuffer>> small = backend.AllocateDevice(16);
    ASSERT_TRUE(small.ok());
    in.q = &shape_only;
    in.q_device = small->get();
    EXPECT_EQ(backend.Compute(in).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace dhsa
