// The worker's KV cache: per (sequence, layer) a set of stripes (contiguous runs of absolute token
// positions, all KV heads), with capacity accounting in bytes over all sequences.
//
// A stripe's keys and values each live in one block [Hkv, capacity, d] of the sequence's dtype,
// in the store's KvMemory (host memory, or device memory for the CUDA backend),
// head-major with room to grow at the end of every head, so attention reads them in place through
// HeadsView::head_stride. Appends fill that room and double the buffer (one copy) when it is full.
// Readers take a snapshot (shared ownership of the buffers plus the lengths at that time): appends
// only write past those lengths and growth swaps in a new buffer, and Drop only releases the
// store's reference, so a snapshot stays valid and unchanged while an Attend computes on it.
// Truncate shortens a stripe in place; an append that would then overwrite rows a snapshot may
// still read (below the buffer's high-water mark) copies the buffer first.
//
// Truncate also fences the writes in flight on its (sequence, layer): a reservation made before the
// truncate fails to commit (ABORTED), so a cancelled write of a call the router has undone cannot
// land after the undo.
#ifndef DHSA_SERVICES_WORKER_KV_STORE_H_
#define DHSA_SERVICES_WORKER_KV_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"
#include "services/worker/kv_memory.h"

namespace dhsa {

// Where the tokens of one StoreKv call go.
struct KvWrite {
  std::string sequence_id;
  int32_t layer = 0;
  int64_t begin = 0;       // Absolute position of the first token.
  int64_t num_tokens = 0;  // n >= 1.
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  DType dtype = DType::kF32;
  bool append = false;  // Extend the stripe ending at `begin` instead of starting a new one.
};

// Memory of one stripe; k and v are [kv_heads, capacity_tokens, head_dim] elements of the dtype,
// in the store's KvMemory.
struct StripeBuffer {
  int64_t capacity_tokens = 0;
  std::unique_ptr<KvBlock> k;
  std::unique_ptr<KvBlock> v;
};

// One stripe as a reader sees it: positions [begin, begin + len).
struct StripeSnapshot {
  int64_t begin = 0;
  int64_t len = 0;
  std::shared_ptr<const StripeBuffer> buffer;
  int64_t end() const { return begin + len; }
};

// Every stripe of one (sequence, layer) at one moment, sorted by position.
struct LayerSnapshot {
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  DType dtype = DType::kF32;
  std::vector<StripeSnapshot> stripes;

  // Keys or values of stripe `i` as [kv_heads, len, head_dim] rows at absolute offset `begin`
  // (head_stride = capacity_tokens * head_dim). The data is in the store's KvMemory: device memory
  // for the CUDA backend.
  HeadsView Keys(size_t i) const;
  HeadsView Values(size_t i) const;
};

struct KvStats {
  int64_t capacity_bytes = 0;
  int64_t held_bytes = 0;       // Stored tokens' K and V bytes (what capacity limits).
  int64_t allocated_bytes = 0;  // Stripe buffers including room for appends.
  int32_t sequences = 0;
  int32_t stripes = 0;
};

class KvStore;

// Bytes set aside for one write between its header and its commit. Move-only; releases the bytes
// when destroyed uncommitted, so an abandoned call leaves no trace.
class KvReservation {
 public:
  KvReservation() = default;
  KvReservation(KvReservation&& other) noexcept;
  KvReservation& operator=(KvReservation&& other) noexcept;
  ~KvReservation();

  const KvWrite& write() const { return write_; }
  int64_t bytes() const { return bytes_; }

 private:
  friend class KvStore;
  void Release();

  KvStore* store_ = nullptr;
  KvWrite write_;
  int64_t bytes_ = 0;
  uint64_t epoch_ = 0;  // The store's truncate epoch when the reservation was made.
};

// What a truncate released.
struct KvTruncation {
  int64_t freed_bytes = 0;  // Held bytes released.
  int64_t held_bytes = 0;   // Over all sequences, after the truncate.
};

// Where a committed write landed.
struct KvCommit {
  int64_t stripe_begin = 0;
  int64_t stripe_length = 0;
  int64_t held_bytes = 0;  // Over all sequences, after the write.
};

class KvStore {
 public:
  // Stripes in `memory` (host memory when null).
  explicit KvStore(int64_t capacity_bytes, std::shared_ptr<KvMemory> memory = nullptr);

  // Checks `write` against the stored state (shapes of the sequence, the stripe to append to, no
  // overlap) and reserves its bytes. InvalidArgument for bad fields or shapes that differ from the
  // sequence's, FailedPrecondition for a placement conflict, ResourceExhausted past capacity.
  absl::StatusOr<KvReservation> Reserve(const KvWrite& write);

  // Stores k and v (each [kv_heads, num_tokens, head_dim] of the write's dtype) under a reservation
  // from Reserve; the checks are repeated, since the state may have changed meanwhile. On error
  // nothing is stored and the reservation is released; ResourceExhausted when the memory cannot
  // allocate the stripe (a device with less free memory than the capacity promised).
  absl::StatusOr<KvCommit> Commit(KvReservation reservation, const Tensor& k, const Tensor& v);
  // The same from host memory the caller guarantees holds [kv_heads, num_tokens, head_dim]
  // elements of the write's dtype at `k` and `v` (a shared-memory region: one copy, straight into
  // the stripe).
  absl::StatusOr<KvCommit> CommitRaw(KvReservation reservation, const void* k, const void* v);

  // The stripes of one layer; NotFound if the worker holds none.
  absl::StatusOr<LayerSnapshot> Snapshot(const std::string& sequence_id, int32_t layer) const;

  // Frees every stripe of the sequence; returns the held bytes released (0 if unknown).
  int64_t Drop(const std::string& sequence_id);

  // Drops the tokens at positions >= end of one layer: stripes starting at or after `end` are
  // freed, a stripe straddling it is cut (its buffer keeps its capacity). A layer left empty is
  // removed, and so is a sequence left without layers. Reservations on this (sequence, layer) made
  // before the call will not commit. Nothing is freed for an unknown sequence or layer.
  // InvalidArgument for an empty id, a negative layer or a negative end.
  absl::StatusOr<KvTruncation> Truncate(const std::string& sequence_id, int32_t layer, int64_t end);

  KvStats Stats() const;

 private:
  friend class KvReservation;

  struct Stripe {
    int64_t len = 0;
    // Rows of `buffer` ever written (>= len once a truncate has cut the stripe): snapshots may read
    // rows below it, so appends there need a buffer of their own while a snapshot holds this one.
    int64_t high_water = 0;
    std::shared_ptr<StripeBuffer> buffer;
  };
  struct Sequence {
    int64_t kv_heads = 0;
    int64_t head_dim = 0;
    DType dtype = DType::kF32;
    int64_t held_bytes = 0;
    std::map<int32_t, std::map<int64_t, Stripe>> layers;  // layer -> stripe begin -> stripe.
  };

  // Bytes of n tokens of K and V for the write's shapes.
  static int64_t WriteBytes(const KvWrite& write);
  // Shape and placement checks of Reserve and Commit; mu_ held.
  absl::Status CheckWriteLocked(const KvWrite& write) const;
  // An uncommitted reservation ends: its bytes and its count go back; mu_ held.
  void EndReservationLocked(int64_t bytes);
  void ReleaseBytes(int64_t bytes);

  // A buffer of `capacity` tokens holding the first `len` tokens of `old`; mu_ held.
  absl::StatusOr<std::shared_ptr<StripeBuffer>> GrowLocked(const StripeBuffer& old, int64_t heads,
                                                           int64_t len, int64_t row_bytes,
                                                           int64_t capacity);

  const int64_t capacity_bytes_;
  const std::shared_ptr<KvMemory> memory_;
  mutable std::mutex mu_;
  std::map<std::string, Sequence> sequences_;  // Guarded by mu_.
  int64_t held_bytes_ = 0;                     // Guarded by mu_.
  int64_t reserved_bytes_ = 0;                 // Guarded by mu_.
  int64_t allocated_bytes_ = 0;                // Guarded by mu_.
  int64_t reservations_ = 0;                   // Guarded by mu_: reservations not yet ended.
  uint64_t epoch_ = 0;                         // Guarded by mu_: counts fencing truncates.
  // Guarded by mu_: (sequence, layer) -> epoch of its last truncate, kept while reservations
  // exist (only those made before it are fenced; with none left, nothing is).
  std::map<std::pair<std::string, int32_t>, uint64_t> fences_;
};

}  // namespace dhsa

#endif  // DHSA_SERVICES_WORKER_KV_STORE_H_
