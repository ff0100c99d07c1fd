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
// the merged output. Over NCCL (PartialAttentionInputs::q_device, outputs_on_device) q is already
// on the device (received into an AllocateDevice buffer) and o and lse stay there in buffers of
// their own, which the data plane sends from: no host copy of them on the worker. Store writes
// (KvStore::Commit) run on the memory's own stream and complete before the commit publishes the new
// length, so a snapshot never sees rows still in flight.
#include "services/worker/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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
#include "services/transport/shm_arena.h"

namespace dhsa {
namespace {

constexpr size_t kAlign = 256;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// A host <-> device copy issued in pieces cut at transport::kShmLockChunkBytes-aligned host
// addresses: a page-locked arena is registered chunk by chunk, and a piece within one
// registration runs at page-locked speed (for pageable memory the cut changes nothing).
cudaError_t CopyHostCut(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                        cudaStream_t stream) {
  const size_t chunk = static_cast<size_t>(transport::kShmLockChunkBytes);
  const uintptr_t host = reinterpret_cast<uintptr_t>(kind == cudaMemcpyHostToDevice ? src : dst);
  for (size_t done = 0; done < bytes;) {
    const size_t n = std::min(bytes - done, chunk - (host + done) % chunk);
    const cudaError_t error =
        cudaMemcpyAsync(static_cast<uint8_t*>(dst) + done, static_cast<const uint8_t*>(src) + done,
                        n, kind, stream);
    if (error != cudaSuccess) return error;
    done += n;
  }
  return cudaSuccess;
}

// cudaHostRegister of a worker's shared-memory arena chunks (services/transport/shm_arena.h).
class CudaHostLocker final : public transport::HostMemoryLocker {
 public:
  explicit CudaHostLocker(int device) : device_(device) {}
  absl::Status Lock(void* data, size_t bytes) override {
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
    const cudaError_t error = cudaHostRegister(data, bytes, cudaHostRegisterPortable);
    if (error != cudaSuccess) {
      (void)cudaGetLastError();
      return CudaStatus(error, absl::StrCat("cudaHostRegister of ", bytes, " bytes"));
    }
    return absl::OkStatus();
  }
  void Unlock(void* data) override {
    (void)cudaSetDevice(device_);
    if (cudaHostUnregister(data) != cudaSuccess) (void)cudaGetLastError();
  }

 private:
  const int device_;
};

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
      // Host sources may be page-locked arena regions (StoreKv over shared memory): cut there.
      const cudaError_t error = kind == cudaMemcpyHostToDevice
                                    ? CopyHostCut(dst, src, width * rows, kind, stream_)
                                    : cudaMemcpyAsync(dst, src, width * rows, kind, stream_);
      DHSA_RETURN_IF_ERROR(CudaStatus(error, "copying KV rows to the device"));
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

// Stream-ordered device memory (cudaMallocAsync) released on `free_stream` (cudaFreeAsync). Its
// holders observed every use of it complete on the host before letting go, so no stream order is
// needed for the release.
class CudaDeviceBuffer final : public WorkerDeviceBuffer {
 public:
  CudaDeviceBuffer(void* data, int64_t bytes, int device, cudaStream_t free_stream)
      : data_(data), bytes_(bytes), device_(device), free_stream_(free_stream) {}
  ~CudaDeviceBuffer() override { (void)cudaFreeAsync(data_, free_stream_); }
  void* data() const override { return data_; }
  int64_t bytes() const override { return bytes_; }
  int device() const override { return device_; }

 private:
  void* const data_;
  const int64_t bytes_;
  const int device_;
  const cudaStream_t free_stream_;
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
  // An output buffer of the call, ordered on its stream (usable elsewhere once the stream is
  // synchronized), freed on `free_stream` when its last holder lets go.
  absl::StatusOr<std::shared_ptr<WorkerDeviceBuffer>> Output(size_t bytes, int device,
                                                             cudaStream_t free_stream) {
    void* data = nullptr;
    const cudaError_t error = cudaMallocAsync(&data, bytes, stream_);
    if (error == cudaErrorMemoryAllocation) return OutOfMemory(error, bytes, "an Attend's o");
    DHSA_RETURN_IF_ERROR(CudaStatus(error, "cudaMallocAsync"));
    return std::shared_ptr<WorkerDeviceBuffer>(
        std::make_shared<CudaDeviceBuffer>(data, static_cast<int64_t>(bytes), device, free_stream));
  }
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
  void* workspace_ = nullptr;
};

// Wall time of an Attend's phases, printed to stderr when DHSA_CUDA_WORKER_TIMING=1 (each phase
// that names a stream then waits for it, so the phases do not overlap as they otherwise would).
class PhaseTimer {
 public:
  explicit PhaseTimer(bool on) : on_(on), last_(std::chrono::steady_clock::now()) {}
  void Mark(const char* name, cudaStream_t stream) {
    if (!on_) return;
    if (stream != nullptr) (void)cudaStreamSynchronize(stream);
    const auto now = std::chrono::steady_clock::now();
    char ms[32];
    std::snprintf(ms, sizeof(ms), "%.1f", std::chrono::duration<double>(now - last_).count() * 1e3);
    absl::StrAppend(&text_, " ", name, " ", ms, " ms");
    last_ = now;
  }
  void Report(const std::string& what) const {
    if (on_) std::fprintf(stderr, "%s:%s\n", what.c_str(), text_.c_str());
  }

 private:
  const bool on_;
  std::chrono::steady_clock::time_point last_;
  std::string text_;
};

class CudaWorkerBackend final : public WorkerBackend {
 public:
  CudaWorkerBackend(int device, std::shared_ptr<CudaKvMemory> memory, cudaStream_t alloc_stream)
      : device_(device),
        memory_(std::move(memory)),
        alloc_stream_(alloc_stream),
        locker_(std::make_shared<CudaHostLocker>(device)),
        timing_(std::getenv("DHSA_CUDA_WORKER_TIMING") != nullptr &&
                std::string(std::getenv("DHSA_CUDA_WORKER_TIMING")) == "1") {}
  // Device buffers handed out may outlive the backend only until the process ends.
  ~CudaWorkerBackend() override { (void)cudaStreamSynchronize(alloc_stream_); }

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
  absl::StatusOr<std::shared_ptr<WorkerDeviceBuffer>> AllocateDevice(int64_t bytes) override;
  std::shared_ptr<transport::HostMemoryLocker> HostLocker() const override { return locker_; }

 private:
  const int device_;
  const std::shared_ptr<CudaKvMemory> memory_;
  const cudaStream_t alloc_stream_;  // Allocations and releases of device buffers.
  const std::shared_ptr<transport::HostMemoryLocker> locker_;
  const bool timing_;
};

absl::StatusOr<std::shared_ptr<WorkerDeviceBuffer>> CudaWorkerBackend::AllocateDevice(
    int64_t bytes) {
  if (bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("device buffer of ", bytes, " bytes"));
  }
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
  void* data = nullptr;
  const cudaError_t error = cudaMallocAsync(&data, static_cast<size_t>(bytes), alloc_stream_);
  if (error == cudaErrorMemoryAllocation) {
    return OutOfMemory(error, static_cast<size_t>(bytes), "a tensor received over NCCL");
  }
  DHSA_RETURN_IF_ERROR(CudaStatus(error, "cudaMallocAsync"));
  auto buffer = std::make_shared<CudaDeviceBuffer>(data, bytes, device_, alloc_stream_);
  // Usable from any stream (NCCL's, a call's) once the allocating stream reached it.
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(alloc_stream_), "cudaMallocAsync"));
  return std::shared_ptr<WorkerDeviceBuffer>(std::move(buffer));
}

absl::StatusOr<PartialAttention> CudaWorkerBackend::Compute(const PartialAttentionInputs& in) {
  const auto start = std::chrono::steady_clock::now();
  PhaseTimer timer(timing_);
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
  if (in.q_device != nullptr) {
    const int64_t want = rows * d * static_cast<int64_t>(DTypeSize(keys.dtype));
    if (q_in.dtype != keys.dtype || in.q_device->bytes() < want ||
        in.q_device->device() != device_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "q on the device is ", DTypeName(q_in.dtype), ", ", in.q_device->bytes(),
          " bytes on device ", in.q_device->device(), "; this backend needs ",
          DTypeName(keys.dtype), " (the keys' dtype), ", want, " bytes on device ", device_));
    }
  }
  // Host I/O in place: page-locked arena regions only (else q's bytes in q, o and lse returned).
  const bool q_in_place = in.host_locked && in.q_host != nullptr && in.q_device == nullptr;
  const bool o_in_place = in.host_locked && in.o_host != nullptr && !in.outputs_on_device;
  if ((in.q_host != nullptr || in.o_host != nullptr) && !in.host_locked) {
    return absl::InvalidArgumentError(
        "the cuda backend takes q_host, o_host and lse_host only in page-locked memory");
  }
  if ((in.o_host == nullptr) != (in.lse_host == nullptr)) {
    return absl::InvalidArgumentError("o_host and lse_host go together");
  }
  if (q_in_place && q_in.dtype != keys.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("q in host memory is ", DTypeName(q_in.dtype),
                                                   "; in place it must be the keys' dtype, ",
                                                   DTypeName(keys.dtype)));
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
  {
    DHSA_ASSIGN_OR_RETURN(
        auto csrs, StripeSelectionCsrs(selection, first, last - first + 1, keys, in.q_begin + lq));
    for (auto& [stripe, csr] : csrs) {
      Part part;
      part.stripe = stripe;
      part.csr = std::move(csr);
      parts.push_back(std::move(part));
    }
  }

  const size_t o_size = static_cast<size_t>(rows * d) * sizeof(float);
  const size_t lse_size = static_cast<size_t>(rows) * sizeof(float);
  PartialAttention out;
  if (!in.outputs_on_device && !o_in_place) {
    out.o = Tensor::Uninitialized(DType::kF32, {hq, lq, d});
    out.lse = Tensor::Uninitialized(DType::kF32, {hq, lq});
  }
  float* const o_host = o_in_place ? in.o_host : static_cast<float*>(out.o.data());
  float* const lse_host = o_in_place ? in.lse_host : static_cast<float*>(out.lse.data());
  CallResources call;
  DHSA_RETURN_IF_ERROR(call.Init(device_));
  float* o_dst = nullptr;  // Where the merged o and lse go on the device.
  float* lse_dst = nullptr;
  if (in.outputs_on_device) {
    DHSA_ASSIGN_OR_RETURN(out.o_device, call.Output(o_size, device_, alloc_stream_));
    DHSA_ASSIGN_OR_RETURN(out.lse_device, call.Output(lse_size, device_, alloc_stream_));
    o_dst = static_cast<float*>(out.o_device->data());
    lse_dst = static_cast<float*>(out.lse_device->data());
  }
  if (parts.empty()) {  // No held key: every row is o = 0, lse = -inf (as the CPU backend).
    std::vector<float> minus_inf(static_cast<size_t>(rows),
                                 -std::numeric_limits<float>::infinity());
    if (in.outputs_on_device) {
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(o_dst, 0, o_size, call.stream()), "zero o"));
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(lse_dst, minus_inf.data(), lse_size,
                                                      cudaMemcpyHostToDevice, call.stream()),
                                      "lse = -inf"));
      DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(call.stream()), "empty attention"));
    } else {
      std::memset(o_host, 0, o_size);
      std::memcpy(lse_host, minus_inf.data(), lse_size);
    }
  } else {
    // q in the keys' dtype (the kernel reads q, k and v in one storage type).
    Tensor q_converted;
    const Tensor* q = &q_in;
    if (in.q_device == nullptr && !q_in_place && q_in.dtype != keys.dtype) {
      q_converted = q_in.ConvertTo(keys.dtype);
      q = &q_converted;
    }
    // Workspace: q (unless it is on the device already), the selections (uploaded at once from
    // `staging`), then the outputs.
    const size_t q_bytes = in.q_device != nullptr
                               ? 0
                               : (q_in_place ? static_cast<size_t>(rows * d) * DTypeSize(keys.dtype)
                                             : q->bytes.size());
    const void* const q_src = q_in_place ? in.q_host : q->bytes.data();
    const size_t q_at = 0;
    size_t size = AlignUp(q_bytes);
    const size_t csr_at = size;
    for (Part& p : parts) {
      p.offsets_at = size;
      size += AlignUp(p.csr.entry_offsets.size() * sizeof(int64_t));
      p.spans_at = size;
      size += AlignUp(p.csr.spans.size() * sizeof(CudaSpan));
      p.starts_at = size;
      size += AlignUp(p.csr.span_starts.size() * sizeof(int32_t));
    }
    const size_t csr_bytes = size - csr_at;
    size_t o_at = 0, lse_at = 0;
    if (!in.outputs_on_device) {
      o_at = size;
      lse_at = size + AlignUp(o_size);
      size += AlignUp(o_size) + AlignUp(lse_size);
    }
    if (parts.size() > 1) {
      for (Part& p : parts) {
        p.o_at = size;
        p.lse_at = size + AlignUp(o_size);
        size += AlignUp(o_size) + AlignUp(lse_size);
      }
    }
    std::vector<uint8_t> staging(csr_bytes);
    for (const Part& p : parts) {
      std::memcpy(staging.data() + (p.offsets_at - csr_at), p.csr.entry_offsets.data(),
                  p.csr.entry_offsets.size() * sizeof(int64_t));
      std::memcpy(staging.data() + (p.spans_at - csr_at), p.csr.spans.data(),
                  p.csr.spans.size() * sizeof(CudaSpan));
      std::memcpy(staging.data() + (p.starts_at - csr_at), p.csr.span_starts.data(),
                  p.csr.span_starts.size() * sizeof(int32_t));
    }
    timer.Mark("prepare", nullptr);

    DHSA_ASSIGN_OR_RETURN(uint8_t* const ws, call.Workspace(size));
    timer.Mark("workspace", call.stream());  // Stream-ordered: mapped when the stream gets here.
    if (!in.outputs_on_device) {
      o_dst = reinterpret_cast<float*>(ws + o_at);
      lse_dst = reinterpret_cast<float*>(ws + lse_at);
    }
    if (q_bytes > 0) {
      DHSA_RETURN_IF_ERROR(
          CudaStatus(CopyHostCut(ws + q_at, q_src, q_bytes, cudaMemcpyHostToDevice, call.stream()),
                     "uploading q"));
    }
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(ws + csr_at, staging.data(), csr_bytes,
                                                    cudaMemcpyHostToDevice, call.stream()),
                                    "uploading the selection"));
    timer.Mark("upload", call.stream());
    const void* const q_dev = in.q_device != nullptr ? in.q_device->data() : ws + q_at;
    std::vector<const float*> part_o, part_lse;
    for (const Part& p : parts) {
      if (in.cancelled && in.cancelled())
        return absl::CancelledError("Attend cancelled by the client");
      const StripeSnapshot& s = keys.stripes[p.stripe];
      SparseAttentionCudaParams params;
      params.dtype = keys.dtype;
      params.q = q_dev;
      params.k = s.buffer->k->data();
      params.v = s.buffer->v->data();
      params.o = parts.size() > 1 ? reinterpret_cast<float*>(ws + p.o_at) : o_dst;
      params.lse = parts.size() > 1 ? reinterpret_cast<float*>(ws + p.lse_at) : lse_dst;
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
      DHSA_RETURN_IF_ERROR(
          MergePartialsCuda(part_o, part_lse, rows, d, o_dst, lse_dst, call.stream()));
    }
    timer.Mark("kernels", call.stream());
    if (!in.outputs_on_device) {
      DHSA_RETURN_IF_ERROR(
          CudaStatus(CopyHostCut(o_host, o_dst, o_size, cudaMemcpyDeviceToHost, call.stream()),
                     "downloading o"));
      DHSA_RETURN_IF_ERROR(CudaStatus(
          CopyHostCut(lse_host, lse_dst, lse_size, cudaMemcpyDeviceToHost, call.stream()),
          "downloading lse"));
    }
    DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(call.stream()), "sparse attention"));
    timer.Mark(in.outputs_on_device ? "sync" : "download", nullptr);
  }
  AttentionShape shape;
  shape.hq = hq;
  shape.hkv = keys.kv_heads;
  shape.dim = d;
  shape.lq = lq;
  shape.lk = in.q_begin + lq;
  out.computed_pairs = CountComputedPairs(selection, shape);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  timer.Report(absl::StrCat("cuda attend: ", hq, "x", lq, " rows, ", parts.size(), " stripes, q ",
                            in.q_device != nullptr ? "device" : (q_in_place ? "locked" : "host"),
                            ", o ",
                            in.outputs_on_device ? "device" : (o_in_place ? "locked" : "host")));
  return out;
}

}  // namespace

absl::StatusOr<std::vector<std::pair<size_t, SelectionCsr>>> StripeSelectionCsrs(
    const Selection& selection, int64_t first_block, int64_t num_blocks, const LayerSnapshot& keys,
    int64_t q_end) {
  if (selection.unit != SelectionUnit::kKvHeadBlock) {
    return absl::InvalidArgumentError(
        "the CUDA kernels take per-(KV head, query block) selections, not per-row ones");
  }
  if (selection.block_size <= 0 || selection.num_heads <= 0 || num_blocks <= 0 ||
      first_block < selection.first_block ||
      first_block + num_blocks > selection.first_block + selection.num_blocks ||
      selection.spans.size() != static_cast<size_t>(selection.num_heads * selection.num_blocks)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection of ", selection.num_heads, " heads x blocks [", selection.first_block, ", ",
        selection.first_block + selection.num_blocks, ") of ", selection.block_size,
        " rows holding ", selection.spans.size(), " entries cannot be cut to blocks [", first_block,
        ", ", first_block + num_blocks, ")"));
  }
  constexpr int64_t kMaxPosition = std::numeric_limits<int32_t>::max();
  const size_t n = keys.stripes.size();
  std::vector<int64_t> ends(n), lo(n), hi(n);
  for (size_t i = 0; i < n; ++i) {
    ends[i] = keys.stripes[i].end();
    lo[i] = keys.stripes[i].begin;
    hi[i] = std::min(keys.stripes[i].end(), q_end);
  }
  std::vector<SelectionCsr> csrs(n);
  std::vector<int64_t> packed(n, 0);
  const int64_t entries = selection.num_heads * num_blocks;
  for (SelectionCsr& c : csrs) {
    c.block_size = selection.block_size;
    c.first_block = first_block;
    c.num_blocks = num_blocks;
    c.num_heads = selection.num_heads;
    c.entry_offsets.reserve(static_cast<size_t>(entries + 1));
    c.entry_offsets.push_back(0);
  }
  for (int64_t h = 0; h < selection.num_heads; ++h) {
    for (int64_t b = 0; b < num_blocks; ++b) {
      std::fill(packed.begin(), packed.end(), 0);
      int64_t previous_end = 0;
      for (const Span& s : selection.At(h, first_block - selection.first_block + b)) {
        if (s.begin < previous_end || s.end < s.begin || s.end > kMaxPosition) {
          return absl::InvalidArgumentError(
              absl::StrCat("selection entry ", h * num_blocks + b, ": span [", s.begin, ", ", s.end,
                           ") is out of order, overlaps, or lies outside [0, 2^31 - 1)"));
        }
        previous_end = s.end;
        // The stripes holding part of the span: from the first that ends after its begin.
        for (size_t i = static_cast<size_t>(std::upper_bound(ends.begin(), ends.end(), s.begin) -
                                            ends.begin());
             i < n && lo[i] < s.end; ++i) {
          const int64_t begin = std::max(s.begin, lo[i]), end = std::min(s.end, hi[i]);
          if (begin >= end) continue;
          csrs[i].spans.push_back({static_cast<int32_t>(begin), static_cast<int32_t>(end)});
          csrs[i].span_starts.push_back(static_cast<int32_t>(packed[i]));
          packed[i] += end - begin;
        }
      }
      for (SelectionCsr& c : csrs) c.entry_offsets.push_back(static_cast<int64_t>(c.spans.size()));
    }
  }
  std::vector<std::pair<size_t, SelectionCsr>> out;
  for (size_t i = 0; i < n; ++i) {
    if (!csrs[i].spans.empty()) out.emplace_back(i, std::move(csrs[i]));
  }
  return out;
}

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
  cudaStream_t stream = nullptr, alloc_stream = nullptr;
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                  "cudaStreamCreateWithFlags"));
  DHSA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&alloc_stream, cudaStreamNonBlocking),
                                  "cudaStreamCreateWithFlags"));
  // Keep up to 8 GiB of freed stream-ordered memory (q, o and the workspaces of a 128K-token
  // prefill are GBs) in the device's pool rather than unmapping it at every synchronization.
  cudaMemPool_t pool = nullptr;
  if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) {
    uint64_t keep = uint64_t{8} << 30;
    (void)cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
  }
  (void)cudaGetLastError();
  return std::make_unique<CudaWorkerBackend>(device, std::make_shared<CudaKvMemory>(device, stream),
                                             alloc_stream);
}

}  // namespace dhsa
