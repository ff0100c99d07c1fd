// The router's state of one sequence: shapes and parameters, and per layer its layout (boundaries,
// summaries, tail keys) and stripes.
#ifndef DHSA_SERVICES_ROUTER_SEQUENCE_H_
#define DHSA_SERVICES_ROUTER_SEQUENCE_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "dhsa/v1/attention.pb.h"
#include "kernels/common/config.h"
#include "kernels/common/dtype.h"
#include "services/router/layout.h"
#include "services/router/placement.h"

namespace dhsa::router {

struct LayerState {
  LayerState(const DhsaConfig& config, int64_t kv_heads, int64_t head_dim, DType dtype)
      : layout(config, kv_heads, head_dim, dtype) {}
  LayerLayout layout;
  std::vector<Stripe> stripes;  // Contiguous from 0 to layout.length().
  // A call is in flight: it alone reads and changes `layout` and `stripes` until it ends.
  bool busy = false;
  // Non-empty when keys of a failed call could not be removed from the workers: why the layer
  // takes no more calls.
  std::string broken;
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
// another call on the layer is in flight, the layer is broken, or (for decode) it holds no keys
// yet.
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
