#include "services/router/layer_call.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/inputs.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/merge.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/selection.h"
#include "kernels/cpu/summaries.h"
#include "kernels/merge/merge.h"
#include "kernels/selection/selection.h"
#include "kernels/summaries/summaries.h"
#include "services/common/config.h"
#include "services/transport/descriptor.h"
#include "services/transport/shm_copy.h"

namespace dhsa::router {
namespace {

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// DHSA_ROUTER_SELECT_TIMING=1: the selection stage's parts on stderr, a line per call (and one
// per worker header), for benchmarks.
bool SelectTimingLogged() {
  static const bool logged = [] {
    const char* v = std::getenv("DHSA_ROUTER_SELECT_TIMING");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return logged;
}

int64_t CountSpans(const Selection& selection) {
  int64_t n = 0;
  for (const std::vector<Span>& spans : selection.spans) n += static_cast<int64_t>(spans.size());
  return n;
}

// Rows [row_begin, row_end) of `t` ([heads, len, dim], or [heads, len] with dim 1) copied into a
// new region of `arena` and described as tensor `name` in `desc`; null, with nothing described,
// when the arena has no room (the tensor then goes over gRPC bytes).
std::unique_ptr<transport::ShmRegion> CopyToArena(transport::ShmArena& arena, const Tensor& t,
                                                  int64_t row_begin, int64_t row_end,
                                                  const char* name, v1::TensorDescriptor* desc) {
  const int64_t heads = t.shape[0];
  const int64_t len = t.shape[1];
  const int64_t dim = t.shape.size() > 2 ? t.shape[2] : 1;
  const int64_t row_bytes = dim * static_cast<int64_t>(DTypeSize(t.dtype));
  const int64_t rows = row_end - row_begin;
  std::unique_ptr<transport::ShmRegion> region = arena.Allocate(heads * rows * row_bytes);
  if (region == nullptr) return nullptr;
  const uint8_t* src = static_cast<const uint8_t*>(t.data());
  for (int64_t h = 0; h < heads; ++h) {
    transport::CopyIntoShared(region->data() + h * rows * row_bytes,
                              src + (h * len + row_begin) * row_bytes,
                              static_cast<size_t>(rows * row_bytes));
  }
  desc->set_name(name);
  desc->set_dtype(ToProtoDType(t.dtype));
  desc->add_shape(heads);
  desc->add_shape(rows);
  if (t.shape.size() > 2) desc->add_shape(dim);
  region->Describe(desc->mutable_shm());
  return region;
}

// An empty region of `bytes` for a float32 tensor `name` of `shape` the worker writes.
std::unique_ptr<transport::ShmRegion> OutputRegion(transport::ShmArena& arena,
                                                   const std::vector<int64_t>& shape,
                                                   const char* name, v1::TensorDescriptor* desc) {
  int64_t bytes = static_cast<int64_t>(sizeof(float));
  for (int64_t d : shape) bytes *= d;
  std::unique_ptr<transport::ShmRegion> region = arena.Allocate(bytes);
  if (region == nullptr) return nullptr;
  desc->set_name(name);
  desc->set_dtype(v1::DTYPE_FLOAT32);
  for (int64_t d : shape) desc->add_shape(d);
  region->Describe(desc->mutable_shm());
  return region;
}

// Rows [row_begin, row_end) of `t` ([heads, len, dim], or [heads, len]) copied into a pinned
// buffer of `link` (null when it cannot be had), as a [heads, rows(, dim)] tensor; heads split
// over up to `threads` threads (a 128K-token q is 1 GiB).
std::shared_ptr<transport::PinnedBuffer> CopyToPinned(transport::NcclLink& link, const Tensor& t,
                                                      int64_t row_begin, int64_t row_end,
                                                      int threads = 1) {
  const int64_t heads = t.shape[0];
  const int64_t len = t.shape[1];
  const int64_t dim = t.shape.size() > 2 ? t.shape[2] : 1;
  const int64_t row_bytes = dim * static_cast<int64_t>(DTypeSize(t.dtype));
  const int64_t rows = row_end - row_begin;
  std::shared_ptr<transport::PinnedBuffer> buffer = link.Pinned(heads * rows * row_bytes);
  if (buffer == nullptr) return nullptr;
  const uint8_t* src = static_cast<const uint8_t*>(t.data());
  auto copy = [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      std::memcpy(buffer->data() + h * rows * row_bytes, src + (h * len + row_begin) * row_bytes,
                  static_cast<size_t>(rows * row_bytes));
    }
  };
  // Threads only for copies of at least 16 MiB a thread.
  const int64_t parts = std::clamp<int64_t>(heads * rows * row_bytes >> 24, 1,
                                            std::min<int64_t>(heads, std::max(1, threads)));
  cpu::ParallelFor(parts, static_cast<int>(parts),
                   [&](int64_t i, int) { copy(heads * i / parts, heads * (i + 1) / parts); });
  return buffer;
}

// CheckFinite of a whole tensor by its exponent bits on up to `threads` threads (the element-wise
// scan, single-threaded, took seconds for a 128K-token layer); the scan runs only to name the
// first bad element.
absl::Status CheckFiniteFast(const Tensor& t, const char* name, int threads) {
  DHSA_ASSIGN_OR_RETURN(HeadsView view, HeadsView::Of(t, name));
  const size_t size = DTypeSize(t.dtype);
  if (t.dtype != DType::kBF16 && t.dtype != DType::kF16 && t.dtype != DType::kF32) {
    return CheckFinite(view, name);
  }
  const uint32_t mask = t.dtype == DType::kBF16  ? 0x7F80u
                        : t.dtype == DType::kF16 ? 0x7C00u
                                                 : 0x7F800000u;
  const int64_t n = static_cast<int64_t>(t.bytes.size() / size);
  const int parts = static_cast<int>(std::clamp<int64_t>(n >> 22, 1, std::max(1, threads)));
  std::atomic<bool> bad{false};
  auto scan = [&](int64_t a, int64_t b) {
    bool any = false;
    if (size == 2) {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(t.bytes.data());
      for (int64_t i = a; i < b; ++i) any |= (p[i] & mask) == mask;
    } else {
      const uint32_t* p = reinterpret_cast<const uint32_t*>(t.bytes.data());
      for (int64_t i = a; i < b; ++i) any |= (p[i] & mask) == mask;
    }
    if (any) bad = true;
  };
  cpu::ParallelFor(parts, parts, [&](int64_t i, int) { scan(n * i / parts, n * (i + 1) / parts); });
  return bad ? CheckFinite(view, name) : absl::OkStatus();
}

std::vector<int64_t> RowsShape(const Tensor& t, int64_t rows) {
  std::vector<int64_t> shape = t.shape;
  shape[1] = rows;
  return shape;
}

// Joins a worker call over NCCL with its transfers: `done` runs once all `count` parts reported,
// with the first NCCL failure (the call is then UNAVAILABLE and the link dropped, so the next
// calls use another transport) or else the call's own status.
struct NcclJoin {
  std::mutex mu;
  int left = 0;
  absl::Status call_status;
  absl::Status nccl_status;
  bool may_have_stored = false;  // StoreKv: as the call reported it.

  // Records the end of one part: an NCCL transfer (its first failure is kept) or the gRPC call
  // (its status, and `record_call()` run under the lock). True for the last part to end.
  template <typename RecordCall>
  bool Arrive(bool nccl_part, const absl::Status& s, RecordCall&& record_call) {
    std::lock_guard<std::mutex> lock(mu);
    if (nccl_part) {
      if (nccl_status.ok() && !s.ok()) nccl_status = s;
    } else {
      call_status = s;
      record_call();
    }
    return --left == 0;
  }

  // Once every part has ended: the call's status, or UNAVAILABLE naming `what` if a transfer
  // failed.
  absl::Status Result(const char* what) const {
    if (nccl_status.ok()) return call_status;
    return absl::UnavailableError(
        absl::StrCat("NCCL transfer of ", what, ": ", nccl_status.message()));
  }
};

}  // namespace

std::shared_ptr<LayerCall> LayerCall::Start(const RouterCore& core,
                                            std::shared_ptr<SequenceState> seq, int layer,
                                            std::shared_ptr<const Tensor> q,
                                            std::shared_ptr<const Tensor> k,
                                            std::shared_ptr<const Tensor> v, bool decode,
                                            const grpc::CallbackServerContext* server_context,
                                            Done done) {
  std::shared_ptr<LayerCall> call(new LayerCall);
  call->core_ = core;
  call->seq_ = std::move(seq);
  call->layer_ = layer;
  call->q_ = std::move(q);
  call->k_ = std::move(k);
  call->v_ = std::move(v);
  call->decode_ = decode;
  call->server_context_ = server_context;
  call->done_ = std::move(done);
  call->start_ = Clock::now();
  core.executor->Submit([call] {
    absl::Status status = call->PlanAndStore();
    if (!status.ok()) call->Rollback(std::move(status));
  });
  return call;
}

void LayerCall::Cancel() {
  std::vector<grpc::ClientContext*> contexts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    for (auto& c : contexts_) contexts.push_back(c.get());
  }
  // Outside the lock: a cancelled call may report (and take mu_) on this thread.
  for (grpc::ClientContext* c : contexts) c->TryCancel();
}

grpc::ClientContext* LayerCall::NewWorkerContext() {
  std::unique_ptr<grpc::ClientContext> context =
      server_context_ != nullptr ? grpc::ClientContext::FromCallbackServerContext(*server_context_)
                                 : std::make_unique<grpc::ClientContext>();
  // The client's deadline propagates from server_context_; without one, the default bounds the
  // call.
  if (server_context_ == nullptr ||
      server_context_->deadline() == std::chrono::system_clock::time_point::max()) {
    context->set_deadline(std::chrono::system_clock::now() + core_.worker_call_timeout);
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (cancelled_) return nullptr;
  contexts_.push_back(std::move(context));
  return contexts_.back().get();
}

absl::Status LayerCall::PlanAndStore() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_) return absl::CancelledError("the client cancelled the call");
  }
  const SequenceState& seq = *seq_;
  LayerState& layer = seq_->layers[static_cast<size_t>(layer_)];  // Ours while busy.
  const DhsaConfig& config = seq.dhsa;
  hq_ = seq.q_heads;
  hkv_ = seq.kv_heads;
  dim_ = seq.head_dim;
  const int64_t lq = q_->shape[1];
  t0_ = layer.layout.length();
  lk_ = t0_ + lq;

  DHSA_ASSIGN_OR_RETURN(HeadsView qv, HeadsView::Of(*q_, "q"));
  DHSA_RETURN_IF_ERROR(CheckFiniteFast(*q_, "q", core_.kernel_threads));
  DHSA_RETURN_IF_ERROR(CheckFiniteFast(*k_, "k", core_.kernel_threads));
  DHSA_RETURN_IF_ERROR(CheckFiniteFast(*v_, "v", core_.kernel_threads));

  Selection selection;
  const AttentionShape shape{hq_, hkv_, dim_, lq, lk_};
  const bool on_device = SelectOnDevice(layer, &selection);
  if (!on_device) {
    out_.stats.set_selection_device("cpu");
    stage_start_ = Clock::now();
    DHSA_ASSIGN_OR_RETURN(delta_, layer.layout.Propose(*k_, decode_, core_.kernel_threads));
    out_.stats.set_boundaries_seconds(Seconds(Clock::now() - stage_start_));
  }

  stage_start_ = Clock::now();
  const LayoutView view = layer.layout.SelectionView(delta_);
  if (!on_device) {
    Summaries rho;
    if (layer.layout.chunked()) {
      qv.offset = t0_;
      rho = ScoreQuerySummariesCpu(qv, hkv_, config, core_.kernel_threads);
    }
    SelectionInputs in;
    in.shape = shape;
    in.boundaries = &view.boundaries;
    in.kappa = &view.kappa;
    in.rho = &rho;
    DHSA_ASSIGN_OR_RETURN(selection, SelectSpansCpu(in, config, core_.kernel_threads));
  }
  const auto counted_from = Clock::now();
  // The same count as CountComputedPairs (the reference walks every query head and row: ~0.6 s at
  // 128K, q_block 16); CountComputedPairsCpu takes a block's rows at once where they see a span.
  out_.stats.set_computed_pairs(CountComputedPairsCpu(selection, shape));
  const auto placed_from = Clock::now();

  PlaceRequest place;
  place.new_end = lk_;
  place.stripe_tokens = core_.stripe_tokens;
  place.bytes_per_token = seq.bytes_per_token;
  place.rotation = seq.rotation;
  place.any_cut = !layer.layout.chunked() || decode_;
  for (int64_t b : view.boundaries) {
    if (b >= t0_ && b < lk_) place.cuts.push_back(b);
  }
  DHSA_ASSIGN_OR_RETURN(pieces_, core_.pool->Place(layer.stripes, place, *core_.policy));
  new_stripes_ = layer.stripes;
  ApplyStorePieces(pieces_, new_stripes_);
  const auto planned_from = Clock::now();
  const int64_t logged_entries = static_cast<int64_t>(selection.spans.size());
  const int64_t logged_spans = SelectTimingLogged() ? CountSpans(selection) : 0;
  // The selection is not read after this: the plan may take its spans (one worker holding all).
  DHSA_ASSIGN_OR_RETURN(works_, PlanAttention(std::move(selection), t0_, lk_, new_stripes_));
  const auto planned = Clock::now();
  out_.stats.set_selection_seconds(out_.stats.selection_seconds() +
                                   Seconds(planned - stage_start_));
  if (SelectTimingLogged()) {
    std::fprintf(stderr,
                 "dhsa-router select: %s, %lld entries, %lld spans: view%s %.1f ms, pair count "
                 "%.1f ms, placement %.1f ms, plan %.1f ms\n",
                 out_.stats.selection_device().c_str(), static_cast<long long>(logged_entries),
                 static_cast<long long>(logged_spans), on_device ? "" : " + selection",
                 Seconds(counted_from - stage_start_) * 1e3,
                 Seconds(placed_from - counted_from) * 1e3,
                 Seconds(planned_from - placed_from) * 1e3, Seconds(planned - planned_from) * 1e3);
  }

  // The data plane of this call: one transport for every worker it touches.
  std::set<int> touched;
  for (const StorePiece& p : pieces_) touched.insert(p.worker);
  for (const WorkerWork& w : works_) touched.insert(w.worker);
  if (!touched.empty()) {
    DHSA_ASSIGN_OR_RETURN(const transport::TransportChoice choice,
                          core_.pool->ChooseTransport({touched.begin(), touched.end()}));
    transport_ = choice.kind;
  }
  out_.stats.set_transport(transport::KindName(transport_));

  // Store the new keys and values: one StoreKv per piece, all at once.
  stage_start_ = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    store_status_.assign(pieces_.size(), absl::UnknownError("not sent"));
    store_sent_.assign(pieces_.size(), false);
    store_maybe_.assign(pieces_.size(), false);
    pending_ = pieces_.size();
  }
  const std::string worker_id = WorkerSequenceId(seq.id, layer_);
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const StorePiece& p = pieces_[i];
    out_.stats.set_bytes_to_workers(out_.stats.bytes_to_workers() +
                                    (p.end - p.begin) * seq.bytes_per_token);
    v1::StoreKvHeader header;
    header.set_sequence_id(worker_id);
    header.set_layer(layer_);
    header.set_begin(p.begin);
    header.set_num_tokens(p.end - p.begin);
    header.set_kv_heads(static_cast<int32_t>(hkv_));
    header.set_head_dim(static_cast<int32_t>(dim_));
    header.set_dtype(ToProtoDType(seq.dtype));
    header.set_append(p.append);
    auto on_done = [self = shared_from_this(), i](absl::Status s, bool may_have_stored) {
      bool last;
      {
        std::lock_guard<std::mutex> lock(self->mu_);
        self->store_status_[i] = std::move(s);
        self->store_maybe_[i] = may_have_stored;
        last = --self->pending_ == 0;
      }
      if (last) self->core_.executor->Submit([self] { self->AfterStores(); });
    };
    grpc::ClientContext* context = NewWorkerContext();
    if (context == nullptr) {
      on_done(absl::CancelledError("the client cancelled the call"), false);
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      store_sent_[i] = true;
    }
    Regions regions;
    std::shared_ptr<transport::NcclLink> link;
    std::shared_ptr<transport::PinnedBuffer> k_buf, v_buf;
    if (transport_ == transport::Kind::kNccl &&
        (link = core_.pool->NcclLinkOf(p.worker)) != nullptr) {
      // "k" and "v" from pinned buffers over NCCL; the header carries their descriptors.
      k_buf = CopyToPinned(*link, *k_, p.begin - t0_, p.end - t0_, core_.kernel_threads);
      if (k_buf != nullptr) {
        v_buf = CopyToPinned(*link, *v_, p.begin - t0_, p.end - t0_, core_.kernel_threads);
      }
      if (v_buf == nullptr) link.reset();  // No pinned memory: gRPC bytes.
    }
    if (link != nullptr) {
      const int64_t rows = p.end - p.begin;
      const transport::TensorDescriptor kd =
          link->Describe("k", k_->dtype, RowsShape(*k_, rows), 0, 1);
      const transport::TensorDescriptor vd =
          link->Describe("v", v_->dtype, RowsShape(*v_, rows), 0, 1);
      transport::DescriptorToProto(kd, header.add_tensors());
      transport::DescriptorToProto(vd, header.add_tensors());
      auto join = std::make_shared<NcclJoin>();
      join->left = 3;
      auto finish = [self = shared_from_this(), join, worker = p.worker, used = link.get(),
                     on_done](bool nccl_part, absl::Status s, bool may_have_stored) {
        if (!join->Arrive(nccl_part, s, [&] { join->may_have_stored = may_have_stored; })) return;
        const absl::Status status = join->Result("keys");
        if (!status.ok()) self->core_.pool->ReportNcclFailure(worker, used, status);
        on_done(status, join->may_have_stored);
      };
      const auto transfer_done = [finish](absl::Status s) { finish(true, std::move(s), false); };
      link->Send(kd, k_buf, transfer_done);
      link->Send(vd, v_buf, transfer_done);
      StoreKvCall::Start(core_.pool->stub(p.worker), context, header, k_, v_, p.begin - t0_,
                         p.end - t0_, core_.piece_bytes, Regions{},
                         [finish](absl::Status s, bool may_have_stored) {
                           finish(false, std::move(s), may_have_stored);
                         });
      continue;
    }
    if (transport_ == transport::Kind::kShm) {
      // "k" and "v" through the worker's arena when both fit (else both as pieces).
      if (std::shared_ptr<transport::ShmLink> link = core_.pool->ShmLinkOf(p.worker)) {
        v1::StoreKvHeader described = header;
        regions.push_back(CopyToArena(link->r2w(), *k_, p.begin - t0_, p.end - t0_, "k",
                                      described.add_tensors()));
        if (regions.back() != nullptr) {
          regions.push_back(CopyToArena(link->r2w(), *v_, p.begin - t0_, p.end - t0_, "v",
                                        described.add_tensors()));
        }
        if (regions.back() != nullptr) {
          header = std::move(described);
        } else {
          regions.clear();
        }
      }
    }
    StoreKvCall::Start(core_.pool->stub(p.worker), context, header, k_, v_, p.begin - t0_,
                       p.end - t0_, core_.piece_bytes, std::move(regions), std::move(on_done));
  }
  return absl::OkStatus();
}

bool LayerCall::SelectOnDevice(LayerState& layer, Selection* selection) {
  SelectionDevice* device = core_.selection_device.get();
  if (device == nullptr || !layer.layout.chunked()) return false;
  const AttentionShape shape{hq_, hkv_, dim_, lk_ - t0_, lk_};
  if (!device->Supports(seq_->dhsa, shape, seq_->dtype, decode_).ok()) return false;
  absl::StatusOr<DeviceSelectionResult> result =
      device->Run(seq_->dhsa, *q_, *k_, core_.kernel_threads);
  absl::StatusOr<LayoutDelta> delta =
      result.ok() ? layer.layout.ProposeComputed(*k_, result->boundaries, result->kappa)
                  : absl::StatusOr<LayoutDelta>(result.status());
  if (!delta.ok()) {
    // A device failure (out of memory, a lost device) costs the call its speed, not its result.
    static std::atomic<int> logged{0};
    if (logged.fetch_add(1) < 5) {
      std::fprintf(stderr, "dhsa-router: selection on %s failed, the CPU selects instead: %s\n",
                   device->name().c_str(), std::string(delta.status().message()).c_str());
    }
    return false;
  }
  delta_ = *std::move(delta);
  *selection = std::move(result->selection);
  out_.stats.set_selection_device(device->name());
  out_.stats.set_selection_upload_seconds(result->upload_seconds);
  out_.stats.set_boundaries_seconds(result->upload_seconds + result->boundaries_seconds);
  out_.stats.set_selection_seconds(result->rest_seconds);
  if (SelectTimingLogged()) {
    std::fprintf(stderr,
                 "dhsa-router select: %s steps 2-4 + downloads %.1f ms, of which the selection's "
                 "download %.1f ms and unpacking %.1f ms\n",
                 device->name().c_str(), result->rest_seconds * 1e3,
                 result->selection_download_seconds * 1e3, result->selection_unpack_seconds * 1e3);
  }
  return true;
}

void LayerCall::AfterStores() {
  for (size_t i = 0; i < pieces_.size(); ++i) {
    absl::Status s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      s = store_status_[i];
    }
    if (!s.ok()) {
      Rollback(WorkerFailure(pieces_[i].worker, "storing keys on", s));
      return;
    }
  }
  out_.stats.set_dispatch_seconds(Seconds(Clock::now() - stage_start_));

  stage_start_ = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    attend_status_.assign(works_.size(), absl::UnknownError("not sent"));
    partials_.resize(works_.size());
    pending_ = works_.size();
  }
  out_.stats.set_workers_used(static_cast<int32_t>(works_.size()));
  if (works_.empty()) {  // Every row saw no key (impossible with a local window, but cheap).
    core_.executor->Submit([self = shared_from_this()] { self->AfterAttends(); });
    return;
  }
  const float scale = EffectiveScale(seq_->dhsa, dim_);
  // Rows of q copied into pinned memory, by (row_begin, row_end): workers given the same rows
  // (every worker holding an early stripe gets all later rows) share one copy.
  std::map<std::pair<int64_t, int64_t>, std::shared_ptr<transport::PinnedBuffer>> q_pinned;
  for (size_t i = 0; i < works_.size(); ++i) {
    const WorkerWork& w = works_[i];
    v1::AttendHeader header;
    const auto header_from = Clock::now();
    SelectionToAttendHeader(w.local, &header);
    if (SelectTimingLogged()) {
      std::fprintf(stderr, "dhsa-router select: worker %d header %.1f ms (%lld spans)\n", w.worker,
                   Seconds(Clock::now() - header_from) * 1e3,
                   static_cast<long long>(CountSpans(w.local)));
    }
    header.set_sequence_id(WorkerSequenceId(seq_->id, layer_));
    header.set_layer(layer_);
    header.set_q_begin(w.row_begin);
    header.set_num_rows(w.row_end - w.row_begin);
    header.set_q_heads(static_cast<int32_t>(hq_));
    header.set_kv_heads(static_cast<int32_t>(hkv_));
    header.set_head_dim(static_cast<int32_t>(dim_));
    header.set_scale(scale);
    out_.stats.set_bytes_to_workers(out_.stats.bytes_to_workers() +
                                    hq_ * (w.row_end - w.row_begin) * dim_ *
                                        static_cast<int64_t>(DTypeSize(q_->dtype)));
    auto on_done = [self = shared_from_this(), i](absl::Status s, PartialResult partial) {
      bool last;
      {
        std::lock_guard<std::mutex> lock(self->mu_);
        self->attend_status_[i] = std::move(s);
        self->partials_[i] = std::move(partial);
        last = --self->pending_ == 0;
      }
      if (last) self->core_.executor->Submit([self] { self->AfterAttends(); });
    };
    grpc::ClientContext* context = NewWorkerContext();
    if (context == nullptr) {
      on_done(absl::CancelledError("the client cancelled the call"), PartialResult{});
      continue;
    }
    std::unique_ptr<transport::ShmRegion> q_region;
    std::shared_ptr<transport::ShmRegion> o_region, lse_region;
    std::shared_ptr<transport::NcclLink> link;
    std::shared_ptr<transport::PinnedBuffer> q_buf, o_buf, lse_buf;
    const int64_t rows = w.row_end - w.row_begin;
    if (transport_ == transport::Kind::kNccl &&
        (link = core_.pool->NcclLinkOf(w.worker)) != nullptr) {
      std::shared_ptr<transport::PinnedBuffer>& shared = q_pinned[{w.row_begin, w.row_end}];
      if (shared == nullptr) {
        shared = CopyToPinned(*link, *q_, w.row_begin - t0_, w.row_end - t0_, core_.kernel_threads);
      }
      q_buf = shared;
      if (q_buf != nullptr) {
        o_buf = link->Pinned(hq_ * rows * dim_ * static_cast<int64_t>(sizeof(float)));
      }
      if (o_buf != nullptr)
        lse_buf = link->Pinned(hq_ * rows * static_cast<int64_t>(sizeof(float)));
      if (lse_buf == nullptr) link.reset();  // No pinned memory: gRPC bytes.
    }
    if (link != nullptr) {
      // "q" out, "o" and "lse" back over NCCL; the header carries their descriptors.
      const transport::TensorDescriptor qd =
          link->Describe("q", q_->dtype, RowsShape(*q_, rows), 0, 1);
      const transport::TensorDescriptor od =
          link->Describe("o", DType::kF32, {hq_, rows, dim_}, 1, 0);
      const transport::TensorDescriptor ld = link->Describe("lse", DType::kF32, {hq_, rows}, 1, 0);
      transport::DescriptorToProto(qd, header.mutable_q_tensor());
      transport::DescriptorToProto(od, header.mutable_o_tensor());
      transport::DescriptorToProto(ld, header.mutable_lse_tensor());
      auto join = std::make_shared<NcclJoin>();
      join->left = 4;
      auto partial_out = std::make_shared<PartialResult>();
      auto finish = [self = shared_from_this(), join, partial_out, o_buf, lse_buf,
                     worker = w.worker, used = link.get(),
                     on_done](bool nccl_part, absl::Status s, PartialResult* partial) {
        if (!join->Arrive(nccl_part, s, [&] { *partial_out = std::move(*partial); })) return;
        const absl::Status status = join->Result("attention tensors");
        PartialResult result;
        if (status.ok()) {
          result = std::move(*partial_out);
          result.o_pinned = o_buf;
          result.lse_pinned = lse_buf;
        } else {
          self->core_.pool->ReportNcclFailure(worker, used, status);
        }
        on_done(status, std::move(result));
      };
      const auto transfer_done = [finish](absl::Status s) { finish(true, std::move(s), nullptr); };
      link->Send(qd, q_buf, transfer_done);
      link->Recv(od, o_buf, transfer_done);
      link->Recv(ld, lse_buf, transfer_done);
      AttendCall::Start(core_.pool->stub(w.worker), context, header, q_, w.row_begin - t0_,
                        w.row_end - t0_, core_.piece_bytes, nullptr, nullptr, nullptr,
                        [finish](absl::Status s, PartialResult partial) {
                          finish(false, std::move(s), &partial);
                        });
      continue;
    }
    if (transport_ == transport::Kind::kShm) {
      // Each of "q" and the pair ("o", "lse") through the arenas when it fits, else as pieces.
      if (std::shared_ptr<transport::ShmLink> link = core_.pool->ShmLinkOf(w.worker)) {
        q_region = CopyToArena(link->r2w(), *q_, w.row_begin - t0_, w.row_end - t0_, "q",
                               header.mutable_q_tensor());
        if (q_region == nullptr) header.clear_q_tensor();
        o_region = OutputRegion(link->w2r(), {hq_, rows, dim_}, "o", header.mutable_o_tensor());
        if (o_region != nullptr) {
          lse_region = OutputRegion(link->w2r(), {hq_, rows}, "lse", header.mutable_lse_tensor());
        }
        if (lse_region == nullptr) {
          o_region.reset();
          header.clear_o_tensor();
          header.clear_lse_tensor();
        }
      }
    }
    AttendCall::Start(core_.pool->stub(w.worker), context, header, q_, w.row_begin - t0_,
                      w.row_end - t0_, core_.piece_bytes, std::move(q_region), std::move(o_region),
                      std::move(lse_region), std::move(on_done));
  }
}

void LayerCall::AfterAttends() {
  for (size_t i = 0; i < works_.size(); ++i) {
    absl::Status s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      s = attend_status_[i];
    }
    if (!s.ok()) {
      Rollback(WorkerFailure(works_[i].worker, "attention on", s));
      return;
    }
  }
  out_.stats.set_attention_seconds(Seconds(Clock::now() - stage_start_));
  absl::StatusOr<LayerCallOutput> out = MergeAndCommit();
  if (!out.ok()) {
    Rollback(out.status());
    return;
  }
  Finish(std::move(out));
}

absl::StatusOr<LayerCallOutput> LayerCall::MergeAndCommit() {
  stage_start_ = Clock::now();
  const int64_t lq = lk_ - t0_;
  for (size_t i = 0; i < works_.size(); ++i) {
    const int64_t rows = works_[i].row_end - works_[i].row_begin;
    const PartialResult& p = partials_[i];
    if (p.o.dtype != DType::kF32 || p.o.shape != std::vector<int64_t>{hq_, rows, dim_} ||
        p.lse.dtype != DType::kF32 || p.lse.shape != std::vector<int64_t>{hq_, rows}) {
      return absl::InternalError(absl::StrCat(
          "worker ", core_.pool->address(works_[i].worker), " answered o ", ShapeString(p.o.shape),
          " and lse ", ShapeString(p.lse.shape), "; expected float32 [", hq_, ", ", rows, ", ",
          dim_, "] and [", hq_, ", ", rows, "]"));
    }
    out_.stats.set_bytes_from_workers(out_.stats.bytes_from_workers() + p.byte_size());
    out_.stats.set_worker_kernel_seconds(
        std::max(out_.stats.worker_kernel_seconds(), p.result.attention_seconds()));
  }
  // Every row is merged below (from no part at all: o = 0, lse = -inf).
  out_.o = Tensor::Uninitialized(DType::kF32, {hq_, lq, dim_});
  out_.lse = Tensor::Uninitialized(DType::kF32, {hq_, lq});
  float* o = static_cast<float*>(out_.o.data());
  float* lse = static_cast<float*>(out_.lse.data());
  // Rows where the set of workers with an answer changes cut the queries into segments.
  std::set<int64_t> edges = {t0_, lk_};
  for (const WorkerWork& w : works_) {
    edges.insert(w.row_begin);
    edges.insert(w.row_end);
  }
  std::vector<PartialView> parts;
  for (auto it = edges.begin(); std::next(it) != edges.end(); ++it) {
    const int64_t a = *it, b = *std::next(it);
    for (int64_t g = 0; g < hq_; ++g) {
      parts.clear();
      for (size_t i = 0; i < works_.size(); ++i) {
        const WorkerWork& w = works_[i];
        if (w.row_begin > a || w.row_end < b) continue;
        const int64_t rows = w.row_end - w.row_begin;
        const int64_t first = g * rows + (a - w.row_begin);
        parts.push_back({partials_[i].o_data() + first * dim_, partials_[i].lse_data() + first});
      }
      const int64_t first = g * lq + (a - t0_);
      absl::Status merged =
          MergePartialsCpu(parts, b - a, dim_, o + first * dim_, lse + first, core_.kernel_threads);
      if (!merged.ok()) {
        return absl::InternalError(absl::StrCat("a worker's partial result: ", merged.message()));
      }
    }
  }
  partials_.clear();
  out_.stats.set_merge_seconds(Seconds(Clock::now() - stage_start_));

  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_) return absl::CancelledError("the client cancelled the call");
  }
  {
    std::lock_guard<std::mutex> lock(seq_->mu);
    LayerState& layer = seq_->layers[static_cast<size_t>(layer_)];
    layer.layout.Commit(std::move(delta_));
    layer.stripes = std::move(new_stripes_);
    for (size_t i = 0; i < pieces_.size(); ++i) {
      seq_->bytes_on_worker[pieces_[i].worker] += PieceBytes(i);
    }
  }
  out_.length = lk_;
  out_.stats.set_causal_pairs(hq_ * (lk_ * (lk_ + 1) / 2 - t0_ * (t0_ + 1) / 2));
  out_.stats.set_total_seconds(Seconds(Clock::now() - start_));
  return std::move(out_);
}

absl::Status LayerCall::WorkerFailure(int worker, const char* what, const absl::Status& status) {
  core_.pool->ReportCallStatus(worker, status);
  const std::string where =
      absl::StrCat(what, " worker ", core_.pool->address(worker), " (sequence '", seq_->id,
                   "', layer ", layer_, "): ", status.message());
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return absl::InternalError(absl::StrCat("the worker rejected the router's request ", where));
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kNotFound:
      return absl::UnavailableError(
          absl::StrCat("the worker no longer holds keys it was given (restarted?) ", where));
    default:
      return absl::Status(status.code(), where);
  }
}

int64_t LayerCall::PieceBytes(size_t i) const {
  return (pieces_[i].end - pieces_[i].begin) * seq_->bytes_per_token;
}

void LayerCall::Rollback(absl::Status status) {
  // Pieces the workers may hold now: those stored, and those whose StoreKv failed with an unknown
  // outcome (it may have committed as it failed). The others stored nothing.
  std::vector<size_t> held;
  std::set<int> attempted;  // Workers that were sent a StoreKv.
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < store_status_.size(); ++i) {
      if (store_maybe_[i]) held.push_back(i);
      if (store_sent_[i]) attempted.insert(pieces_[i].worker);
    }
  }
  std::vector<bool> is_held(pieces_.size(), false);
  for (size_t i : held) is_held[i] = true;
  for (size_t i = 0; i < pieces_.size(); ++i) {
    if (!is_held[i]) core_.pool->Unreserve(pieces_[i].worker, PieceBytes(i));
  }
  if (held.empty()) {
    Finish(std::move(status));
    return;
  }
  // Truncate(t0) on every worker sent a StoreKv takes the layer back to its state before the call
  // (all of it when t0 is 0), and fences this call's writes still in flight there. The workers that
  // may hold a piece must confirm; the others stored nothing, and may be unreachable.
  std::set<int> must;
  for (size_t i : held) must.insert(pieces_[i].worker);
  struct Pending {
    std::mutex mu;
    size_t left = 0;
    std::map<int, absl::Status> failed;  // Required truncates that failed, per worker.
  };
  auto pending = std::make_shared<Pending>();
  pending->left = attempted.size();
  const std::string worker_id = WorkerSequenceId(seq_->id, layer_);
  for (int w : attempted) {
    const bool required = must.count(w) > 0;
    TruncateOnWorker(
        *core_.pool, w, worker_id, layer_, t0_, core_.cleanup_timeout,
        [self = shared_from_this(), pending, held, status, required, w](absl::Status s) {
          bool last;
          {
            std::lock_guard<std::mutex> lock(pending->mu);
            if (required && !s.ok()) pending->failed.emplace(w, std::move(s));
            last = --pending->left == 0;
          }
          if (!last) return;
          self->core_.executor->Submit([self, pending, held, status] {
            self->AfterTruncates(held, pending->failed, status);
          });
        });
  }
}

void LayerCall::AfterTruncates(const std::vector<size_t>& held,
                               const std::map<int, absl::Status>& failed, absl::Status status) {
  std::vector<size_t> stranded;  // Pieces on workers whose truncate failed.
  for (size_t i : held) {
    if (failed.count(pieces_[i].worker) > 0) {
      stranded.push_back(i);
    } else {
      core_.pool->Unreserve(pieces_[i].worker, PieceBytes(i));
    }
  }
  if (stranded.empty()) {
    Finish(std::move(status));
    return;
  }
  std::string why = absl::StrCat("keys [", t0_, ", ", lk_,
                                 ") of a failed call may remain on workers that could not "
                                 "truncate them (");
  bool first = true;
  for (const auto& [worker, s] : failed) {
    core_.pool->ReportCallStatus(worker, s);
    absl::StrAppend(&why, first ? "" : "; ", core_.pool->address(worker), ": ", s.message());
    first = false;
  }
  absl::StrAppend(&why, ")");
  MarkBroken(stranded, why);
  Finish(absl::Status(status.code(),
                      absl::StrCat(status.message(), "; layer ", layer_,
                                   " is now unusable until those workers confirm the undo (the "
                                   "next call on the layer retries it): ",
                                   why)));
}

void LayerCall::MarkBroken(const std::vector<size_t>& pieces, const std::string& why) {
  std::lock_guard<std::mutex> lock(seq_->mu);
  PendingUndo& undo = seq_->layers[static_cast<size_t>(layer_)].undo.emplace();
  undo.end = t0_;
  undo.why = why;
  // Their bytes stay placed until the undo is confirmed or the sequence is released.
  for (size_t i : pieces) {
    seq_->bytes_on_worker[pieces_[i].worker] += PieceBytes(i);
    undo.bytes[pieces_[i].worker] += PieceBytes(i);
  }
}

void LayerCall::Finish(absl::StatusOr<LayerCallOutput> result) {
  EndLayerCall(*seq_, layer_);
  Done done = std::move(done_);
  done(std::move(result));
}

}  // namespace dhsa::router
