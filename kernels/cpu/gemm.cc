#include "kernels/cpu/gemm.h"

#include <omp.h>

#include "absl/strings/str_cat.h"
#include "oneapi/dnnl/dnnl.h"

namespace dhsa::cpu {
namespace {

dnnl_status_t Sgemm(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  return dnnl_sgemm('N', transpose_b ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace

absl::Status GemmF32(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                     int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  dnnl_status_t status;
  if (omp_in_parallel() || omp_get_max_threads() == 1) {
    // oneDNN runs single-threaded inside an active OpenMP region or when allowed one thread.
    status = Sgemm(transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    // Anywhere else it would start a team of its own: a one-thread region with a one-thread
    // limit keeps it on this thread (the limit ends with the region).
#pragma omp parallel num_threads(1)
    {
      omp_set_num_threads(1);
      status = Sgemm(transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
  }
  if (status != dnnl_success) {
    return absl::InternalError(absl::StrCat("oneDNN sgemm failed with status ",
                                            static_cast<int>(status), " for m=", m, " n=", n,
                                            " k=", k));
  }
  return absl::OkStatus();
}

}  // namespace dhsa::cpu
