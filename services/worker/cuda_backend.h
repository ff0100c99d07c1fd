// The worker's CUDA backend (services/worker/backend.h); only in builds with DHSA_WITH_CUDA.
#ifndef DHSA_SERVICES_WORKER_CUDA_BACKEND_H_
#define DHSA_SERVICES_WORKER_CUDA_BACKEND_H_

#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cuda/selection_csr.h"
#include "services/worker/backend.h"

namespace dhsa {

// On the calling thread's current device (device 0 unless CUDA_VISIBLE_DEVICES says otherwise).
// FailedPrecondition when no device is usable.
absl::StatusOr<std::unique_ptr<WorkerBackend>> CreateCudaWorkerBackend();

// For every stripe of `keys` that some span reaches, (stripe index, the CSR of `selection`
// (kKvHeadBlock) for absolute query blocks [first_block, first_block + num_blocks) cut to the
// stripe's held positions below q_end): SelectionToCsr(SelectionForStripe(selection, first_block,
// num_blocks, s.begin, min(s.end(), q_end))) for each stripe with a span left, in stripe order,
// built in one pass over the spans (the per-stripe cuts cost O(stripes x spans): 0.5 s for 32
// stripes of a 128K-token prefill at q_block 16). Errors as SelectionToCsr.
absl::StatusOr<std::vector<std::pair<size_t, SelectionCsr>>> StripeSelectionCsrs(
    const Selection& selection, int64_t first_block, int64_t num_blocks, const LayerSnapshot& keys,
    int64_t q_end);

// Total and free memory of the current device.
absl::StatusOr<DeviceMemoryInfo> CudaDeviceMemory();

}  // namespace dhsa

#endif  // DHSA_SERVICES_WORKER_CUDA_BACKEND_H_
