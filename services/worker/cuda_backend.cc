// The CUDA backend of the worker (see backend.h).
//
// Stripes: each KvBlock is one cudaMalloc, zero-filled at allocation. Attention calls pass a
// stripe's whole buffer as the kernel's keys (lk = capacity_tokens, so that the kernel's head
// stride, lk * head_dim, is the buffer's) and cut the selection to the stripe's held positions
// [begin, begin + len): the kernel skips keys outside the spans, and rows past len (room for
// appends, or rows a truncate cut) are never selected. They are zeros or old finite keys, so even a
// tile load the kernel masks reads finite values.
//
// Calls: each Attend runs on an executor thread with a non-blocking stream of its own (no implicit
// ordering with other calls' streams), one stream-ordered workspace (cudaMallocAsync) holding q in
// the keys' dtype, the per-stripe selections in CSR form (one upload), the per-stripe partials and
// the merged output. Store writes (KvStore::Commit) run on the memory's own stream and complete
// before the commit publishes the new length, so a snapshot never sees rows still in flight.
#include "services/worker/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/attention/sparse_attention.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/selection_csr.h"
#include "kernels/cuda/selection_cuda.h"
#include "kernels/cuda/sparse_attention_cuda.h"

namespace dhsa {
namespace {

constexpr size_t kAlign = 256;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

class DeviceBlock final : public KvBlock {
 public:
  DeviceBlock(void* data, size_t size) : data_(data), size_(size) {}
  ~DeviceBlock() override { cudaFree(data_); }
  void* data() const override { return data_; }
  size_t size() const override { return size_; }

 private:
  void* const data_;
  const size_t size_;
};

absl::Status OutOfMemory(cudaError_t error, size_t bytes, absl::string_view what) {
  cudaGetLastError();  // Clear the sticky-free allocation error.
  return absl::ResourceExhaustedError(
      absl::StrCat("device memory exhausted: cudaMalloc of ", bytes, " bytes for ", what,
                   " failed (", cudaGetErrorName(error),
                   "); lower the worker's capacity_bytes (--capacity-bytes) or free "
                   "device memory"));
}

class CudaKvMemory final : public KvMemory {
 public:
  CudaKvMemory(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  ~CudaKvMemory() override { cudaStreamDestroy(stream_); }

  std::string name() const override { return "cuda"; }

  absl::StatusOr<std::unique_ptr<KvBlock>> Allocate(size_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
    void* data = nullptr;
    const cudaError_t error = cudaMalloc(&data, bytes);
    if (error == cudaErrorMemoryAllocation) return OutOfMemory(error, bytes, "a KV stripe");
    DHSA_RETURN_IF_ERROR(CudaStatus(error, absl::StrCat("cudaMalloc(", bytes, ")")));
    auto block = std::make_unique<DeviceBlock>(data, bytes);
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(data, 0, bytes, stream_), "cudaMemsetAsync"));
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "zero-filling a KV stripe"));
    return block;
  }

  absl::Status CopyIn(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                      size_t rows) override {
    return Copy(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyHostToDevice);
  }
  absl::Status CopyWithin(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                          size_t width, size_t rows) override {
    return Copy(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDeviceToDevice);
  }

 private:
  absl::Status Copy(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                    size_t rows, cudaMemcpyKind kind) {
    if (width == 0 || rows == 0) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mu_);
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
    if (rows == 1 || (dst_pitch == width && src_pitch == width)) {
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(dst, src, width * rows, kind, stream_),
                                      "copying KV rows to the device"));
    } else {
      DHSA_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, kind, stream_),
                     "copying KV rows to the device"));
    }
    return CudaStatus(cudaStreamSynchronize(stream_), "copying KV rows to the device");
  }

  const int device_;
  std::mutex mu_;
  const cudaStream_t stream_;
};

// A non-blocking stream and a stream-ordered workspace, released (after the stream's work) when
// the call ends, however it ends.
class CallResources {
 public:
  ~CallResources() {
    if (stream_ == nullptr) return;
    if (workspace_ != nullptr) cudaFreeAsync(workspace_, stream_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  absl::Status Init(int device) {
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device), "cudaSetDevice"));
    return CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                      "cudaStreamCreateWithFlags");
  }
  absl::StatusOr<uint8_t*> Workspace(size_t bytes) {
    const cudaError_t error = cudaMallocAsync(&workspace_, bytes, stream_);
    if (error == cudaErrorMemoryAllocation) {
      workspace_ = nullptr;
      return OutOfMemory(error, bytes, "an Attend's q, selection and outputs");
    }
    DHSA_RETURN_IF_ERROR(CudaStatus(error, "cudaMallocAsync"));
    return static_cast<uint8_t*>(workspace_);
  }
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
  void* workspace_ = nullptr;
};

class CudaWorkerBackend final : public WorkerBackend {
 public:
  CudaWorkerBackend(int device, std::shared_ptr<CudaKvMemory> memory)
      : device_(device), memory_(std::move(memory)) {}

  std::string name() const override { return "cuda"; }
  std::shared_ptr<KvMemory> memory() const override { return memory_; }

  absl::Status CheckLayout(int64_t head_dim, DType dtype) const override {
    if ((dtype == DType::kBF16 || dtype == DType::kF16) && (head_dim == 64 || head_dim == 128)) {
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "this worker's backend is \"cuda\", whose kernel serves bfloat16 or float16 keys of head "
        "dim 64 or 128; got ",
        DTypeName(dtype), " keys of head dim ", head_dim,
        " (run workers with --backend=cpu for other layouts)"));
  }

  absl::StatusOr<DeviceMemoryInfo> DeviceMemory() const override {
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
    return CudaDeviceMemory();
  }

  absl::StatusOr<PartialAttention> Compute(const PartialAttentionInputs& in) override;

 private:
  const int device_;
  const std::shared_ptr<CudaKvMemory> memory_;
};

absl::StatusOr<PartialAttention> CudaWorkerBackend::Compute(const PartialAttentionInputs& in) {
  const auto start = std::chrono::steady_clock::now();
  if (in.cancelled && in.cancelled()) {
    return absl::CancelledError("Attend cancelled by the client before it started");
  }
  const LayerSnapshot& keys = *in.keys;
  const Selection& selection = *in.selection;
  const Tensor& q_in = *in.q;
  if (q_in.shape.size() != 3 || q_in.shape[2] != keys.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q is ", ShapeString(q_in.shape), "; expected [q_heads, rows, ", keys.head_dim, "]"));
  }
  const int64_t hq = q_in.shape[0], lq = q_in.shape[1], d = keys.head_dim;
  const int64_t rows = hq * lq;
  DHSA_RETURN_IF_ERROR(CheckLayout(d, keys.dtype));
  if (selection.unit != SelectionUnit::kKvHeadBlock || selection.num_heads != keys.kv_heads ||
      hq != keys.kv_heads * selection.group) {
    return absl::InvalidArgumentError(
        absl::StrCat("the cuda backend takes per-(KV head, query block) selections over ",
                     keys.kv_heads, " KV heads with ", hq,
                     " query heads; per-query-head selections (oracle_topk) need workers with "
                     "--backend=cpu"));
  }
  // The kernel's selection covers exactly the blocks of rows [q_begin, q_begin + lq).
  const int64_t bs = selection.block_size;
  const int64_t first = in.q_begin / bs, last = (in.q_begin + lq - 1) / bs;
  if (first < selection.first_block || last >= selection.first_block + selection.num_blocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection blocks [", selection.first_block, ", ",
                     selection.first_block + selection.num_blocks, ") do not cover query rows [",
                     in.q_begin, ", ", in.q_begin + lq, ")"));
  }

  // Per touched stripe, the selection cut to its held positions the queries can see.
  struct Part {
    size_t stripe = 0;
    SelectionCsr csr;
    size_t offsets_at = 0, spans_at = 0, starts_at = 0, o_at = 0, lse_at = 0;
  };
  std::vector<Part> parts;
  for (size_t i = 0; i < keys.stripes.size(); ++i) {
    const StripeSnapshot& s = keys.stripes[i];
    bool any = false;
    const Selection cut = SelectionForStripe(selection, first, last - first + 1, s.begin,
                                             std::min(s.end(), in.q_begin + lq), &any);
    if (!any) continue;
    Part part;
    part.stripe = i;
    DHSA_ASSIGN_OR_RETURN(part.csr, SelectionToCsr(cut));
    parts.push_back(std::move(part));
  }

  PartialAttention out;
  out.o = Tensor::Uninitialized(DType::kF32, {hq, lq, d});
  out.lse = Tensor::Uninitialized(DType::kF32, {hq, lq});
  if (parts.empty()) {  // No held key: every row is o = 0, lse = -inf (as the CPU backend).
    std::memset(out.o.data(), 0, out.o.bytes.size());
    float* lse = static_cast<float*>(out.lse.data());
    std::fill(lse, lse + rows, -std::numeric_limits<float>::infinity());
  } else {
    // q in the keys' dtype (the kernel reads q, k and v in one storage type).
    Tensor q_converted;
    const Tensor* q = &q_in;
    if (q_in.dtype != keys.dtype) {
      q_converted = q_in.ConvertTo(keys.dtype);
      q = &q_converted;
    }
    // Workspace: q and the selections (uploaded at once from `staging`), then the outputs.
    size_t size = AlignUp(q->bytes.size());
    for (Part& p : parts) {
      p.offsets_at = size;
      size += AlignUp(p.csr.entry_offsets.size() * sizeof(int64_t));
      p.spans_at = size;
      size += AlignUp(p.csr.spans.size() * sizeof(CudaSpan));
      p.starts_at = size;
      size += AlignUp(p.csr.span_starts.size() * sizeof(int32_t));
    }
    const size_t upload = size;
    const size_t o_bytes = AlignUp(static_cast<size_t>(rows * d) * sizeof(float));
    const size_t lse_bytes = AlignUp(static_cast<size_t>(rows) * sizeof(float));
    const size_t o_at = size, lse_at = size + o_bytes;
    size += o_bytes + lse_bytes;
    if (parts.size() > 1) {
      for (Part& p : parts) {
        p.o_at = size;
        p.lse_at = size + o_bytes;
        size += o_bytes + lse_bytes;
      }
    } else {
      parts[0].o_at = o_at;
      parts[0].lse_at = lse_at;
    }
    std::vector<uint8_t> staging(upload);
    std::memcpy(staging.data(), q->bytes.data(), q->bytes.size());
    for (const Part& p : parts) {
      std::memcpy(staging.data() + p.offsets_at, p.csr.entry_offsets.data(),
                  p.csr.entry_offsets.size() * sizeof(int64_t));
      std::memcpy(staging.data() + p.spans_at, p.csr.spans.data(),
                  p.csr.spans.size() * sizeof(CudaSpan));
      std::memcpy(staging.data() + p.starts_at, p.csr.span_starts.data(),
                  p.csr.span_starts.size() * sizeof(int32_t));
    }

    CallResources call;
    DHSA_RETURN_IF_ERROR(call.Init(device_));
    DHSA_ASSIGN_OR_RETURN(uint8_t* const ws, call.Workspace(size));
    DHSA_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(ws, staging.data(), upload, cudaMemcpyHostToDevice, call.stream()),
        "uploading q and the selection"));
    std::vector<const float*> part_o, part_lse;
    for (const Part& p : parts) {
      if (in.cancelled && in.cancelled())
        return absl::CancelledError("Attend cancelled by the client");
      const StripeSnapshot& s = keys.stripes[p.stripe];
      SparseAttentionCudaParams params;
      params.dtype = keys.dtype;
      params.q = ws;
      params.k = s.buffer->k->data();
      params.v = s.buffer->v->data();
      params.o = reinterpret_cast<float*>(ws + p.o_at);
      params.lse = reinterpret_cast<float*>(ws + p.lse_at);
      params.hq = hq;
      params.hkv = keys.kv_heads;
      params.head_dim = d;
      params.lq = lq;
      params.lk = s.buffer->capacity_tokens;  // The buffer's head stride; spans stay below len.
      params.q_offset = in.q_begin;
      params.k_offset = s.begin;
      params.scale = in.scale;
      params.block_size = p.csr.block_size;
      params.first_block = p.csr.first_block;
      params.num_blocks = p.csr.num_blocks;
      params.entry_offsets = reinterpret_cast<const int64_t*>(ws + p.offsets_at);
      params.spans = reinterpret_cast<const CudaSpan*>(ws + p.spans_at);
      params.span_starts = reinterpret_cast<const int32_t*>(ws + p.starts_at);
      DHSA_RETURN_IF_ERROR(SparseAttentionCuda(params, call.stream()));
      part_o.push_back(params.o);
      part_lse.push_back(params.lse);
    }
    if (parts.size() > 1) {
      DHSA_RETURN_IF_ERROR(MergePartialsCuda(part_o, part_lse, rows, d,
                                             reinterpret_cast<float*>(ws + o_at),
                                             reinterpret_cast<float*>(ws + lse_at), call.stream()));
    }
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(out.o.data(), ws + o_at, out.o.bytes.size(),
                                                    cudaMemcpyDeviceToHost, call.stream()),
                                    "downloading o"));
    DHSA_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(out.lse.data(), ws + lse_at, out.lse.bytes.size(),
                                   cudaMemcpyDeviceToHost, call.stream()),
                   "downloading lse"));
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(call.stream()), "sparse attention"));
  }
  AttentionShape shape;
  shape.hq = hq;
  shape.hkv = keys.kv_heads;
  shape.dim = d;
  shape.lq = lq;
  shape.lk = in.q_begin + lq;
  out.computed_pairs = CountComputedPairs(selection, shape);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

}  // namespace

absl::StatusOr<DeviceMemoryInfo> CudaDeviceMemory() {
  size_t free_bytes = 0, total_bytes = 0;
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo"));
  DeviceMemoryInfo info;
  info.total_bytes = static_cast<int64_t>(total_bytes);
  info.free_bytes = static_cast<int64_t>(free_bytes);
  return info;
}

absl::StatusOr<std::unique_ptr<WorkerBackend>> CreateCudaWorkerBackend() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("backend \"cuda\": no usable CUDA device (",
                     error != cudaSuccess ? cudaGetErrorName(error) : "no device",
                     "); use --backend=cpu on machines without a GPU"));
  }
  int device = 0;
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&device), "cudaGetDevice"));
  cudaStream_t stream = nullptr;
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                  "cudaStreamCreateWithFlags"));
  return std::make_unique<CudaWorkerBackend>(device,
                                             std::make_shared<CudaKvMemory>(device, stream));
}

}  // namespace dhsa
