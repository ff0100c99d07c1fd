// The router's state of one sequence: shapes and parameters, and per layer its layout (boundaries,
// summaries, tail keys) and stripes.
#ifndef DHSA_SERVICES_ROUTER_SEQUENCE_H_
#define DHSA_SERVICES_ROUTER_SEQUENCE_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "dhsa/v1/attention.pb.h"
#include "kernels/common/config.h"
#include "kernels/common/dtype.h"
#include "services/router/layout.h"
#include "services/router/placement.h"

namespace dhsa::router {

// The undo of a failed call that not every worker confirmed: each worker in `bytes` may still hold
// keys of the call (positions >= `end` of the layer), whose bytes stay placed there and counted to
// the sequence. The layer takes no call until each of them has confirmed a Truncate(end); the next
// call on the layer retries it first (RetryPendingUndo, worker_calls.h).
struct PendingUndo {
  int64_t end = 0;
  std::map<int, int64_t> bytes;  // Worker -> KV bytes of the keys it may hold.
  std::string why;               // Which workers could not truncate, and why.
};

struct LayerState {
  LayerState(const DhsaConfig& config, int64_t kv_heads, int64_t head_dim, DType dtype)
      : layout(config, kv_heads, head_dim, dtype) {}
  LayerLayout layout;
  std::vector<Stripe> stripes;  // Contiguous from 0 to layout.length().
  // A call is in flight: it alone reads and changes `layout` and `stripes` until it ends.
  bool busy = false;
  // Set when keys of a failed call could not be removed from every worker.
  std::optional<PendingUndo> undo;
};

struct SequenceState {
  std::string id;
  v1::SequenceConfig config;  // As created, with every default filled in.
  DhsaConfig dhsa;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  DType dtype = DType::kF32;
  int64_t bytes_per_token = 0;  // K and V bytes of one token of one layer.
  int rotation = 0;             // Placement offset (spreads short sequences over workers).

  std::mutex mu;
  std::vector<LayerState> layers;          // Guarded by mu (see LayerState::busy).
  std::map<int, int64_t> bytes_on_worker;  // Guarded by mu: committed KV bytes per worker.
  int calls_in_flight = 0;                 // Guarded by mu.
  bool released = false;                   // Guarded by mu.
};

// Claims `layer` for one call: NOT_FOUND if the sequence was released, FAILED_PRECONDITION if
// another call on the layer is in flight or (for decode) it holds no keys yet. A layer with a
// pending undo is claimed too: the caller retries the undo before the call (RetryPendingUndo).
absl::Status BeginLayerCall(SequenceState& seq, int layer, bool decode);
// Gives the layer back.
void EndLayerCall(SequenceState& seq, int layer);

// Checks a client-chosen id: 1 to 128 of letters, digits, '-', '_', '.'.
absl::Status ValidateSequenceId(const std::string& id);

// The id under which workers hold one layer of a sequence. One worker sequence per layer keeps the
// layers apart on the workers: the rollback of a failed call truncates exactly its layer, and
// ReleaseSequence drops each layer with the worker's Drop.
std::string WorkerSequenceId(const std::string& id, int layer);

}  // namespace dhsa::router

#endif  // DHSA_SERVICES_ROUTER_SEQUENCE_H_
