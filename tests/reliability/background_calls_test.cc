// The router's worker pool never destroys a channel while a call it started on it is pending: gRPC
// (1.51) aborts the process then ("ref_counted.h:183 assertion failed: prior > 0", seen by a CI run
// at the exit of stall_test). Drop, Truncate and the shared-memory DetachArena calls are the pool's
// background calls: ~WorkerPool gives them a grace period, cancels the rest, and returns only when
// every one has ended. A fake worker here holds those calls until they are cancelled, so a pool
// that did not wait would return with them still pending.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/router/worker_calls.h"
#include "services/router/workers.h"

namespace dhsa::reliability_test {
namespace {

using namespace std::chrono_literals;

// A Worker that answers Stats and AttachArena at once and holds every Drop, Truncate and
// DetachArena until the caller cancels it (or its deadline passes).
class HoldingWorker final : public v1::Worker::CallbackService {
 public:
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context, const v1::StatsRequest*,
                                  v1::StatsResponse* response) override {
    response->set_capacity_bytes(int64_t{1} << 30);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerUnaryReactor* AttachArena(grpc::CallbackServerContext* context,
                                        const v1::AttachArenaRequest* request,
                                        v1::AttachArenaResponse* response) override {
    response->mutable_arena()->set_arena_id(request->arena_id());
    {
      std::lock_guard<std::mutex> lock(mu_);
      attached_.push_back(request->arena_id());
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerUnaryReactor* Drop(grpc::CallbackServerContext*, const v1::DropRequest* request,
                                 v1::DropResponse*) override {
    return Hold("Drop " + request->sequence_id());
  }
  grpc::ServerUnaryReactor* Truncate(grpc::CallbackServerContext*,
                                     const v1::TruncateRequest* request,
                                     v1::TruncateResponse*) override {
    return Hold("Truncate " + request->sequence_id());
  }
  grpc::ServerUnaryReactor* DetachArena(grpc::CallbackServerContext*,
                                        const v1::DetachArenaRequest* request,
                                        v1::DetachArenaResponse*) override {
    return Hold("DetachArena " + request->arena_id());
  }

  // Waits up to 10 s until `n` calls are held (started and not ended); whether they are.
  bool WaitHeld(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 10s, [&] { return held_ == n; });
  }
  // Waits up to 10 s until `n` held calls have ended (cancelled); whether they have.
  bool WaitEnded(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 10s, [&] { return static_cast<int>(ended_.size()) == n; });
  }
  std::vector<std::string> attached() {
    std::lock_guard<std::mutex> lock(mu_);
    return attached_;
  }
  std::vector<std::string> ended() {
    std::lock_guard<std::mutex> lock(mu_);
    return ended_;
  }

 private:
  class Held final : public grpc::ServerUnaryReactor {
   public:
    Held(HoldingWorker* owner, std::string what) : owner_(owner), what_(std::move(what)) {
      DHSA_HAPPENS_BEFORE(this);  // gRPC binds the reactor before any reaction.
    }
    void OnCancel() override {
      DHSA_HAPPENS_AFTER(this);
      owner_->Ended(what_);
      DHSA_HAPPENS_BEFORE(this);
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled while held"));
    }
    void OnDone() override {
      DHSA_HAPPENS_AFTER(this);
      delete this;
    }

   private:
    HoldingWorker* owner_;
    std::string what_;
  };

  grpc::ServerUnaryReactor* Hold(std::string what) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++held_;
    }
    cv_.notify_all();
    return new Held(this, std::move(what));
  }
  void Ended(const std::string& what) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      --held_;
      ended_.push_back(what);
    }
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  int held_ = 0;
  std::vector<std::string> ended_;
  std::vector<std::string> attached_;
};

struct FakeWorker {
  HoldingWorker service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  FakeWorker() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
  }
  ~FakeWorker() { server->Shutdown(std::chrono::system_clock::now()); }
};

std::unique_ptr<router::WorkerPool> StartPool(const FakeWorker& worker, transport::Mode mode) {
  router::WorkerPoolOptions o;
  o.addresses = {absl::StrCat("127.0.0.1:", worker.port)};
  o.probe_interval = std::chrono::minutes(10);  // The first probe only.
  o.probe_timeout = 300ms;                      // Also the grace of the last calls.
  o.data_plane.mode = mode;
  o.data_plane.shm_arena_bytes = 1 << 20;
  absl::StatusOr<std::unique_ptr<router::WorkerPool>> pool = router::WorkerPool::Create(o);
  EXPECT_TRUE(pool.ok()) << pool.status();
  return pool.ok() ? *std::move(pool) : nullptr;
}

// What the done callbacks of a set of calls saw.
struct Outcomes {
  std::mutex mu;
  std::map<std::string, absl::Status> done;
  std::function<void(absl::Status)> For(const std::string& what) {
    return [this, what](absl::Status s) {
      std::lock_guard<std::mutex> lock(mu);
      done.emplace(what, std::move(s));
    };
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mu);
    return done.size();
  }
};

TEST(BackgroundCallsTest, ThePoolEndsItsPendingDropsAndTruncatesBeforeItsChannelsGo) {
  FakeWorker worker;
  ASSERT_GT(worker.port, 0);
  std::unique_ptr<router::WorkerPool> pool = StartPool(worker, transport::Mode::kGrpc);
  ASSERT_NE(pool, nullptr);
  ASSERT_TRUE(pool->Loads()[0].available);
  constexpr int kCalls = 6;
  Outcomes outcomes;
  for (int i = 0; i < kCalls / 2; ++i) {
    router::DropOnWorker(*pool, 0, absl::StrCat("s", i, ".L0"), std::chrono::minutes(1),
                         outcomes.For(absl::StrCat("drop ", i)));
    router::TruncateOnWorker(*pool, 0, absl::StrCat("s", i, ".L0"), 0, 7, std::chrono::minutes(1),
                             outcomes.For(absl::StrCat("truncate ", i)));
  }
  ASSERT_TRUE(worker.service.WaitHeld(kCalls));
  EXPECT_EQ(pool->background_calls().pending(), kCalls);
  EXPECT_EQ(outcomes.size(), 0u);  // The worker holds every call: none has ended.

  pool.reset();  // Must cancel the calls and wait for them (a minute of deadline is left).
  ASSERT_EQ(outcomes.size(), static_cast<size_t>(kCalls))
      << "the pool went while calls on its channels were pending";
  for (const auto& [what, status] : outcomes.done) {
    EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << what << ": " << status;
  }
  EXPECT_TRUE(worker.service.WaitEnded(kCalls));
}

TEST(BackgroundCallsTest, ThePoolEndsItsLastArenaDetachesBeforeItsChannelsGo) {
  FakeWorker worker;
  ASSERT_GT(worker.port, 0);
  std::unique_ptr<router::WorkerPool> pool = StartPool(worker, transport::Mode::kShm);
  ASSERT_NE(pool, nullptr);
  ASSERT_NE(pool->ShmLinkOf(0), nullptr) << "no shared-memory link with the fake worker";
  const std::vector<std::string> arenas = worker.service.attached();
  ASSERT_EQ(arenas.size(), 2u);
  // The pool's destructor tells the worker to unmap both arenas; the worker holds both calls, so
  // the pool waits its grace, cancels them, and waits for them to end before the channel goes.
  pool.reset();
  ASSERT_TRUE(worker.service.WaitEnded(2));
  std::vector<std::string> ended = worker.service.ended();
  std::sort(ended.begin(), ended.end());
  std::vector<std::string> want = {"DetachArena " + arenas[0], "DetachArena " + arenas[1]};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(ended, want);
}

TEST(BackgroundCallsTest, ACallThatEndsOnItsOwnIsCountedOut) {
  FakeWorker worker;
  ASSERT_GT(worker.port, 0);
  std::unique_ptr<router::WorkerPool> pool = StartPool(worker, transport::Mode::kGrpc);
  ASSERT_NE(pool, nullptr);
  Outcomes outcomes;
  router::DropOnWorker(*pool, 0, "short.L0", 200ms, outcomes.For("drop"));
  ASSERT_TRUE(worker.service.WaitEnded(1));  // Its deadline passed on the worker.
  for (int i = 0; i < 100 && pool->background_calls().pending() != 0; ++i) {
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(pool->background_calls().pending(), 0);
  ASSERT_EQ(outcomes.size(), 1u);
  EXPECT_EQ(outcomes.done["drop"].code(), absl::StatusCode::kDeadlineExceeded)
      << outcomes.done["drop"];
}

TEST(BackgroundCallsTest, NothingStartsOnceClosed) {
  router::BackgroundCalls calls;
  calls.Close(0ms);
  bool started = false;
  absl::Status got;
  calls.Start<v1::DropResponse>(
      v1::DropRequest(), std::chrono::system_clock::now() + 1s,
      [&](grpc::ClientContext*, const v1::DropRequest*, v1::DropResponse*,
          std::function<void(grpc::Status)>) { started = true; },
      [&](absl::Status s, const v1::DropResponse&) { got = std::move(s); });
  EXPECT_FALSE(started);
  EXPECT_EQ(got.code(), absl::StatusCode::kCancelled) << got;
  EXPECT_EQ(calls.pending(), 0);
}

}  // namespace
}  // namespace dhsa::reliability_test
