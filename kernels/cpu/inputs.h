// Input validation on the fast CPU path: CheckFinite (kernels/common/inputs.h) vectorised and
// spread over heads, optionally limited to the rows new to a call.
#ifndef DHSA_KERNELS_CPU_INPUTS_H_
#define DHSA_KERNELS_CPU_INPUTS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kernels/common/tensor.h"

namespace dhsa {

// As CheckFinite over rows [first_row, t.len) of every head: InvalidArgument naming the tensor and
// the element ([head, row, column], row counted from 0) of the first non-finite value.
absl::Status CheckFiniteCpu(const HeadsView& t, absl::string_view name, int num_threads = 1,
                            int64_t first_row = 0);

}  // namespace dhsa

#endif  // DHSA_KERNELS_CPU_INPUTS_H_
