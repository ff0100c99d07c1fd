// The dhsa-worker binary: flags, startup line, and SIGTERM -> drain -> exit 0.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "dhsa/v1/worker.grpc.pb.h"

extern char** environ;

namespace dhsa {
namespace {

// A child process running the worker binary with `args`, its stdout on a pipe.
struct Child {
  pid_t pid = -1;
  FILE* out = nullptr;
};

Child Spawn(const std::vector<std::string>& args) {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::vector<std::string> all = {DHSA_WORKER_BINARY};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  Child child;
  EXPECT_EQ(posix_spawn(&child.pid, DHSA_WORKER_BINARY, &actions, nullptr, argv.data(), environ),
            0);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  child.out = fdopen(fds[0], "r");
  return child;
}

// Exit status of the child, or -1 if it did not exit normally within `timeout`.
int WaitExit(const Child& child, std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  while (waitpid(child.pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(child.pid, SIGKILL);
      waitpid(child.pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (child.out != nullptr) fclose(child.out);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(WorkerBinary, ServesUntilSigtermThenExitsZero) {
  Child child = Spawn({"--listen=127.0.0.1:0", "--threads", "1", "--capacity-bytes=1000000",
                       "--max-message-bytes", "65536", "--drain-seconds=1"});
  ASSERT_NE(child.out, nullptr);
  char line[512] = {0};
  ASSERT_NE(fgets(line, sizeof(line), child.out), nullptr);
  const std::string text = line;
  const std::string marker = "listening on port ";
  const size_t at = text.find(marker);
  ASSERT_NE(at, std::string::npos) << text;
  int port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(
      text.substr(at + marker.size(), text.find(' ', at + marker.size()) - at - marker.size()),
      &port))
      << text;

  // The channel stays open across SIGTERM, as a router's would: an idle client connection holds the
  // server's shutdown until the client notices the GOAWAY (gRPC's backup poller, ~5 s) or the drain
  // time ends, whichever is first.
  auto stub = v1::Worker::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::StatsResponse stats;
  const grpc::Status s = stub->Stats(&context, v1::StatsRequest(), &stats);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(stats.capacity_bytes(), 1000000);
  EXPECT_EQ(stats.backend(), "cpu");

  ASSERT_EQ(kill(child.pid, SIGTERM), 0);
  EXPECT_EQ(WaitExit(child, std::chrono::seconds(4)), 0);  // Drain bounded by --drain-seconds=1.
}

TEST(WorkerBinary, BadCommandLinesExitTwo) {
  for (const std::vector<std::string>& args : {std::vector<std::string>{"--no-such-flag"},
                                               {"--threads"},
                                               {"--threads=-3"},
#ifndef DHSA_TEST_WITH_CUDA  // Without CUDA in the build: a usage error.
                                               {"--backend=cuda", "--listen=127.0.0.1:0"},
#endif
                                               {"--config=/nonexistent/worker.json"}}) {
    SCOPED_TRACE(args[0]);
    Child child = Spawn(args);
    EXPECT_EQ(WaitExit(child, std::chrono::seconds(20)), 2);
  }
}

}  // namespace
}  // namespace dhsa
