#include "bench/gpu/calibration.h"

#include <cublas_api.h>
#include <dlfcn.h>

#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/gpu/event_timer.h"
#include "kernels/common/dtype.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_buffer.h"

namespace dhsa {
namespace {

// The cuBLAS entry points used, resolved with dlsym (the binary does not link cuBLAS).
struct Cublas {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  // The exported C symbol (the header adds a C++ overload taking cudaDataType compute types).
  cublasStatus_t (*gemm)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                         const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                         int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                         cublasGemmAlgo_t) = nullptr;
};

absl::StatusOr<Cublas> LoadCublas() {
  void* lib = nullptr;
  for (const char* name : {"libcublas.so.13", "libcublas.so"}) {
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib != nullptr) break;
  }
  if (lib == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("cuBLAS not loadable: ", dlerror()));
  }
  Cublas c;
  c.create = reinterpret_cast<decltype(c.create)>(dlsym(lib, "cublasCreate_v2"));
  c.destroy = reinterpret_cast<decltype(c.destroy)>(dlsym(lib, "cublasDestroy_v2"));
  c.set_stream = reinterpret_cast<decltype(c.set_stream)>(dlsym(lib, "cublasSetStream_v2"));
  c.gemm = reinterpret_cast<decltype(c.gemm)>(dlsym(lib, "cublasGemmEx"));
  if (c.create == nullptr || c.destroy == nullptr || c.set_stream == nullptr || c.gemm == nullptr) {
    return absl::FailedPreconditionError("cuBLAS lacks cublasCreate_v2/cublasGemmEx");
  }
  return c;
}

absl::StatusOr<DeviceBuffer> RandomBf16(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<uint16_t> host(static_cast<size_t>(count));
  for (uint16_t& x : host) x = FloatToBFloat16(uniform(rng));
  return DeviceBuffer::FromHost(host.data(), host.size() * sizeof(uint16_t));
}

}  // namespace

absl::StatusOr<double> CublasBf16GemmTflops(int64_t n, cudaStream_t stream) {
  DHSA_ASSIGN_OR_RETURN(Cublas cublas, LoadCublas());
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer a, RandomBf16(n * n, 1));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer b, RandomBf16(n * n, 2));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer c, DeviceBuffer::Allocate(n * n * sizeof(uint16_t)));
  cublasHandle_t handle;
  if (cublas.create(&handle) != CUBLAS_STATUS_SUCCESS) {
    return absl::InternalError("cublasCreate failed");
  }
  cublas.set_stream(handle, stream);
  const float alpha = 1.0f, beta = 0.0f;
  const int dim = static_cast<int>(n);
  auto launch = [&]() -> absl::Status {
    const cublasStatus_t s =
        cublas.gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, dim, dim, dim, &alpha, a.data(), CUDA_R_16BF,
                    dim, b.data(), CUDA_R_16BF, dim, &beta, c.data(), CUDA_R_16BF, dim,
                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) return absl::InternalError(absl::StrCat("cublasGemmEx ", s));
    return absl::OkStatus();
  };
  absl::StatusOr<DeviceTiming> t = TimeOnDevice(launch, stream, 3, 20);
  cublas.destroy(handle);
  if (!t.ok()) return t.status();
  return 2.0 * double(n) * double(n) * double(n) / (t->median_ms * 1e-3) / 1e12;
}

absl::StatusOr<double> DeviceCopyTbps(size_t bytes, cudaStream_t stream) {
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer src, DeviceBuffer::Allocate(bytes));
  DHSA_ASSIGN_OR_RETURN(DeviceBuffer dst, DeviceBuffer::Allocate(bytes));
  DHSA_RETURN_IF_ERROR(src.Fill(0x3C));  // Not zeros (METHOD.md: never time on zeros).
  auto launch = [&]() {
    return CudaStatus(
        cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpyAsync");
  };
  DHSA_ASSIGN_OR_RETURN(DeviceTiming t, TimeOnDevice(launch, stream, 2, 10));
  return 2.0 * double(bytes) / (t.median_ms * 1e-3) / 1e12;
}

}  // namespace dhsa
