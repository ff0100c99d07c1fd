// Prometheus metrics of every dhsa process (prometheus-cpp): one process-wide registry, the
// /metrics endpoint, and the few calls the services make when something finishes.
//
// Every family is listed in Families() (name, type, labels, help): the Grafana dashboard and the
// alert rules are checked against that list (tests/observability), so a query of a metric the code
// does not export fails a test. Names carry their unit (`_seconds`, `_bytes`, `_total`, `_ratio`);
// labels are few and bounded: role, method, code, stage, policy, backend, transport, direction,
// worker, device.
//
// What it costs on the request path: per RPC one interceptor (two clock reads, a few atomic adds);
// per Prefill/Decode layer call a handful of histogram observations taken from its CallStats.
// Nothing is done per token or per piece. Gauges that mirror state (KV bytes held and capacity,
// active sequences, workers up, process CPU and memory, GPU memory) are read only when /metrics is
// scraped, through sources the services register.
#ifndef DHSA_SERVICES_COMMON_METRICS_H_
#define DHSA_SERVICES_COMMON_METRICS_H_

#include <grpcpp/support/server_interceptor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "dhsa/v1/attention.pb.h"
#include "kernels/common/config.h"

namespace dhsa::metrics {

// The /metrics ports of the deployment (Dockerfiles, k8s, Prometheus config use these; checked by
// tests/deploy). A process serves /metrics only when its ServiceConfig.metrics_port (or
// --metrics-port) is set: 0 keeps it off.
inline constexpr int kRouterMetricsPort = 9464;
inline constexpr int kWorkerMetricsPort = 9465;

// Histogram buckets of request and stage durations, seconds: from a sub-millisecond decode step
// to a two-minute long prefill.
const std::vector<double>& DurationBuckets();
// Buckets of the selection density (attended pairs / causal pairs), 0 to 1.
const std::vector<double>& DensityBuckets();

enum class FamilyType { kCounter, kGauge, kHistogram };

struct FamilyInfo {
  std::string name;
  FamilyType type;
  std::vector<std::string> labels;
  std::string help;
};

// Every family this module exports, in exposition order. Counters are listed with their `_total`
// name; histograms by their base name (the exposition adds `_bucket`, `_sum`, `_count`).
const std::vector<FamilyInfo>& Families();

// Starts the HTTP server of /metrics on `bind_address` ("0.0.0.0:9464"; port 0 picks a free one)
// and returns the bound port. One per process; a second call is FailedPrecondition. Unavailable
// when the address cannot be bound.
absl::StatusOr<int> StartExposer(const std::string& bind_address);

// The exposition text of everything registered (what /metrics serves).
std::string ScrapeText();

// Counts and times every RPC of the dhsa.v1 services on a server it is installed on
// (StartGrpcServer installs it): dhsa_requests_total, dhsa_request_duration_seconds and
// dhsa_inflight_requests, with role "router" for dhsa.v1.Attention and "worker" for dhsa.v1.Worker.
// Health and reflection calls are not counted.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> NewRpcInterceptorFactory();

// The router finished a Prefill (decode = false, `tokens` new tokens) or Decode (one token) layer
// call: its stage times, selection density, tokens and bytes moved to and from workers.
void ObserveLayerCall(bool decode, Policy policy, int64_t tokens, const v1::CallStats& stats);

// A worker computed one Attend: compute seconds on `backend`.
void ObserveWorkerAttention(absl::string_view backend, double seconds);
// A worker committed a StoreKv of `bytes` K and V bytes.
void CountKvStored(int64_t bytes);

// State read at scrape time. A source fills a GaugeSink with the current value of families of
// type kGauge from Families(); `labels` are that family's labels in order.
class GaugeSink {
 public:
  virtual ~GaugeSink() = default;
  virtual void Set(absl::string_view family, const std::vector<std::string>& labels,
                   double value) = 0;
};

// Registers `read`, called at every scrape until RemoveSource(owner). `read` must not call
// AddSource or RemoveSource. RemoveSource waits for a scrape that is running `read`.
void AddSource(const void* owner, std::function<void(GaugeSink&)> read);
void RemoveSource(const void* owner);

// A worker's KV store as seen at scrape time.
struct KvGauges {
  int64_t capacity_bytes = 0;
  int64_t held_bytes = 0;
  int64_t allocated_bytes = 0;
  int64_t sequences = 0;
  int64_t stripes = 0;
};
// AddSource for a worker's KV store: dhsa_kv_* gauges with labels worker (the worker's index in
// this process, "0" for a standalone dhsa-worker; Prometheus's instance/pod label tells pods apart)
// and backend.
void AddWorkerSource(const void* owner, const std::string& backend, std::function<KvGauges()> read);

// Exports dhsa_gpu_memory_{used,total}_bytes per visible CUDA device (a CUDA worker calls it once).
// FailedPrecondition in a build without CUDA.
absl::Status EnableGpuMemoryMetrics();

}  // namespace dhsa::metrics

#endif  // DHSA_SERVICES_COMMON_METRICS_H_
