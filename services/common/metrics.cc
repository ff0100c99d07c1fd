#include "services/common/metrics.h"

#include <dirent.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <exception>
#include <fstream>
#include <mutex>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "services/common/tsan_annotations.h"

#ifdef DHSA_METRICS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace dhsa::metrics {
namespace {

using prometheus::ClientMetric;
using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;
using prometheus::MetricFamily;
using prometheus::MetricType;

// Stages of a layer call, in CallStats order.
constexpr std::array<const char*, 5> kStages = {"boundaries", "selection", "dispatch", "attention",
                                                "merge"};
constexpr int kNumPolicies = 8;  // Above the number of Policy values.
constexpr int kNumCodes = 17;    // grpc::StatusCode 0..16.

const FamilyInfo& Info(absl::string_view name) {
  for (const FamilyInfo& f : Families()) {
    if (f.name == name) return f;
  }
  // Every name used below is in the table (metrics_test checks each is exported).
  static const FamilyInfo unknown{"", FamilyType::kGauge, {}, ""};
  return unknown;
}

std::string CodeName(int code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

// Children of one (role, method): created on first use of each status code.
struct MethodMetrics {
  std::string role, method;
  Gauge* inflight = nullptr;
  std::mutex mu;
  std::array<std::atomic<Counter*>, kNumCodes> count{};
  std::array<std::atomic<Histogram*>, kNumCodes> duration{};
};

// The layer-call children of one (method, policy).
struct LayerMetrics {
  std::array<Histogram*, kStages.size()> stage{};
  Histogram* density = nullptr;
  Counter* tokens = nullptr;
};

// Families, the scrape-time sources, the exposer. Created once, never destroyed (servers may
// still be finishing calls while statics are torn down).
class Core {
 public:
  Core()
      : registry_(std::make_shared<prometheus::Registry>()),
        requests_(Build<Counter>(prometheus::BuildCounter(), "dhsa_requests_total")),
        request_duration_(
            Build<Histogram>(prometheus::BuildHistogram(), "dhsa_request_duration_seconds")),
        inflight_(Build<Gauge>(prometheus::BuildGauge(), "dhsa_inflight_requests")),
        prefill_tokens_(Build<Counter>(prometheus::BuildCounter(), "dhsa_prefill_tokens_total")),
        decode_tokens_(Build<Counter>(prometheus::BuildCounter(), "dhsa_decode_tokens_total")),
        stage_(Build<Histogram>(prometheus::BuildHistogram(), "dhsa_stage_duration_seconds")),
        density_(Build<Histogram>(prometheus::BuildHistogram(), "dhsa_selection_density_ratio")),
        transfer_(Build<Counter>(prometheus::BuildCounter(), "dhsa_transfer_bytes_total")),
        worker_attention_(Build<Histogram>(prometheus::BuildHistogram(),
                                           "dhsa_worker_attention_duration_seconds")),
        kv_stored_(
            Build<Counter>(prometheus::BuildCounter(), "dhsa_kv_stored_bytes_total").Add({})),
        to_workers_(transfer_.Add({{"transport", "grpc"}, {"direction", "to_workers"}})),
        from_workers_(transfer_.Add({{"transport", "grpc"}, {"direction", "from_workers"}})) {}

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  MethodMetrics* ForMethod(const std::string& path) {
    std::lock_guard<std::mutex> lock(mu_);
    std::unique_ptr<MethodMetrics>& m = methods_[path];
    if (m == nullptr) {
      m = std::make_unique<MethodMetrics>();
      // "/dhsa.v1.Attention/Prefill" -> role "router", method "Prefill".
      const size_t slash = path.rfind('/');
      const std::string service = path.substr(1, slash - 1);
      m->method = path.substr(slash + 1);
      m->role = service == "dhsa.v1.Attention" ? "router"
                : service == "dhsa.v1.Worker"  ? "worker"
                                               : service;
      m->inflight = &inflight_.Add({{"role", m->role}});
    }
    return m.get();
  }

  void FinishRpc(MethodMetrics* m, int code, double seconds) {
    if (code < 0 || code >= kNumCodes) code = static_cast<int>(grpc::StatusCode::UNKNOWN);
    Counter* count = m->count[static_cast<size_t>(code)].load(std::memory_order_acquire);
    Histogram* duration = m->duration[static_cast<size_t>(code)].load(std::memory_order_acquire);
    if (count == nullptr) {
      std::lock_guard<std::mutex> lock(m->mu);
      const prometheus::Labels labels = {
          {"role", m->role}, {"method", m->method}, {"code", CodeName(code)}};
      count = &requests_.Add(labels);
      duration = &request_duration_.Add(labels, DurationBuckets());
      m->duration[static_cast<size_t>(code)].store(duration, std::memory_order_release);
      m->count[static_cast<size_t>(code)].store(count, std::memory_order_release);
    }
    count->Increment();
    duration->Observe(seconds);
  }

  void ObserveLayerCall(bool decode, Policy policy, int64_t tokens, const v1::CallStats& stats) {
    const double stage_seconds[kStages.size()] = {
        stats.boundaries_seconds(), stats.selection_seconds(), stats.dispatch_seconds(),
        stats.attention_seconds(), stats.merge_seconds()};
    const LayerMetrics& m = ForLayerCall(decode, policy);
    for (size_t s = 0; s < kStages.size(); ++s) m.stage[s]->Observe(stage_seconds[s]);
    if (stats.causal_pairs() > 0) {
      m.density->Observe(static_cast<double>(stats.computed_pairs()) /
                         static_cast<double>(stats.causal_pairs()));
    }
    m.tokens->Increment(static_cast<double>(tokens));
    Counter* to = &to_workers_;
    Counter* from = &from_workers_;
    if (!stats.transport().empty() && stats.transport() != "grpc") {
      std::lock_guard<std::mutex> lock(mu_);  // One pair of series per transport.
      auto& slot = transfer_by_transport_[stats.transport()];
      if (slot.first == nullptr) {
        slot.first =
            &transfer_.Add({{"transport", stats.transport()}, {"direction", "to_workers"}});
        slot.second =
            &transfer_.Add({{"transport", stats.transport()}, {"direction", "from_workers"}});
      }
      to = slot.first;
      from = slot.second;
    }
    to->Increment(static_cast<double>(stats.bytes_to_workers()));
    from->Increment(static_cast<double>(stats.bytes_from_workers()));
  }

  void ObserveWorkerAttention(absl::string_view backend, double seconds) {
    Histogram* h;
    {
      std::lock_guard<std::mutex> lock(mu_);
      Histogram*& slot = worker_attention_by_backend_[std::string(backend)];
      if (slot == nullptr) {
        slot = &worker_attention_.Add({{"backend", std::string(backend)}}, DurationBuckets());
      }
      h = slot;
    }
    h->Observe(seconds);
  }

  void CountKvStored(int64_t bytes) { kv_stored_.Increment(static_cast<double>(bytes)); }

  // Scrape-time sources.
  void AddSource(const void* owner, std::function<void(GaugeSink&)> read) {
    std::lock_guard<std::mutex> lock(sources_mu_);
    sources_[owner] = std::move(read);
  }
  void RemoveSource(const void* owner) {
    std::lock_guard<std::mutex> lock(sources_mu_);
    sources_.erase(owner);
  }
  int NextWorkerIndex() { return next_worker_.fetch_add(1); }
  void EnableGpu() { gpu_enabled_.store(true); }

  // The families read at scrape time: sources, process, GPU.
  std::vector<MetricFamily> CollectScraped() const;

  absl::StatusOr<int> StartExposer(const std::string& bind_address);

 private:
  template <typename T, typename B>
  Family<T>& Build(B builder, const char* name) {
    const FamilyInfo& info = Info(name);
    return builder.Name(name).Help(info.help).Register(*registry_);
  }

  const LayerMetrics& ForLayerCall(bool decode, Policy policy) {
    const int p = static_cast<int>(policy);
    const size_t index =
        (decode ? kNumPolicies : 0) + static_cast<size_t>(p >= 0 && p < kNumPolicies ? p : 0);
    std::lock_guard<std::mutex> lock(mu_);
    LayerMetrics& m = layer_[index];
    if (m.tokens == nullptr) {
      const std::string method = decode ? "Decode" : "Prefill";
      const std::string policy_name(PolicyName(policy));
      for (size_t s = 0; s < kStages.size(); ++s) {
        m.stage[s] = &stage_.Add({{"method", method}, {"stage", kStages[s]}}, DurationBuckets());
      }
      m.density = &density_.Add({{"method", method}, {"policy", policy_name}}, DensityBuckets());
      m.tokens = &(decode ? decode_tokens_ : prefill_tokens_).Add({{"policy", policy_name}});
    }
    return m;
  }

  const std::shared_ptr<prometheus::Registry> registry_;
  Family<Counter>& requests_;
  Family<Histogram>& request_duration_;
  Family<Gauge>& inflight_;
  Family<Counter>& prefill_tokens_;
  Family<Counter>& decode_tokens_;
  Family<Histogram>& stage_;
  Family<Histogram>& density_;
  Family<Counter>& transfer_;
  Family<Histogram>& worker_attention_;
  Counter& kv_stored_;
  Counter& to_workers_;
  Counter& from_workers_;
  // Guarded by mu_: "shm", "nccl" -> (to_workers, from_workers).
  std::map<std::string, std::pair<Counter*, Counter*>> transfer_by_transport_;

  std::mutex mu_;
  std::map<std::string, std::unique_ptr<MethodMetrics>> methods_;  // Guarded by mu_.
  std::array<LayerMetrics, 2 * kNumPolicies> layer_{};             // Guarded by mu_.
  std::map<std::string, Histogram*> worker_attention_by_backend_;  // Guarded by mu_.

  mutable std::mutex sources_mu_;  // Held while sources run, so RemoveSource waits for them.
  std::map<const void*, std::function<void(GaugeSink&)>> sources_;  // Guarded by sources_mu_.
  std::atomic<int> next_worker_{0};
  std::atomic<bool> gpu_enabled_{false};

  std::mutex exposer_mu_;
  std::unique_ptr<prometheus::Exposer> exposer_;  // Guarded by exposer_mu_.
  std::shared_ptr<prometheus::Collectable> scraped_;
};

Core& GetCore() {
  static Core* const core = new Core();
  return *core;
}

// Gathers gauge values into families of the table, in its order.
class FamilySink final : public GaugeSink {
 public:
  void Set(absl::string_view family, const std::vector<std::string>& labels,
           double value) override {
    const FamilyInfo& info = Info(family);
    if (info.name.empty() || info.type != FamilyType::kGauge ||
        info.labels.size() != labels.size()) {
      return;  // Not a gauge of the table: dropped (metrics_test covers every source).
    }
    ClientMetric m;
    for (size_t i = 0; i < labels.size(); ++i) m.label.push_back({info.labels[i], labels[i]});
    m.gauge.value = value;
    metrics_[info.name].push_back(std::move(m));
  }

  void Add(const std::string& name, MetricType type, ClientMetric metric) {
    types_[name] = type;
    metrics_[name].push_back(std::move(metric));
  }

  std::vector<MetricFamily> Take() {
    std::vector<MetricFamily> out;
    for (const FamilyInfo& info : Families()) {
      auto it = metrics_.find(info.name);
      if (it == metrics_.end()) continue;
      MetricFamily f;
      f.name = info.name;
      f.help = info.help;
      auto type = types_.find(info.name);
      f.type = type != types_.end() ? type->second : MetricType::Gauge;
      f.metric = std::move(it->second);
      out.push_back(std::move(f));
    }
    return out;
  }

 private:
  std::map<std::string, std::vector<ClientMetric>> metrics_;
  std::map<std::string, MetricType> types_;
};

ClientMetric Value(double v, MetricType type) {
  ClientMetric m;
  if (type == MetricType::Counter) {
    m.counter.value = v;
  } else {
    m.gauge.value = v;
  }
  return m;
}

// Process CPU, memory, file descriptors and start time from /proc (the standard process_* names).
void CollectProcess(FamilySink* sink) {
  std::ifstream stat_file("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
  // Fields after the command name (which may contain spaces) start at field 3.
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return;
  std::istringstream fields(stat.substr(close + 2));
  std::vector<std::string> f;
  for (std::string s; fields >> s;) f.push_back(s);
  if (f.size() < 22) return;
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
  // f[i] is field i + 3 of proc(5): utime 14, stime 15, starttime 22, vsize 23, rss 24.
  const double cpu = (std::stod(f[11]) + std::stod(f[12])) / ticks;
  sink->Add("process_cpu_seconds_total", MetricType::Counter, Value(cpu, MetricType::Counter));
  sink->Add("process_virtual_memory_bytes", MetricType::Gauge,
            Value(std::stod(f[20]), MetricType::Gauge));
  sink->Add("process_resident_memory_bytes", MetricType::Gauge,
            Value(std::stod(f[21]) * page, MetricType::Gauge));
  std::ifstream proc_stat("/proc/stat");
  for (std::string line; std::getline(proc_stat, line);) {
    if (absl::StartsWith(line, "btime ")) {
      const double boot = std::stod(line.substr(6));
      sink->Add("process_start_time_seconds", MetricType::Gauge,
                Value(boot + std::stod(f[19]) / ticks, MetricType::Gauge));
      break;
    }
  }
  if (DIR* dir = opendir("/proc/self/fd")) {
    int fds = 0;
    while (dirent* e = readdir(dir)) fds += e->d_name[0] != '.';
    closedir(dir);
    sink->Add("process_open_fds", MetricType::Gauge,
              Value(static_cast<double>(fds - 1), MetricType::Gauge));  // Less the one just read.
  }
}

void CollectGpu(FamilySink* sink) {
#ifdef DHSA_METRICS_WITH_CUDA
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) return;
  int current = 0;
  cudaGetDevice(&current);
  for (int d = 0; d < devices; ++d) {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaSetDevice(d) != cudaSuccess ||
        cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      continue;
    }
    const std::string device = std::to_string(d);
    sink->Set("dhsa_gpu_memory_used_bytes", {device},
              static_cast<double>(total_bytes - free_bytes));
    sink->Set("dhsa_gpu_memory_total_bytes", {device}, static_cast<double>(total_bytes));
  }
  cudaSetDevice(current);
#else
  (void)sink;
#endif
}

std::vector<MetricFamily> Core::CollectScraped() const {
  FamilySink sink;
  {
    std::lock_guard<std::mutex> lock(sources_mu_);
    for (const auto& [owner, read] : sources_) read(sink);
  }
  CollectProcess(&sink);
  if (gpu_enabled_.load()) CollectGpu(&sink);
  return sink.Take();
}

class ScrapedCollectable final : public prometheus::Collectable {
 public:
  std::vector<MetricFamily> Collect() const override { return GetCore().CollectScraped(); }
};

absl::StatusOr<int> Core::StartExposer(const std::string& bind_address) {
  std::lock_guard<std::mutex> lock(exposer_mu_);
  if (exposer_ != nullptr) {
    return absl::FailedPreconditionError("the /metrics endpoint is already started");
  }
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(bind_address, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve /metrics on '", bind_address,
                                               "': ", e.what(), " (port in use?)"));
  }
  const std::vector<int> ports = exposer_->GetListeningPorts();
  if (ports.empty()) {
    exposer_.reset();
    return absl::UnavailableError(absl::StrCat("cannot serve /metrics on '", bind_address, "'"));
  }
  scraped_ = std::make_shared<ScrapedCollectable>();
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(scraped_);
  return ports.front();
}

class RpcInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit RpcInterceptor(MethodMetrics* m) : m_(m), start_(std::chrono::steady_clock::now()) {
    m_->inflight->Increment();
    DHSA_HAPPENS_BEFORE(this);  // gRPC runs the hooks and deletes the interceptor on its threads.
  }
  ~RpcInterceptor() override {
    DHSA_HAPPENS_AFTER(this);
    m_->inflight->Decrement();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    GetCore().FinishRpc(m_, code_, seconds);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    DHSA_HAPPENS_AFTER(this);
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      code_ = static_cast<int>(methods->GetSendStatus().error_code());
    }
    DHSA_HAPPENS_BEFORE(this);
    methods->Proceed();
  }

 private:
  MethodMetrics* const m_;
  const std::chrono::steady_clock::time_point start_;
  // A call that ends without sending a status was cancelled (the client went away).
  int code_ = static_cast<int>(grpc::StatusCode::CANCELLED);
};

class RpcInterceptorFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    const char* method = info->method();
    if (method == nullptr || !absl::StartsWith(method, "/dhsa.")) return nullptr;
    return new RpcInterceptor(GetCore().ForMethod(method));
  }
};

}  // namespace

const std::vector<double>& DurationBuckets() {
  static const std::vector<double> buckets = {
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
  return buckets;
}

const std::vector<double>& DensityBuckets() {
  static const std::vector<double> buckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                              0.2,   0.3,    0.5,   0.7,  0.9,   1.0};
  return buckets;
}

const std::vector<FamilyInfo>& Families() {
  using T = FamilyType;
  static const std::vector<FamilyInfo> families = {
      {"dhsa_requests_total",
       T::kCounter,
       {"role", "method", "code"},
       "RPCs of the dhsa.v1 services that finished, by role (router, worker), method and status "
       "code."},
      {"dhsa_request_duration_seconds",
       T::kHistogram,
       {"role", "method", "code"},
       "Time from the start of an RPC to its end, seconds."},
      {"dhsa_inflight_requests", T::kGauge, {"role"}, "RPCs in progress."},
      {"dhsa_prefill_tokens_total",
       T::kCounter,
       {"policy"},
       "Tokens appended by successful Prefill layer calls (a token of an L-layer model counts L "
       "times)."},
      {"dhsa_decode_tokens_total",
       T::kCounter,
       {"policy"},
       "Tokens appended by successful Decode layer calls."},
      {"dhsa_stage_duration_seconds",
       T::kHistogram,
       {"method", "stage"},
       "Router time per stage of a successful layer call (boundaries, selection, dispatch, "
       "attention = waiting for workers, merge), seconds."},
      {"dhsa_selection_density_ratio",
       T::kHistogram,
       {"method", "policy"},
       "Attended (query, key) pairs over the causal pairs dense attention would attend, per layer "
       "call."},
      {"dhsa_transfer_bytes_total",
       T::kCounter,
       {"transport", "direction"},
       "Bytes the router sent to and received from workers (K, V, queries, partial results)."},
      {"dhsa_worker_attention_duration_seconds",
       T::kHistogram,
       {"backend"},
       "Worker compute time of one Attend (partial attention over its spans), seconds."},
      {"dhsa_kv_stored_bytes_total",
       T::kCounter,
       {},
       "K and V bytes committed by the workers of this process (StoreKv)."},
      {"dhsa_kv_held_bytes",
       T::kGauge,
       {"worker", "backend"},
       "K and V bytes a worker holds (what its capacity limits)."},
      {"dhsa_kv_capacity_bytes",
       T::kGauge,
       {"worker", "backend"},
       "K and V bytes a worker accepts in all."},
      {"dhsa_kv_allocated_bytes",
       T::kGauge,
       {"worker", "backend"},
       "Bytes of a worker's stripe buffers, including room for appends."},
      {"dhsa_kv_sequences",
       T::kGauge,
       {"worker", "backend"},
       "Sequences (one per sequence and layer) a worker holds keys of."},
      {"dhsa_kv_stripes", T::kGauge, {"worker", "backend"}, "Stripes a worker holds."},
      {"dhsa_active_sequences", T::kGauge, {}, "Sequences created on the router and not released."},
      {"dhsa_worker_up",
       T::kGauge,
       {"worker"},
       "1 when the router's last probe of the worker (address) answered, else 0."},
      {"dhsa_router_placed_bytes",
       T::kGauge,
       {"worker"},
       "KV bytes the router has placed (or reserved) on a worker."},
      {"dhsa_router_worker_capacity_bytes",
       T::kGauge,
       {"worker"},
       "A worker's KV capacity as its last probe reported."},
      {"dhsa_gpu_memory_used_bytes",
       T::kGauge,
       {"device"},
       "Device memory in use on a CUDA device (all processes), bytes."},
      {"dhsa_gpu_memory_total_bytes", T::kGauge, {"device"}, "Device memory of a CUDA device."},
      {"process_cpu_seconds_total", T::kCounter, {}, "User and system CPU time, seconds."},
      {"process_virtual_memory_bytes", T::kGauge, {}, "Virtual memory size, bytes."},
      {"process_resident_memory_bytes", T::kGauge, {}, "Resident memory size, bytes."},
      {"process_start_time_seconds", T::kGauge, {}, "Start time since the Unix epoch, seconds."},
      {"process_open_fds", T::kGauge, {}, "Open file descriptors."},
  };
  return families;
}

absl::StatusOr<int> StartExposer(const std::string& bind_address) {
  return GetCore().StartExposer(bind_address);
}

std::string ScrapeText() {
  std::vector<MetricFamily> families = GetCore().registry()->Collect();
  std::vector<MetricFamily> scraped = GetCore().CollectScraped();
  families.insert(families.end(), std::make_move_iterator(scraped.begin()),
                  std::make_move_iterator(scraped.end()));
  return prometheus::TextSerializer().Serialize(families);
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> NewRpcInterceptorFactory() {
  return std::make_unique<RpcInterceptorFactory>();
}

void ObserveLayerCall(bool decode, Policy policy, int64_t tokens, const v1::CallStats& stats) {
  GetCore().ObserveLayerCall(decode, policy, tokens, stats);
}

void ObserveWorkerAttention(absl::string_view backend, double seconds) {
  GetCore().ObserveWorkerAttention(backend, seconds);
}

void CountKvStored(int64_t bytes) { GetCore().CountKvStored(bytes); }

void AddSource(const void* owner, std::function<void(GaugeSink&)> read) {
  GetCore().AddSource(owner, std::move(read));
}

void RemoveSource(const void* owner) { GetCore().RemoveSource(owner); }

void AddWorkerSource(const void* owner, const std::string& backend,
                     std::function<KvGauges()> read) {
  const std::string worker = std::to_string(GetCore().NextWorkerIndex());
  AddSource(owner, [worker, backend, read = std::move(read)](GaugeSink& sink) {
    const KvGauges g = read();
    const std::vector<std::string> labels = {worker, backend};
    sink.Set("dhsa_kv_held_bytes", labels, static_cast<double>(g.held_bytes));
    sink.Set("dhsa_kv_capacity_bytes", labels, static_cast<double>(g.capacity_bytes));
    sink.Set("dhsa_kv_allocated_bytes", labels, static_cast<double>(g.allocated_bytes));
    sink.Set("dhsa_kv_sequences", labels, static_cast<double>(g.sequences));
    sink.Set("dhsa_kv_stripes", labels, static_cast<double>(g.stripes));
  });
}

absl::Status EnableGpuMemoryMetrics() {
#ifdef DHSA_METRICS_WITH_CUDA
  GetCore().EnableGpu();
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError("GPU memory metrics need a build with CUDA");
#endif
}

}  // namespace dhsa::metrics
