// Shared pieces of the fault tests: a sequence whose every answer is checked against the in-process
// reference, the router's view of a worker's readiness, and a TCP proxy that can cut the path
// between the router and a worker.
#ifndef DHSA_TESTS_RELIABILITY_FAULT_UTIL_H_
#define DHSA_TESTS_RELIABILITY_FAULT_UTIL_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "services/router/router.h"
#include "tests/router/service_test_util.h"

namespace dhsa::reliability_test {

// Waits up to 10 s for worker `w` to be (un)available in the router's view.
inline bool WaitAvailable(router::RouterServer& r, int w, bool available) {
  for (int i = 0; i < 100; ++i) {
    if (r.service().pool().Loads()[static_cast<size_t>(w)].available == available) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

// A one-layer sequence (Hq 4, Hkv 2, d 32, dense) with its inputs; every answer it gets is checked
// against AttendReference over the same keys.
class CheckedSequence {
 public:
  static constexpr int64_t kMaxLen = 160;

  CheckedSequence(Client& client, const std::string& id, uint64_t seed)
      : rng_(seed), in_(router_test::MakeInputs(rng_, 4, 2, kMaxLen, 32)) {
    config_ = router_test::SmallConfig(Policy::kDense);
    SequenceOptions so;
    so.q_heads = 4;
    so.kv_heads = 2;
    so.head_dim = 32;
    so.config = config_;
    so.id = id;
    absl::StatusOr<Sequence> seq = client.CreateSequence(so);
    EXPECT_TRUE(seq.ok()) << seq.status();
    if (seq.ok()) seq_.emplace(*std::move(seq));
  }

  Sequence& seq() { return *seq_; }
  int64_t length() const { return len_; }

  // Prefills positions [0, len) and checks the answer.
  void Prefill(int64_t len) {
    ASSERT_TRUE(seq_.has_value());
    absl::StatusOr<PrefillOutput> got =
        seq_->Prefill(0, router_test::Rows(in_.q, 0, len), router_test::Rows(in_.k, 0, len),
                      router_test::Rows(in_.v, 0, len), true);
    ASSERT_TRUE(got.ok()) << got.status();
    absl::StatusOr<AttendResult> want =
        AttendReference(router_test::Rows(in_.q, 0, len), router_test::Rows(in_.k, 0, len),
                        router_test::Rows(in_.v, 0, len), config_);
    ASSERT_TRUE(want.ok()) << want.status();
    router_test::ExpectMatches(*got, *want, true, "prefill of " + seq_->id());
    boundaries_ = want->boundaries;
    len_ = len;
  }

  // Decodes the next position; on success checks the answer against the reference and advances.
  absl::Status Decode() {
    if (!seq_.has_value()) return absl::InternalError("no sequence");
    if (len_ + 1 > kMaxLen) return absl::InternalError("CheckedSequence: out of inputs");
    const int64_t end = len_ + 1;
    absl::StatusOr<DecodeOutput> got =
        seq_->Decode(0, router_test::Rows(in_.q, len_, end), router_test::Rows(in_.k, len_, end),
                     router_test::Rows(in_.v, len_, end), true);
    if (!got.ok()) return got.status();
    AttendOptions decode;
    decode.prior_boundaries = &boundaries_;
    decode.decode = true;
    absl::StatusOr<AttendResult> want =
        AttendReference(router_test::Rows(in_.q, len_, end), router_test::Rows(in_.k, 0, end),
                        router_test::Rows(in_.v, 0, end), config_, decode);
    if (!want.ok()) return want.status();
    router_test::ExpectMatches(*got, *want, true,
                               seq_->id() + " decode at " + std::to_string(len_));
    EXPECT_EQ(got->length, end);
    boundaries_ = want->boundaries;
    len_ = end;
    return absl::OkStatus();
  }

  // The addresses of the workers holding the sequence's keys.
  std::vector<std::string> Workers() {
    absl::StatusOr<v1::SequenceInfo> info = seq_->Info();
    EXPECT_TRUE(info.ok()) << info.status();
    if (!info.ok()) return {};
    return {info->workers().begin(), info->workers().end()};
  }

 private:
  std::mt19937_64 rng_;
  router_test::Inputs in_;
  DhsaConfig config_;
  std::optional<Sequence> seq_;
  std::vector<int64_t> boundaries_;
  int64_t len_ = 0;
};

// Decodes the next position of `seq` (checked), retrying for up to 10 s while its layer is still
// busy with the rollback of an earlier failed call (FAILED_PRECONDITION "in flight").
inline absl::Status DecodeWhenLayerFree(CheckedSequence& seq) {
  absl::Status status = seq.Decode();
  for (int i = 0; i < 200 && status.code() == absl::StatusCode::kFailedPrecondition &&
                  absl::StrContains(status.message(), "in flight");
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    status = seq.Decode();
  }
  return status;
}

// A TCP proxy on 127.0.0.1 in front of 127.0.0.1:target_port, one thread polling every socket.
// Modes: kForward passes bytes both ways; kRefuse closes every connection at once and every new
// one as soon as it is accepted (a peer that went away: the router sees the connection drop);
// kBlackhole keeps the connections but drops every byte both ways (a silent partition: nothing
// answers, nothing closes). Going back to kForward closes the connections that lived through a
// blackhole (their streams lost bytes), like a NAT entry flushed on a path's return.
class TcpProxy {
 public:
  enum class Mode { kForward, kRefuse, kBlackhole };

  explicit TcpProxy(int target_port) : target_port_(target_port) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in a = Loopback(0);
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        listen(listen_fd_, 64) != 0) {
      ADD_FAILURE() << "TcpProxy: cannot listen on 127.0.0.1";
      return;
    }
    socklen_t len = sizeof(a);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { Loop(); });
  }
  ~TcpProxy() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    close(listen_fd_);
  }
  TcpProxy(const TcpProxy&) = delete;
  TcpProxy& operator=(const TcpProxy&) = delete;

  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  void SetMode(Mode mode) {
    mode_ = static_cast<int>(mode);
    ++generation_;
  }

 private:
  struct Pair {
    int a = -1;  // Accepted from the router.
    int b = -1;  // Connected to the target.
  };

  static sockaddr_in Loopback(int port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
  }
  static void ClosePair(Pair& p) {
    close(p.a);
    close(p.b);
    p.a = p.b = -1;
  }
  static bool WriteAll(int fd, const char* data, ssize_t n) {
    while (n > 0) {
      const ssize_t w = send(fd, data, static_cast<size_t>(n), MSG_NOSIGNAL);
      if (w <= 0) return false;
      data += w;
      n -= w;
    }
    return true;
  }

  void Loop() {
    std::vector<Pair> pairs;
    int seen = 0;
    std::vector<char> buffer(1 << 16);
    while (!stop_) {
      const Mode mode = static_cast<Mode>(mode_.load());
      if (const int g = generation_.load(); g != seen) {
        seen = g;
        if (mode != Mode::kBlackhole) {
          for (Pair& p : pairs) ClosePair(p);
          pairs.clear();
        }
      }
      std::vector<pollfd> fds;
      fds.push_back({listen_fd_, POLLIN, 0});
      for (const Pair& p : pairs) {
        fds.push_back({p.a, POLLIN, 0});
        fds.push_back({p.b, POLLIN, 0});
      }
      if (poll(fds.data(), fds.size(), 20) <= 0) continue;
      for (size_t i = 0; i < pairs.size(); ++i) {
        for (int side = 0; side < 2; ++side) {
          Pair& p = pairs[i];
          if (p.a < 0 || (fds[1 + 2 * i + side].revents & (POLLIN | POLLHUP | POLLERR)) == 0) {
            continue;
          }
          const int from = side == 0 ? p.a : p.b;
          const int to = side == 0 ? p.b : p.a;
          const ssize_t n = read(from, buffer.data(), buffer.size());
          if (n <= 0 || (mode == Mode::kForward && !WriteAll(to, buffer.data(), n))) {
            ClosePair(p);
          }
        }
      }
      pairs.erase(std::remove_if(pairs.begin(), pairs.end(), [](const Pair& p) { return p.a < 0; }),
                  pairs.end());
      if (fds[0].revents & POLLIN) {
        Pair p;
        p.a = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (p.a < 0) continue;
        if (mode == Mode::kRefuse) {
          close(p.a);
          continue;
        }
        p.b = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in t = Loopback(target_port_);
        if (connect(p.b, reinterpret_cast<sockaddr*>(&t), sizeof(t)) != 0) {
          ClosePair(p);
          continue;
        }
        pairs.push_back(p);
      }
    }
    for (Pair& p : pairs) ClosePair(p);
  }

  int target_port_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<int> mode_{static_cast<int>(Mode::kForward)};
  std::atomic<int> generation_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace dhsa::reliability_test

#endif  // DHSA_TESTS_RELIABILITY_FAULT_UTIL_H_
