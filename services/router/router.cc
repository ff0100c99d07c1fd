#include "services/router/router.h"

#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/common/status_macros.h"
#include "services/common/config.h"
#include "services/common/metrics.h"
#include "services/common/server.h"
#include "services/common/status.h"
#include "services/common/tsan_annotations.h"
#include "services/common/wire.h"
#include "services/transport/shm_copy.h"

namespace dhsa::router {
namespace {

// Limits that keep one request's shapes sane (they are far above any model).
constexpr int32_t kMaxLayers = 4096;
constexpr int32_t kMaxHeads = 4096;
constexpr int32_t kMaxHeadDim = 512;
constexpr int64_t kMaxTokensPerCall = int64_t{1} << 24;
// Largest token count a DhsaParams field may hold: far above any context, low enough that the
// sums the checks form (sink + local, ...) cannot overflow.
constexpr int64_t kMaxParamTokens = int64_t{1} << 40;

// The timeout of the undo a client call retries before it runs (RetryPendingUndo): the cleanup
// timeout, or less when the client's deadline comes first.
std::chrono::milliseconds UndoTimeout(const RouterCore& core,
                                      const grpc::CallbackServerContext& context) {
  const std::chrono::system_clock::time_point deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return core.cleanup_timeout;
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::system_clock::now());
  return std::clamp(left, std::chrono::milliseconds(0), core.cleanup_timeout);
}

// Every token-count field of `p` within [.., kMaxParamTokens] (negative values and zeros are left
// to ValidateConfig, which names the rule they break).
absl::Status CheckParamMagnitudes(const v1::DhsaParams& p) {
  const std::pair<int64_t, const char*> fields[] = {{p.budget(), "budget"},
                                                    {p.sink(), "sink"},
                                                    {p.local(), "local"},
                                                    {p.q_block(), "q_block"},
                                                    {p.chunk_mean(), "chunk_mean"},
                                                    {p.chunk_min(), "chunk_min"},
                                                    {p.chunk_max(), "chunk_max"},
                                                    {p.boundary_window(), "boundary_window"},
                                                    {p.block(), "block"}};
  for (const auto& [value, name] : fields) {
    if (value > kMaxParamTokens) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be at most ", kMaxParamTokens, " tokens; got ", value));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckTensor(const Tensor& t, absl::string_view name, DType dtype,
                         const std::vector<int64_t>& shape) {
  if (t.dtype != dtype || t.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' must be ", DTypeName(dtype),
                                                   " ", ShapeString(shape), "; got ",
                                                   DTypeName(t.dtype), " ", ShapeString(t.shape)));
  }
  return absl::OkStatus();
}

// One Prefill stream: header, "q", "k", "v" pieces in; "o" (and "lse") pieces and the result out.
class PrefillReactor
    : public GrpcHandover<grpc::ServerBidiReactor<v1::PrefillRequest, v1::PrefillResponse>> {
 public:
  PrefillReactor(RouterService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context) {
    DHSA_GRPC_BOUND(this);
    absl::Status admitted = service_->BeginRequest();
    counted_ = admitted.ok();
    if (!admitted.ok()) {
      Fail(admitted);
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    DHSA_GRPC_READ_DONE(this);
    if (!ok) {
      Fail(absl::InvalidArgumentError(
          absl::StrCat("the Prefill stream ended before ", claimed_ ? "tensor '" : "the header",
                       claimed_ ? absl::StrCat(kNames[received_], "' was complete") : "")));
      return;
    }
    absl::Status status = claimed_ ? OnPiece() : OnHeader();
    if (!status.ok()) {
      Fail(std::move(status));
      return;
    }
    if (received_ < 3) {
      StartRead(&request_);
      return;
    }
    Run();
  }

  void OnWriteDone(bool ok) override {
    DHSA_GRPC_WRITE_DONE(this);
    if (!ok) {
      FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    WriteNext();
  }

  void OnCancel() override {
    DHSA_GRPC_CANCELLED(this);
    std::shared_ptr<LayerCall> call;
    {
      std::lock_guard<std::mutex> lock(mu_);
      call = call_;
    }
    if (call != nullptr) call->Cancel();
  }

  void OnDone() override {
    DHSA_GRPC_DONE(this);
    ReleaseKvReservation();
    if (counted_) service_->EndRequest();
    delete this;
  }

 private:
  static constexpr const char* kNames[3] = {"q", "k", "v"};

  absl::Status OnHeader() {
    if (!request_.has_header()) {
      return absl::InvalidArgumentError("the first Prefill message must be a PrefillHeader");
    }
    const v1::PrefillHeader& h = request_.header();
    client_ = ClientIdentity(*context_);
    DHSA_RETURN_IF_ERROR(service_->CheckOwner(h.sequence_id(), client_));
    DHSA_ASSIGN_OR_RETURN(seq_, service_->FindForCall(h.sequence_id(), h.layer()));
    if (h.num_tokens() < 1 || h.num_tokens() > kMaxTokensPerCall) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_tokens must be in [1, ", kMaxTokensPerCall, "]; got ", h.num_tokens()));
    }
    DHSA_RETURN_IF_ERROR(service_->BeginKvCall(client_, h.num_tokens() * seq_->bytes_per_token));
    reserved_bytes_ = h.num_tokens() * seq_->bytes_per_token;
    layer_ = h.layer();
    want_lse_ = h.want_lse();
    const int64_t n = h.num_tokens();
    shapes_[0] = {seq_->q_heads, n, seq_->head_dim};
    shapes_[1] = shapes_[2] = {seq_->kv_heads, n, seq_->head_dim};
    for (int i = 0; i < 3; ++i) {
      DHSA_ASSIGN_OR_RETURN(const int64_t bytes,
                            TensorByteSize(shapes_[i], seq_->dtype, kNames[i]));
      assemblers_[i] = std::make_unique<TensorAssembler>(kNames[i], bytes);
    }
    if (h.has_shared()) DHSA_RETURN_IF_ERROR(ReadShared(h.shared()));
    DHSA_RETURN_IF_ERROR(BeginLayerCall(*seq_, layer_, /*decode=*/false));
    claimed_ = true;
    if (shared_ != nullptr) received_ = 3;  // No pieces follow.
    return absl::OkStatus();
  }

  // The tensors from the client's shared-memory region, copied (the client could change the
  // region while the call runs; the copy is what gets checked and used), and the output ranges
  // checked. They are read here, before the call starts, so the output may overlap them (the SDK
  // puts o where q was: a smaller region). The client writes the region again only after the
  // answer, or after a failed call, when the SDK replaces the region. The copies in and out go
  // through the kernel (services/transport/shm_copy.h).
  absl::Status ReadShared(const v1::SharedTensors& where) {
    DHSA_ASSIGN_OR_RETURN(shared_, service_->shared_regions().Use(client_, where.region_id()));
    const int64_t offsets[3] = {where.q_offset(), where.k_offset(), where.v_offset()};
    const google::protobuf::RepeatedField<int64_t>* declared_shapes[3] = {
        &where.q_shape(), &where.k_shape(), &where.v_shape()};
    for (int i = 0; i < 3; ++i) {
      // The client's word on what lies there, checked as a streamed tensor's first piece is.
      Tensor declared;
      absl::StatusOr<DType> dtype = FromProtoDType(where.dtype());
      if (!dtype.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "shared tensors: the dtype of q, k and v is missing or unknown (", where.dtype(), ")"));
      }
      declared.dtype = *dtype;
      declared.shape.assign(declared_shapes[i]->begin(), declared_shapes[i]->end());
      DHSA_RETURN_IF_ERROR(CheckTensor(declared, kNames[i], seq_->dtype, shapes_[i]));
    }
    for (int i = 0; i < 3; ++i) {
      DHSA_ASSIGN_OR_RETURN(const int64_t bytes,
                            TensorByteSize(shapes_[i], seq_->dtype, kNames[i]));
      DHSA_RETURN_IF_ERROR(shared_->CheckRange(offsets[i], bytes, kNames[i]));
      Tensor t = Tensor::Uninitialized(seq_->dtype, shapes_[i]);
      transport::CopyFromShared(t.bytes.data(), shared_->data() + offsets[i],
                                static_cast<size_t>(bytes));
      tensors_[i] = std::make_shared<const Tensor>(std::move(t));
    }
    const int64_t rows = shapes_[0][0] * shapes_[0][1];
    o_bytes_ = rows * shapes_[0][2] * static_cast<int64_t>(sizeof(float));
    DHSA_RETURN_IF_ERROR(shared_->CheckRange(where.o_offset(), o_bytes_, "o"));
    lse_bytes_ = rows * static_cast<int64_t>(sizeof(float));
    if (want_lse_) DHSA_RETURN_IF_ERROR(shared_->CheckRange(where.lse_offset(), lse_bytes_, "lse"));
    o_offset_ = where.o_offset();
    lse_offset_ = where.lse_offset();
    return absl::OkStatus();
  }

  absl::Status OnPiece() {
    if (!request_.has_piece()) {
      return absl::InvalidArgumentError(
          absl::StrCat("expected a piece of tensor '", kNames[received_], "' after the header"));
    }
    const v1::TensorPiece& piece = request_.piece();
    if (piece.offset() == 0 && piece.name() == kNames[received_]) {
      // Check the declared shape here, so that a wrong one is INVALID_ARGUMENT with the shape
      // expected rather than a size complaint.
      Tensor declared;
      DHSA_ASSIGN_OR_RETURN(declared.dtype, FromProtoDType(piece.dtype()));
      declared.shape.assign(piece.shape().begin(), piece.shape().end());
      DHSA_RETURN_IF_ERROR(
          CheckTensor(declared, kNames[received_], seq_->dtype, shapes_[received_]));
    }
    DHSA_RETURN_IF_ERROR(assemblers_[received_]->Add(piece));
    if (assemblers_[received_]->complete()) {
      DHSA_ASSIGN_OR_RETURN(Tensor t, assemblers_[received_]->Take());
      tensors_[received_] = std::make_shared<const Tensor>(std::move(t));
      ++received_;
    }
    return absl::OkStatus();
  }

  void Run() {
    // The undo of an earlier failed call on the layer, when a worker has not confirmed it yet.
    RetryPendingUndo(service_->pool(), seq_, layer_, UndoTimeout(service_->core(), *context_),
                     [this](absl::Status undone) {
                       if (!undone.ok()) {
                         Fail(undone);
                         return;
                       }
                       std::shared_ptr<LayerCall> call = LayerCall::Start(
                           service_->core(), seq_, layer_, tensors_[0], tensors_[1], tensors_[2],
                           /*decode=*/false, context_, [this](absl::StatusOr<LayerCallOutput> out) {
                             OnCallDone(std::move(out));
                           });
                       std::lock_guard<std::mutex> lock(mu_);
                       call_ = std::move(call);
                       started_ = true;
                     });
  }

  void OnCallDone(absl::StatusOr<LayerCallOutput> out) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      started_ = true;  // The call has given the layer back itself.
    }
    // Committed or rolled back: the reservation ends before the client can hear of it, so that
    // the client's next call is checked against what is held now.
    ReleaseKvReservation();
    for (auto& t : tensors_) t.reset();
    if (!out.ok()) {
      Fail(out.status());
      return;
    }
    output_ = *std::move(out);
    metrics::ObserveLayerCall(/*decode=*/false, seq_->dhsa.policy, shapes_[0][1], output_.stats);
    if (shared_ != nullptr) {
      // The answer goes into the client's region; the result message follows alone.
      if (static_cast<int64_t>(output_.o.bytes.size()) != o_bytes_ ||
          (want_lse_ && static_cast<int64_t>(output_.lse.bytes.size()) != lse_bytes_)) {
        Fail(absl::InternalError("the layer call's output does not have the announced shape"));
        return;
      }
      transport::CopyIntoShared(shared_->data() + o_offset_, output_.o.bytes.data(),
                                output_.o.bytes.size());
      if (want_lse_) {
        transport::CopyIntoShared(shared_->data() + lse_offset_, output_.lse.bytes.data(),
                                  output_.lse.bytes.size());
      }
      output_.o = Tensor();
      output_.lse = Tensor();
      shared_.reset();
      result_sent_ = true;
      WriteResult();
      return;
    }
    const int64_t piece_bytes = service_->response_piece_bytes();
    const int64_t lq = output_.o.shape[1];
    o_stream_ = std::make_unique<PieceStream>(std::make_shared<const Tensor>(std::move(output_.o)),
                                              0, lq, "o", piece_bytes);
    if (want_lse_) {
      lse_stream_ = std::make_unique<PieceStream>(
          std::make_shared<const Tensor>(std::move(output_.lse)), 0, lq, "lse", piece_bytes);
    }
    WriteNext();
  }

  void WriteNext() {
    if (o_stream_ == nullptr) {  // Shared memory: the result was the only message.
      FinishOnce(grpc::Status::OK);
      return;
    }
    if (o_stream_->Next(response_.mutable_piece()) ||
        (lse_stream_ != nullptr && lse_stream_->Next(response_.mutable_piece()))) {
      StartWrite(&response_);
      return;
    }
    if (!result_sent_) {
      result_sent_ = true;
      WriteResult();
      return;
    }
    FinishOnce(grpc::Status::OK);
  }

  void WriteResult() {
    v1::PrefillResult* result = response_.mutable_result();
    result->set_length(output_.length);
    *result->mutable_stats() = output_.stats;
    StartWrite(&response_);
  }

  void Fail(absl::Status status) {
    bool give_back = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      give_back = claimed_ && !started_;
      started_ = true;
    }
    if (give_back) EndLayerCall(*seq_, layer_);
    FinishOnce(ToGrpcStatus(status));
  }

  void FinishOnce(const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
    }
    ReleaseKvReservation();
    Finish(status);
  }

  // Gives back the bytes BeginKvCall reserved, once.
  void ReleaseKvReservation() {
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::swap(bytes, reserved_bytes_);
    }
    if (bytes > 0) service_->EndKvCall(client_, bytes);
  }

  RouterService* const service_;
  grpc::CallbackServerContext* const context_;
  bool counted_ = false;
  v1::PrefillRequest request_;
  v1::PrefillResponse response_;
  std::shared_ptr<SequenceState> seq_;
  int layer_ = 0;
  bool want_lse_ = false;
  std::string client_;          // ClientIdentity of the caller.
  int64_t reserved_bytes_ = 0;  // KV bytes reserved by BeginKvCall; guarded by mu_ once set.
  bool claimed_ = false;        // BeginLayerCall succeeded.
  int received_ = 0;            // Tensors complete: q, k, v.
  std::vector<int64_t> shapes_[3];
  std::unique_ptr<TensorAssembler> assemblers_[3];
  std::shared_ptr<const Tensor> tensors_[3];
  LayerCallOutput output_;
  std::unique_ptr<PieceStream> o_stream_, lse_stream_;
  // Shared memory (PrefillHeader.shared): the client's region and where the answer goes.
  std::shared_ptr<SharedRegion> shared_;
  int64_t o_bytes_ = 0, lse_bytes_ = 0, o_offset_ = 0, lse_offset_ = 0;
  bool result_sent_ = false;

  std::mutex mu_;
  std::shared_ptr<LayerCall> call_;  // Guarded by mu_.
  bool started_ = false;             // Guarded by mu_: the layer is the LayerCall's to give back.
  bool finished_ = false;            // Guarded by mu_.
};

}  // namespace

absl::StatusOr<RouterOptions> RouterOptionsFromServiceConfig(const v1::ServiceConfig& config) {
  RouterOptions o;
  if (!config.listen_address().empty()) o.listen_address = config.listen_address();
  o.worker_addresses.assign(config.worker_addresses().begin(), config.worker_addresses().end());
  o.worker_dns = config.worker_dns();
  if (config.max_message_bytes() != 0) o.max_message_bytes = config.max_message_bytes();
  if (config.stripe_tokens() != 0) o.stripe_tokens = config.stripe_tokens();
  if (config.threads() != 0) o.threads = config.threads();
  if (config.max_inflight() != 0) o.max_inflight = config.max_inflight();
  if (!(config.worker_call_timeout_seconds() >= 0) || config.worker_call_timeout_seconds() > 1e9) {
    return absl::InvalidArgumentError(
        absl::StrCat("router config: worker_call_timeout_seconds must be >= 0 (0: the default, ",
                     "120 s); got ", config.worker_call_timeout_seconds()));
  }
  if (config.worker_call_timeout_seconds() > 0) {
    o.worker_call_timeout = std::max(std::chrono::milliseconds(1),
                                     std::chrono::milliseconds(static_cast<int64_t>(std::llround(
                                         config.worker_call_timeout_seconds() * 1000))));
  }
  DHSA_ASSIGN_OR_RETURN(o.default_config,
                        DhsaConfigFromProto(config.default_params(), DhsaConfig{}));
  o.security.cert_file = config.tls().cert_file();
  o.security.key_file = config.tls().key_file();
  o.security.client_ca_file = config.tls().client_ca_file();
  o.security.token_file = config.auth_token_file();
  o.worker_security.ca_file = config.tls().worker_ca_file();
  o.worker_security.cert_file = config.tls().worker_client_cert_file();
  o.worker_security.key_file = config.tls().worker_client_key_file();
  o.worker_security.server_name = config.tls().worker_server_name();
  o.worker_security.token_file = config.worker_token_file();
  if (config.max_sequences_per_client() < 0 || config.max_kv_bytes_per_client() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "router config: max_sequences_per_client and max_kv_bytes_per_client must be >= 0 (0: no "
        "limit); got ",
        config.max_sequences_per_client(), " and ", config.max_kv_bytes_per_client()));
  }
  o.max_sequences_per_client = config.max_sequences_per_client();
  o.max_kv_bytes_per_client = config.max_kv_bytes_per_client();
  o.data_plane = config.data_plane();
  if (config.client_shm_bytes() != 0)
    o.client_shm_bytes = std::max<int64_t>(0, config.client_shm_bytes());
  if (!config.selection_device().empty()) o.selection_device = config.selection_device();
  DHSA_RETURN_IF_ERROR(ParseSelectionDevice(o.selection_device).status());
  if (o.max_message_bytes < 4096 || o.stripe_tokens < 1 || o.threads < 0 || o.max_inflight < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "router config: need max_message_bytes >= 4096, stripe_tokens >= 1, threads >= 0 and "
        "max_inflight >= 1; got ",
        o.max_message_bytes, ", ", o.stripe_tokens, ", ", o.threads, ", ", o.max_inflight));
  }
  return o;
}

RouterService::RouterService(const RouterOptions& options)
    : options_(options),
      shared_regions_(SharedRegions::Options{.max_bytes_per_client = options.client_shm_bytes}),
      response_piece_bytes_(PieceBytesForMessageLimit(options.max_message_bytes)) {}

RouterService::~RouterService() {
  metrics::RemoveSource(this);
  executor_.reset();
  std::lock_guard<std::mutex> lock(mu_);  // After the handlers' writes (gRPC's Shutdown waited).
}

absl::StatusOr<std::unique_ptr<RouterService>> RouterService::Create(const RouterOptions& options) {
  DHSA_RETURN_IF_ERROR(ValidateConfig(options.default_config));
  if (options.default_config.policy == Policy::kOracleTopk) {
    return absl::InvalidArgumentError("oracle_topk cannot be the service's default policy");
  }
  if (options.worker_call_timeout <= std::chrono::milliseconds(0)) {
    return absl::InvalidArgumentError(absl::StrCat("worker_call_timeout must be positive; got ",
                                                   options.worker_call_timeout.count(), " ms"));
  }
  std::unique_ptr<RouterService> service(new RouterService(options));
  WorkerPoolOptions pool_options;
  pool_options.addresses = options.worker_addresses;
  pool_options.dns_target = options.worker_dns;
  pool_options.max_message_bytes = options.max_message_bytes;
  pool_options.probe_interval = options.probe_interval;
  DHSA_ASSIGN_OR_RETURN(pool_options.credentials,
                        MakeChannelCredentials(options.worker_security, /*args=*/nullptr));
  pool_options.ssl_target_name = options.worker_security.server_name;
  DHSA_ASSIGN_OR_RETURN(pool_options.data_plane,
                        transport::DataPlaneOptionsFromProto(options.data_plane));
  DHSA_ASSIGN_OR_RETURN(service->pool_, WorkerPool::Create(pool_options));
  const int threads = options.threads > 0
                          ? options.threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  service->executor_ = std::make_unique<Executor>(threads);
  service->core_.pool = service->pool_.get();
  service->core_.executor = service->executor_.get();
  service->core_.policy = &service->placement_;
  service->core_.stripe_tokens = options.stripe_tokens;
  service->core_.kernel_threads = threads;
  service->core_.piece_bytes = PieceBytesForMessageLimit(options.max_message_bytes);
  service->core_.worker_call_timeout = options.worker_call_timeout;
  DHSA_ASSIGN_OR_RETURN(const SelectionDeviceSpec spec,
                        ParseSelectionDevice(options.selection_device));
  DHSA_ASSIGN_OR_RETURN(service->core_.selection_device,
                        SelectionDevice::Open(spec, options.data_plane.router_devices_size() > 0
                                                        ? options.data_plane.router_devices(0)
                                                        : -1));
  std::fprintf(
      stderr, "dhsa-router: selection of first prefills on %s\n",
      service->core_.selection_device != nullptr
          ? absl::StrCat(service->core_.selection_device->Describe(),
                         " where the device selection supports the call, else the CPU")
                .c_str()
          : (spec.kind == SelectionDeviceSpec::Kind::kCpu ? "the CPU (selection_device cpu)"
             : SelectionDevice::BuiltWithCuda()           ? "the CPU (no CUDA device visible)"
                                                          : "the CPU (a build without CUDA)"));
  // Scrape-time gauges: sequences held, and each worker as the router sees it.
  metrics::AddSource(service.get(), [s = service.get()](metrics::GaugeSink& sink) {
    {
      std::lock_guard<std::mutex> lock(s->mu_);
      sink.Set("dhsa_active_sequences", {}, static_cast<double>(s->sequences_.size()));
    }
    const std::vector<WorkerLoad> loads = s->pool_->Loads();
    for (size_t w = 0; w < loads.size(); ++w) {
      const std::vector<std::string> worker = {s->pool_->address(static_cast<int>(w))};
      sink.Set("dhsa_worker_up", worker, loads[w].available ? 1 : 0);
      sink.Set("dhsa_router_placed_bytes", worker, static_cast<double>(loads[w].used_bytes));
      sink.Set("dhsa_router_worker_capacity_bytes", worker,
               static_cast<double>(loads[w].capacity_bytes));
    }
  });
  return service;
}

absl::Status RouterService::BeginRequest() {
  if (inflight_.fetch_add(1) >= options_.max_inflight) {
    inflight_.fetch_sub(1);
    return absl::ResourceExhaustedError(absl::StrCat("the router has ", options_.max_inflight,
                                                     " requests in flight; retry with backoff"));
  }
  return absl::OkStatus();
}

void RouterService::EndRequest() { inflight_.fetch_sub(1); }

absl::StatusOr<std::shared_ptr<SequenceState>> RouterService::FindForCall(const std::string& id,
                                                                          int layer) {
  if (id.empty()) return absl::InvalidArgumentError("sequence_id is empty");
  std::shared_ptr<SequenceState> seq;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sequences_.find(id);
    if (it == sequences_.end()) {
      return absl::NotFoundError(
          absl::StrCat("no sequence '", id, "' (never created, or released)"));
    }
    seq = it->second;
  }
  if (layer < 0 || layer >= seq->config.num_layers()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer ", layer, " is outside [0, ", seq->config.num_layers(), ") of sequence '", id, "'"));
  }
  return seq;
}

int64_t RouterService::CapacityTokens(const SequenceState& seq) const {
  int64_t free = 0;
  for (const WorkerLoad& l : pool_->Loads()) free += std::max<int64_t>(0, l.free_bytes());
  return free / (seq.bytes_per_token * seq.config.num_layers());
}

absl::Status RouterService::CreateSequenceImpl(const v1::CreateSequenceRequest& request,
                                               v1::CreateSequenceResponse* response,
                                               const std::string& client) {
  const v1::SequenceConfig& c = request.config();
  if (c.num_layers() < 1 || c.num_layers() > kMaxLayers) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_layers must be in [1, ", kMaxLayers, "]; got ", c.num_layers()));
  }
  if (c.q_heads() < 1 || c.kv_heads() < 1 || c.q_heads() > kMaxHeads || c.kv_heads() > kMaxHeads) {
    return absl::InvalidArgumentError(absl::StrCat("q_heads and kv_heads must be in [1, ",
                                                   kMaxHeads, "]; got ", c.q_heads(), " and ",
                                                   c.kv_heads()));
  }
  if (c.q_heads() % c.kv_heads() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q_heads (", c.q_heads(), ") must be a multiple of kv_heads (", c.kv_heads(), ")"));
  }
  if (c.head_dim() < 1 || c.head_dim() > kMaxHeadDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim must be in [1, ", kMaxHeadDim, "]; got ", c.head_dim()));
  }
  DType dtype = DType::kF32;
  if (c.dtype() != v1::DTYPE_UNSPECIFIED) {
    DHSA_ASSIGN_OR_RETURN(dtype, FromProtoDType(c.dtype()));
  }
  DHSA_RETURN_IF_ERROR(CheckParamMagnitudes(c.params()));
  DHSA_ASSIGN_OR_RETURN(const DhsaConfig dhsa,
                        DhsaConfigFromProto(c.params(), options_.default_config));
  if (dhsa.policy == Policy::kOracleTopk) {
    return absl::InvalidArgumentError(
        "oracle_topk is evaluation-only and needs every key in one place; the distributed service "
        "serves dhsa, block_topk, streaming and dense");
  }
  if (!request.sequence_id().empty())
    DHSA_RETURN_IF_ERROR(ValidateSequenceId(request.sequence_id()));

  auto seq = std::make_shared<SequenceState>();
  seq->config = c;
  seq->config.set_dtype(ToProtoDType(dtype));
  DhsaConfigToProto(dhsa, seq->config.mutable_params());
  seq->dhsa = dhsa;
  seq->q_heads = c.q_heads();
  seq->kv_heads = c.kv_heads();
  seq->head_dim = c.head_dim();
  seq->dtype = dtype;
  seq->bytes_per_token = 2 * seq->kv_heads * seq->head_dim * static_cast<int64_t>(DTypeSize(dtype));
  seq->layers.reserve(static_cast<size_t>(c.num_layers()));
  for (int l = 0; l < c.num_layers(); ++l) {
    seq->layers.emplace_back(dhsa, seq->kv_heads, seq->head_dim, dtype);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::string id = request.sequence_id();
    if (id.empty()) {
      std::random_device rd;
      id = absl::StrFormat("seq-%d-%08x", created_, rd());
    }
    if (sequences_.count(id) > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence id '", id, "' is already in use; release it or pick another"));
    }
    ClientUsage& usage = clients_[client];
    if (options_.max_sequences_per_client > 0 &&
        static_cast<int64_t>(usage.sequences.size()) >= options_.max_sequences_per_client) {
      return absl::ResourceExhaustedError(
          absl::StrCat("client '", client, "' holds ", usage.sequences.size(),
                       " sequences, its limit ", "(max_sequences_per_client); release one first"));
    }
    usage.sequences.push_back(id);
    owners_[id] = client;
    seq->id = id;
    seq->rotation = static_cast<int>(created_ % static_cast<uint64_t>(std::max(1, pool_->size())));
    ++created_;
    sequences_[id] = seq;
  }
  response->set_sequence_id(seq->id);
  response->set_capacity_tokens(CapacityTokens(*seq));
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* RouterService::CreateSequence(grpc::CallbackServerContext* context,
                                                        const v1::CreateSequenceRequest* request,
                                                        v1::CreateSequenceResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(CreateSequenceImpl(*request, response, ClientIdentity(*context))));
  return reactor;
}

grpc::ServerBidiReactor<v1::PrefillRequest, v1::PrefillResponse>* RouterService::Prefill(
    grpc::CallbackServerContext* context) {
  return new PrefillReactor(this, context);
}

grpc::ServerUnaryReactor* RouterService::Decode(grpc::CallbackServerContext* context,
                                                const v1::DecodeRequest* request,
                                                v1::DecodeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status admitted = BeginRequest();
  if (!admitted.ok()) {
    reactor->Finish(ToGrpcStatus(admitted));
    return reactor;
  }
  const std::string client = ClientIdentity(*context);
  auto reserved = std::make_shared<int64_t>(0);  // KV bytes reserved by BeginKvCall.
  auto finish = [this, reactor, client, reserved](const absl::Status& status) {
    if (*reserved > 0) EndKvCall(client, *reserved);
    EndRequest();
    reactor->Finish(ToGrpcStatus(status));
  };
  auto start = [&]() -> absl::Status {
    DHSA_RETURN_IF_ERROR(CheckOwner(request->sequence_id(), client));
    DHSA_ASSIGN_OR_RETURN(std::shared_ptr<SequenceState> seq,
                          FindForCall(request->sequence_id(), request->layer()));
    DHSA_ASSIGN_OR_RETURN(Tensor q, TensorFromProto(request->q(), "q"));
    DHSA_ASSIGN_OR_RETURN(Tensor k, TensorFromProto(request->k(), "k"));
    DHSA_ASSIGN_OR_RETURN(Tensor v, TensorFromProto(request->v(), "v"));
    DHSA_RETURN_IF_ERROR(CheckTensor(q, "q", seq->dtype, {seq->q_heads, 1, seq->head_dim}));
    DHSA_RETURN_IF_ERROR(CheckTensor(k, "k", seq->dtype, {seq->kv_heads, 1, seq->head_dim}));
    DHSA_RETURN_IF_ERROR(CheckTensor(v, "v", seq->dtype, {seq->kv_heads, 1, seq->head_dim}));
    DHSA_RETURN_IF_ERROR(BeginKvCall(client, seq->bytes_per_token));
    *reserved = seq->bytes_per_token;
    DHSA_RETURN_IF_ERROR(BeginLayerCall(*seq, request->layer(), /*decode=*/true));
    const bool want_lse = request->want_lse();
    const int layer = request->layer();
    auto run = [this, seq, layer, context, response, want_lse, finish,
                q = std::make_shared<const Tensor>(std::move(q)),
                k = std::make_shared<const Tensor>(std::move(k)),
                v = std::make_shared<const Tensor>(std::move(v))](absl::Status undone) {
      if (!undone.ok()) {  // The undo of an earlier failed call is still not confirmed.
        EndLayerCall(*seq, layer);
        finish(undone);
        return;
      }
      LayerCall::Start(core_, seq, layer, q, k, v, /*decode=*/true, context,
                       [response, want_lse, finish,
                        policy = seq->dhsa.policy](absl::StatusOr<LayerCallOutput> out) {
                         if (!out.ok()) {
                           finish(out.status());
                           return;
                         }
                         TensorToProto(out->o, response->mutable_o());
                         if (want_lse) TensorToProto(out->lse, response->mutable_lse());
                         response->set_length(out->length);
                         *response->mutable_stats() = out->stats;
                         metrics::ObserveLayerCall(/*decode=*/true, policy, 1, out->stats);
                         finish(absl::OkStatus());
                       });
    };
    RetryPendingUndo(*pool_, seq, layer, UndoTimeout(core_, *context), std::move(run));
    return absl::OkStatus();
  };
  absl::Status started = start();
  if (!started.ok()) finish(started);
  return reactor;
}

absl::Status RouterService::CheckOwner(const std::string& id, const std::string& client) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = owners_.find(id);
  if (it == owners_.end() || it->second == client) return absl::OkStatus();
  // Sequences of an authenticated client are invisible to others; a host-identified one is not
  // an identity strong enough to hide anything behind.
  if (absl::StartsWith(it->second, "peer:")) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("no sequence '", id, "' (never created, or released)"));
}

absl::Status RouterService::BeginKvCall(const std::string& client, int64_t bytes) {
  if (options_.max_kv_bytes_per_client <= 0) return absl::OkStatus();
  std::lock_guard<std::mutex> lock(mu_);
  ClientUsage& usage = clients_[client];
  int64_t held = usage.reserved_bytes;
  for (const std::string& id : usage.sequences) {
    auto it = sequences_.find(id);
    if (it == sequences_.end()) continue;
    std::lock_guard<std::mutex> seq_lock(it->second->mu);
    for (const auto& [worker, b] : it->second->bytes_on_worker) held += b;
  }
  if (held + bytes > options_.max_kv_bytes_per_client) {
    return absl::ResourceExhaustedError(
        absl::StrCat("client '", client, "' holds ", held, " KV bytes; this call's ", bytes,
                     " more would pass its limit of ", options_.max_kv_bytes_per_client,
                     " (max_kv_bytes_per_client); release a sequence first"));
  }
  usage.reserved_bytes += bytes;
  return absl::OkStatus();
}

void RouterService::EndKvCall(const std::string& client, int64_t bytes) {
  if (options_.max_kv_bytes_per_client <= 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  clients_[client].reserved_bytes -= bytes;
}

absl::Status RouterService::InfoImpl(const std::string& id, v1::SequenceInfo* info) {
  DHSA_ASSIGN_OR_RETURN(std::shared_ptr<SequenceState> seq, FindForCall(id, 0));
  info->set_sequence_id(seq->id);
  *info->mutable_config() = seq->config;
  int64_t bytes = 0;
  std::lock_guard<std::mutex> lock(seq->mu);
  for (const LayerState& l : seq->layers) info->add_layer_lengths(l.layout.length());
  for (const auto& [worker, b] : seq->bytes_on_worker) {
    bytes += b;
    if (b > 0) info->add_workers(pool_->address(worker));
  }
  info->set_kv_bytes(bytes);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* RouterService::GetSequenceInfo(grpc::CallbackServerContext* context,
                                                         const v1::GetSequenceInfoRequest* request,
                                                         v1::SequenceInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status owner = CheckOwner(request->sequence_id(), ClientIdentity(*context));
  reactor->Finish(ToGrpcStatus(owner.ok() ? InfoImpl(request->sequence_id(), response) : owner));
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::OpenSharedMemory(
    grpc::CallbackServerContext* context, const v1::OpenSharedMemoryRequest* request,
    v1::OpenSharedMemoryResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<v1::OpenSharedMemoryResponse> opened =
      shared_regions_.Open(ClientIdentity(*context), request->bytes());
  if (opened.ok()) *response = *std::move(opened);
  reactor->Finish(ToGrpcStatus(opened.status()));
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::CloseSharedMemory(
    grpc::CallbackServerContext* context, const v1::CloseSharedMemoryRequest* request,
    v1::CloseSharedMemoryResponse* /*response*/) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(
      ToGrpcStatus(shared_regions_.Close(ClientIdentity(*context), request->region_id())));
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::ReleaseSequence(grpc::CallbackServerContext* context,
                                                         const v1::ReleaseSequenceRequest* request,
                                                         v1::ReleaseSequenceResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::shared_ptr<SequenceState> seq;
  std::map<int, int64_t> bytes;
  const absl::Status owner = CheckOwner(request->sequence_id(), ClientIdentity(*context));
  if (!owner.ok()) {
    reactor->Finish(ToGrpcStatus(owner));
    return reactor;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sequences_.find(request->sequence_id());
    if (it == sequences_.end()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                   absl::StrCat("no sequence '", request->sequence_id(), "'")));
      return reactor;
    }
    seq = it->second;
    std::lock_guard<std::mutex> seq_lock(seq->mu);
    if (seq->calls_in_flight > 0) {
      reactor->Finish(
          grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                       absl::StrCat("sequence '", seq->id, "' has ", seq->calls_in_flight,
                                    " calls in flight; release it once they have ended")));
      return reactor;
    }
    seq->released = true;
    bytes = seq->bytes_on_worker;
    sequences_.erase(it);
    auto owner_it = owners_.find(seq->id);
    if (owner_it != owners_.end()) {
      std::vector<std::string>& held = clients_[owner_it->second].sequences;
      held.erase(std::remove(held.begin(), held.end(), seq->id), held.end());
      owners_.erase(owner_it);
    }
  }
  int64_t freed = 0;
  for (const auto& [worker, b] : bytes) {
    pool_->Unreserve(worker, b);
    freed += b;
  }
  response->set_freed_bytes(freed);
  // Every layer on every worker holding bytes of the sequence (Drop of an unknown id is OK).
  struct Pending {
    std::mutex mu;
    size_t left = 0;
  };
  auto pending = std::make_shared<Pending>();
  pending->left = bytes.size() * seq->layers.size();
  if (pending->left == 0) {
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  for (const auto& entry : bytes) {
    for (int l = 0; l < static_cast<int>(seq->layers.size()); ++l) {
      DropOnWorker(*pool_, entry.first, WorkerSequenceId(seq->id, l), core_.cleanup_timeout,
                   [pending, reactor](const absl::Status&) {
                     // A worker that cannot be reached has lost the keys with its process.
                     bool last;
                     {
                       std::lock_guard<std::mutex> lock(pending->mu);
                       last = --pending->left == 0;
                     }
                     if (last) reactor->Finish(grpc::Status::OK);
                   });
    }
  }
  return reactor;
}

absl::StatusOr<std::unique_ptr<RouterServer>> RouterServer::Start(const RouterOptions& options) {
  std::unique_ptr<RouterServer> server(new RouterServer);
  DHSA_ASSIGN_OR_RETURN(server->service_, RouterService::Create(options));
  DHSA_ASSIGN_OR_RETURN(
      server->server_, StartGrpcServer(options.listen_address, options.max_message_bytes,
                                       {server->service_.get()}, &server->port_, options.security));
  grpc::HealthCheckServiceInterface* health = server->server_->GetHealthCheckService();
  if (health != nullptr) {
    RouterServer* self = server.get();
    server->service_->pool().SetAvailabilityListener([self, health](bool any) {
      std::lock_guard<std::mutex> lock(self->mu_);
      if (!self->shut_down_) health->SetServingStatus(kAttentionServiceName, any);
    });
  }
  return server;
}

RouterServer::~RouterServer() { Shutdown(std::chrono::milliseconds(0)); }

void RouterServer::Shutdown(std::chrono::milliseconds drain) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (server_ != nullptr) {
    grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
    if (health != nullptr) health->Shutdown();  // Every service NOT_SERVING from now on.
    server_->Shutdown(std::chrono::system_clock::now() + drain);
    server_->Wait();
  }
  server_.reset();
  service_.reset();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
  }
  stopped_cv_.notify_all();
}

void RouterServer::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  stopped_cv_.wait(lock, [&] { return stopped_; });
}

}  // namespace dhsa::router
