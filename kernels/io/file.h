// Whole-file reads and crash-safe whole-file writes.
#ifndef DHSA_KERNELS_IO_FILE_H_
#define DHSA_KERNELS_IO_FILE_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dhsa {

// Reads the whole file at `path`. Errors carry the path and the OS reason (NotFound,
// PermissionDenied, ... mapped from errno; a directory gives FailedPrecondition).
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `contents` to a temporary file in the directory of `path`, fsyncs it, then renames it over
// `path` (and fsyncs the directory), so readers see either the old file or the complete new one,
// never a half-written one. On failure the temporary file is removed and `path` is untouched.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);

}  // namespace dhsa

#endif  // DHSA_KERNELS_IO_FILE_H_
