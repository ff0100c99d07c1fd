// The library GEMM the CPU backend multiplies attention tiles with (oneDNN's sgemm: JIT kernels for
// AVX2 and AVX-512 chosen at run time), also used by `dhsa bench` to calibrate the machine's peak.
#ifndef DHSA_KERNELS_CPU_GEMM_H_
#define DHSA_KERNELS_CPU_GEMM_H_

#include <cstdint>

#include "absl/status/status.h"

namespace dhsa::cpu {

// Row-major C = alpha * A * op(B) + beta * C in fp32, op(B) = B^T when transpose_b. A is [m, k]
// (row stride lda), B is [k, n] or, transposed, [n, k] (ldb), C is [m, n] (ldc). Always runs on the
// calling thread only (callers parallelise over tiles). Internal error if the library refuses.
absl::Status GemmF32(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                     int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace dhsa::cpu

#endif  // DHSA_KERNELS_CPU_GEMM_H_
