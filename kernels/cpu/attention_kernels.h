// The vector steps of CPU sparse attention between its two GEMMs: the online-softmax update of a
// panel of query rows after one group of keys, and the final normalisation. Highway, dispatched at
// run time (AVX2, AVX-512, portable fallback).
#ifndef DHSA_KERNELS_CPU_ATTENTION_KERNELS_H_
#define DHSA_KERNELS_CPU_ATTENTION_KERNELS_H_

#include <cstdint>

namespace dhsa::cpu {

// Scaled scores of one key group are laid out for `rows` query rows as s[r * lds + j], j < width,
// width a multiple of kScoreAlign, masked keys (and padding) holding -inf. For each row r:
// m' = max(m[r], max_j s); s becomes exp(s - m') (0 where masked); l[r] = l[r] * exp(m[r] - m') +
// sum_j s; o[r * ldo + 0..d) *= exp(m[r] - m'); m[r] = m'. A row that has seen no key keeps
// m = -inf, l = 0 and gets s = 0.
void SoftmaxStep(float* s, int64_t rows, int64_t lds, int64_t width, float* m, float* l, float* o,
                 int64_t ldo, int64_t d);

// Score columns are padded to a multiple of this (the widest vector, 16 floats).
inline constexpr int64_t kScoreAlign = 16;

// out = acc / l (d floats). Callers handle l = 0 (a row without keys) themselves.
void NormaliseRow(const float* acc, float l, int64_t d, float* out);

}  // namespace dhsa::cpu

#endif  // DHSA_KERNELS_CPU_ATTENTION_KERNELS_H_
