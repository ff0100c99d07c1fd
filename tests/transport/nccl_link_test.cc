// The NCCL data plane's logic that needs no GPU: transfers run one at a time in transfer-id order
// whatever order they are posted in, a missing id or a failed transfer fails the queue (once, with
// on_fail) and everything queued or posted later, pinned host buffers are reused within the pool's
// bound, and a worker answers NCCL descriptors of a communicator it does not hold with UNAVAILABLE
// (the router then drops its link and falls back to shared memory or gRPC bytes).
#include "services/transport/nccl_link.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "dhsa/v1/worker.grpc.pb.h"
#include "gtest/gtest.h"
#include "services/worker/worker_service.h"
#include "tests/kernels/test_util.h"

namespace dhsa::transport {
namespace {

using ::dhsa::testing::FreshSeed;

// Collects done reports and waits for a number of them.
struct Reports {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<uint64_t, absl::Status>> done;

  OrderedTransfers::Done For(uint64_t id) {
    return [this, id](absl::Status s) {
      std::lock_guard<std::mutex> lock(mu);
      done.emplace_back(id, std::move(s));
      cv.notify_all();
    };
  }
  bool WaitFor(size_t n, absl::Duration timeout = absl::Seconds(20)) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, absl::ToChronoSeconds(timeout), [&] { return done.size() >= n; });
  }
};

TEST(OrderedTransfers, RunsInIdOrderWhateverThePostingOrder) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int n : {1, 2, 7, 64}) {
    std::vector<uint64_t> ids(static_cast<size_t>(n));
    std::iota(ids.begin(), ids.end(), 5);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::mutex mu;
    std::vector<uint64_t> ran;
    std::atomic<int> in_flight{0};
    bool overlapped = false;
    Reports reports;
    int failures = 0;
    {
      OrderedTransfers queue(5, absl::Seconds(30), [&](const absl::Status&) { ++failures; });
      // Posted from several threads at once.
      std::vector<std::thread> posters;
      for (int t = 0; t < 3; ++t) {
        posters.emplace_back([&, t] {
          for (size_t i = static_cast<size_t>(t); i < ids.size(); i += 3) {
            const uint64_t id = ids[i];
            queue.Post(
                id,
                [&, id] {
                  if (in_flight.fetch_add(1) != 0) overlapped = true;
                  {
                    std::lock_guard<std::mutex> lock(mu);
                    ran.push_back(id);
                  }
                  in_flight.fetch_sub(1);
                  return absl::OkStatus();
                },
                reports.For(id));
          }
        });
      }
      for (auto& p : posters) p.join();
      ASSERT_TRUE(reports.WaitFor(ids.size()));
      EXPECT_EQ(queue.next_id(), 5u + static_cast<uint64_t>(n));
      EXPECT_TRUE(queue.error().ok());
    }
    std::vector<uint64_t> want(static_cast<size_t>(n));
    std::iota(want.begin(), want.end(), 5);
    EXPECT_EQ(ran, want) << n << " transfers";
    EXPECT_FALSE(overlapped);
    EXPECT_EQ(failures, 0);
    for (const auto& [id, s] : reports.done) EXPECT_TRUE(s.ok()) << id << ": " << s;
  }
}

TEST(OrderedTransfers, AFailedTransferFailsTheQueueOnceAndEverythingAfter) {
  std::vector<absl::Status> failures;
  Reports reports;
  std::atomic<int> ran{0};
  OrderedTransfers queue(1, absl::Seconds(30),
                         [&](const absl::Status& why) { failures.push_back(why); });
  auto ok_op = [&] {
    ++ran;
    return absl::OkStatus();
  };
  // 3 and 4 wait behind 2, which fails.
  queue.Post(3, ok_op, reports.For(3));
  queue.Post(4, ok_op, reports.For(4));
  queue.Post(1, ok_op, reports.For(1));
  queue.Post(
      2, [] { return absl::UnavailableError("peer went away"); }, reports.For(2));
  ASSERT_TRUE(reports.WaitFor(4));
  EXPECT_EQ(ran.load(), 1);  // Only 1.
  ASSERT_EQ(failures.size(), 1u);
  EXPECT_EQ(failures[0].code(), absl::StatusCode::kUnavailable);
  for (const auto& [id, s] : reports.done) {
    if (id == 1) {
      EXPECT_TRUE(s.ok());
    } else {
      EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << id;
      EXPECT_NE(s.message().find("peer went away"), std::string::npos) << s;
    }
  }
  // Later posts fail at once, on the poster's thread, without running.
  queue.Post(5, ok_op, reports.For(5));
  ASSERT_TRUE(reports.WaitFor(5));
  EXPECT_EQ(reports.done.back().second.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ran.load(), 1);
  EXPECT_EQ(failures.size(), 1u);
}

TEST(OrderedTransfers, AnIdThatNeverComesFailsTheQueueWithinTheGapTimeout) {
  std::atomic<int> failures{0};
  Reports reports;
  std::atomic<int> ran{0};
  OrderedTransfers queue(1, absl::Milliseconds(200), [&](const absl::Status&) { ++failures; });
  queue.Post(
      1, [&] { return ++ran, absl::OkStatus(); }, reports.For(1));
  ASSERT_TRUE(reports.WaitFor(1));
  // Nothing is queued: no timer runs, however long it takes for 2 to come.
  absl::SleepFor(absl::Milliseconds(400));
  EXPECT_TRUE(queue.error().ok());
  // 3 waits behind 2, which never comes.
  queue.Post(
      3, [&] { return ++ran, absl::OkStatus(); }, reports.For(3));
  ASSERT_TRUE(reports.WaitFor(2));
  EXPECT_EQ(reports.done[1].first, 3u);
  EXPECT_EQ(reports.done[1].second.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(reports.done[1].second.message().find("transfer 2 never came"), std::string::npos)
      << reports.done[1].second;
  EXPECT_EQ(ran.load(), 1);
  EXPECT_EQ(failures.load(), 1);
}

TEST(OrderedTransfers, RefusesIdsAlreadyRunOrPostedTwice) {
  Reports reports;
  OrderedTransfers queue(1, absl::Seconds(30), nullptr);
  queue.Post(
      1, [] { return absl::OkStatus(); }, reports.For(1));
  ASSERT_TRUE(reports.WaitFor(1));
  queue.Post(
      1, [] { return absl::OkStatus(); }, reports.For(1));
  ASSERT_TRUE(reports.WaitFor(2));
  EXPECT_EQ(reports.done[1].second.code(), absl::StatusCode::kInternal);
  queue.Post(
      3, [] { return absl::OkStatus(); }, reports.For(3));
  queue.Post(
      3, [] { return absl::OkStatus(); }, reports.For(3));
  ASSERT_TRUE(reports.WaitFor(3));
  EXPECT_EQ(reports.done[2].second.code(), absl::StatusCode::kInternal);
  // The queue itself still works.
  EXPECT_TRUE(queue.error().ok());
  queue.Post(
      2, [] { return absl::OkStatus(); }, reports.For(2));
  ASSERT_TRUE(reports.WaitFor(5));
  for (size_t i = 3; i < 5; ++i) EXPECT_TRUE(reports.done[i].second.ok());
}

TEST(OrderedTransfers, ClosingCancelsWhatIsQueuedAndFailAbortsOnce) {
  Reports reports;
  int failures = 0;
  {
    OrderedTransfers queue(1, absl::Seconds(30), [&](const absl::Status&) { ++failures; });
    queue.Post(
        2, [] { return absl::OkStatus(); }, reports.For(2));
    queue.Fail(absl::UnavailableError("the router aborted"));
    queue.Fail(absl::UnavailableError("again"));
    ASSERT_TRUE(reports.WaitFor(1));
    EXPECT_EQ(reports.done[0].second.message(), "the router aborted");
    queue.Post(
        1, [] { return absl::OkStatus(); }, reports.For(1));
  }
  ASSERT_TRUE(reports.WaitFor(2));
  EXPECT_EQ(failures, 1);
  Reports closing;
  {
    OrderedTransfers queue(1, absl::Seconds(30), nullptr);
    queue.Post(
        7, [] { return absl::OkStatus(); }, closing.For(7));
  }
  ASSERT_TRUE(closing.WaitFor(1));
  EXPECT_EQ(closing.done[0].second.code(), absl::StatusCode::kCancelled);
}

TEST(PinnedPool, ReusesBuffersWithinItsBound) {
  std::shared_ptr<PinnedPool> pool = PinnedPool::Create(1000);
  uint8_t* first;
  {
    std::shared_ptr<PinnedBuffer> a = pool->Take(300);
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->bytes(), 300);
    EXPECT_GE(a->capacity(), 300);
    std::fill(a->data(), a->data() + a->bytes(), uint8_t{7});
    first = a->data();
  }
  EXPECT_EQ(pool->spare_bytes(), 300);
  {
    std::shared_ptr<PinnedBuffer> b = pool->Take(200);  // Fits the spare one.
    EXPECT_EQ(b->data(), first);
    EXPECT_EQ(b->bytes(), 200);
    EXPECT_EQ(pool->spare_bytes(), 0);
    std::shared_ptr<PinnedBuffer> c = pool->Take(400);  // A new one.
    EXPECT_NE(c->data(), first);
    std::shared_ptr<PinnedBuffer> big = pool->Take(5000);  // Over the bound: not kept.
    ASSERT_NE(big, nullptr);
  }
  EXPECT_EQ(pool->spare_bytes(), 700);
  {
    // The oldest spare goes when a third would pass the bound.
    std::shared_ptr<PinnedBuffer> d = pool->Take(600);
    EXPECT_EQ(pool->spare_bytes(), 700);
  }
  EXPECT_LE(pool->spare_bytes(), 1000);
  // Buffers outlive their pool.
  std::shared_ptr<PinnedBuffer> kept = pool->Take(10);
  pool.reset();
  kept->data()[0] = 1;
  kept.reset();
}

TEST(NcclDescriptor, TellsNcclFromSharedMemory) {
  v1::TensorDescriptor d;
  d.set_name("q");
  EXPECT_FALSE(IsNcclDescriptor(d));
  d.set_communicator_id("router-x/w0/1");
  EXPECT_TRUE(IsNcclDescriptor(d));
  d.mutable_shm()->set_arena_id("a");
  EXPECT_FALSE(IsNcclDescriptor(d));
}

// A worker answers descriptors of a communicator it does not hold with UNAVAILABLE (not a
// refusal that would look like the client's error).
TEST(WorkerNccl, UnknownCommunicatorIsUnavailable) {
  WorkerService::Options o;
  o.capacity_bytes = 64 << 20;
  WorkerService service(o);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = v1::Worker::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  v1::StoreKvResponse response;
  auto writer = stub->StoreKv(&context, &response);
  v1::StoreKvRequest request;
  v1::StoreKvHeader* h = request.mutable_header();
  h->set_sequence_id("s");
  h->set_layer(0);
  h->set_begin(0);
  h->set_num_tokens(4);
  h->set_kv_heads(1);
  h->set_head_dim(8);
  h->set_dtype(v1::DTYPE_FLOAT32);
  for (const char* name : {"k", "v"}) {
    v1::TensorDescriptor* d = h->add_tensors();
    d->set_name(name);
    d->set_dtype(v1::DTYPE_FLOAT32);
    d->add_shape(1);
    d->add_shape(4);
    d->add_shape(8);
    d->set_communicator_id("router-gone/w0/1");
    d->set_src_rank(0);
    d->set_dst_rank(1);
    d->set_transfer_id(name[0] == 'k' ? 1 : 2);
  }
  writer->Write(request);
  writer->WritesDone();
  const grpc::Status s = writer->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("does not hold"), std::string::npos) << s.error_message();
  server->Shutdown();
}

}  // namespace
}  // namespace dhsa::transport
