#include "kernels/cpu/sparse_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "hwy/aligned_allocator.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/attention_kernels.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vector_ops.h"

namespace dhsa {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kGroupKeys = cpu::kAttentionGroupKeys;
constexpr int64_t kPanelRows = cpu::kAttentionPanelRows;

// One selection entry and the query rows it covers: heads [head_begin, head_begin + heads) of Q,
// rows [row_begin, row_begin + rows) of each. Tile row i is head head_begin + i / rows, row
// row_begin + i % rows.
struct Tile {
  int64_t entry = 0;
  int64_t kv_head = 0;
  int64_t head_begin = 0;
  int64_t heads = 0;
  int64_t row_begin = 0;
  int64_t rows = 0;
  int64_t work = 0;  // Rows times visible keys: the order tiles are handed out in.
};

// Keys [row, row + count) of key run `run` (rows of its views; absolute positions from `position`)
// that fill score columns [column, column + count) of the current group.
struct Piece {
  size_t run = 0;
  int64_t row = 0;
  int64_t position = 0;
  int64_t count = 0;
  int64_t column = 0;
};

// Per-thread buffers, reused from tile to tile.
struct Scratch {
  hwy::AlignedFreeUniquePtr<float[]> q, s, o, m, l, k, v;
  int64_t q_floats = 0, s_floats = 0, o_floats = 0, rows = 0, kv_floats = 0;
  std::vector<Piece> pieces;
  std::vector<int64_t> positions;  // Absolute position of each panel row.

  void Reserve(int64_t panel_rows, int64_t d, bool convert_kv) {
    auto grow = [](hwy::AlignedFreeUniquePtr<float[]>& buffer, int64_t& have, int64_t want) {
      if (have >= want) return;
      buffer = hwy::AllocateAligned<float>(static_cast<size_t>(want));
      have = want;
    };
    grow(q, q_floats, panel_rows * d);
    grow(s, s_floats, panel_rows * kGroupKeys);
    grow(o, o_floats, panel_rows * d);
    if (rows < panel_rows) {
      m = hwy::AllocateAligned<float>(static_cast<size_t>(panel_rows));
      l = hwy::AllocateAligned<float>(static_cast<size_t>(panel_rows));
      rows = panel_rows;
    }
    if (convert_kv && kv_floats < kGroupKeys * d) {
      k = hwy::AllocateAligned<float>(static_cast<size_t>(kGroupKeys * d));
      v = hwy::AllocateAligned<float>(static_cast<size_t>(kGroupKeys * d));
      kv_floats = kGroupKeys * d;
    }
  }
};

absl::Status CheckParams(const SparseAttentionParams& p) {
  if (p.selection == nullptr) return absl::InvalidArgumentError("no selection given");
  if (!(p.scale > 0.0f)) return absl::InvalidArgumentError("softmax scale must be positive");
  if (p.o.heads != p.q.heads || p.o.len != p.q.len || p.o.dim != p.q.dim ||
      p.lse.heads != p.q.heads || p.lse.len != p.q.len || p.lse.dim != 1) {
    return absl::InvalidArgumentError("output views do not match Q");
  }
  const Selection& s = *p.selection;
  const bool per_block = s.unit == SelectionUnit::kKvHeadBlock;
  if (s.block_size <= 0 || s.num_heads != (per_block ? p.k.heads : p.q.heads) ||
      s.spans.size() != static_cast<size_t>(s.num_heads * s.num_blocks) ||
      s.first_block * s.block_size > p.q.offset ||
      (s.first_block + s.num_blocks) * s.block_size < p.q.offset + p.q.len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection (", s.num_heads, " heads x ", s.num_blocks, " blocks of ", s.block_size,
        " from block ", s.first_block, ") does not cover the query rows [", p.q.offset, ", ",
        p.q.offset + p.q.len, ")"));
  }
  return absl::OkStatus();
}

// Keys of `spans` inside the runs and at or before `last_position`.
int64_t VisibleKeys(const std::vector<Span>& spans, const std::vector<KvRun>& runs,
                    int64_t last_position) {
  int64_t keys = 0;
  for (const Span& span : spans) {
    for (const KvRun& run : runs) {
      keys +=
          std::max<int64_t>(0, std::min({span.end, run.k.offset + run.k.len, last_position + 1}) -
                                   std::max(span.begin, run.k.offset));
    }
  }
  return keys;
}

std::vector<Tile> MakeTiles(const SparseAttentionParams& p, const std::vector<KvRun>& runs) {
  const Selection& s = *p.selection;
  const int64_t group = p.q.heads / p.k.heads;
  const int64_t q_first = p.q.offset, q_end = p.q.offset + p.q.len;
  std::vector<Tile> tiles;
  for (int64_t head = 0; head < s.num_heads; ++head) {
    for (int64_t b = 0; b < s.num_blocks; ++b) {
      const int64_t block = s.first_block + b;
      const int64_t first = std::max(q_first, block * s.block_size);
      const int64_t end = std::min(q_end, (block + 1) * s.block_size);
      if (end <= first) continue;
      Tile t;
      t.entry = head * s.num_blocks + b;
      if (s.unit == SelectionUnit::kKvHeadBlock) {
        t.kv_head = head;
        t.head_begin = head * group;
        t.heads = group;
      } else {
        t.kv_head = head / group;
        t.head_begin = head;
        t.heads = 1;
      }
      t.row_begin = first - q_first;
      t.rows = end - first;
      t.work = t.heads * t.rows * VisibleKeys(s.spans[t.entry], runs, end - 1);
      tiles.push_back(t);
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& a, const Tile& b) { return a.work > b.work; });
  return tiles;
}

// Where row `row` of head `head` of a view lies, as a typed pointer into its buffer.
const char* RowBytes(const HeadsView& view, int64_t head, int64_t row) {
  return static_cast<const char*>(view.data) + view.Index(head, row) * DTypeSize(view.dtype);
}

// The rows of `piece` in `view` (K or V) as fp32: in place when stored as fp32, else converted
// into `panel` at the piece's column.
const float* PieceRows(const HeadsView& view, int64_t head, const Piece& piece, float* panel) {
  const char* rows = RowBytes(view, head, piece.row);
  if (view.dtype == DType::kF32) return reinterpret_cast<const float*>(rows);
  float* out = panel + piece.column * view.dim;
  cpu::ToFloat(rows, view.dtype, piece.count * view.dim, out);
  return out;
}

// Walks the visible keys of a span list in groups of at most kGroupKeys, as pieces of contiguous
// K/V rows of one run each.
class KeyGroups {
 public:
  KeyGroups(const std::vector<Span>& spans, const std::vector<KvRun>& runs, int64_t last_position)
      : spans_(spans), runs_(runs), last_(last_position) {}

  // Fills `pieces` with the next group; false when the keys are exhausted.
  bool Next(std::vector<Piece>& pieces) {
    pieces.clear();
    int64_t width = 0;
    while (span_ < spans_.size() && width < kGroupKeys) {
      const Span& span = spans_[span_];
      const int64_t lo = std::max(span.begin, next_);
      const int64_t hi = std::min(span.end, last_ + 1);
      // The first run ending after lo.
      while (run_ < runs_.size() && runs_[run_].k.offset + runs_[run_].k.len <= lo) ++run_;
      if (lo >= hi || run_ == runs_.size() || runs_[run_].k.offset >= hi) {
        ++span_;
        continue;
      }
      const HeadsView& k = runs_[run_].k;
      const int64_t begin = std::max(lo, k.offset);
      const int64_t end = std::min(hi, k.offset + k.len);
      const int64_t count = std::min(end - begin, kGroupKeys - width);
      pieces.push_back({run_, begin - k.offset, begin, count, width});
      width += count;
      next_ = begin + count;
    }
    return !pieces.empty();
  }

 private:
  const std::vector<Span>& spans_;
  const std::vector<KvRun>& runs_;
  int64_t last_;
  size_t span_ = 0;
  size_t run_ = 0;  // Positions only grow: spans are sorted and disjoint, runs too.
  int64_t next_ = std::numeric_limits<int64_t>::min();
};

// Rows [panel_begin, panel_begin + panel_rows) of `tile`.
absl::Status AttendPanel(const SparseAttentionParams& p, const std::vector<KvRun>& runs,
                         const Tile& tile, int64_t panel_begin, int64_t panel_rows,
                         Scratch& scratch) {
  const int64_t d = p.q.dim;
  scratch.Reserve(panel_rows, d, p.k.dtype != DType::kF32 || p.v.dtype != DType::kF32);
  float* q = scratch.q.get();
  float* s = scratch.s.get();
  float* o = scratch.o.get();
  float* m = scratch.m.get();
  float* l = scratch.l.get();
  scratch.positions.resize(static_cast<size_t>(panel_rows));
  int64_t first_position = std::numeric_limits<int64_t>::max(), last_position = -1;
  for (int64_t i = 0; i < panel_rows; ++i) {
    const int64_t head = tile.head_begin + (panel_begin + i) / tile.rows;
    const int64_t row = tile.row_begin + (panel_begin + i) % tile.rows;
    cpu::ToFloat(RowBytes(p.q, head, row), p.q.dtype, d, q + i * d);
    const int64_t position = p.q.offset + row;
    scratch.positions[static_cast<size_t>(i)] = position;
    first_position = std::min(first_position, position);
    last_position = std::max(last_position, position);
  }
  std::fill(o, o + panel_rows * d, 0.0f);
  std::fill(m, m + panel_rows, kNegInf);
  std::fill(l, l + panel_rows, 0.0f);

  const std::vector<Span>& spans = p.selection->spans[static_cast<size_t>(tile.entry)];
  KeyGroups groups(spans, runs, last_position);
  std::vector<Piece>& pieces = scratch.pieces;
  while (groups.Next(pieces)) {
    const int64_t width = pieces.back().column + pieces.back().count;
    const int64_t padded = (width + cpu::kScoreAlign - 1) / cpu::kScoreAlign * cpu::kScoreAlign;
    for (const Piece& piece : pieces) {
      const float* keys = PieceRows(runs[piece.run].k, tile.kv_head, piece, scratch.k.get());
      DHSA_RETURN_IF_ERROR(cpu::GemmF32(/*transpose_b=*/true, panel_rows, piece.count, d, p.scale,
                                        q, d, keys, d, 0.0f, s + piece.column, kGroupKeys));
    }
    // Causality: keys after a row's position, and the padding, get -inf.
    const int64_t last_key = pieces.back().position + pieces.back().count - 1;
    for (int64_t i = 0; i < panel_rows; ++i) {
      float* row = s + i * kGroupKeys;
      std::fill(row + width, row + padded, kNegInf);
      if (last_key <= first_position) continue;
      const int64_t position = scratch.positions[static_cast<size_t>(i)];
      for (const Piece& piece : pieces) {
        const int64_t masked_from = std::max<int64_t>(0, position + 1 - piece.position);
        if (masked_from < piece.count) {
          std::fill(row + piece.column + masked_from, row + piece.column + piece.count, kNegInf);
        }
      }
    }
    cpu::SoftmaxStep(s, panel_rows, kGroupKeys, padded, m, l, o, d, d);
    for (const Piece& piece : pieces) {
      const float* values = PieceRows(runs[piece.run].v, tile.kv_head, piece, scratch.v.get());
      DHSA_RETURN_IF_ERROR(cpu::GemmF32(/*transpose_b=*/false, panel_rows, d, piece.count, 1.0f,
                                        s + piece.column, kGroupKeys, values, d, 1.0f, o, d));
    }
  }

  for (int64_t i = 0; i < panel_rows; ++i) {
    const int64_t head = tile.head_begin + (panel_begin + i) / tile.rows;
    const int64_t row = tile.row_begin + (panel_begin + i) % tile.rows;
    float* out = p.o.Row(head, row);
    float* lse = p.lse.Row(head, row);
    if (l[i] == 0.0f) {
      std::fill(out, out + d, 0.0f);
      *lse = kNegInf;
    } else {
      cpu::NormaliseRow(o + i * d, l[i], d, out);
      *lse = m[i] + std::log(l[i]);
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SparseAttentionCpu(const SparseAttentionParams& p) {
  DHSA_ASSIGN_OR_RETURN(const std::vector<KvRun> runs, KeyRuns(p));
  DHSA_RETURN_IF_ERROR(CheckParams(p));
  const std::vector<Tile> tiles = MakeTiles(p, runs);
  const int threads = std::max(1, p.num_threads);
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  std::vector<absl::Status> errors(static_cast<size_t>(threads));
  std::atomic<bool> stop{false};
  cpu::ParallelFor(static_cast<int64_t>(tiles.size()), threads, [&](int64_t i, int thread) {
    if (stop.load(std::memory_order_relaxed)) return;
    if (p.cancelled && p.cancelled()) {
      stop = true;
      return;
    }
    const Tile& tile = tiles[static_cast<size_t>(i)];
    const int64_t rows = tile.heads * tile.rows;
    for (int64_t begin = 0; begin < rows; begin += kPanelRows) {
      absl::Status s = AttendPanel(p, runs, tile, begin, std::min(kPanelRows, rows - begin),
                                   scratch[static_cast<size_t>(thread)]);
      if (!s.ok()) errors[static_cast<size_t>(thread)].Update(s);
    }
  });
  for (const absl::Status& s : errors) {
    if (!s.ok()) return s;
  }
  if (stop) return absl::CancelledError("sparse attention cancelled");
  return absl::OkStatus();
}

}  // namespace dhsa
