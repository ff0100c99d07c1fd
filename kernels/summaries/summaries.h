// Step 2 of spec/DHSA.md: chunk summaries kappa and query-block summaries rho.
#ifndef DHSA_KERNELS_SUMMARIES_SUMMARIES_H_
#define DHSA_KERNELS_SUMMARIES_SUMMARIES_H_

#include <cstdint>
#include <vector>

#include "kernels/common/config.h"
#include "kernels/common/tensor.h"

namespace dhsa {

// fp32 summaries `[heads, count, dim]`: one vector per (KV head, chunk) or (KV head, query block).
struct Summaries {
  int64_t heads = 0;
  int64_t count = 0;
  int64_t dim = 0;
  std::vector<float> data;
  const float* Row(int64_t h, int64_t j) const { return data.data() + (h * count + j) * dim; }
};

// kappa[h][j] = sum of k[h][t] over chunk j, divided by sqrt(|chunk|) (kSqrt) or |chunk| (kMean).
// `boundaries` are absolute positions inside [k.offset, k.offset + k.len].
Summaries ChunkSummariesReference(const HeadsView& k, const std::vector<int64_t>& boundaries,
                                  SummaryNorm norm);

// Query blocks are [i*q_block, (i+1)*q_block) intersected with the query positions
// [q.offset, q.offset + q.len); block index i runs from q.offset / q_block. For KV head h,
// rho[h][i] = sum over the group's `group` query heads g = h*group .. and t in the block of
// q[g][t], divided by group * sqrt(|block|) (kSqrt) or group * |block| (kMean).
Summaries QueryBlockSummariesReference(const HeadsView& q, int64_t kv_heads, int64_t q_block,
                                       SummaryNorm norm);

// The query summaries rho that `config`'s selection scores chunks with:
//  - dhsa with ChunkScore::kPaper: QueryBlockSummariesReference(q, kv_heads, q_block,
//    summary_norm) (block_topk: kMean);
//  - dhsa with ChunkScore::kMass: one mean query per query head and `score_rows`-row piece,
//    QueryBlockSummariesReference(q, q.heads, score_rows, kMean) ([Hq, pieces, d], piece index
//    from q.offset / score_rows).
Summaries ScoreQuerySummariesReference(const HeadsView& q, int64_t kv_heads,
                                       const DhsaConfig& config);

}  // namespace dhsa

#endif  // DHSA_KERNELS_SUMMARIES_SUMMARIES_H_
