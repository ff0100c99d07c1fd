// What the device selection costs with the mass chunk score (the new defaults: q_block 16,
// score_rows 8, chunks 4-16 around a mean of 32) beside the paper's score at its structure
// (q_block 128, chunks 8-128), on the structured synthetic workload (bench/workload, seed 1):
// Hq = 32, Hkv = 8, d = 128, bf16, a fresh prefill of L tokens, one budget. Per config: Step 1
// (boundaries), Step 2 (summaries), Steps 3-4 (scores and the cut; for mass also the scores
// alone), the whole selection, and the sparse attention over it, each the median of --reps runs
// timed with CUDA events after a warm-up; the selection's share of the attention; the workspace.
// Checks on the first run (outputs poisoned before it): the selection's spans valid
// (CheckSelection), every lse finite.
//
// Usage: mass_selection_bench [--lengths=131072] [--budget=4096] [--reps=7] [--variants=a,b,..]
// (variants: paper_old, paper, fma, tf32, tf32_cut, tiled_oldcut, tiled_noexit, tiled_noagg,
// tiled_agg, tiled_short, tiled_w825, tiled; kVariants below; by default paper, fma, tf32,
// tiled).
// Exit status: 0 when every case ran and passed its checks, 1 otherwise, 2 without a device.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/gpu/event_timer.h"
#include "bench/workload/workload.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_cuda.h"
#include "kernels/cuda/sparse_attention_cuda.h"

namespace dhsa {
namespace {

constexpr int64_t kHq = 32, kHkv = 8, kDim = 128;

DhsaConfig PaperStructure(int64_t budget) {
  DhsaConfig c;
  c.chunk_score = ChunkScore::kPaper;
  c.q_block = 128;
  c.chunk_mean = 32;
  c.chunk_min = 8;
  c.chunk_max = 128;
  c.score_rows = 16;
  c.sink = 128;
  c.local = 256;
  c.budget = budget;
  return c;
}

DhsaConfig MassDefaults(int64_t budget) {
  DhsaConfig c = PaperStructure(budget);
  c.chunk_score = ChunkScore::kMass;
  c.q_block = 16;
  c.score_rows = 8;
  c.chunk_min = 4;
  c.chunk_max = 16;
  return c;
}

double Median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x.empty() ? 0.0 : x[x.size() / 2];
}

struct Result {
  double boundaries = 0, summaries = 0, choose = 0, scores = 0, select = 0, attention = 0;
  double workspace_mb = 0, keys_per_entry = 0;
  int64_t chunks = 0, span_cap = 0, entries = 0;
  std::string check = "ok";
  std::vector<std::vector<Span>> spans;  // The checked run's selection.
};

// A configuration of the device selection to time (--variants picks them by name).
struct Variant {
  const char* key;
  const char* name;
  bool mass, tensor, tiled, global, early, aggregate;
  bool short_split = false;
  int64_t wave = 0;  // Query blocks a wave (0: the default).
};
constexpr Variant kVariants[] = {
    {"paper_old", "paper q128 c32 n8 x128, cut without early exit", false, false, false, false,
     false, false},
    {"paper", "paper q128 c32 n8 x128 (defaults)", false, false, false, false, true, true},
    {"fma", "mass, fp32 FMA, cut on shared copies", true, false, false, false, false, false},
    {"tf32", "mass, 3xTF32 first kernel, cut on shared copies", true, true, false, false, false,
     false},
    {"tf32_cut", "mass, 3xTF32 first kernel, global cut + early exit", true, true, false, true,
     true, false},
    {"tiled_oldcut", "mass, tiled 3xTF32, cut on shared copies", true, true, true, false, false,
     false},
    {"tiled_noexit", "mass, tiled 3xTF32, global cut", true, true, true, true, false, false},
    {"tiled_noagg", "mass, tiled 3xTF32, global cut + early exit", true, true, true, true, true,
     false},
    {"tiled_agg", "mass, tiled 3xTF32, global cut + early exit + warp adds", true, true, true, true,
     true, true},
    {"tiled_short", "mass, tiled 3xTF32 short split, global cut + early exit", true, true, true,
     true, true, false, true},
    {"tiled_w825", "mass, tiled 3xTF32, global cut + early exit, waves of 825 blocks", true, true,
     true, true, true, false, true, 825},
    {"tiled", "mass, tiled 3xTF32, global cut + early exit (defaults)", true, true, true, true,
     true, false},
};

absl::StatusOr<Result> RunCase(const Workload& w, const DeviceBuffer& q, const DeviceBuffer& k,
                               const DeviceBuffer& v, DeviceBuffer& o, DeviceBuffer& lse,
                               const DhsaConfig& config, const Variant& variant, int reps,
                               cudaStream_t stream) {
  const int64_t len = w.config.len;
  const AttentionShape shape{kHq, kHkv, kDim, len, len};
  DHSA_ASSIGN_OR_RETURN(DeviceDhsaSelection sel,
                        DeviceDhsaSelection::Create(config, shape, DType::kBF16));
  sel.set_mass_tensor_cores(variant.tensor);
  sel.set_mass_tiled(variant.tiled);
  sel.set_select_global_scores(variant.global);
  sel.set_select_early_exit(variant.early);
  sel.set_select_aggregate(variant.aggregate);
  sel.set_mass_short_split(variant.short_split);
  if (variant.wave > 0) sel.set_mass_wave_blocks(variant.wave);
  Result r;
  r.workspace_mb = static_cast<double>(sel.workspace_bytes()) / (1 << 20);
  SparseAttentionCudaParams p;
  p.dtype = DType::kBF16;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.as<float>();
  p.lse = lse.as<float>();
  p.hq = kHq;
  p.hkv = kHkv;
  p.head_dim = kDim;
  p.lq = len;
  p.lk = len;
  p.scale = EffectiveScale(config, kDim);
  DHSA_RETURN_IF_ERROR(sel.Attach(&p));
  r.span_cap = p.span_stride;

  // The checked run.
  DHSA_RETURN_IF_ERROR(sel.Poison());
  DHSA_RETURN_IF_ERROR(o.Fill(0xFF));
  DHSA_RETURN_IF_ERROR(lse.Fill(0xFF));
  DHSA_RETURN_IF_ERROR(sel.Run(q.data(), k.data(), stream));
  DHSA_RETURN_IF_ERROR(SparseAttentionCuda(p, stream));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "selection + attention"));
  DHSA_ASSIGN_OR_RETURN(std::vector<int64_t> b, sel.Boundaries());
  r.chunks = static_cast<int64_t>(b.size()) - 1;
  DHSA_ASSIGN_OR_RETURN(Selection got, sel.ToSelection());
  r.entries = static_cast<int64_t>(got.spans.size());
  int64_t keys = 0;
  for (const std::vector<Span>& spans : got.spans) {
    for (const Span& s : spans) keys += s.size();
  }
  r.keys_per_entry = static_cast<double>(keys) / static_cast<double>(r.entries);
  r.spans = got.spans;
  const absl::Status valid = CheckSelection(got, shape);
  std::vector<float> l(static_cast<size_t>(kHq * len));
  DHSA_RETURN_IF_ERROR(lse.CopyToHost(l.data(), l.size() * sizeof(float)));
  int64_t nonfinite = 0;
  for (float x : l) nonfinite += std::isfinite(x) ? 0 : 1;
  if (!valid.ok()) {
    r.check = std::string(valid.message());
  } else if (nonfinite > 0) {
    r.check = std::to_string(nonfinite) + " non-finite lse";
  }

  // Stage times: events around Run and at its stage marks.
  std::vector<cudaEvent_t> ev(4);
  for (cudaEvent_t& e : ev) DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&e), "event"));
  SelectionStageEvents marks;
  marks.boundaries_done = ev[1];
  marks.summaries_done = ev[2];
  auto staged = [&](bool scores_only, std::vector<double>* b_ms, std::vector<double>* s_ms,
                    std::vector<double>* c_ms) -> absl::Status {
    sel.set_mass_scores_only(scores_only);
    for (int i = 0; i < reps + 1; ++i) {
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(ev[0], stream), "event"));
      DHSA_RETURN_IF_ERROR(sel.Run(q.data(), k.data(), stream, nullptr, &marks));
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(ev[3], stream), "event"));
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(ev[3]), "stage timing"));
      float ms[3] = {0, 0, 0};
      for (int s = 0; s < 3; ++s) {
        DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventElapsedTime(&ms[s], ev[s], ev[s + 1]), "time"));
      }
      if (i == 0) continue;  // Warm-up.
      if (b_ms != nullptr) b_ms->push_back(ms[0]);
      if (s_ms != nullptr) s_ms->push_back(ms[1]);
      c_ms->push_back(ms[2]);
    }
    sel.set_mass_scores_only(false);
    return absl::OkStatus();
  };
  std::vector<double> b_ms, s_ms, c_ms, scores_ms;
  DHSA_RETURN_IF_ERROR(staged(false, &b_ms, &s_ms, &c_ms));
  if (config.chunk_score == ChunkScore::kMass) {
    DHSA_RETURN_IF_ERROR(staged(true, nullptr, nullptr, &scores_ms));
  }
  for (cudaEvent_t e : ev) cudaEventDestroy(e);
  r.boundaries = Median(b_ms);
  r.summaries = Median(s_ms);
  r.choose = Median(c_ms);
  r.scores = Median(scores_ms);
  DHSA_ASSIGN_OR_RETURN(
      DeviceTiming select,
      TimeOnDevice([&] { return sel.Run(q.data(), k.data(), stream); }, stream, 1, reps));
  // The selection buffers hold a full selection again (the scores-only runs left none).
  DHSA_ASSIGN_OR_RETURN(
      DeviceTiming attend,
      TimeOnDevice([&] { return SparseAttentionCuda(p, stream); }, stream, 1, reps));
  r.select = select.median_ms;
  r.attention = attend.median_ms;
  return r;
}

int Main(int argc, char** argv) {
  std::vector<int64_t> lengths = {131072};
  int64_t budget = 4096;
  int reps = 7;
  std::vector<std::string> picked = {"paper", "fma", "tf32", "tiled"};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* flag) -> const char* {
      const size_t n = std::strlen(flag);
      return arg.compare(0, n, flag) == 0 ? argv[i] + n : nullptr;
    };
    if (const char* x = value("--lengths=")) {
      lengths.clear();
      for (absl::string_view s : absl::StrSplit(x, ',')) {
        int64_t l = 0;
        if (!absl::SimpleAtoi(s, &l) || l < 1) {
          std::fprintf(stderr, "bad length '%s'\n", std::string(s).c_str());
          return 1;
        }
        lengths.push_back(l);
      }
    } else if (const char* x = value("--budget=")) {
      if (!absl::SimpleAtoi(x, &budget) || budget < 512) {
        std::fprintf(stderr, "bad budget '%s'\n", x);
        return 1;
      }
    } else if (const char* x = value("--variants=")) {
      picked = absl::StrSplit(x, ',');
      for (const std::string& name : picked) {
        bool known = false;
        for (const Variant& v : kVariants) known = known || name == v.key;
        if (!known) {
          std::fprintf(stderr, "unknown variant '%s'\n", name.c_str());
          return 1;
        }
      }
    } else if (const char* x = value("--reps=")) {
      if (!absl::SimpleAtoi(x, &reps) || reps < 1) {
        std::fprintf(stderr, "bad reps '%s'\n", x);
        return 1;
      }
    } else {
      std::fprintf(stderr,
                   "usage: mass_selection_bench [--lengths=131072] [--budget=4096] [--reps=7] "
                   "[--variants=paper,fma,tf32,tiled,...]\n");
      return 1;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device %s; Hq %lld, Hkv %lld, d %lld, bf16, budget %lld, median of %d runs\n",
              prop.name, static_cast<long long>(kHq), static_cast<long long>(kHkv),
              static_cast<long long>(kDim), static_cast<long long>(budget), reps);
  cudaStream_t stream = nullptr;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  bool ok = true;
  std::vector<std::string> table;
  for (int64_t len : lengths) {
    WorkloadConfig wc;
    wc.len = len;
    wc.hq = kHq;
    wc.hkv = kHkv;
    wc.dim = kDim;
    wc.dtype = DType::kBF16;
    absl::StatusOr<Workload> w = GenerateWorkload(wc);
    if (!w.ok()) {
      std::fprintf(stderr, "workload: %s\n", std::string(w.status().message()).c_str());
      return 1;
    }
    absl::StatusOr<DeviceBuffer> q = DeviceBuffer::FromHost(w->q.data(), w->q.bytes.size());
    absl::StatusOr<DeviceBuffer> k = DeviceBuffer::FromHost(w->k.data(), w->k.bytes.size());
    absl::StatusOr<DeviceBuffer> v = DeviceBuffer::FromHost(w->v.data(), w->v.bytes.size());
    absl::StatusOr<DeviceBuffer> o = DeviceBuffer::Allocate(kHq * len * kDim * sizeof(float));
    absl::StatusOr<DeviceBuffer> lse = DeviceBuffer::Allocate(kHq * len * sizeof(float));
    if (!q.ok() || !k.ok() || !v.ok() || !o.ok() || !lse.ok()) {
      std::fprintf(stderr, "device memory for L = %lld\n", static_cast<long long>(len));
      return 1;
    }
    std::vector<std::vector<Span>> first_mass;
    for (const std::string& key : picked) {
      const Variant* variant = nullptr;
      for (const Variant& v : kVariants) {
        if (key == v.key) variant = &v;
      }
      const bool mass = variant->mass;
      const DhsaConfig config = mass ? MassDefaults(budget) : PaperStructure(budget);
      const char* name = variant->name;
      absl::StatusOr<Result> r = RunCase(*w, *q, *k, *v, *o, *lse, config, *variant, reps, stream);
      if (!r.ok()) {
        std::printf("L %lld %s: %s\n", static_cast<long long>(len), name,
                    std::string(r.status().message()).c_str());
        ok = false;
        continue;
      }
      ok = ok && r->check == "ok";
      // Entries whose spans differ from the first mass variant's (scores within rounding may
      // order tied chunks apart; the tests bound those).
      if (mass && first_mass.empty()) first_mass = std::move(r->spans);
      if (mass && !first_mass.empty() && first_mass.size() == r->spans.size()) {
        int64_t differ = 0;
        for (size_t i = 0; i < first_mass.size(); ++i) differ += first_mass[i] != r->spans[i];
        std::printf("L %lld %s: %lld of %zu entries differ from the first mass variant's\n",
                    static_cast<long long>(len), name, static_cast<long long>(differ),
                    first_mass.size());
      }
      char line[512];
      std::snprintf(line, sizeof(line),
                    "| %lld | %s | %lld | %.3f | %.3f | %.3f | %s | %.3f | %.3f | %.1f%% | %.0f | "
                    "%lld | %.0f | %s |",
                    static_cast<long long>(len), name, static_cast<long long>(r->chunks),
                    r->boundaries, r->summaries, r->choose,
                    mass ? std::to_string(r->scores).substr(0, 6).c_str() : "-", r->select,
                    r->attention, 100.0 * r->select / r->attention, r->workspace_mb,
                    static_cast<long long>(r->span_cap), r->keys_per_entry, r->check.c_str());
      std::printf("%s\n", line);
      std::fflush(stdout);
      table.push_back(line);
    }
  }
  std::printf(
      "\n== mass vs paper selection on the GPU (ms; choose = scores + cut; scores = mass scores "
      "alone)\n| L | config | chunks | boundaries | summaries | choose | scores | selection | "
      "attention | selection/attention | workspace MiB | span cap | keys/entry | check |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& line : table) std::printf("%s\n", line.c_str());
  cudaStreamDestroy(stream);
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace dhsa

int main(int argc, char** argv) { return dhsa::Main(argc, argv); }
