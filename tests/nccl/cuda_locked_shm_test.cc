// The CUDA worker's shared-memory I/O at page-locked speed (services/transport/shm_arena.h
// "Page-locking", services/worker/cuda_backend.cc): an embedded service with a CUDA worker, its
// router's tensors over shared memory, computes every call twice, once with the arena regions
// page-locked and used in place (q uploaded from the router's arena, o and lse downloaded into it,
// k and v stored from it) and once with DHSA_WORKER_SHM_LOCKED=0 (the pageable path of before),
// on two sequences fed the same inputs; the results must be equal to the bit (same kernels, only
// the copies change), over prefill, decode and a chunked prefill, random odd sizes, bf16 and f16,
// d 64 and 128. The arenas are page-locked while the service runs and unlocked once it is gone.
// One CUDA device; skipped without one.
#include <cuda_runtime_api.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "services/transport/shm_arena.h"
#include "tests/cpu/cpu_test_util.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router {
namespace {

using ::dhsa::router_test::Inputs;
using ::dhsa::router_test::MakeInputs;
using ::dhsa::router_test::Rows;
using ::dhsa::testing::FreshSeed;

struct Case {
  int64_t hq, hkv, dim, len;
  DType dtype;
  int64_t budget;
};

bool SameBits(const Tensor& a, const Tensor& b) {
  return a.dtype == b.dtype && a.shape == b.shape && a.bytes.size() == b.bytes.size() &&
         std::memcmp(a.bytes.data(), b.bytes.data(), a.bytes.size()) == 0;
}

TEST(CudaLockedShm, LockedArenasEqualThePageablePathToTheBit) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  ASSERT_EQ(transport::ShmLockedBytes(), 0);
  {
    EmbeddedOptions o;
    o.num_workers = 1;
    o.stripe_tokens = 512;
    o.threads = 4;
    o.backend = "cuda";
    o.capacity_bytes_per_worker = int64_t{1} << 30;
    o.selection_device = "cpu";
    absl::StatusOr<std::unique_ptr<EmbeddedService>> s = EmbeddedService::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    absl::StatusOr<Client> client = Client::Connect((*s)->router_address());
    ASSERT_TRUE(client.ok()) << client.status();
    std::uniform_int_distribution<int64_t> jitter(0, 300);
    for (const Case& c : {Case{8, 2, 128, 1037 + jitter(rng), DType::kBF16, 256},
                          Case{4, 4, 64, 777 + jitter(rng), DType::kF16, 128},
                          Case{32, 8, 128, 3001 + jitter(rng), DType::kBF16, 512},
                          Case{12, 4, 64, 2049 + jitter(rng), DType::kF16, 512}}) {
      SCOPED_TRACE(::testing::Message() << "Hq " << c.hq << " Hkv " << c.hkv << " d " << c.dim
                                        << " len " << c.len << " " << DTypeName(c.dtype));
      DhsaConfig config;  // The defaults (mass score, q_block 16), a smaller budget.
      config.budget = c.budget;
      config.sink = c.budget / 16;
      config.local = std::max<int64_t>(config.q_block, c.budget / 4);
      constexpr int64_t kDecode = 3, kChunk = 71;
      const int64_t total = c.len + kDecode + kChunk;
      const Inputs in = MakeInputs(rng, c.hq, c.hkv, total, c.dim, c.dtype);
      std::vector<Sequence> seqs;  // [0]: locked, [1]: pageable.
      for (int i = 0; i < 2; ++i) {
        SequenceOptions so;
        so.q_heads = static_cast<int>(c.hq);
        so.kv_heads = static_cast<int>(c.hkv);
        so.head_dim = static_cast<int>(c.dim);
        so.dtype = c.dtype;
        so.config = config;
        absl::StatusOr<Sequence> seq = client->CreateSequence(so);
        ASSERT_TRUE(seq.ok()) << seq.status();
        seqs.push_back(*std::move(seq));
      }
      struct Step {
        int64_t begin, end;
        bool decode;
      };
      std::vector<Step> steps = {{0, c.len, false}};
      for (int64_t e = c.len + 1; e <= c.len + kDecode; ++e) steps.push_back({e - 1, e, true});
      steps.push_back({c.len + kDecode, total, false});
      for (const Step& st : steps) {
        SCOPED_TRACE(::testing::Message() << (st.decode ? "decode" : "prefill") << " [" << st.begin
                                          << ", " << st.end << ")");
        std::vector<AttentionOutput> outs;
        for (int i = 0; i < 2; ++i) {
          if (i == 1) {
            setenv("DHSA_WORKER_SHM_LOCKED", "0", 1);
          } else {
            unsetenv("DHSA_WORKER_SHM_LOCKED");
          }
          const Tensor q = Rows(in.q, st.begin, st.end), k = Rows(in.k, st.begin, st.end),
                       v = Rows(in.v, st.begin, st.end);
          absl::StatusOr<AttentionOutput> out =
              st.decode ? seqs[i].Decode(0, q, k, v, true) : seqs[i].Prefill(0, q, k, v, true);
          unsetenv("DHSA_WORKER_SHM_LOCKED");
          ASSERT_TRUE(out.ok()) << out.status();
          EXPECT_EQ(out->stats.transport(), "shm");
          outs.push_back(*std::move(out));
        }
        EXPECT_TRUE(SameBits(outs[0].o, outs[1].o)) << "o: locked vs pageable";
        EXPECT_TRUE(SameBits(outs[0].lse, outs[1].lse)) << "lse: locked vs pageable";
        EXPECT_GT(outs[0].o.NumElements(), 0);
      }
      // The locked path ran: the worker's arenas hold page-locked chunks.
      EXPECT_GT(transport::ShmLockedBytes(), 0);
      std::printf(
          "Hq %lld Hkv %lld d %lld len %lld %s: equal to the bit over %zu calls; %lld MiB "
          "of arenas page-locked\n",
          static_cast<long long>(c.hq), static_cast<long long>(c.hkv),
          static_cast<long long>(c.dim), static_cast<long long>(c.len),
          std::string(DTypeName(c.dtype)).c_str(), steps.size(),
          static_cast<long long>(transport::ShmLockedBytes() >> 20));
      for (Sequence& q : seqs) EXPECT_TRUE(q.Release().ok());
    }
    (*s)->Shutdown();
  }
  // Every chunk unregistered with the arenas' unmap (the service is gone).
  EXPECT_EQ(transport::ShmLockedBytes(), 0);
}

}  // namespace
}  // namespace dhsa::router
