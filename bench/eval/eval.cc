#include "bench/eval/eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/eval/needles.h"
#include "bench/eval/pair_match.h"
#include "bench/eval/variants.h"
#include "kernels/boundaries/boundaries.h"
#include "kernels/common/status_macros.h"
#include "kernels/fidelity/fidelity_rows.h"
#include "kernels/fidelity/oracle_rows.h"
#include "kernels/fidelity/parallel.h"
#include "kernels/io/file.h"
#include "kernels/io/npy.h"
#include "kernels/summaries/summaries.h"
#include "nlohmann/json.hpp"

namespace dhsa {
namespace {

using Clock = std::chrono::steady_clock;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Chunk boundaries and summaries of one policy: they do not depend on the budget, so they are
// computed once per policy and reused for every budget.
struct Chunking {
  std::vector<int64_t> boundaries;
  Summaries kappa, rho;
  double seconds = 0;
};

// The true segment starts inside (0, lk), a forced boundary at t0, and chunks longer than
// chunk_max split into equal parts, as the dynamic rule does.
std::vector<int64_t> TrueBoundaries(const std::vector<int64_t>& starts, const AttentionShape& shape,
                                    int64_t chunk_max) {
  std::vector<int64_t> cuts = {0};
  for (int64_t t : starts) {
    if (t > 0 && t < shape.lk) cuts.push_back(t);
  }
  if (shape.t0() > 0) cuts.push_back(shape.t0());
  cuts.push_back(shape.lk);
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<int64_t> out = {0};
  for (size_t j = 0; j + 1 < cuts.size(); ++j) {
    const int64_t len = cuts[j + 1] - cuts[j];
    const int64_t parts = (len + chunk_max - 1) / chunk_max;
    for (int64_t p = 1; p < parts; ++p) out.push_back(cuts[j] + p * len / parts);
    out.push_back(cuts[j + 1]);
  }
  return out;
}

// Steps 1-2 as AttendReference does them for `variant` (dhsa or block_topk), on a fresh prefill of
// the queries [t0, lk) after keys [0, t0) segmented on their own.
absl::StatusOr<Chunking> ComputeChunking(const HeadsView& q, const HeadsView& k,
                                         const AttentionShape& shape, const Variant& variant,
                                         const std::vector<int64_t>& segment_starts) {
  const DhsaConfig& config = variant.config;
  Chunking c;
  const auto start = Clock::now();
  if (variant.true_boundaries) {
    c.boundaries = TrueBoundaries(segment_starts, shape, config.chunk_max);
    c.kappa = ChunkSummariesReference(k, c.boundaries, ChunkSummaryNorm(config));
    c.rho = ScoreQuerySummariesReference(q, shape.hkv, config);
  } else if (config.policy == Policy::kBlockTopk) {
    DhsaConfig blocks = config;
    blocks.boundary_mode = BoundaryMode::kFixed;
    blocks.chunk_mean = config.block;
    DHSA_ASSIGN_OR_RETURN(c.boundaries, SegmentKeysReference(k, 0, shape.lk, blocks));
    c.kappa = ChunkSummariesReference(k, c.boundaries, ChunkSummaryNorm(config));
    c.rho = ScoreQuerySummariesReference(q, shape.hkv, config);
  } else {
    std::vector<int64_t> prior = {0};
    if (shape.t0() > 0) {
      DHSA_ASSIGN_OR_RETURN(prior, SegmentKeysReference(k, 0, shape.t0(), config));
    }
    DHSA_ASSIGN_OR_RETURN(c.boundaries,
                          AppendPrefillBoundariesReference(k, prior, shape.lk, config));
    c.kappa = ChunkSummariesReference(k, c.boundaries, ChunkSummaryNorm(config));
    c.rho = ScoreQuerySummariesReference(q, shape.hkv, config);
  }
  c.seconds = SecondsSince(start);
  return c;
}

// (query, key) pairs the selection computes on `rows` (indices into the queries), all heads.
int64_t PairsOnRows(const Selection& sel, const AttentionShape& shape,
                    const std::vector<int64_t>& rows) {
  int64_t pairs = 0;
  for (int64_t g = 0; g < shape.hq; ++g) {
    for (int64_t r : rows) {
      const int64_t p = shape.t0() + r;
      for (const Span& s : sel.ForQuery(g, p)) {
        pairs += std::max<int64_t>(0, std::min(s.end, p + 1) - s.begin);
      }
    }
  }
  return pairs;
}

// Sparse attention of each sampled row on its own (a one-row view of Q), rows spread over threads.
// Fills `o_rows` [Hq, rows, d]; returns the wall time.
absl::StatusOr<double> AttendSampledRows(SparseAttentionFn attention, const HeadsView& q,
                                         const HeadsView& k, const HeadsView& v,
                                         const Selection& sel, float scale,
                                         const std::vector<int64_t>& rows, int num_threads,
                                         std::vector<float>& o_rows) {
  const int64_t n_rows = static_cast<int64_t>(rows.size()), d = q.dim, hq = q.heads;
  o_rows.assign(static_cast<size_t>(hq * n_rows * d), 0.0f);
  std::vector<absl::Status> status(static_cast<size_t>(n_rows));
  const auto start = Clock::now();
  ParallelFor(n_rows, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> o(static_cast<size_t>(hq * d)), lse(static_cast<size_t>(hq));
    for (int64_t n = begin; n < end; ++n) {
      SparseAttentionParams p;
      p.q = q;
      p.q.data = static_cast<const char*>(q.data) + q.Index(0, rows[n]) * DTypeSize(q.dtype);
      p.q.len = 1;
      p.q.offset = q.offset + rows[n];
      p.q.head_stride = q.HeadStride();
      p.k = k;
      p.v = v;
      p.selection = &sel;
      p.scale = scale;
      p.o = {o.data(), hq, 1, d};
      p.lse = {lse.data(), hq, 1, 1};
      p.num_threads = 1;
      status[static_cast<size_t>(n)] = attention(p);
      for (int64_t g = 0; g < hq; ++g) {
        std::copy(o.begin() + g * d, o.begin() + (g + 1) * d,
                  o_rows.begin() + (g * n_rows + n) * d);
      }
    }
  });
  const double seconds = SecondsSince(start);
  for (const absl::Status& s : status) DHSA_RETURN_IF_ERROR(s);
  return seconds;
}

// Sparse attention of every row; the sampled rows of the output are copied to `o_rows`.
absl::StatusOr<double> AttendAllRows(SparseAttentionFn attention, const HeadsView& q,
                                     const HeadsView& k, const HeadsView& v, const Selection& sel,
                                     float scale, const std::vector<int64_t>& rows, int num_threads,
                                     std::vector<float>& o_rows) {
  const int64_t n_rows = static_cast<int64_t>(rows.size()), d = q.dim, hq = q.heads;
  std::vector<float> o(static_cast<size_t>(hq * q.len * d)), lse(static_cast<size_t>(hq * q.len));
  SparseAttentionParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.selection = &sel;
  p.scale = scale;
  p.o = {o.data(), hq, q.len, d};
  p.lse = {lse.data(), hq, q.len, 1};
  p.num_threads = num_threads;
  const auto start = Clock::now();
  DHSA_RETURN_IF_ERROR(attention(p));
  const double seconds = SecondsSince(start);
  o_rows.assign(static_cast<size_t>(hq * n_rows * d), 0.0f);
  for (int64_t g = 0; g < hq; ++g) {
    for (int64_t n = 0; n < n_rows; ++n) {
      std::copy(o.begin() + (g * q.len + rows[n]) * d, o.begin() + (g * q.len + rows[n] + 1) * d,
                o_rows.begin() + (g * n_rows + n) * d);
    }
  }
  return seconds;
}

// Notes on policies that compute a different number of pairs than the others at one budget.
std::vector<std::string> PairNotes(const std::vector<PolicyResult>& results) {
  std::vector<std::string> notes;
  std::map<int64_t, const PolicyResult*> reference;
  for (const PolicyResult& r : results) {
    if (r.policy == "dense") continue;
    auto it = reference.find(r.budget);
    if (it == reference.end() || (r.policy == "dhsa" && it->second->policy != "dhsa")) {
      reference[r.budget] = &r;
    }
  }
  for (const PolicyResult& r : results) {
    if (r.policy == "dense") continue;
    const PolicyResult* ref = reference[r.budget];
    if (ref == &r || ref->computed_pairs == 0) continue;
    const double diff = static_cast<double>(r.computed_pairs) / ref->computed_pairs - 1.0;
    if (std::abs(diff) <= 0.005) continue;
    std::string why;
    if (r.run_budget != r.budget) {
      why = absl::StrCat(" at budget ", r.run_budget, ", the smallest that reaches its pairs");
      if (r.policy == "block_topk") absl::StrAppend(&why, " (whole key blocks only)");
    } else if (r.policy == "oracle_topk") {
      why = " (exactly `budget` keys per row: no causal cut inside the query block)";
    } else if (r.policy == "block_topk") {
      why = " (whole key blocks only)";
    }
    notes.push_back(absl::StrFormat("budget %d: %s computes %+.1f%% (query, key) pairs vs %s%s",
                                    r.budget, r.policy, 100.0 * diff, ref->policy, why));
  }
  return notes;
}

absl::Status ParseMeta(const std::string& text, const std::string& path, EvalInput& input) {
  const nlohmann::json meta = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a JSON object"));
  }
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
  };
  if (meta.contains("segments")) {
    const nlohmann::json& segs = meta["segments"];
    if (!segs.is_array()) return bad("\"segments\" must be an array of [begin, end]");
    for (const nlohmann::json& s : segs) {
      if (!s.is_array() || s.size() != 2 || !s[0].is_number_integer()) {
        return bad("every segment must be [begin, end] integers");
      }
      input.segment_starts.push_back(s[0].get<int64_t>());
    }
    if (!std::is_sorted(input.segment_starts.begin(), input.segment_starts.end())) {
      return bad("segments must be in order");
    }
  }
  if (meta.contains("needles")) {
    const nlohmann::json& needles = meta["needles"];
    if (!needles.is_array()) return bad("\"needles\" must be an array");
    for (const nlohmann::json& n : needles) {
      Needle nd;
      for (auto [key, field] : {std::pair<const char*, int64_t*>{"key_begin", &nd.key_begin},
                                {"key_end", &nd.key_end},
                                {"query_begin", &nd.query_begin},
                                {"query_end", &nd.query_end}}) {
        if (!n.is_object() || !n.contains(key) || !n[key].is_number_integer()) {
          return bad(absl::StrCat("every needle needs integer \"", key, "\""));
        }
        *field = n[key].get<int64_t>();
      }
      if (nd.key_begin < 0 || nd.key_end <= nd.key_begin || nd.query_begin < nd.key_end ||
          nd.query_end <= nd.query_begin) {
        return bad("a needle's keys must be a non-empty run before its queries");
      }
      input.needles.push_back(nd);
    }
  }
  return absl::OkStatus();
}

nlohmann::json MatchJson(const BoundaryMatch& m) {
  return {{"predicted", m.predicted},
          {"truth", m.truth},
          {"predicted_matched", m.predicted_matched},
          {"truth_matched", m.truth_matched},
          {"precision", m.precision},
          {"recall", m.recall}};
}

}  // namespace

absl::StatusOr<EvalInput> ReadEvalInput(const std::string& dir) {
  const std::filesystem::path base(dir);
  EvalInput input;
  input.source = dir;
  DHSA_ASSIGN_OR_RETURN(input.q, ReadNpy((base / "q.npy").string()));
  DHSA_ASSIGN_OR_RETURN(input.k, ReadNpy((base / "k.npy").string()));
  DHSA_ASSIGN_OR_RETURN(input.v, ReadNpy((base / "v.npy").string()));
  const std::string meta_path = (base / "meta.json").string();
  if (std::filesystem::exists(meta_path)) {
    DHSA_ASSIGN_OR_RETURN(std::string text, ReadFileToString(meta_path));
    DHSA_RETURN_IF_ERROR(ParseMeta(text, meta_path, input));
  }
  return input;
}

EvalInput EvalInputFromWorkload(Workload w) {
  EvalInput input;
  input.source = absl::StrCat("generated, seed ", w.config.seed);
  input.q = std::move(w.q);
  input.k = std::move(w.k);
  input.v = std::move(w.v);
  for (const Segment& s : w.segments) input.segment_starts.push_back(s.begin);
  input.needles = std::move(w.needles);
  return input;
}

absl::StatusOr<EvalReport> RunEval(const EvalInput& input, const EvalOptions& options) {
  if (options.policies.empty() || options.budgets.empty()) {
    return absl::InvalidArgumentError("give at least one policy and one budget");
  }
  if (options.rows < 1) {
    return absl::InvalidArgumentError(absl::StrCat("rows must be >= 1; got ", options.rows));
  }
  if (options.attention == nullptr) return absl::InvalidArgumentError("no attention function");
  DHSA_ASSIGN_OR_RETURN(HeadsView q, HeadsView::Of(input.q, "Q"));
  DHSA_ASSIGN_OR_RETURN(HeadsView k, HeadsView::Of(input.k, "K"));
  DHSA_ASSIGN_OR_RETURN(HeadsView v, HeadsView::Of(input.v, "V"));
  DHSA_ASSIGN_OR_RETURN(AttentionShape shape, CheckShapes(q, k, v));
  DHSA_RETURN_IF_ERROR(CheckFinite(q, "Q"));
  DHSA_RETURN_IF_ERROR(CheckFinite(k, "K"));
  DHSA_RETURN_IF_ERROR(CheckFinite(v, "V"));
  q.offset = shape.t0();
  const int threads = std::max(1, options.num_threads);

  // Every config up front, so that a bad name or budget fails before the slow part.
  std::vector<std::vector<Variant>> variants;  // [budget][policy].
  for (int64_t budget : options.budgets) {
    variants.emplace_back();
    for (const std::string& name : options.policies) {
      DHSA_ASSIGN_OR_RETURN(Variant variant, ParseVariant(name, options.base));
      if (variant.true_boundaries && input.segment_starts.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "policy ", name, " needs the true segments of the input (a meta.json with segments)"));
      }
      variant.config.budget = budget;
      absl::Status valid = ValidateConfig(variant.config);
      if (!valid.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("policy ", name, " at budget ", budget, ": ", valid.message()));
      }
      variants.back().push_back(variant);
    }
  }
  // The budgets that equalise computed pairs with dhsa's (the nominal ones without matching).
  std::vector<std::vector<int64_t>> run_budgets;  // [budget][policy].
  for (size_t b = 0; b < options.budgets.size(); ++b) {
    run_budgets.emplace_back();
    int64_t target = -1;
    if (options.match_pairs) {
      DhsaConfig dhsa = options.base;
      dhsa.policy = Policy::kDhsa;
      dhsa.budget = options.budgets[b];
      absl::StatusOr<int64_t> pairs = StructuralPairs(dhsa, shape.lq, shape.lk);
      if (!pairs.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "cannot match pairs at budget ", options.budgets[b], " (dhsa under the base config: ",
            pairs.status().message(), "); give --match-pairs=false"));
      }
      target = *pairs;
    }
    for (size_t pi = 0; pi < options.policies.size(); ++pi) {
      const DhsaConfig& config = variants[b][pi].config;
      if (target < 0 || config.policy == Policy::kDense) {
        run_budgets.back().push_back(config.budget);
        continue;
      }
      absl::StatusOr<int64_t> matched = PairMatchedBudget(config, target, shape.lq, shape.lk);
      if (!matched.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("policy ", options.policies[pi],
                                                       " at budget ", config.budget, ": ",
                                                       matched.status().message()));
      }
      run_budgets.back().push_back(*matched);
    }
  }
  const float scale = EffectiveScale(options.base, shape.dim);

  EvalReport report;
  report.shape = shape;
  report.source = input.source;
  report.full = options.full;
  report.attention_name = options.attention_name;
  const std::vector<int64_t> rows = StratifiedRows(shape.lq, options.rows, options.row_seed);
  const std::vector<int64_t> needle_rows = NeedleQueryRows(shape, input.needles);
  std::vector<int64_t> oracle_rows = rows;
  oracle_rows.insert(oracle_rows.end(), needle_rows.begin(), needle_rows.end());
  std::sort(oracle_rows.begin(), oracle_rows.end());
  oracle_rows.erase(std::unique(oracle_rows.begin(), oracle_rows.end()), oracle_rows.end());
  report.sampled_rows = static_cast<int64_t>(rows.size());
  report.needle_rows = static_cast<int64_t>(needle_rows.size());
  report.true_segments = static_cast<int64_t>(input.segment_starts.size());
  const int64_t causal_pairs =
      shape.hq * (shape.lk * (shape.lk + 1) / 2 - shape.t0() * (shape.t0() + 1) / 2);

  const double steps = 1.0 + static_cast<double>(options.budgets.size() * options.policies.size());
  double done = 0;
  auto progress = [&](const std::string& next) {
    if (options.progress) options.progress(done / steps, next);
  };
  progress(absl::StrCat("dense attention of ", rows.size(), " sampled rows"));
  auto start = Clock::now();
  DHSA_ASSIGN_OR_RETURN(DenseRows dense, DenseAttentionRows(q, k, v, scale, rows, threads));
  report.dense_seconds = SecondsSince(start);
  done += 1;

  std::map<std::string, Chunking> chunkings;
  for (size_t b = 0; b < options.budgets.size(); ++b) {
    for (size_t pi = 0; pi < options.policies.size(); ++pi) {
      const std::string& name = options.policies[pi];
      const Variant& variant = variants[b][pi];
      DhsaConfig config = variant.config;
      config.budget = run_budgets[b][pi];
      progress(absl::StrCat(name, " at budget ", config.budget));
      PolicyResult r;
      r.policy = name;
      r.budget = options.budgets[b];
      r.run_budget = config.budget;
      r.causal_pairs = causal_pairs;
      Selection sel;
      const bool oracle = config.policy == Policy::kOracleTopk;
      if (oracle) {
        start = Clock::now();
        DHSA_ASSIGN_OR_RETURN(sel,
                              SelectOracleTopkRowsReference(q, k, config, oracle_rows, threads));
        // Each row's cost is its causal length: scale by causal pairs.
        int64_t row_pairs = 0;
        for (int64_t row : oracle_rows) row_pairs += shape.hq * (shape.t0() + row + 1);
        r.select_seconds = SecondsSince(start) * static_cast<double>(causal_pairs) /
                           static_cast<double>(std::max<int64_t>(1, row_pairs));
        r.select_estimated = true;
        r.computed_pairs = OracleComputedPairs(shape.hq, shape.t0(), shape.lk, config.budget);
      } else {
        SelectionInputs in;
        in.shape = shape;
        double prep_seconds = 0;
        if (variant.has_chunks()) {
          auto it = chunkings.find(name);
          if (it == chunkings.end()) {
            DHSA_ASSIGN_OR_RETURN(Chunking c,
                                  ComputeChunking(q, k, shape, variant, input.segment_starts));
            it = chunkings.emplace(name, std::move(c)).first;
          }
          in.boundaries = &it->second.boundaries;
          in.kappa = &it->second.kappa;
          in.rho = &it->second.rho;
          prep_seconds = it->second.seconds;
          r.chunks = static_cast<int64_t>(it->second.boundaries.size()) - 1;
        }
        start = Clock::now();
        DHSA_ASSIGN_OR_RETURN(sel, SelectSpansReference(in, config));
        r.select_seconds = prep_seconds + SecondsSince(start);
        r.computed_pairs = CountComputedPairs(sel, shape);
      }

      std::vector<float> o_rows;
      if (options.full && !oracle) {
        DHSA_ASSIGN_OR_RETURN(r.attention_seconds, AttendAllRows(options.attention, q, k, v, sel,
                                                                 scale, rows, threads, o_rows));
        r.attention_estimated = false;
      } else {
        // oracle_topk's spans are single keys, which tiled backends are not built for, and its
        // time is no claim: it runs on the reference.
        const SparseAttentionFn attention = oracle ? &SparseAttentionReference : options.attention;
        DHSA_ASSIGN_OR_RETURN(
            const double seconds,
            AttendSampledRows(attention, q, k, v, sel, scale, rows, threads, o_rows));
        const int64_t sampled_pairs = PairsOnRows(sel, shape, rows);
        r.attention_seconds = seconds * static_cast<double>(r.computed_pairs) /
                              static_cast<double>(std::max<int64_t>(1, sampled_pairs));
      }
      DHSA_ASSIGN_OR_RETURN(r.fidelity, MeasureFidelityRows(q, k, dense, sel, o_rows, threads));
      const NeedleHits hits = CountNeedleHits(sel, shape, input.needles);
      r.needle_pairs = hits.pairs;
      r.needle_hits = hits.hits;
      report.results.push_back(std::move(r));
      done += 1;
    }
  }
  progress("done");

  if (!input.segment_starts.empty()) {
    for (const std::string& name : options.policies) {
      auto it = chunkings.find(name);
      if (it == chunkings.end()) continue;
      BoundaryResult br;
      br.policy = name;
      br.chunks = static_cast<int64_t>(it->second.boundaries.size()) - 1;
      br.exact = MatchBoundaries(it->second.boundaries, input.segment_starts, 0);
      br.near = MatchBoundaries(it->second.boundaries, input.segment_starts, 2);
      report.boundaries.push_back(br);
      chunkings.erase(it);  // A policy listed twice is reported once.
    }
  }
  report.notes = PairNotes(report.results);
  return report;
}

std::vector<int64_t> StratifiedRows(int64_t lq, int64_t count, uint64_t seed) {
  std::vector<int64_t> rows;
  if (lq <= 0 || count <= 0) return rows;
  count = std::min(count, lq);
  for (int64_t n = 0; n < count; ++n) {
    const int64_t begin = n * lq / count, end = (n + 1) * lq / count;
    rows.push_back(begin + static_cast<int64_t>(SplitMix64(seed ^ SplitMix64(n)) %
                                                static_cast<uint64_t>(end - begin)));
  }
  return rows;
}

absl::StatusOr<EvalReport> AverageReports(const std::vector<EvalReport>& reports) {
  if (reports.empty()) return absl::InvalidArgumentError("no reports to average");
  EvalReport avg = reports.front();
  const double n = static_cast<double>(reports.size());
  for (size_t i = 1; i < reports.size(); ++i) {
    const EvalReport& r = reports[i];
    if (r.results.size() != avg.results.size() || r.boundaries.size() != avg.boundaries.size()) {
      return absl::InvalidArgumentError("reports to average differ in policies or budgets");
    }
    avg.sampled_rows += r.sampled_rows;
    avg.needle_rows += r.needle_rows;
    avg.dense_seconds += r.dense_seconds;
    avg.true_segments += r.true_segments;
    for (size_t j = 0; j < r.results.size(); ++j) {
      PolicyResult& a = avg.results[j];
      const PolicyResult& b = r.results[j];
      if (a.policy != b.policy || a.budget != b.budget) {
        return absl::InvalidArgumentError("reports to average differ in policies or budgets");
      }
      a.fidelity.rows += b.fidelity.rows;
      a.fidelity.recall_mean += b.fidelity.recall_mean;
      a.fidelity.recall_p5 += b.fidelity.recall_p5;
      a.fidelity.output_rel_error += b.fidelity.output_rel_error;
      a.needle_pairs += b.needle_pairs;
      a.needle_hits += b.needle_hits;
      a.computed_pairs += b.computed_pairs;
      a.causal_pairs += b.causal_pairs;
      a.chunks += b.chunks;
      a.select_seconds += b.select_seconds;
      a.attention_seconds += b.attention_seconds;
    }
    for (size_t j = 0; j < r.boundaries.size(); ++j) {
      BoundaryResult& a = avg.boundaries[j];
      const BoundaryResult& b = r.boundaries[j];
      a.chunks += b.chunks;
      for (auto [x, y] : {std::pair<BoundaryMatch*, const BoundaryMatch*>{&a.exact, &b.exact},
                          {&a.near, &b.near}}) {
        x->predicted += y->predicted;
        x->truth += y->truth;
        x->predicted_matched += y->predicted_matched;
        x->truth_matched += y->truth_matched;
      }
    }
  }
  avg.sampled_rows = static_cast<int64_t>(std::llround(avg.sampled_rows / n));
  avg.needle_rows = static_cast<int64_t>(std::llround(avg.needle_rows / n));
  avg.true_segments = static_cast<int64_t>(std::llround(avg.true_segments / n));
  avg.dense_seconds /= n;
  for (PolicyResult& a : avg.results) {
    a.fidelity.recall_mean /= n;
    a.fidelity.recall_p5 /= n;
    a.fidelity.output_rel_error /= n;
    a.chunks = static_cast<int64_t>(std::llround(a.chunks / n));
    a.select_seconds /= n;
    a.attention_seconds /= n;
  }
  for (BoundaryResult& a : avg.boundaries) {
    a.chunks = static_cast<int64_t>(std::llround(a.chunks / n));
    for (BoundaryMatch* m : {&a.exact, &a.near}) {
      m->precision =
          m->predicted > 0 ? static_cast<double>(m->predicted_matched) / m->predicted : 0.0;
      m->recall = m->truth > 0 ? static_cast<double>(m->truth_matched) / m->truth : 0.0;
    }
  }
  avg.source = absl::StrCat("mean of ", reports.size(), " inputs");
  avg.notes = PairNotes(avg.results);
  return avg;
}

std::string EvalReportJson(const EvalReport& report) {
  nlohmann::json results = nlohmann::json::array();
  for (const PolicyResult& r : report.results) {
    results.push_back({{"policy", r.policy},
                       {"budget", r.budget},
                       {"run_budget", r.run_budget},
                       {"recall_mean", r.fidelity.recall_mean},
                       {"recall_p5", r.fidelity.recall_p5},
                       {"output_rel_error", r.fidelity.output_rel_error},
                       {"fidelity_rows", r.fidelity.rows},
                       {"needle_hit_rate", r.needle_hit_rate()},
                       {"needle_pairs", r.needle_pairs},
                       {"needle_hits", r.needle_hits},
                       {"computed_pairs", r.computed_pairs},
                       {"causal_pairs", r.causal_pairs},
                       {"density", r.density()},
                       {"chunks", r.chunks},
                       {"select_seconds", r.select_seconds},
                       {"select_estimated", r.select_estimated},
                       {"attention_seconds", r.attention_seconds},
                       {"attention_estimated", r.attention_estimated},
                       {"seconds", r.select_seconds + r.attention_seconds}});
  }
  nlohmann::json boundaries = nlohmann::json::array();
  for (const BoundaryResult& b : report.boundaries) {
    boundaries.push_back({{"policy", b.policy},
                          {"chunks", b.chunks},
                          {"exact", MatchJson(b.exact)},
                          {"within_2", MatchJson(b.near)}});
  }
  nlohmann::json j = {
      {"source", report.source},
      {"shape",
       {{"hq", report.shape.hq},
        {"hkv", report.shape.hkv},
        {"dim", report.shape.dim},
        {"lq", report.shape.lq},
        {"lk", report.shape.lk}}},
      {"sampled_rows", report.sampled_rows},
      {"needle_rows", report.needle_rows},
      {"time", report.full ? "full attention" : "attention on sampled rows, scaled to all rows"},
      {"attention", report.attention_name},
      {"dense_rows_seconds", report.dense_seconds},
      {"true_segments", report.true_segments},
      {"results", std::move(results)},
      {"boundaries", std::move(boundaries)},
      {"notes", report.notes},
  };
  return j.dump(2);
}

}  // namespace dhsa
