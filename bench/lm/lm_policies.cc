#include "bench/lm/lm_policies.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "bench/eval/variants.h"
#include "kernels/common/inputs.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/boundaries.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/selection.h"
#include "kernels/cpu/sparse_attention.h"
#include "kernels/dhsa.h"

namespace dhsa {
namespace {

absl::StatusOr<Tensor> AttendSelection(const Selection& sel, const HeadsView& q, const HeadsView& k,
                                       const HeadsView& v, const AttentionShape& shape, float scale,
                                       int threads, LmAttentionStats* stats) {
  Tensor o = Tensor::Zeros(DType::kF32, {shape.hq, shape.lq, shape.dim});
  Tensor lse = Tensor::Zeros(DType::kF32, {shape.hq, shape.lq});
  SparseAttentionParams params;
  params.q = q;
  params.k = k;
  params.v = v;
  params.selection = &sel;
  params.scale = scale;
  params.o = {static_cast<float*>(o.data()), shape.hq, shape.lq, shape.dim};
  params.lse = {static_cast<float*>(lse.data()), shape.hq, shape.lq, 1};
  params.num_threads = threads;
  DHSA_RETURN_IF_ERROR(SparseAttentionCpu(params));
  if (stats != nullptr) {
    stats->computed_pairs += CountComputedPairsCpu(sel, shape);
    stats->causal_pairs += shape.hq * shape.lk * (shape.lk + 1) / 2;
  }
  return o;
}

}  // namespace

absl::StatusOr<LmPolicy> ParseLmPolicy(const std::string& name, const DhsaConfig& base,
                                       int64_t budget) {
  LmPolicy p;
  p.name = name;
  p.config = base;
  p.config.budget = budget;
  const std::string oracle = "oracle_block";
  if (name == "local") {
    p.kind = LmPolicy::Kind::kLocal;
    p.config.policy = Policy::kDhsa;
  } else if (name.compare(0, oracle.size(), oracle) == 0) {
    // oracle_block takes dhsa's modifiers for its structure: oracle_block_fixed_q32.
    p.kind = LmPolicy::Kind::kOracleBlock;
    DHSA_ASSIGN_OR_RETURN(Variant variant,
                          ParseVariant("dhsa" + name.substr(oracle.size()), p.config));
    p.config = variant.config;
  } else {
    absl::StatusOr<Variant> variant = ParseVariant(name, p.config);
    if (!variant.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(variant.status().message(), "; or local, oracle_block"));
    }
    if (variant->true_boundaries) {
      return absl::InvalidArgumentError("dhsa_truth needs true segments, which text does not have");
    }
    p.config = variant->config;
  }
  DHSA_RETURN_IF_ERROR(ValidateConfig(p.config));
  return p;
}

std::vector<std::vector<float>> ChunkAttentionMass(const Tensor& q_tensor, const Tensor& k_tensor,
                                                   const std::vector<int64_t>& boundaries,
                                                   int64_t q_block, float scale, int num_threads) {
  const int64_t hq = q_tensor.shape[0], len = q_tensor.shape[1], dim = q_tensor.shape[2];
  const int64_t hkv = k_tensor.shape[0], group = hq / hkv;
  const int64_t blocks = (len + q_block - 1) / q_block;
  const float* q = static_cast<const float*>(q_tensor.data());
  const float* k = static_cast<const float*>(k_tensor.data());
  std::vector<std::vector<float>> mass(static_cast<size_t>(hkv * blocks));
  // Later blocks cost more: hand them out first.
  cpu::ParallelFor(hkv * blocks, num_threads, [&](int64_t n, int) {
    const int64_t h = n % hkv, i = blocks - 1 - n / hkv;
    const int64_t first = i * q_block, end = std::min(len, first + q_block);
    const int64_t eligible = EligibleChunks(boundaries, first);
    std::vector<double> acc(static_cast<size_t>(eligible), 0.0);
    if (eligible > 0) {
      const int64_t rows = end - first, keys = end;
      std::vector<float> s(static_cast<size_t>(rows * keys));
      for (int64_t g = h * group; g < (h + 1) * group; ++g) {
        // Scores of the block's rows against keys [0, end); internal errors cannot happen for
        // these sizes, and a failure would leave zeros (a wrong oracle, never a crash).
        (void)cpu::GemmF32(true, rows, keys, dim, scale, q + (g * len + first) * dim, dim,
                           k + h * len * dim, dim, 0.0f, s.data(), keys);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = s.data() + r * keys;
          const int64_t visible = first + r + 1;  // Causal: keys [0, p].
          float m = row[0];
          for (int64_t t = 1; t < visible; ++t) m = std::max(m, row[t]);
          double sum = 0;
          for (int64_t t = 0; t < visible; ++t) {
            row[t] = std::exp(row[t] - m);
            sum += row[t];
          }
          for (int64_t j = 0; j < eligible; ++j) {
            double part = 0;
            for (int64_t t = boundaries[static_cast<size_t>(j)];
                 t < boundaries[static_cast<size_t>(j + 1)]; ++t) {
              part += row[t];
            }
            acc[static_cast<size_t>(j)] += part / sum;
          }
        }
      }
    }
    std::vector<float>& out = mass[static_cast<size_t>(h * blocks + i)];
    out.assign(acc.begin(), acc.end());
  });
  return mass;
}

absl::StatusOr<Tensor> LmAttention(const LmPolicy& policy, const Tensor& q_tensor,
                                   const Tensor& k_tensor, const Tensor& v_tensor, int num_threads,
                                   LmAttentionStats* stats) {
  const DhsaConfig& c = policy.config;
  if (policy.kind == LmPolicy::Kind::kLibrary) {
    AttendOptions options;
    options.backend = Backend::kCpu;
    options.num_threads = num_threads;
    DHSA_ASSIGN_OR_RETURN(AttendResult r, Attend(q_tensor, k_tensor, v_tensor, c, options));
    if (stats != nullptr) {
      stats->computed_pairs += r.computed_pairs;
      stats->causal_pairs += r.causal_pairs;
    }
    return std::move(r.o);
  }
  DHSA_ASSIGN_OR_RETURN(HeadsView q, HeadsView::Of(q_tensor, "Q"));
  DHSA_ASSIGN_OR_RETURN(HeadsView k, HeadsView::Of(k_tensor, "K"));
  DHSA_ASSIGN_OR_RETURN(HeadsView v, HeadsView::Of(v_tensor, "V"));
  DHSA_ASSIGN_OR_RETURN(AttentionShape shape, CheckShapes(q, k, v));
  if (shape.lq != shape.lk || q_tensor.dtype != DType::kF32 || k_tensor.dtype != DType::kF32) {
    return absl::InvalidArgumentError("local and oracle_block take a whole float32 sequence");
  }
  const float scale = EffectiveScale(c, shape.dim);
  Selection sel = EmptyBlockSelection(shape, c.q_block);
  if (policy.kind == LmPolicy::Kind::kLocal) {
    for (int64_t h = 0; h < sel.num_heads; ++h) {
      for (int64_t i = 0; i < sel.num_blocks; ++i) {
        const int64_t e = std::min((i + 1) * c.q_block, shape.lk);
        sel.At(h, i) = {{std::max<int64_t>(0, e - c.budget), e}};
      }
    }
    return AttendSelection(sel, q, k, v, shape, scale, num_threads, stats);
  }
  DHSA_ASSIGN_OR_RETURN(std::vector<int64_t> boundaries,
                        SegmentKeysCpu(k, 0, shape.lk, c, num_threads));
  const std::vector<std::vector<float>> mass =
      ChunkAttentionMass(q_tensor, k_tensor, boundaries, c.q_block, scale, num_threads);
  for (int64_t h = 0; h < sel.num_heads; ++h) {
    for (int64_t i = 0; i < sel.num_blocks; ++i) {
      const int64_t e = std::min((i + 1) * c.q_block, shape.lk);
      if (e <= c.budget) {
        sel.At(h, i) = {{0, e}};
      } else {
        sel.At(h, i) = SelectDhsaSpansReference(
            boundaries, mass[static_cast<size_t>(h * sel.num_blocks + i)], c, e);
      }
    }
  }
  return AttendSelection(sel, q, k, v, shape, scale, num_threads, stats);
}

}  // namespace dhsa
