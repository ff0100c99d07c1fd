// The router's selection device option (services/router/selection_device.h) where no GPU is
// needed (CI): parsing and validation of ServiceConfig.selection_device and of dhsa-router's
// --selection-device, LayerLayout::ProposeComputed against Propose (the device path's way into the
// layout: the same delta, and later decode and chunked prefill continue alike), and the service
// with "auto" on a build or machine without a GPU: the CPU path, equal to "cpu" to the bit.
#include "services/router/selection_device.h"

#include <stdio.h>
#include <sys/wait.h>

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/config.h"
#include "kernels/summaries/summaries.h"
#include "services/router/layout.h"
#include "services/router/router.h"
#include "tests/kernels/test_util.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router {
namespace {

using ::dhsa::router_test::Inputs;
using ::dhsa::router_test::MakeInputs;
using ::dhsa::router_test::Rows;
using ::dhsa::router_test::SmallConfig;
using ::dhsa::testing::FreshSeed;

TEST(SelectionDeviceSpecTest, ParsesAutoCpuAndOrdinals) {
  for (const char* text : {"", "auto"}) {
    absl::StatusOr<SelectionDeviceSpec> s = ParseSelectionDevice(text);
    ASSERT_TRUE(s.ok()) << text;
    EXPECT_EQ(s->kind, SelectionDeviceSpec::Kind::kAuto);
  }
  absl::StatusOr<SelectionDeviceSpec> cpu = ParseSelectionDevice("cpu");
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(cpu->kind, SelectionDeviceSpec::Kind::kCpu);
  for (int n : {0, 1, 7, 15}) {
    absl::StatusOr<SelectionDeviceSpec> s = ParseSelectionDevice(std::to_string(n));
    ASSERT_TRUE(s.ok()) << n;
    EXPECT_EQ(s->kind, SelectionDeviceSpec::Kind::kOrdinal);
    EXPECT_EQ(s->ordinal, n);
  }
  for (const char* bad :
       {"-1", "gpu", "cuda", "CPU", "1x", " 1", "+1", "0.5", "cuda:0", "99999999999999999999"}) {
    absl::StatusOr<SelectionDeviceSpec> s = ParseSelectionDevice(bad);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << "'" << bad << "'";
  }
}

TEST(SelectionDeviceSpecTest, ServiceConfigIsValidated) {
  v1::ServiceConfig config;
  config.add_worker_addresses("127.0.0.1:1");
  absl::StatusOr<RouterOptions> o = RouterOptionsFromServiceConfig(config);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->selection_device, "auto");  // The default.
  config.set_selection_device("cpu");
  o = RouterOptionsFromServiceConfig(config);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->selection_device, "cpu");
  config.set_selection_device("the gpu");
  o = RouterOptionsFromServiceConfig(config);
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(o.status().message().find("selection_device"), std::string::npos) << o.status();
}

TEST(SelectionDeviceTest, CpuIsNoDeviceAndAMissingOrdinalIsAnError) {
  SelectionDeviceSpec cpu;
  cpu.kind = SelectionDeviceSpec::Kind::kCpu;
  absl::StatusOr<std::shared_ptr<SelectionDevice>> d = SelectionDevice::Open(cpu);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(*d, nullptr);
  SelectionDeviceSpec missing;
  missing.kind = SelectionDeviceSpec::Kind::kOrdinal;
  missing.ordinal = 4096;  // No machine has that many.
  d = SelectionDevice::Open(missing);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(d.status().message().find("selection_device 4096"), std::string::npos) << d.status();

  // The router refuses to start on it (dhsa-router exits 2 with the message).
  RouterOptions options;
  options.listen_address = "127.0.0.1:0";
  options.worker_addresses = {"127.0.0.1:1"};
  options.selection_device = "4096";
  absl::StatusOr<std::unique_ptr<RouterServer>> server = RouterServer::Start(options);
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SelectionDeviceTest, RouterBinaryRejectsBadValues) {
  const std::string router = DHSA_ROUTER_BINARY;
  for (const char* value : {"gpu", "4096"}) {
    const std::string cmd = router + " --listen 127.0.0.1:0 --workers 127.0.0.1:1 " +
                            "--selection-device " + value + " 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    char buf[512];
    while (fgets(buf, sizeof(buf), p) != nullptr) out += buf;
    const int status = pclose(p);
    ASSERT_TRUE(WIFEXITED(status)) << out;
    EXPECT_EQ(WEXITSTATUS(status), 2) << value << ": " << out;
    EXPECT_NE(out.find("selection_device"), std::string::npos) << out;
  }
}

// Propose's own boundaries and kappa fed back through ProposeComputed give the same delta; the
// layouts committed from the two continue alike over decode steps and a chunked prefill.
TEST(LayoutProposeComputedTest, EqualsProposeAndContinuesAlike) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  DhsaConfig mass;  // The defaults: the mass score.
  for (const DhsaConfig& config : {SmallConfig(Policy::kDhsa), mass, PaperConfig()}) {
    for (int64_t n : {1, 2, 97, 1025, 3001}) {
      for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
        SCOPED_TRACE(::testing::Message()
                     << "n " << n << " " << DTypeName(dtype) << " q_block " << config.q_block);
        const int64_t hkv = 3, dim = 16, extra = 40;
        const Tensor k = testing::SegmentedTensor(rng, hkv, n + extra, dim).ConvertTo(dtype);
        LayerLayout a(config, hkv, dim, dtype), b(config, hkv, dim, dtype);
        const Tensor first = Rows(k, 0, n);
        absl::StatusOr<LayoutDelta> da = a.Propose(first, false, 2);
        ASSERT_TRUE(da.ok()) << da.status();
        const LayoutView view = a.SelectionView(*da);
        absl::StatusOr<LayoutDelta> db = b.ProposeComputed(first, view.boundaries, view.kappa);
        ASSERT_TRUE(db.ok()) << db.status();
        EXPECT_EQ(db->old_length, da->old_length);
        EXPECT_EQ(db->new_length, da->new_length);
        EXPECT_EQ(db->kept_chunks, da->kept_chunks);
        EXPECT_EQ(db->boundaries, da->boundaries);
        EXPECT_EQ(db->kappa, da->kappa);
        EXPECT_EQ(db->tail_begin, da->tail_begin);
        EXPECT_EQ(db->tail_keys.shape, da->tail_keys.shape);
        EXPECT_EQ(db->tail_keys.bytes, da->tail_keys.bytes);
        a.Commit(*std::move(da));
        b.Commit(*std::move(db));
        // Decode steps, then a chunked prefill of the rest.
        for (int64_t e = n + 1; e <= n + extra; e = e < n + 8 ? e + 1 : n + extra) {
          const bool decode = e <= n + 7;
          const int64_t begin = a.length();
          absl::StatusOr<LayoutDelta> na = a.Propose(Rows(k, begin, e), decode, 2);
          absl::StatusOr<LayoutDelta> nb = b.Propose(Rows(k, begin, e), decode, 2);
          ASSERT_TRUE(na.ok()) << na.status();
          ASSERT_TRUE(nb.ok()) << nb.status();
          const LayoutView va = a.SelectionView(*na), vb = b.SelectionView(*nb);
          EXPECT_EQ(va.boundaries, vb.boundaries) << "at " << e;
          EXPECT_EQ(va.kappa.data, vb.kappa.data) << "at " << e;
          a.Commit(*std::move(na));
          b.Commit(*std::move(nb));
          if (e == n + extra) break;
        }
        EXPECT_EQ(a.boundaries(), b.boundaries());
        EXPECT_EQ(a.tail_begin(), b.tail_begin());
      }
    }
  }
}

TEST(LayoutProposeComputedTest, RefusesWhatItCannotServe) {
  std::mt19937_64 rng(7);
  const DhsaConfig config = SmallConfig(Policy::kDhsa);
  const Tensor k = testing::SegmentedTensor(rng, 2, 300, 8).ConvertTo(DType::kBF16);
  LayerLayout layout(config, 2, 8, DType::kBF16);
  absl::StatusOr<LayoutDelta> d = layout.Propose(k, false);
  ASSERT_TRUE(d.ok()) << d.status();
  const LayoutView view = layout.SelectionView(*d);
  ASSERT_GE(view.boundaries.size(), 3u);
  // Boundaries not from 0 to n, not rising, or kappa of the wrong shape.
  std::vector<int64_t> bad = view.boundaries;
  bad.back() = 299;
  EXPECT_EQ(layout.ProposeComputed(k, bad, view.kappa).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = view.boundaries;
  bad[1] = bad[2];
  EXPECT_EQ(layout.ProposeComputed(k, bad, view.kappa).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = view.boundaries;
  bad.front() = 1;
  EXPECT_EQ(layout.ProposeComputed(k, bad, view.kappa).status().code(),
            absl::StatusCode::kInvalidArgument);
  Summaries short_kappa = view.kappa;
  short_kappa.count -= 1;
  short_kappa.data.resize(static_cast<size_t>(short_kappa.heads * short_kappa.count * 8));
  EXPECT_EQ(layout.ProposeComputed(k, view.boundaries, short_kappa).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      layout.ProposeComputed(k.ConvertTo(DType::kF16), view.boundaries, view.kappa).status().code(),
      absl::StatusCode::kInvalidArgument);
  // Only a first prefill, only chunked layouts.
  layout.Commit(*std::move(d));
  EXPECT_EQ(layout.ProposeComputed(k, view.boundaries, view.kappa).status().code(),
            absl::StatusCode::kFailedPrecondition);
  LayerLayout dense(SmallConfig(Policy::kDense), 2, 8, DType::kBF16);
  EXPECT_EQ(dense.ProposeComputed(k, view.boundaries, view.kappa).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// With "auto" on a build without CUDA or a machine without a GPU, every call selects on the CPU:
// stats say so, and outputs equal "cpu"'s to the bit over prefill, chunked prefill and decode.
TEST(SelectionDeviceServiceTest, AutoWithoutAGpuIsTheCpuPath) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::vector<std::unique_ptr<EmbeddedService>> services;
  std::vector<std::unique_ptr<Client>> clients;
  for (const char* where : {"auto", "cpu"}) {
    EmbeddedOptions o;
    o.num_workers = 2;
    o.stripe_tokens = 256;
    o.threads = 2;
    o.selection_device = where;
    absl::StatusOr<std::unique_ptr<EmbeddedService>> s = EmbeddedService::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    if (std::string(where) == "auto" && (*s)->router().service().core().selection_device) {
      GTEST_SKIP() << "a CUDA device is visible: router_selection_gpu_test covers auto here";
    }
    EXPECT_EQ((*s)->router().service().core().selection_device, nullptr);
    absl::StatusOr<Client> c = Client::Connect((*s)->router_address());
    ASSERT_TRUE(c.ok()) << c.status();
    clients.push_back(std::make_unique<Client>(*std::move(c)));
    services.push_back(*std::move(s));
  }
  DhsaConfig mass;
  for (const DhsaConfig& config : {SmallConfig(Policy::kDhsa), mass}) {
    const int64_t hq = 8, hkv = 2, dim = 32, len = 777, first = 700;
    const Inputs in = MakeInputs(rng, hq, hkv, len, dim, DType::kBF16);
    std::vector<Sequence> seqs;
    for (auto& c : clients) {
      SequenceOptions so;
      so.q_heads = hq;
      so.kv_heads = hkv;
      so.head_dim = dim;
      so.dtype = DType::kBF16;
      so.config = config;
      absl::StatusOr<Sequence> seq = c->CreateSequence(so);
      ASSERT_TRUE(seq.ok()) << seq.status();
      seqs.push_back(*std::move(seq));
    }
    struct Step {
      int64_t begin, end;
      bool decode;
    };
    for (const Step& st :
         {Step{0, first, false}, Step{first, len - 3, false}, Step{len - 3, len - 2, true},
          Step{len - 2, len - 1, true}, Step{len - 1, len, true}}) {
      std::vector<AttentionOutput> outs;
      for (Sequence& seq : seqs) {
        const Tensor q = Rows(in.q, st.begin, st.end), k = Rows(in.k, st.begin, st.end),
                     v = Rows(in.v, st.begin, st.end);
        absl::StatusOr<AttentionOutput> out =
            st.decode ? seq.Decode(0, q, k, v, true) : seq.Prefill(0, q, k, v, true);
        ASSERT_TRUE(out.ok()) << out.status();
        EXPECT_EQ(out->stats.selection_device(), "cpu");
        EXPECT_EQ(out->stats.selection_upload_seconds(), 0);
        outs.push_back(*std::move(out));
      }
      EXPECT_EQ(outs[0].o.bytes, outs[1].o.bytes) << "[" << st.begin << ", " << st.end << ")";
      EXPECT_EQ(outs[0].lse.bytes, outs[1].lse.bytes) << "[" << st.begin << ", " << st.end << ")";
    }
    for (Sequence& seq : seqs) EXPECT_TRUE(seq.Release().ok());
  }
}

}  // namespace
}  // namespace dhsa::router
