// Small helpers for absl::Status propagation (Debian's Abseil predates absl's own macros).
#ifndef DHSA_KERNELS_COMMON_STATUS_MACROS_H_
#define DHSA_KERNELS_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define DHSA_CONCAT_INNER_(a, b) a##b
#define DHSA_CONCAT_(a, b) DHSA_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define DHSA_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status dhsa_status_ = (expr);        \
    if (!dhsa_status_.ok()) return dhsa_status_; \
  } while (0)

// `DHSA_ASSIGN_OR_RETURN(auto x, MakeX());` unwraps an absl::StatusOr or returns its error.
#define DHSA_ASSIGN_OR_RETURN(lhs, rexpr) \
  DHSA_ASSIGN_OR_RETURN_IMPL_(DHSA_CONCAT_(dhsa_statusor_, __LINE__), lhs, rexpr)

#define DHSA_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                \
  if (!statusor.ok()) return statusor.status();           \
  lhs = std::move(statusor).value()

#endif  // DHSA_KERNELS_COMMON_STATUS_MACROS_H_
