#include "kernels/io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>

#include "absl/strings/str_cat.h"

namespace dhsa {
namespace {

absl::Status ErrnoError(int err, absl::string_view what, const std::string& path) {
  return absl::ErrnoToStatus(err, absl::StrCat("cannot ", what, " '", path, "'"));
}

// Closes `fd` on scope exit unless released.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  int Release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// Writes all of `data` to `fd`, retrying on short writes and EINTR. Returns 0 or an errno value.
int WriteAll(int fd, absl::string_view data) {
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  return 0;
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return ErrnoError(errno, "open", path);
  FdCloser closer(fd);

  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError(errno, "stat", path);
  if (S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot read '", path, "': it is a directory; pass a file"));
  }

  std::string out;
  // The size is only a hint (the file may change, or be a pipe); never trust it for more than a
  // reservation of what fstat reports for a regular file.
  if (S_ISREG(st.st_mode) && st.st_size > 0) out.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "read", path);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents) {
  if (path.empty()) return absl::InvalidArgumentError("cannot write a file with an empty path");
  if (path.back() == '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot write '", path, "': the path names a directory; add a file name"));
  }
  const size_t slash = path.rfind('/');
  const std::string dir =
      slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);

  // A hidden, unique sibling of the target (same directory, hence same filesystem for rename).
  static std::atomic<uint64_t> counter{0};
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    tmp = absl::StrCat(dir == "/" ? "" : dir, "/.", base, ".tmp.", ::getpid(), ".",
                       counter.fetch_add(1));
    do {
      fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0 && errno != EEXIST) {
      const int err = errno;
      return absl::ErrnoToStatus(
          err, absl::StrCat("cannot write '", path, "' (creating a temporary file in '", dir,
                            "' failed; does the directory exist and is it writable?)"));
    }
  }
  if (fd < 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("cannot write '", path, "': could not pick an unused temporary name"));
  }

  auto fail = [&](int err, absl::string_view what) {
    ::unlink(tmp.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat("cannot write '", path, "' (", what, ")"));
  };
  {
    FdCloser closer(fd);
    if (const int err = WriteAll(fd, contents); err != 0) return fail(err, "write");
    if (::fsync(fd) != 0) return fail(errno, "fsync");
    if (::close(closer.Release()) != 0) return fail(errno, "close");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return fail(errno, "rename");

  // Make the rename itself durable. Failure here does not un-write the file, so it is ignored.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

}  // namespace dhsa
