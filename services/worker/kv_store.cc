#include "services/worker/kv_store.h"

#include <algorithm>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"
#include "services/common/wire.h"

namespace dhsa {
namespace {

// Positions beyond this are rejected: far past any context, and it keeps every size product small.
constexpr int64_t kMaxPosition = int64_t{1} << 40;

// "[0, 37), [37, 93)" for the stripes of a layer (at most a few, then a count).
template <typename StripeMap>
std::string HeldRanges(const StripeMap& stripes) {
  if (stripes.empty()) return "none";
  std::string out;
  int shown = 0;
  for (const auto& [begin, stripe] : stripes) {
    if (shown == 8) {
      absl::StrAppend(&out, ", ... (", stripes.size(), " stripes)");
      break;
    }
    absl::StrAppend(&out, shown == 0 ? "" : ", ", "[", begin, ", ", begin + stripe.len, ")");
    ++shown;
  }
  return out;
}

std::string Describe(const KvWrite& w) {
  return absl::StrCat("tokens [", w.begin, ", ", w.begin + w.num_tokens, ") of sequence '",
                      w.sequence_id, "' layer ", w.layer);
}

int64_t BufferBytes(const StripeBuffer& b) {
  return static_cast<int64_t>(b.k->size() + b.v->size());
}

absl::Status CheckTensor(const Tensor& t, absl::string_view name, const KvWrite& w) {
  const std::vector<int64_t> expected = {w.kv_heads, w.num_tokens, w.head_dim};
  if (t.shape != expected || t.dtype != w.dtype ||
      t.bytes.size() != static_cast<size_t>(t.NumElements()) * DTypeSize(t.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' is ", ShapeString(t.shape), " ", DTypeName(t.dtype),
                     "; the header announces ", ShapeString(expected), " ", DTypeName(w.dtype)));
  }
  return absl::OkStatus();
}

// Copies tokens [0, n) of every head of `src` ([heads, n, d]) to rows [at, at + n) of `dst`
// ([heads, capacity, d]).
absl::Status CopyRows(KvMemory& memory, const void* src, int64_t heads, int64_t n,
                      int64_t row_bytes, int64_t capacity, int64_t at, const KvBlock& dst) {
  return memory.CopyIn(static_cast<uint8_t*>(dst.data()) + at * row_bytes,
                       static_cast<size_t>(capacity * row_bytes), src,
                       static_cast<size_t>(n * row_bytes), static_cast<size_t>(n * row_bytes),
                       static_cast<size_t>(heads));
}

}  // namespace

HeadsView LayerSnapshot::Keys(size_t i) const {
  const StripeSnapshot& s = stripes[i];
  HeadsView view;
  view.data = s.buffer->k->data();
  view.dtype = dtype;
  view.heads = kv_heads;
  view.len = s.len;
  view.dim = head_dim;
  view.offset = s.begin;
  view.head_stride = s.buffer->capacity_tokens * head_dim;
  return view;
}

HeadsView LayerSnapshot::Values(size_t i) const {
  HeadsView view = Keys(i);
  view.data = stripes[i].buffer->v->data();
  return view;
}

KvReservation::KvReservation(KvReservation&& other) noexcept
    : store_(std::exchange(other.store_, nullptr)),
      write_(std::move(other.write_)),
      bytes_(std::exchange(other.bytes_, 0)),
      epoch_(other.epoch_) {}

KvReservation& KvReservation::operator=(KvReservation&& other) noexcept {
  if (this != &other) {
    Release();
    store_ = std::exchange(other.store_, nullptr);
    write_ = std::move(other.write_);
    bytes_ = std::exchange(other.bytes_, 0);
    epoch_ = other.epoch_;
  }
  return *this;
}

KvReservation::~KvReservation() { Release(); }

void KvReservation::Release() {
  if (store_ != nullptr) store_->ReleaseBytes(bytes_);
  store_ = nullptr;
  bytes_ = 0;
}

KvStore::KvStore(int64_t capacity_bytes, std::shared_ptr<KvMemory> memory)
    : capacity_bytes_(capacity_bytes),
      memory_(memory != nullptr ? std::move(memory) : std::make_shared<HostKvMemory>()) {}

absl::StatusOr<std::shared_ptr<StripeBuffer>> KvStore::GrowLocked(const StripeBuffer& old,
                                                                  int64_t heads, int64_t len,
                                                                  int64_t row_bytes,
                                                                  int64_t capacity) {
  auto grown = std::make_shared<StripeBuffer>();
  grown->capacity_tokens = capacity;
  const size_t bytes = static_cast<size_t>(heads * capacity * row_bytes);
  DHSA_ASSIGN_OR_RETURN(grown->k, memory_->Allocate(bytes));
  DHSA_ASSIGN_OR_RETURN(grown->v, memory_->Allocate(bytes));
  const size_t old_pitch = static_cast<size_t>(old.capacity_tokens * row_bytes);
  const size_t pitch = static_cast<size_t>(capacity * row_bytes);
  const size_t width = static_cast<size_t>(len * row_bytes);
  if (width > 0) {
    DHSA_RETURN_IF_ERROR(memory_->CopyWithin(grown->k->data(), pitch, old.k->data(), old_pitch,
                                             width, static_cast<size_t>(heads)));
    DHSA_RETURN_IF_ERROR(memory_->CopyWithin(grown->v->data(), pitch, old.v->data(), old_pitch,
                                             width, static_cast<size_t>(heads)));
  }
  return grown;
}

int64_t KvStore::WriteBytes(const KvWrite& w) {
  return 2 * w.kv_heads * w.num_tokens * w.head_dim * static_cast<int64_t>(DTypeSize(w.dtype));
}

void KvStore::EndReservationLocked(int64_t bytes) {
  reserved_bytes_ -= bytes;
  if (--reservations_ == 0) fences_.clear();  // No write left to fence.
}

void KvStore::ReleaseBytes(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  EndReservationLocked(bytes);
}

absl::Status KvStore::CheckWriteLocked(const KvWrite& w) const {
  const auto seq = sequences_.find(w.sequence_id);
  if (seq == sequences_.end()) {
    if (w.append) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot append ", Describe(w), ": this worker holds nothing of the sequence"));
    }
    return absl::OkStatus();
  }
  const Sequence& s = seq->second;
  if (s.kv_heads != w.kv_heads || s.head_dim != w.head_dim || s.dtype != w.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence '", w.sequence_id, "' is stored with kv_heads ", s.kv_heads, ", head_dim ",
        s.head_dim, ", ", DTypeName(s.dtype), "; this write has kv_heads ", w.kv_heads,
        ", head_dim ", w.head_dim, ", ", DTypeName(w.dtype)));
  }
  static const std::map<int64_t, Stripe> kNoStripes;
  const auto layer = s.layers.find(w.layer);
  const std::map<int64_t, Stripe>& stripes = layer == s.layers.end() ? kNoStripes : layer->second;
  const int64_t end = w.begin + w.num_tokens;
  const auto next = stripes.upper_bound(w.begin);  // First stripe starting after `begin`.
  const bool has_prev = next != stripes.begin();
  const auto prev = has_prev ? std::prev(next) : stripes.end();
  const bool overlaps_prev = has_prev && prev->first + prev->second.len > w.begin;
  const bool overlaps_next = next != stripes.end() && next->first < end;
  if (overlaps_prev || overlaps_next) {
    return absl::FailedPreconditionError(
        absl::StrCat(Describe(w), " overlap stripes this worker holds: ", HeldRanges(stripes)));
  }
  if (w.append && !(has_prev && prev->first + prev->second.len == w.begin)) {
    return absl::FailedPreconditionError(absl::StrCat("cannot append ", Describe(w),
                                                      ": no stripe here ends at position ", w.begin,
                                                      " (held: ", HeldRanges(stripes), ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<KvReservation> KvStore::Reserve(const KvWrite& w) {
  if (w.sequence_id.empty()) return absl::InvalidArgumentError("sequence_id is empty");
  if (w.layer < 0) return absl::InvalidArgumentError(absl::StrCat("layer ", w.layer, " < 0"));
  if (w.begin < 0 || w.num_tokens < 1 || w.begin > kMaxPosition - w.num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot store ", w.num_tokens, " tokens at position ", w.begin,
                     ": need begin >= 0, num_tokens >= 1 and an end below 2^40"));
  }
  if (w.kv_heads < 1 || w.head_dim < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv_heads and head_dim must be positive; got ",
                                                   w.kv_heads, " and ", w.head_dim));
  }
  DHSA_RETURN_IF_ERROR(
      TensorByteSize({2, w.kv_heads, w.num_tokens, w.head_dim}, w.dtype, "k and v").status());
  const int64_t bytes = WriteBytes(w);

  std::lock_guard<std::mutex> lock(mu_);
  DHSA_RETURN_IF_ERROR(CheckWriteLocked(w));
  if (bytes > capacity_bytes_ - held_bytes_ - reserved_bytes_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("worker KV capacity exhausted: storing ", Describe(w), " needs ", bytes,
                     " bytes, but ", held_bytes_, " of ", capacity_bytes_, " bytes are held and ",
                     reserved_bytes_, " reserved by calls in progress"));
  }
  reserved_bytes_ += bytes;
  ++reservations_;
  KvReservation r;
  r.store_ = this;
  r.write_ = w;
  r.bytes_ = bytes;
  r.epoch_ = epoch_;
  return r;
}

absl::StatusOr<KvCommit> KvStore::Commit(KvReservation reservation, const Tensor& k,
                                         const Tensor& v) {
  if (reservation.store_ != this) {
    return absl::InternalError("KvStore::Commit called without a reservation of this store");
  }
  const KvWrite& w = reservation.write_;
  DHSA_RETURN_IF_ERROR(CheckTensor(k, "k", w));
  DHSA_RETURN_IF_ERROR(CheckTensor(v, "v", w));
  return CommitRaw(std::move(reservation), k.bytes.data(), v.bytes.data());
}

absl::StatusOr<KvCommit> KvStore::CommitRaw(KvReservation reservation, const void* k,
                                            const void* v) {
  if (reservation.store_ != this) {
    return absl::InternalError("KvStore::Commit called without a reservation of this store");
  }
  const KvWrite& w = reservation.write_;
  const int64_t row_bytes = w.head_dim * static_cast<int64_t>(DTypeSize(w.dtype));

  std::lock_guard<std::mutex> lock(mu_);
  const auto fence = fences_.find({w.sequence_id, w.layer});
  if (fence != fences_.end() && fence->second > reservation.epoch_) {
    return absl::AbortedError(absl::StrCat("sequence '", w.sequence_id, "' layer ", w.layer,
                                           " was truncated while this write was in flight; ",
                                           Describe(w), " are not stored"));
  }
  DHSA_RETURN_IF_ERROR(CheckWriteLocked(w));
  Sequence& seq = sequences_[w.sequence_id];
  if (seq.layers.empty()) {
    seq.kv_heads = w.kv_heads;
    seq.head_dim = w.head_dim;
    seq.dtype = w.dtype;
  }
  std::map<int64_t, Stripe>& stripes = seq.layers[w.layer];
  KvCommit out;
  if (w.append) {
    auto it = std::prev(stripes.upper_bound(w.begin));
    Stripe& stripe = it->second;
    const int64_t needed = stripe.len + w.num_tokens;
    // Below the high-water mark (the stripe was truncated), a snapshot taken before the truncate
    // may still read the rows this write would fill: write into a copy then. use_count() is exact
    // here: snapshots copy the pointer only under mu_.
    const bool shared_rows = stripe.len < stripe.high_water && stripe.buffer.use_count() > 1;
    if (needed > stripe.buffer->capacity_tokens || shared_rows) {
      const int64_t capacity = needed > stripe.buffer->capacity_tokens
                                   ? std::max(2 * stripe.buffer->capacity_tokens, needed)
                                   : stripe.buffer->capacity_tokens;
      DHSA_ASSIGN_OR_RETURN(
          std::shared_ptr<StripeBuffer> grown,
          GrowLocked(*stripe.buffer, w.kv_heads, stripe.len, row_bytes, capacity));
      allocated_bytes_ += BufferBytes(*grown) - BufferBytes(*stripe.buffer);
      stripe.buffer = std::move(grown);
      stripe.high_water = stripe.len;
    }
    // Rows past every snapshot's length: readers of this buffer never look at them.
    DHSA_RETURN_IF_ERROR(CopyRows(*memory_, k, w.kv_heads, w.num_tokens, row_bytes,
                                  stripe.buffer->capacity_tokens, stripe.len, *stripe.buffer->k));
    DHSA_RETURN_IF_ERROR(CopyRows(*memory_, v, w.kv_heads, w.num_tokens, row_bytes,
                                  stripe.buffer->capacity_tokens, stripe.len, *stripe.buffer->v));
    stripe.len = needed;
    stripe.high_water = std::max(stripe.high_water, needed);
    out.stripe_begin = it->first;
    out.stripe_length = stripe.len;
  } else {
    Stripe stripe;
    stripe.len = w.num_tokens;
    stripe.high_water = w.num_tokens;
    stripe.buffer = std::make_shared<StripeBuffer>();
    stripe.buffer->capacity_tokens = w.num_tokens;
    const size_t bytes = static_cast<size_t>(w.kv_heads * w.num_tokens * row_bytes);
    DHSA_ASSIGN_OR_RETURN(stripe.buffer->k, memory_->Allocate(bytes));
    DHSA_ASSIGN_OR_RETURN(stripe.buffer->v, memory_->Allocate(bytes));
    DHSA_RETURN_IF_ERROR(memory_->CopyIn(stripe.buffer->k->data(), bytes, k, bytes, bytes, 1));
    DHSA_RETURN_IF_ERROR(memory_->CopyIn(stripe.buffer->v->data(), bytes, v, bytes, bytes, 1));
    allocated_bytes_ += BufferBytes(*stripe.buffer);
    stripes.emplace(w.begin, std::move(stripe));
    out.stripe_begin = w.begin;
    out.stripe_length = w.num_tokens;
  }
  const int64_t bytes = reservation.bytes_;
  EndReservationLocked(bytes);
  reservation.store_ = nullptr;  // Committed: the bytes move from reserved to held.
  held_bytes_ += bytes;
  seq.held_bytes += bytes;
  out.held_bytes = held_bytes_;
  return out;
}

absl::StatusOr<LayerSnapshot> KvStore::Snapshot(const std::string& sequence_id,
                                                int32_t layer) const {
  std::lock_guard<std::mutex> lock(mu_);
  const auto seq = sequences_.find(sequence_id);
  const bool found = seq != sequences_.end() && seq->second.layers.count(layer) != 0;
  if (!found) {
    return absl::NotFoundError(
        absl::StrCat("this worker holds no keys of sequence '", sequence_id, "' layer ", layer));
  }
  const auto stripes = seq->second.layers.find(layer);
  LayerSnapshot snap;
  snap.kv_heads = seq->second.kv_heads;
  snap.head_dim = seq->second.head_dim;
  snap.dtype = seq->second.dtype;
  snap.stripes.reserve(stripes->second.size());
  for (const auto& [begin, stripe] : stripes->second) {
    snap.stripes.push_back(StripeSnapshot{begin, stripe.len, stripe.buffer});
  }
  return snap;
}

int64_t KvStore::Drop(const std::string& sequence_id) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto seq = sequences_.find(sequence_id);
  if (seq == sequences_.end()) return 0;
  for (const auto& [layer, stripes] : seq->second.layers) {
    for (const auto& [begin, stripe] : stripes) allocated_bytes_ -= BufferBytes(*stripe.buffer);
  }
  const int64_t freed = seq->second.held_bytes;
  held_bytes_ -= freed;
  sequences_.erase(seq);
  return freed;
}

absl::StatusOr<KvTruncation> KvStore::Truncate(const std::string& sequence_id, int32_t layer,
                                               int64_t end) {
  if (sequence_id.empty()) return absl::InvalidArgumentError("sequence_id is empty");
  if (layer < 0) return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " < 0"));
  if (end < 0) return absl::InvalidArgumentError(absl::StrCat("truncate end ", end, " < 0"));

  std::lock_guard<std::mutex> lock(mu_);
  // Writes to this layer reserved before now must not commit, whether or not it holds anything.
  if (reservations_ > 0) fences_[{sequence_id, layer}] = ++epoch_;
  KvTruncation out;
  out.held_bytes = held_bytes_;
  const auto seq = sequences_.find(sequence_id);
  if (seq == sequences_.end()) return out;
  Sequence& s = seq->second;
  const auto layer_it = s.layers.find(layer);
  if (layer_it == s.layers.end()) return out;
  std::map<int64_t, Stripe>& stripes = layer_it->second;
  const int64_t token_bytes =
      2 * s.kv_heads * s.head_dim * static_cast<int64_t>(DTypeSize(s.dtype));
  int64_t freed_tokens = 0;
  // Stripes that start at or after `end` go whole.
  for (auto it = stripes.lower_bound(end); it != stripes.end();) {
    freed_tokens += it->second.len;
    allocated_bytes_ -= BufferBytes(*it->second.buffer);
    it = stripes.erase(it);
  }
  // The stripe before may straddle `end`: it keeps its buffer (a snapshot may be reading it) and
  // its high-water mark.
  if (!stripes.empty()) {
    auto last = std::prev(stripes.end());
    const int64_t keep = end - last->first;
    if (keep < last->second.len) {
      freed_tokens += last->second.len - keep;
      last->second.len = keep;
    }
  }
  const int64_t freed = freed_tokens * token_bytes;
  held_bytes_ -= freed;
  s.held_bytes -= freed;
  if (stripes.empty()) s.layers.erase(layer_it);
  if (s.layers.empty()) sequences_.erase(seq);
  out.freed_bytes = freed;
  out.held_bytes = held_bytes_;
  return out;
}

KvStats KvStore::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  KvStats s;
  s.capacity_bytes = capacity_bytes_;
  s.held_bytes = held_bytes_;
  s.allocated_bytes = allocated_bytes_;
  s.sequences = static_cast<int32_t>(sequences_.size());
  for (const auto& [id, seq] : sequences_) {
    for (const auto& [layer, stripes] : seq.layers)
      s.stripes += static_cast<int32_t>(stripes.size());
  }
  return s;
}

}  // namespace dhsa
