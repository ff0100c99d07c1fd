// A fixed pool of threads running submitted tasks in FIFO order: where request handlers put heavy
// work so that no gRPC thread ever blocks on it.
#ifndef DHSA_SERVICES_COMMON_EXECUTOR_H_
#define DHSA_SERVICES_COMMON_EXECUTOR_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dhsa {

class Executor {
 public:
  // Starts `threads` (>= 1; less is taken as 1) worker threads.
  explicit Executor(int threads);
  // Runs every task already submitted, then joins the threads.
  ~Executor();

  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `task`; it runs on one of the pool's threads. Tasks must not throw.
  void Submit(std::function<void()> task);

  int num_threads() const { return static_cast<int>(threads_.size()); }
  // Tasks running or queued right now (a load hint for callers sizing their own parallelism).
  int pending() const;

 private:
  void Loop();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // Guarded by mu_.
  int running_ = 0;                          // Guarded by mu_.
  bool stopping_ = false;                    // Guarded by mu_.
  std::vector<std::thread> threads_;
};

}  // namespace dhsa

#endif  // DHSA_SERVICES_COMMON_EXECUTOR_H_
