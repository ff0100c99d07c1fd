// SIMD loops shared by the CPU kernels, compiled with Highway for every x86 target (AVX2, AVX-512,
// a portable fallback) and dispatched at run time to the best one the machine has.
//
// Functions that accumulate in double keep the reference's per-element arithmetic (convert, then
// multiply, then add; no fused multiply-add) so that sums that the reference forms in the same
// order come out bit-identical; only the order of the final reductions (dot products) differs.
#ifndef DHSA_KERNELS_CPU_VECTOR_OPS_H_
#define DHSA_KERNELS_CPU_VECTOR_OPS_H_

#include <cstdint>

#include "kernels/common/dtype.h"

namespace dhsa::cpu {

// dst[i] = element i of `src` (stored as `dtype`) as float, for i in [0, n).
void ToFloat(const void* src, DType dtype, int64_t n, float* dst);

// acc[i] += double(x[i]).
void AccumulateF64(const float* x, int64_t n, double* acc);

// acc[i] += double(x[i]) * scale (a product, then a sum: two roundings, as the reference).
void AccumulateScaledF64(const float* x, double scale, int64_t n, double* acc);

// sum of double(x[i])^2.
double SumSquaresF64(const float* x, int64_t n);

// sum of a[i] * b[i] in double.
double DotF64(const double* a, const double* b, int64_t n);

// sum of double(a[i]) * double(b[i]): the products are exact, the sum is in double.
double DotF32InF64(const float* a, const float* b, int64_t n);

// out[j] = sum over i < dim of double(x[i]) * double(rows[j * dim + i]), for j in [0, count).
void RowDotsF32InF64(const float* x, const float* rows, int64_t count, int64_t dim, double* out);

// out[i] = x[i] * w.
void ScaleF32(const float* x, float w, int64_t n, float* out);

// out[i] += x[i] * w.
void AxpyF32(const float* x, float w, int64_t n, float* out);

// True when no element of `data` (n elements of `dtype`) is NaN or infinite.
bool AllFinite(const void* data, DType dtype, int64_t n);

// The SIMD target the kernels dispatch to on this machine: "AVX3" (AVX-512), "AVX2", ...
const char* SimdTargetName();

}  // namespace dhsa::cpu

#endif  // DHSA_KERNELS_CPU_VECTOR_OPS_H_
