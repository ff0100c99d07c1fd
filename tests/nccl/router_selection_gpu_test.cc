// The router's selection on its own GPU (services/router/selection_device.h) against its CPU path,
// on one CUDA device (skipped without one):
// - the device run itself against the router's CPU steps (LayerLayout::Propose, the query
//   summaries and SelectSpansCpu) on fresh random and segmented inputs of odd lengths, GQA
//   groups of 1 to 4, bf16 and f16, d 64 and 128, the paper preset and the mass-score defaults:
//   boundaries and kappa equal to the bit, selections equal or, where they differ, every
//   differing key in a chunk whose score ties with the cut (ExpectSameUpToTies; the mass score's
//   fp32 sums: kMassScoreTolerance);
// - what it declines (decode, chunked prefill, float32, other policies) stays on the CPU;
// - the service (embedded router + CUDA workers on the device) with selection_device "auto" (the
//   GPU) against "cpu": the first prefill equal where the selections are (else explained as
//   above), and the decode steps and the chunked prefill after it equal always (the layout came
//   back from the device with the same boundaries and kappa); both near the in-process library.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/selection.h"
#include "kernels/cpu/summaries.h"
#include "services/router/layout.h"
#include "services/router/selection_device.h"
#include "tests/cpu/cpu_test_util.h"
#include "tests/router/service_test_util.h"

namespace dhsa::router {
namespace {

using ::dhsa::router_test::Inputs;
using ::dhsa::router_test::MakeInputs;
using ::dhsa::router_test::Rows;
using ::dhsa::router_test::SmallConfig;
using ::dhsa::testing::FreshSeed;

std::shared_ptr<SelectionDevice> OpenAuto() {
  absl::StatusOr<std::shared_ptr<SelectionDevice>> d = SelectionDevice::Open({});
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *d : nullptr;
}

DhsaConfig MassConfig(int64_t budget) {
  DhsaConfig c;  // The defaults: mass score, q_block 16.
  c.budget = budget;
  c.sink = budget / 16;
  c.local = std::max<int64_t>(c.q_block, budget / 4);
  return c;
}

DhsaConfig PaperPreset(int64_t budget) {
  DhsaConfig c = PaperConfig();
  c.budget = budget;
  c.sink = budget / 16;
  c.local = std::max<int64_t>(c.q_block, budget / 4);
  return c;
}

// The router's CPU steps for one call on `layout` (LayerCall's CPU path), committed after.
struct CpuSteps {
  LayoutView view;
  Summaries rho;
  SelectionInputs in;
  Selection selection;
};

void RunCpuSteps(LayerLayout& layout, const DhsaConfig& config, const Tensor& q, const Tensor& k,
                 bool decode, CpuSteps* s) {
  const int64_t hkv = k.shape[0], dim = k.shape[2];
  const int64_t t0 = layout.length(), lk = t0 + k.shape[1];
  absl::StatusOr<LayoutDelta> delta = layout.Propose(k, decode, 4);
  ASSERT_TRUE(delta.ok()) << delta.status();
  s->view = layout.SelectionView(*delta);
  absl::StatusOr<HeadsView> qv = HeadsView::Of(q, "q");
  ASSERT_TRUE(qv.ok()) << qv.status();
  qv->offset = t0;
  s->rho = ScoreQuerySummariesCpu(*qv, hkv, config, 4);
  s->in.shape = {q.shape[0], hkv, dim, q.shape[1], lk};
  s->in.boundaries = &s->view.boundaries;
  s->in.kappa = &s->view.kappa;
  s->in.rho = &s->rho;
  absl::StatusOr<Selection> sel = SelectSpansCpu(s->in, config, 4);
  ASSERT_TRUE(sel.ok()) << sel.status();
  s->selection = *std::move(sel);
  layout.Commit(*std::move(delta));
}

// A first prefill's CPU steps.
void RunCpuSteps(const DhsaConfig& config, const Tensor& q, const Tensor& k, CpuSteps* s) {
  LayerLayout layout(config, k.shape[0], k.shape[2], k.dtype);
  RunCpuSteps(layout, config, q, k, false, s);
}

int64_t DifferingEntries(const Selection& a, const Selection& b) {
  int64_t n = 0;
  for (size_t e = 0; e < a.spans.size() && e < b.spans.size(); ++e) {
    n += a.spans[e] == b.spans[e] ? 0 : 1;
  }
  return n + static_cast<int64_t>(std::max(a.spans.size(), b.spans.size()) -
                                  std::min(a.spans.size(), b.spans.size()));
}

struct Case {
  int64_t hq, hkv, dim, len;
  DType dtype;
  bool paper;
  int64_t budget;
};

std::string Name(const Case& c) {
  return absl::StrCat("Hq ", c.hq, " Hkv ", c.hkv, " d ", c.dim, " len ", c.len, " ",
                      DTypeName(c.dtype), c.paper ? " paper" : " mass", " budget ", c.budget);
}

TEST(RouterSelectionGpuTest, DeviceRunEqualsTheCpuSteps) {
  std::shared_ptr<SelectionDevice> device = OpenAuto();
  if (device == nullptr) GTEST_SKIP() << "no CUDA device";
  std::printf("%s\n", device->Describe().c_str());
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (const Case& c : {Case{4, 2, 64, 397, DType::kBF16, true, 256},
                        Case{8, 2, 128, 1037, DType::kBF16, true, 256},
                        Case{4, 4, 64, 1025, DType::kF16, false, 256},
                        Case{12, 4, 128, 4099, DType::kF16, true, 1024},
                        Case{32, 8, 128, 3001, DType::kBF16, false, 512},
                        Case{8, 8, 128, 4107, DType::kBF16, false, 1024},
                        Case{6, 2, 64, 1, DType::kBF16, false, 256}}) {
    SCOPED_TRACE(Name(c));
    const DhsaConfig config = c.paper ? PaperPreset(c.budget) : MassConfig(c.budget);
    const Inputs in = MakeInputs(rng, c.hq, c.hkv, c.len, c.dim, c.dtype);
    CpuSteps cpu;
    RunCpuSteps(config, in.q, in.k, &cpu);
    const absl::Status supported = device->Supports(config, cpu.in.shape, c.dtype, false);
    if (c.len == 1 && !supported.ok()) {  // A one-token prefill may be declined: the CPU's.
      std::printf("%s: declined (%s)\n", Name(c).c_str(), std::string(supported.message()).c_str());
      continue;
    }
    ASSERT_TRUE(supported.ok()) << supported;
    // Twice: the second reuses the workspace and buffers.
    for (int run = 0; run < 2; ++run) {
      absl::StatusOr<DeviceSelectionResult> got = device->Run(config, in.q, in.k, 4);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->boundaries, cpu.view.boundaries);
      EXPECT_EQ(got->kappa.heads, cpu.view.kappa.heads);
      EXPECT_EQ(got->kappa.count, cpu.view.kappa.count);
      EXPECT_EQ(got->kappa.data, cpu.view.kappa.data);
      const Selection& s = got->selection;
      EXPECT_EQ(s.unit, cpu.selection.unit);
      EXPECT_EQ(s.block_size, cpu.selection.block_size);
      EXPECT_EQ(s.first_block, cpu.selection.first_block);
      EXPECT_EQ(s.group, cpu.selection.group);
      const int64_t differ = DifferingEntries(s, cpu.selection);
      if (differ > 0) {
        std::printf("%s: %lld of %zu entries differ (checked as ties below)\n", Name(c).c_str(),
                    static_cast<long long>(differ), cpu.selection.spans.size());
        ::dhsa::testing::ExpectSameUpToTies(s, cpu.selection, cpu.in, config);
      }
      if (c.paper) {
        EXPECT_EQ(differ, 0) << "the paper score's selection is the reference's";
      }
    }
  }
}

TEST(RouterSelectionGpuTest, DeclinesWhatTheCpuServes) {
  std::shared_ptr<SelectionDevice> device = OpenAuto();
  if (device == nullptr) GTEST_SKIP() << "no CUDA device";
  const DhsaConfig config = PaperPreset(256);
  const AttentionShape fresh{8, 2, 128, 1000, 1000}, chunked{8, 2, 128, 400, 1000};
  EXPECT_TRUE(device->Supports(config, fresh, DType::kBF16, false).ok());
  EXPECT_FALSE(device->Supports(config, fresh, DType::kBF16, true).ok());
  EXPECT_FALSE(device->Supports(config, chunked, DType::kBF16, false).ok());
  EXPECT_FALSE(device->Supports(config, fresh, DType::kF32, false).ok());
  DhsaConfig block = SmallConfig(Policy::kBlockTopk);
  EXPECT_FALSE(device->Supports(block, fresh, DType::kBF16, false).ok());
  DhsaConfig shared = config;
  shared.shared_heads = true;
  EXPECT_FALSE(device->Supports(shared, fresh, DType::kBF16, false).ok());
}

// Max |a - b| over o and lse (equal infinities count as 0).
std::pair<double, double> MaxDiff(const AttentionOutput& a, const AttentionOutput& b) {
  double o = 0, l = 0;
  if (a.o.shape != b.o.shape || a.lse.shape != b.lse.shape) return {1e30, 1e30};
  for (int64_t i = 0; i < a.o.NumElements(); ++i) {
    o = std::max(o, std::abs(static_cast<double>(a.o.Get(i)) - b.o.Get(i)));
  }
  for (int64_t i = 0; i < a.lse.NumElements(); ++i) {
    const double x = a.lse.Get(i), y = b.lse.Get(i);
    if (std::isinf(x) && x == y) continue;
    l = std::max(l, std::abs(x - y));
  }
  return {o, l};
}

// Within the CUDA kernels' storage-precision error of the reference (as nccl_service_gpu_test).
void ExpectNearReference(const AttentionOutput& got, const AttendResult& want) {
  double max_o = 0, max_l = 1;
  for (int64_t i = 0; i < want.o.NumElements(); ++i) {
    max_o = std::max(max_o, std::abs(static_cast<double>(want.o.Get(i))));
  }
  for (int64_t i = 0; i < want.lse.NumElements(); ++i) {
    if (std::isfinite(want.lse.Get(i))) {
      max_l = std::max(max_l, std::abs(static_cast<double>(want.lse.Get(i))));
    }
  }
  AttentionOutput ref;
  ref.o = want.o;
  ref.lse = want.lse;
  const auto [o, l] = MaxDiff(got, ref);
  EXPECT_LE(o, 1e-2 * max_o) << "max |o| " << max_o;
  EXPECT_LE(l, 1e-3 * max_l) << "max |lse| " << max_l;
}

TEST(RouterSelectionGpuTest, ServiceOnTheGpuEqualsTheCpuSelection) {
  std::shared_ptr<SelectionDevice> device = OpenAuto();
  if (device == nullptr) GTEST_SKIP() << "no CUDA device";
  device.reset();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::vector<std::unique_ptr<EmbeddedService>> services;
  std::vector<std::unique_ptr<Client>> clients;
  for (const char* where : {"auto", "cpu"}) {
    EmbeddedOptions o;
    o.num_workers = 2;
    o.stripe_tokens = 512;
    o.threads = 4;
    o.backend = "cuda";
    o.capacity_bytes_per_worker = int64_t{512} << 20;
    o.selection_device = where;
    absl::StatusOr<std::unique_ptr<EmbeddedService>> s = EmbeddedService::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->router().service().core().selection_device != nullptr,
              std::string(where) == "auto");
    absl::StatusOr<Client> c = Client::Connect((*s)->router_address());
    ASSERT_TRUE(c.ok()) << c.status();
    clients.push_back(std::make_unique<Client>(*std::move(c)));
    services.push_back(*std::move(s));
  }
  for (const Case& c : {Case{8, 2, 128, 1037, DType::kBF16, true, 256},
                        Case{4, 4, 64, 777, DType::kF16, false, 256},
                        Case{32, 8, 128, 3001, DType::kBF16, false, 512},
                        Case{12, 4, 128, 2049, DType::kF16, true, 512}}) {
    SCOPED_TRACE(Name(c));
    const DhsaConfig config = c.paper ? PaperPreset(c.budget) : MassConfig(c.budget);
    constexpr int64_t kDecode = 3, kChunk = 70;
    const int64_t total = c.len + kDecode + kChunk;
    const Inputs in = MakeInputs(rng, c.hq, c.hkv, total, c.dim, c.dtype);
    // The router's CPU steps, call by call, and whether the device's first selection is the
    // CPU's (mass: near-ties may differ).
    LayerLayout mirror(config, c.hkv, c.dim, c.dtype);
    CpuSteps cpu;
    RunCpuSteps(mirror, config, Rows(in.q, 0, c.len), Rows(in.k, 0, c.len), false, &cpu);
    std::shared_ptr<SelectionDevice> probe = OpenAuto();
    ASSERT_NE(probe, nullptr);
    absl::StatusOr<DeviceSelectionResult> dev =
        probe->Run(config, Rows(in.q, 0, c.len), Rows(in.k, 0, c.len), 4);
    ASSERT_TRUE(dev.ok()) << dev.status();
    probe.reset();
    const int64_t differ = DifferingEntries(dev->selection, cpu.selection);
    if (differ > 0) {
      std::printf("%s: first prefill, %lld selection entries differ (ties, checked)\n",
                  Name(c).c_str(), static_cast<long long>(differ));
      ::dhsa::testing::ExpectSameUpToTies(dev->selection, cpu.selection, cpu.in, config);
    }
    std::vector<Sequence> seqs;
    for (auto& client : clients) {
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
    std::vector<int64_t> boundaries;
    for (const Step& st : steps) {
      SCOPED_TRACE(::testing::Message() << (st.decode ? "decode" : "prefill") << " [" << st.begin
                                        << ", " << st.end << ")");
      std::vector<AttentionOutput> outs;
      for (size_t i = 0; i < seqs.size(); ++i) {
        const Tensor q = Rows(in.q, st.begin, st.end), k = Rows(in.k, st.begin, st.end),
                     v = Rows(in.v, st.begin, st.end);
        absl::StatusOr<AttentionOutput> out =
            st.decode ? seqs[i].Decode(0, q, k, v, true) : seqs[i].Prefill(0, q, k, v, true);
        ASSERT_TRUE(out.ok()) << out.status();
        const bool gpu = i == 0 && st.begin == 0;
        EXPECT_EQ(out->stats.selection_device(), gpu ? "cuda:0" : "cpu");
        if (gpu) {
          std::printf(
              "%s: router on cuda:0: upload %.2f ms, boundaries %.2f ms, selection %.2f ms\n",
              Name(c).c_str(), out->stats.selection_upload_seconds() * 1e3,
              out->stats.boundaries_seconds() * 1e3, out->stats.selection_seconds() * 1e3);
        }
        outs.push_back(*std::move(out));
      }
      const auto [o, l] = MaxDiff(outs[0], outs[1]);
      if (st.begin > 0 || differ == 0) {
        // The same selection on the same workers: the same results (1e-6: the merge's order).
        double max_o = 0;
        for (int64_t i = 0; i < outs[1].o.NumElements(); ++i) {
          max_o = std::max(max_o, std::abs(static_cast<double>(outs[1].o.Get(i))));
        }
        EXPECT_LE(o, 1e-6 * max_o) << "auto (GPU) vs cpu";
        EXPECT_LE(l, 1e-6 * 100) << "auto (GPU) vs cpu";
      }
      AttendOptions options;
      options.prior_boundaries = st.begin == 0 ? nullptr : &boundaries;
      options.decode = st.decode;
      options.num_threads = 8;
      absl::StatusOr<AttendResult> want =
          AttendReference(Rows(in.q, st.begin, st.end), Rows(in.k, 0, st.end),
                          Rows(in.v, 0, st.end), config, options);
      ASSERT_TRUE(want.ok()) << want.status();
      // The router's CPU selection of this call against the reference's (the mass score's fp32
      // sums may break a near-tie the other way: then the outputs differ by more than rounding).
      CpuSteps later;
      if (st.begin > 0) {
        RunCpuSteps(mirror, config, Rows(in.q, st.begin, st.end), Rows(in.k, st.begin, st.end),
                    st.decode, &later);
      }
      const Selection& router_cpu = st.begin > 0 ? later.selection : cpu.selection;
      const bool cpu_is_reference = router_cpu.spans == want->selection.spans;
      if (!cpu_is_reference) {
        std::printf(
            "%s [%lld, %lld): the router's CPU selection differs from the reference's in "
            "%lld entries (ties); outputs not compared with it\n",
            Name(c).c_str(), static_cast<long long>(st.begin), static_cast<long long>(st.end),
            static_cast<long long>(DifferingEntries(router_cpu, want->selection)));
      }
      if (cpu_is_reference && (st.begin > 0 || differ == 0)) {
        SCOPED_TRACE("auto (GPU) vs the in-process library");
        ExpectNearReference(outs[0], *want);
      }
      if (cpu_is_reference) {
        SCOPED_TRACE("cpu vs the in-process library");
        ExpectNearReference(outs[1], *want);
      }
      boundaries = want->boundaries;
    }
    for (Sequence& s : seqs) EXPECT_TRUE(s.Release().ok());
  }
}

}  // namespace
}  // namespace dhsa::router
