// The device's two ceilings, measured (METHOD.md "Two numbers first"): a cuBLAS bf16 GEMM and a
// device-to-device copy.
#ifndef DHSA_BENCH_GPU_CALIBRATION_H_
#define DHSA_BENCH_GPU_CALIBRATION_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/statusor.h"

namespace dhsa {

// TFLOP/s (2 n^3 per product) of an n x n x n bf16 GEMM with fp32 accumulation and bf16 output,
// median over timed runs on random data. cuBLAS is loaded at run time (libcublas.so.13, then
// libcublas.so): FailedPrecondition when it is not found, so the benchmark still runs without it.
absl::StatusOr<double> CublasBf16GemmTflops(int64_t n, cudaStream_t stream);

// TB/s of a device-to-device copy of `bytes`, counting bytes read plus bytes written.
absl::StatusOr<double> DeviceCopyTbps(size_t bytes, cudaStream_t stream);

}  // namespace dhsa

#endif  // DHSA_BENCH_GPU_CALIBRATION_H_
