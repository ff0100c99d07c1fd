// End-to-end DHSA prefill on the GPU (issue 5's benchmark, our side): Hq = 32, Hkv = 8, d = 128,
// bf16, structured synthetic inputs (bench/workload), L tokens, token budgets. For each case:
// the device selection (boundaries, summaries, scores, top chunks: kernels/cuda/selection_cuda.h)
// and the sparse attention over it, each timed with CUDA events (median after warm-up), and both
// together as one enqueued sequence (the end-to-end time). TFLOP/s counts the (query, key) pairs
// actually computed (4 d flops each: q.k and p v); the ceiling is the cuBLAS bf16 GEMM measured in
// the same run. Checks: outputs poisoned (NaN) before the checked run, every lse finite after; at
// L <= --check_max the device selection equals the reference selection (computed on the CPU), and
// a kernel other than the portable one (--kernel) gives the portable kernel's outputs within 2e-2
// (o) and 1e-2 (lse).
// --configs=paper,default: the selection configs to run. `paper` (the default) is the spec's
// method spelled out here field by field (chunk score paper, q_block 128, chunk mean 32, min 8,
// max 128, score_rows 16, sink 128, local 256), so that the numbers stay comparable across
// library default changes; `default` is DhsaConfig{} of this build with the budget set (skipped
// with a note where the device selection does not implement it).
// xSDPA: SDPA causal's time (--sdpa_ms=L:ms,...; by default cuDNN's measured on an H200 on
// 2026-11-28, bench/results/2026-11-28-h200-hopper-end-to-end.md, not in this run) over our total.
// --compare=K1,K2,... also times the attention of other kernels (portable, hopper, hopper_serial)
// and of the Hopper kernel's tuning variants (sparse_attention_variants.h: variant names, or "all")
// on the same selection, each checked against the portable kernel the same way, in a second table.
//
// Prints one `CSV,...` line per case (bench/gpu/sdpa_peer.py reads them to put the peers beside
// ours) and a table last.
//
// Usage: sparse_attention_bench [--lengths=8192,32768,65536,131072] [--budgets=2048,4096]
//                               [--seconds=1] [--check_max=32768]
//                               [--kernel=auto|portable|hopper|hopper_serial]
//                               [--compare=portable,hopper,...,VARIANT,...|all]
//                               [--configs=paper,default] [--sdpa_ms=131072:254.088,...]
// Exit status: 0 when every case ran and passed its checks, 1 otherwise, 2 without a device.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/gpu/calibration.h"
#include "bench/gpu/event_timer.h"
#include "bench/gpu/reference_selection.h"
#include "bench/workload/workload.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/selection_cuda.h"
#include "kernels/cuda/sparse_attention_cuda.h"
#include "kernels/cuda/sparse_attention_variants.h"

namespace dhsa {
namespace {

constexpr int64_t kHq = 32, kHkv = 8, kDim = 128;

struct Options {
  std::vector<int64_t> lengths = {8192, 32768, 65536, 131072};
  std::vector<int64_t> budgets = {2048, 4096};
  double seconds = 1.0;  // Timed runs per measurement take about this long (3 to 50 runs).
  int64_t check_max = 32768;
  SparseAttentionCudaKernel kernel = SparseAttentionCudaKernel::kAuto;
  std::vector<std::string> compare;  // Other kernels or variants timed beside (--compare).
  std::vector<std::string> configs = {"paper"};
  // SDPA causal (cuDNN) on an H200, 2026-11-28
  // (bench/results/2026-11-28-h200-hopper-end-to-end.md).
  std::map<int64_t, double> sdpa_ms = {
      {8192, 0.945}, {32768, 14.856}, {65536, 58.284}, {131072, 254.088}};
};

// The spec's method (spec/DHSA.md defaults, chunk score `paper`), every field set here.
DhsaConfig BenchPaperConfig(int64_t budget) {
  DhsaConfig c;
  c.policy = Policy::kDhsa;
  c.budget = budget;
  c.sink = 128;
  c.local = 256;
  c.q_block = 128;
  c.boundary_mode = BoundaryMode::kDynamic;
  c.boundary_window = 4;
  c.chunk_mean = 32;
  c.chunk_min = 8;
  c.chunk_max = 128;
  c.shared_heads = false;
  c.summary_norm = SummaryNorm::kSqrt;
  c.chunk_score = ChunkScore::kPaper;
  c.score_rows = 16;
  c.scale = 0.0f;
  return c;
}

// Config `name` (paper or default) with `budget`, or false for an unknown name.
bool BenchConfig(const std::string& name, int64_t budget, DhsaConfig* config) {
  if (name == "paper") {
    *config = BenchPaperConfig(budget);
    return true;
  }
  if (name == "default") {
    *config = DhsaConfig{};
    config->budget = budget;
    return true;
  }
  return false;
}

const char* KernelName(SparseAttentionCudaKernel kernel) {
  switch (kernel) {
    case SparseAttentionCudaKernel::kAuto:
      return "auto";
    case SparseAttentionCudaKernel::kPortable:
      return "portable";
    case SparseAttentionCudaKernel::kHopper:
      return "hopper";
    case SparseAttentionCudaKernel::kHopperSerial:
      return "hopper_serial";
  }
  return "?";
}

// One compared kernel or variant on one case.
struct Compared {
  std::string name;
  DeviceTiming attention;
  double tflops = 0;
  std::string check = "ok";
  bool failed = false;
};

struct Row {
  std::vector<Compared> compared;
  std::string config;
  bool skipped = false;  // The device selection does not implement the config (check says why).
  int64_t len = 0;
  int64_t budget = 0;
  int64_t pairs = 0;
  double density = 0;
  DeviceTiming select, attention, total;
  double boundaries_ms = 0, summaries_ms = 0, choose_ms = 0;  // Steps 1, 2, 3-4 (means).
  double gaps_ms = 0, sort_ms = 0, nms_ms = 0;                // Step 1's parts (means).
  // Variants, each with the rest at the defaults (means): the first gap kernel; the windowed one
  // with the block's norm phase; the serial NMS; Steps 3-4 with unbatched scores.
  double legacy_gaps_ms = 0, block_norms_gaps_ms = 0, serial_nms_ms = 0;
  // Steps 3-4 with the scores in the cut kernel (batched), with shared-memory copies of the tiled
  // scores in the cut, with the query blocks in order, and the scores alone (no cut); the chunk
  // summaries' part of Step 2 (means).
  double in_kernel_choose_ms = 0, copies_choose_ms = 0, in_order_choose_ms = 0;
  double scores_only_ms = 0, kappa_ms = 0;
  double serial_select_ms = 0, overlap_select_ms = 0;  // Whole selection, rho on the stream or
                                                       // beside Step 1 (means of the same loop).
  double tflops = 0;
  std::string check = "ok";
  bool failed = false;
};

bool ParseList(const std::string& value, std::vector<int64_t>* out) {
  out->clear();
  for (absl::string_view part : absl::StrSplit(value, ',')) {
    int64_t x = 0;
    if (!absl::SimpleAtoi(part, &x) || x < 1) return false;
    out->push_back(x);
  }
  return !out->empty();
}

bool ParseOptions(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq),
                      value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    if (key == "--lengths") {
      if (!ParseList(value, &o->lengths)) return false;
    } else if (key == "--budgets") {
      if (!ParseList(value, &o->budgets)) return false;
    } else if (key == "--seconds") {
      if (!absl::SimpleAtod(value, &o->seconds) || !(o->seconds > 0)) return false;
    } else if (key == "--check_max") {
      if (!absl::SimpleAtoi(value, &o->check_max)) return false;
    } else if (key == "--kernel") {
      bool known = false;
      for (SparseAttentionCudaKernel k :
           {SparseAttentionCudaKernel::kAuto, SparseAttentionCudaKernel::kPortable,
            SparseAttentionCudaKernel::kHopper, SparseAttentionCudaKernel::kHopperSerial}) {
        if (value == KernelName(k)) {
          o->kernel = k;
          known = true;
        }
      }
      if (!known) return false;
    } else if (key == "--configs") {
      o->configs.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        DhsaConfig unused;
        if (!BenchConfig(std::string(part), 2048, &unused)) return false;
        o->configs.emplace_back(part);
      }
      if (o->configs.empty()) return false;
    } else if (key == "--sdpa_ms") {
      o->sdpa_ms.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        const std::vector<std::string> lm = absl::StrSplit(part, ':');
        int64_t len = 0;
        double ms = 0;
        if (lm.size() != 2 || !absl::SimpleAtoi(lm[0], &len) || !absl::SimpleAtod(lm[1], &ms)) {
          return false;
        }
        o->sdpa_ms[len] = ms;
      }
    } else if (key == "--compare") {
      o->compare.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        if (part == "all") {
          for (const char* k : {"portable", "hopper"}) o->compare.emplace_back(k);
          for (int i = 0; i < SparseAttentionHopperVariantCount(); ++i) {
            o->compare.emplace_back(SparseAttentionHopperVariantName(i));
          }
        } else if (!part.empty()) {
          o->compare.emplace_back(part);
        }
      }
    } else {
      return false;
    }
  }
  return true;
}

// Pairs (row p, key t) with t in the span and t <= p, over rows [r0, r1): closed form.
int64_t SpanPairs(int64_t begin, int64_t end, int64_t r0, int64_t r1) {
  int64_t pairs = 0;
  // Rows p < begin see none; rows begin <= p < end see p + 1 - begin; rows p >= end see all.
  const int64_t a = std::max(r0, begin), b = std::min(r1, end);
  if (b > a) pairs += (b - a) * (a + b - 1 - 2 * begin + 2) / 2;  // Sum of p + 1 - begin.
  const int64_t full = std::max<int64_t>(0, r1 - std::max(r0, end));
  pairs += full * (end - begin);
  return pairs;
}

int64_t ComputedPairs(const Selection& s, int64_t lk, int64_t group) {
  int64_t pairs = 0;
  for (int64_t h = 0; h < s.num_heads; ++h) {
    for (int64_t b = 0; b < s.num_blocks; ++b) {
      const int64_t r0 = (s.first_block + b) * s.block_size;
      const int64_t r1 = std::min(r0 + s.block_size, lk);
      for (const Span& span : s.At(h, b)) pairs += SpanPairs(span.begin, span.end, r0, r1);
    }
  }
  return pairs * group;
}

// The launch of compared kernel `name` (a kernel's name or a Hopper variant's), or an error.
absl::StatusOr<std::function<absl::Status(cudaStream_t)>> ComparedLaunch(
    const std::string& name, const SparseAttentionCudaParams& p) {
  for (SparseAttentionCudaKernel k :
       {SparseAttentionCudaKernel::kPortable, SparseAttentionCudaKernel::kHopper,
        SparseAttentionCudaKernel::kHopperSerial}) {
    if (name == KernelName(k)) {
      SparseAttentionCudaParams q = p;
      q.kernel = k;
      DHSA_RETURN_IF_ERROR(CanImplement(q));
      return std::function<absl::Status(cudaStream_t)>(
          [q](cudaStream_t stream) { return SparseAttentionCuda(q, stream); });
    }
  }
  for (int i = 0; i < SparseAttentionHopperVariantCount(); ++i) {
    if (name == SparseAttentionHopperVariantName(i)) {
      return std::function<absl::Status(cudaStream_t)>(
          [p, i](cudaStream_t stream) { return SparseAttentionCudaHopperVariant(p, i, stream); });
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown kernel or variant '", name, "'"));
}

struct DeviceInputs {
  DeviceBuffer q, k, v, o, lse;
};

absl::StatusOr<DeviceInputs> Upload(const Workload& w) {
  DeviceInputs d;
  DHSA_ASSIGN_OR_RETURN(d.q, DeviceBuffer::FromHost(w.q.data(), w.q.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(d.k, DeviceBuffer::FromHost(w.k.data(), w.k.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(d.v, DeviceBuffer::FromHost(w.v.data(), w.v.bytes.size()));
  DHSA_ASSIGN_OR_RETURN(d.o, DeviceBuffer::Allocate(w.q.NumElements() * sizeof(float)));
  DHSA_ASSIGN_OR_RETURN(d.lse, DeviceBuffer::Allocate(kHq * w.config.len * sizeof(float)));
  return d;
}

absl::Status RunCase(const Workload& w, DeviceInputs& d, const DhsaConfig& config,
                     const Options& options, cudaStream_t stream, Row* row) {
  const int64_t len = w.config.len;
  AttentionShape shape{kHq, kHkv, kDim, len, len};
  absl::StatusOr<DeviceDhsaSelection> created =
      DeviceDhsaSelection::Create(config, shape, DType::kBF16);
  if (absl::IsUnimplemented(created.status())) {
    row->skipped = true;
    row->check = absl::StrCat("skipped: ", created.status().message());
    return absl::OkStatus();
  }
  DHSA_RETURN_IF_ERROR(created.status());
  DeviceDhsaSelection selection = *std::move(created);
  SparseAttentionCudaParams p;
  p.dtype = DType::kBF16;
  p.q = d.q.data();
  p.k = d.k.data();
  p.v = d.v.data();
  p.o = d.o.as<float>();
  p.lse = d.lse.as<float>();
  p.hq = kHq;
  p.hkv = kHkv;
  p.head_dim = kDim;
  p.lq = len;
  p.lk = len;
  p.scale = EffectiveScale(config, kDim);
  p.kernel = options.kernel;
  DHSA_RETURN_IF_ERROR(selection.Attach(&p));

  // The checked run, on poisoned outputs.
  DHSA_RETURN_IF_ERROR(selection.Poison());
  DHSA_RETURN_IF_ERROR(d.o.Fill(0xFF));
  DHSA_RETURN_IF_ERROR(d.lse.Fill(0xFF));
  auto start = std::chrono::steady_clock::now();
  DHSA_RETURN_IF_ERROR(selection.Run(d.q.data(), d.k.data(), stream));
  DHSA_RETURN_IF_ERROR(SparseAttentionCuda(p, stream));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "selection + attention"));
  const double first_ms =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
  std::vector<float> lse(static_cast<size_t>(kHq * len));
  DHSA_RETURN_IF_ERROR(d.lse.CopyToHost(lse.data(), lse.size() * sizeof(float)));
  int64_t nonfinite = 0;
  for (float x : lse) nonfinite += std::isfinite(x) ? 0 : 1;
  DHSA_ASSIGN_OR_RETURN(Selection got, selection.ToSelection());
  row->pairs = ComputedPairs(got, len, kHq / kHkv);
  row->density = double(row->pairs) / (double(kHq) * double(len) * double(len + 1) / 2.0);
  if (nonfinite > 0) {
    row->check = absl::StrCat(nonfinite, " non-finite lse");
    row->failed = true;
  } else if (len <= options.check_max) {
    DHSA_ASSIGN_OR_RETURN(Selection want, ReferenceSelection(w.q, w.k, config));
    int64_t differing = 0;
    for (size_t e = 0; e < want.spans.size(); ++e)
      differing += got.spans[e] == want.spans[e] ? 0 : 1;
    row->check = differing == 0 ? "ok, =ref" : absl::StrCat(differing, " entries != ref");
    row->failed = differing != 0;
  }
  // Another kernel than the portable one: its outputs against the portable kernel's on the same
  // selection (both round P to bf16; they differ by accumulation order only).
  if (!row->failed && len <= options.check_max &&
      ChosenKernel(p) != SparseAttentionCudaKernel::kPortable) {
    std::vector<float> o(static_cast<size_t>(w.q.NumElements())), o_portable(o.size()),
        lse_portable(lse.size());
    DHSA_RETURN_IF_ERROR(d.o.CopyToHost(o.data(), o.size() * sizeof(float)));
    SparseAttentionCudaParams portable = p;
    portable.kernel = SparseAttentionCudaKernel::kPortable;
    DHSA_RETURN_IF_ERROR(SparseAttentionCuda(portable, stream));
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "portable attention"));
    DHSA_RETURN_IF_ERROR(d.o.CopyToHost(o_portable.data(), o.size() * sizeof(float)));
    DHSA_RETURN_IF_ERROR(d.lse.CopyToHost(lse_portable.data(), lse.size() * sizeof(float)));
    double o_diff = 0, lse_diff = 0;
    for (size_t i = 0; i < o.size(); ++i) {
      o_diff = std::max(o_diff, double(std::fabs(o[i] - o_portable[i])));
    }
    for (size_t i = 0; i < lse.size(); ++i) {
      lse_diff = std::max(lse_diff, double(std::fabs(lse[i] - lse_portable[i])));
    }
    // NaN fails both comparisons below.
    const bool close = o_diff <= 2e-2 && lse_diff <= 1e-2;
    absl::StrAppend(&row->check, close ? ", =portable" : ", != portable", " (do ",
                    absl::SixDigits(o_diff), " dlse ", absl::SixDigits(lse_diff), ")");
    row->failed = row->failed || !close;
  }

  // Compared kernels: each one's outputs against the portable kernel's, then its attention time.
  const int reps = RepsFor(first_ms, options.seconds, 3, 50);
  if (!options.compare.empty()) {
    std::vector<float> o_portable(static_cast<size_t>(w.q.NumElements())), lse_portable(lse.size()),
        o(o_portable.size()), lse_k(lse.size());
    SparseAttentionCudaParams portable = p;
    portable.kernel = SparseAttentionCudaKernel::kPortable;
    DHSA_RETURN_IF_ERROR(SparseAttentionCuda(portable, stream));
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "portable attention"));
    DHSA_RETURN_IF_ERROR(d.o.CopyToHost(o_portable.data(), o.size() * sizeof(float)));
    DHSA_RETURN_IF_ERROR(d.lse.CopyToHost(lse_portable.data(), lse.size() * sizeof(float)));
    for (const std::string& name : options.compare) {
      Compared c;
      c.name = name;
      absl::StatusOr<std::function<absl::Status(cudaStream_t)>> launch = ComparedLaunch(name, p);
      absl::Status status = launch.status();
      if (status.ok()) status = d.o.Fill(0xFF);
      if (status.ok()) status = d.lse.Fill(0xFF);
      if (status.ok()) status = (*launch)(stream);
      if (status.ok()) status = CudaStatus(cudaStreamSynchronize(stream), name);
      if (status.ok()) status = d.o.CopyToHost(o.data(), o.size() * sizeof(float));
      if (status.ok()) status = d.lse.CopyToHost(lse_k.data(), lse_k.size() * sizeof(float));
      if (!status.ok()) {
        c.check = status.ToString();
        c.failed = true;
        row->compared.push_back(c);
        continue;
      }
      double o_diff = 0, lse_diff = 0;
      int64_t nonfinite_k = 0;
      for (size_t i = 0; i < o.size(); ++i) {
        nonfinite_k += std::isfinite(o[i]) ? 0 : 1;
        o_diff = std::max(o_diff, double(std::fabs(o[i] - o_portable[i])));
      }
      for (size_t i = 0; i < lse_k.size(); ++i) {
        nonfinite_k += std::isfinite(lse_k[i]) ? 0 : 1;
        lse_diff = std::max(lse_diff, double(std::fabs(lse_k[i] - lse_portable[i])));
      }
      const bool close = nonfinite_k == 0 && o_diff <= 2e-2 && lse_diff <= 1e-2;
      c.check =
          absl::StrCat(close ? "=portable" : "!= portable", " (do ", absl::SixDigits(o_diff),
                       " dlse ", absl::SixDigits(lse_diff),
                       nonfinite_k > 0 ? absl::StrCat(", ", nonfinite_k, " non-finite") : "", ")");
      // Diagnostic variants time part of the work: their outputs are wrong by design.
      const bool diagnostic = name.rfind("diag_", 0) == 0;
      if (diagnostic) c.check = "diagnostic (outputs not checked)";
      c.failed = !close && !diagnostic;
      absl::StatusOr<DeviceTiming> timing =
          TimeOnDevice([&] { return (*launch)(stream); }, stream, 2, reps);
      if (!timing.ok()) {
        c.check = timing.status().ToString();
        c.failed = true;
      } else {
        c.attention = *timing;
        c.tflops = 4.0 * kDim * double(row->pairs) / (c.attention.median_ms * 1e-3) / 1e12;
      }
      row->compared.push_back(c);
    }
  }

  auto select = [&] { return selection.Run(d.q.data(), d.k.data(), stream); };
  auto attend = [&] { return SparseAttentionCuda(p, stream); };
  auto both = [&]() -> absl::Status {
    DHSA_RETURN_IF_ERROR(select());
    return attend();
  };
  DHSA_ASSIGN_OR_RETURN(row->select, TimeOnDevice(select, stream, 2, reps));
  DHSA_ASSIGN_OR_RETURN(row->attention, TimeOnDevice(attend, stream, 2, reps));
  DHSA_ASSIGN_OR_RETURN(row->total, TimeOnDevice(both, stream, 2, reps));
  row->tflops = 4.0 * kDim * double(row->pairs) / (row->attention.median_ms * 1e-3) / 1e12;

  // The selection's steps apart, with the library defaults: events after the gap
  // dissimilarities, the sort, the boundaries, the chunk summaries and the query-block summaries,
  // mean of 10 runs; then one variant at a time, the rest at the defaults: the first (legacy) gap
  // kernel; the windowed one with the block's norm phase; the serial NMS; the scores in the cut
  // kernel (the previous path, batched); the query-block summaries beside Step 1 (the whole
  // selection); shared-memory copies of the tiled scores in the cut; the query blocks in order
  // (not heavy first); the scores without the cut (a diagnostic).
  constexpr int kMarks = 7;
  cudaEvent_t marks[kMarks];
  for (cudaEvent_t& e : marks) DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&e), "event"));
  SelectionStageEvents stages;
  stages.gaps_done = marks[1];
  stages.sort_done = marks[2];
  stages.boundaries_done = marks[3];
  stages.kappa_done = marks[4];
  stages.summaries_done = marks[5];
  constexpr int kStageRuns = 10;
  auto defaults = [&] {  // selection_cuda.h's defaults.
    selection.set_legacy_gap_kernel(false);
    selection.set_gap_warp_norms(true);
    selection.set_parallel_nms(true);
    selection.set_batched_scores(true);
    selection.set_overlap_query_summaries(true);
    selection.set_select_uniform_aggregate(false);
    selection.set_select_heavy_first(true);
    selection.set_select_skip_cut(false);
    selection.set_paper_tiled_scores(true, true);
  };
  // Mode 0 (the parts) and the variants run with rho on the caller's stream, so that the events
  // split the steps; mode 5 is the defaults as they are (rho beside Step 1).
  for (int mode = 0; mode < 9; ++mode) {
    defaults();
    selection.set_overlap_query_summaries(mode == 5);
    if (mode == 1) selection.set_legacy_gap_kernel(true);
    if (mode == 2) selection.set_gap_warp_norms(false);
    if (mode == 3) selection.set_parallel_nms(false);
    if (mode == 4) selection.set_paper_tiled_scores(false);
    if (mode == 6) selection.set_paper_tiled_scores(true, false);
    if (mode == 7) selection.set_select_heavy_first(false);
    if (mode == 8) selection.set_select_skip_cut(true);
    for (int i = 0; i < kStageRuns; ++i) {
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(marks[0], stream), "event"));
      DHSA_RETURN_IF_ERROR(selection.Run(d.q.data(), d.k.data(), stream, nullptr, &stages));
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(marks[kMarks - 1], stream), "event"));
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(marks[kMarks - 1]), "stage timing"));
      float ms[kMarks - 1] = {};
      double whole = 0;
      for (int s = 0; s + 1 < kMarks; ++s) {
        DHSA_RETURN_IF_ERROR(
            CudaStatus(cudaEventElapsedTime(&ms[s], marks[s], marks[s + 1]), "elapsed"));
        whole += ms[s];
      }
      const double choose = ms[5] / kStageRuns;
      switch (mode) {
        case 0:
          row->serial_select_ms += whole / kStageRuns;
          row->gaps_ms += ms[0] / kStageRuns;
          row->sort_ms += ms[1] / kStageRuns;
          row->nms_ms += ms[2] / kStageRuns;
          row->boundaries_ms += (ms[0] + ms[1] + ms[2]) / kStageRuns;
          row->kappa_ms += ms[3] / kStageRuns;
          row->summaries_ms += (ms[3] + ms[4]) / kStageRuns;
          row->choose_ms += choose;
          break;
        case 1:
          row->legacy_gaps_ms += ms[0] / kStageRuns;
          break;
        case 2:
          row->block_norms_gaps_ms += ms[0] / kStageRuns;
          break;
        case 3:
          row->serial_nms_ms += ms[2] / kStageRuns;
          break;
        case 4:
          row->in_kernel_choose_ms += choose;
          break;
        case 5:
          row->overlap_select_ms += whole / kStageRuns;
          break;
        case 6:
          row->copies_choose_ms += choose;
          break;
        case 7:
          row->in_order_choose_ms += choose;
          break;
        default:
          row->scores_only_ms += choose;
          break;
      }
    }
  }
  defaults();
  for (cudaEvent_t e : marks) cudaEventDestroy(e);
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  Options options;
  if (!ParseOptions(argc, argv, &options)) {
    std::fprintf(stderr,
                 "usage: %s [--lengths=8192,32768,65536,131072] [--budgets=2048,4096] "
                 "[--seconds=1] [--check_max=32768] [--kernel=auto|portable|hopper|hopper_serial] "
                 "[--compare=KERNEL_OR_VARIANT,...|all]\n",
                 argv[0]);
    return 1;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to time\n");
    return 2;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s, %d SMs, sm_%d%d, %.1f GiB, L2 %d MiB\n", prop.name,
              prop.multiProcessorCount, prop.major, prop.minor,
              double(prop.totalGlobalMem) / (1 << 30), prop.l2CacheSize >> 20);
  cudaStream_t stream;
  if (cudaStreamCreate(&stream) != cudaSuccess) return 1;
  const absl::StatusOr<double> gemm = CublasBf16GemmTflops(8192, stream);
  const std::string gemm_text = gemm.ok() ? absl::StrCat(*gemm) : gemm.status().ToString();
  std::printf("ceiling: cuBLAS bf16 GEMM 8192^3 TFLOP/s = %s\n", gemm_text.c_str());
  SparseAttentionCudaParams probe;
  probe.kernel = options.kernel;
  std::printf("attention kernel: %s (asked: %s)\n", KernelName(ChosenKernel(probe)),
              KernelName(options.kernel));
  std::fflush(stdout);

  std::vector<Row> rows;
  bool failed = false;
  for (int64_t len : options.lengths) {
    WorkloadConfig wc;
    wc.len = len;
    wc.hq = kHq;
    wc.hkv = kHkv;
    wc.dim = kDim;
    wc.dtype = DType::kBF16;
    absl::StatusOr<Workload> w = GenerateWorkload(wc);
    absl::StatusOr<DeviceInputs> d = w.ok() ? Upload(*w) : absl::StatusOr<DeviceInputs>(w.status());
    if (!d.ok()) {
      std::printf("L=%lld: inputs: %s\n", static_cast<long long>(len),
                  d.status().ToString().c_str());
      failed = true;
      continue;
    }
    for (const std::string& config_name : options.configs) {
      for (int64_t budget : options.budgets) {
        Row row;
        row.len = len;
        row.budget = budget;
        row.config = config_name;
        DhsaConfig config;
        BenchConfig(config_name, budget, &config);  // Names checked by ParseOptions.
        const absl::Status status = RunCase(*w, *d, config, options, stream, &row);
        if (!status.ok()) {
          row.check = status.ToString();
          row.failed = true;
        }
        failed = failed || row.failed;
        for (const Compared& c : row.compared) {
          failed = failed || c.failed;
          std::printf("COMPARE,%lld,%lld,%s,%.4f,%.2f,%s\n", static_cast<long long>(len),
                      static_cast<long long>(budget), c.name.c_str(), c.attention.median_ms,
                      c.tflops, c.check.c_str());
        }
        // sdpa_peer.py reads the `paper` rows (CSV,...); other configs print CSV_<config>,....
        const std::string tag = config_name == "paper" ? "CSV" : "CSV_" + config_name;
        std::printf("%s,%lld,%lld,%lld,%.6f,%.4f,%.4f,%.4f,%.2f,%s,%s\n", tag.c_str(),
                    static_cast<long long>(len), static_cast<long long>(budget),
                    static_cast<long long>(row.pairs), row.density, row.select.median_ms,
                    row.attention.median_ms, row.total.median_ms, row.tflops,
                    gemm.ok() ? absl::StrCat(*gemm).c_str() : "nan", row.check.c_str());
        std::fflush(stdout);
        rows.push_back(row);
      }
    }
  }

  std::printf("\n== dhsa on the GPU end to end, Hq=%lld Hkv=%lld d=%lld bf16, %s ==\n",
              static_cast<long long>(kHq), static_cast<long long>(kHkv),
              static_cast<long long>(kDim), prop.name);
  std::printf("ceiling: cuBLAS bf16 GEMM %s TFLOP/s; attention kernel: %s\n", gemm_text.c_str(),
              KernelName(ChosenKernel(probe)));
  std::printf(
      "total_ms: selection + attention enqueued together, timed as one (median); sel%%: select_ms "
      "(timed alone) / total_ms; xSDPA: SDPA causal ms (--sdpa_ms; default cuDNN on an H200, "
      "2026-11-28, not this run) / total_ms\n");
  std::printf("%-8s %-7s %-6s %8s %10s %22s %10s %10s %6s %8s %6s %7s %s\n", "config", "L",
              "budget", "density", "select_ms", "(bounds+summ+choose)", "attn_ms", "total_ms",
              "sel%", "TFLOP/s", "%gemm", "xSDPA", "check");
  for (const Row& r : rows) {
    if (r.skipped) {
      std::printf("%-8s %-7lld %-6lld %s\n", r.config.c_str(), static_cast<long long>(r.len),
                  static_cast<long long>(r.budget), r.check.c_str());
      continue;
    }
    const double share = gemm.ok() && *gemm > 0 ? 100.0 * r.tflops / *gemm : 0.0;
    const auto sdpa = options.sdpa_ms.find(r.len);
    char speedup[32] = "-";
    if (sdpa != options.sdpa_ms.end() && r.total.median_ms > 0) {
      std::snprintf(speedup, sizeof(speedup), "%.2f", sdpa->second / r.total.median_ms);
    }
    std::printf(
        "%-8s %-7lld %-6lld %8.4f %10.3f %6.3f+%6.3f+%6.3f   %10.3f %10.3f %6.1f %8.1f %6.1f %7s "
        "%s\n",
        r.config.c_str(), static_cast<long long>(r.len), static_cast<long long>(r.budget),
        r.density, r.select.median_ms, r.boundaries_ms, r.summaries_ms, r.choose_ms,
        r.attention.median_ms, r.total.median_ms,
        r.total.median_ms > 0 ? 100.0 * r.select.median_ms / r.total.median_ms : 0.0, r.tflops,
        share, speedup, r.check.c_str());
  }
  std::printf(
      "\nStep 1 apart (ms, means of 10, library defaults, rho on the stream): gap dissimilarities "
      "+ "
      "sort + NMS and "
      "split; beside them the variants (first gap kernel, block norm phase, serial NMS)\n");
  for (const Row& r : rows) {
    if (r.skipped) continue;
    std::printf(
        "%-8s %-7lld %-6lld gaps %6.3f + sort %6.3f + nms %6.3f = %6.3f | first kernel %6.3f, "
        "block norms %6.3f, serial nms %6.3f\n",
        r.config.c_str(), static_cast<long long>(r.len), static_cast<long long>(r.budget),
        r.gaps_ms, r.sort_ms, r.nms_ms, r.boundaries_ms, r.legacy_gaps_ms, r.block_norms_gaps_ms,
        r.serial_nms_ms);
  }
  std::printf(
      "\nSteps 2-4 apart (ms, means of 10; rho on the stream): summaries = kappa + rho; choose "
      "(Steps 3-4) at the defaults (tiled scores read in place by the cut), with the scores in "
      "the cut kernel (before), with the cut on shared copies of the tiled scores, query blocks "
      "in order (not heavy first), scores alone (no cut); the whole selection as summed by the "
      "events with rho on the stream, and with rho beside Step 1 (the default)\n");
  for (const Row& r : rows) {
    if (r.skipped) continue;
    std::printf(
        "%-8s %-7lld %-6lld summ %6.3f = kappa %6.3f + rho %6.3f | choose %6.3f in kernel %6.3f "
        "copies %6.3f in order %6.3f scores %6.3f | whole %6.3f overlapped %6.3f\n",
        r.config.c_str(), static_cast<long long>(r.len), static_cast<long long>(r.budget),
        r.summaries_ms, r.kappa_ms, r.summaries_ms - r.kappa_ms, r.choose_ms, r.in_kernel_choose_ms,
        r.copies_choose_ms, r.in_order_choose_ms, r.scores_only_ms, r.serial_select_ms,
        r.overlap_select_ms);
  }
  if (!options.compare.empty()) {
    std::printf(
        "\n== attention kernels side by side (same selection; TFLOP/s on computed pairs) ==\n");
    std::printf("%-8s %-7s %-6s %-14s %9s %9s %8s %s\n", "config", "L", "budget", "kernel",
                "attn_ms", "min_ms", "TFLOP/s", "check");
    for (const Row& r : rows) {
      for (const Compared& c : r.compared) {
        std::printf("%-8s %-7lld %-6lld %-14s %9.3f %9.3f %8.1f %s\n", r.config.c_str(),
                    static_cast<long long>(r.len), static_cast<long long>(r.budget), c.name.c_str(),
                    c.attention.median_ms, c.attention.min_ms, c.tflops, c.check.c_str());
      }
    }
  }
  cudaStreamDestroy(stream);
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace dhsa

int main(int argc, char** argv) { return dhsa::Main(argc, argv); }
