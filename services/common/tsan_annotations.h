#ifndef DHSA_SERVICES_COMMON_TSAN_ANNOTATIONS_H_
#define DHSA_SERVICES_COMMON_TSAN_ANNOTATIONS_H_

// Happens-before edges for ThreadSanitizer where gRPC hands our objects from one thread to another.
//
// gRPC orders a reactor's Start* call (StartRead, StartWrite, Finish, ...) before the reaction that
// reports it (OnReadDone, OnWriteDone, OnDone), and an async unary call before its callback, but it
// does so inside libgrpc, with abseil's and its own atomics. Debian's libraries are not built with
// -fsanitize=thread, so TSan never sees that order and reports every field the reactor touches on
// both sides as a race. These macros state, in our code, exactly the order gRPC documents:
//   DHSA_HAPPENS_BEFORE(p) right before handing p's owner to gRPC, and
//   DHSA_HAPPENS_AFTER(p) first thing in the callback where gRPC hands it back (same p);
//   GrpcHandover<Reactor> for reactors: every Start* call and Finish releases, and each reaction
//   the reactor overrides begins with DHSA_GRPC_READ_DONE(this) (OnReadDone),
//   DHSA_GRPC_WRITE_DONE(this) (OnWriteDone, OnWritesDoneDone) or DHSA_GRPC_DONE(this) (OnDone).
//   Reads and writes of a stream are independent in gRPC, so they are separate edges: a read's
//   reaction is ordered after the StartRead calls, not after a concurrent StartWrite. OnCancel may
//   come at any time after gRPC has the reactor: only the reactor's construction is ordered
//   before it (DHSA_GRPC_BOUND(this) first thing in the constructor's body, after the members are
//   initialized; DHSA_GRPC_CANCELLED(this) first thing in OnCancel).
// Without -fsanitize=thread all of it is nothing (GrpcHandover<R> is R), and it orders only what
// gRPC orders: a field touched after StartRead that OnReadDone also touches is still reported.

#if defined(__SANITIZE_THREAD__)
#define DHSA_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define DHSA_TSAN 1
#endif
#endif

#ifdef DHSA_TSAN
#include <utility>

extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);

namespace dhsa::tsan {

// The edges' keys: the reactor's address for the call, +1 for its reads, +2 for its writes, +3
// for its construction.
enum Edge { kCall = 0, kRead = 1, kWrite = 2, kBound = 3 };
inline void* Key(const volatile void* p, int edge) {
  return const_cast<char*>(static_cast<const volatile char*>(p)) + edge;
}

}  // namespace dhsa::tsan

#define DHSA_HAPPENS_BEFORE(addr) __tsan_release(::dhsa::tsan::Key((addr), ::dhsa::tsan::kCall))
#define DHSA_HAPPENS_AFTER(addr) __tsan_acquire(::dhsa::tsan::Key((addr), ::dhsa::tsan::kCall))
#define DHSA_GRPC_READ_DONE(reactor) \
  __tsan_acquire(::dhsa::tsan::Key((reactor), ::dhsa::tsan::kRead))
#define DHSA_GRPC_WRITE_DONE(reactor) \
  __tsan_acquire(::dhsa::tsan::Key((reactor), ::dhsa::tsan::kWrite))
#define DHSA_GRPC_BOUND(reactor) __tsan_release(::dhsa::tsan::Key((reactor), ::dhsa::tsan::kBound))
#define DHSA_GRPC_CANCELLED(reactor) \
  __tsan_acquire(::dhsa::tsan::Key((reactor), ::dhsa::tsan::kBound))
#define DHSA_GRPC_DONE(reactor)                                         \
  do {                                                                  \
    __tsan_acquire(::dhsa::tsan::Key((reactor), ::dhsa::tsan::kCall));  \
    __tsan_acquire(::dhsa::tsan::Key((reactor), ::dhsa::tsan::kRead));  \
    __tsan_acquire(::dhsa::tsan::Key((reactor), ::dhsa::tsan::kWrite)); \
  } while (false)

namespace dhsa {

// A gRPC reactor (server or client, any streaming kind) whose Start* calls and Finish release the
// edges above. The key is the reactor's address: it must be the derived class's first base.
template <class Reactor>
class GrpcHandover : public Reactor {
 public:
  template <class... Args>
  void StartCall(Args&&... args) {
    __tsan_release(tsan::Key(this, tsan::kCall));
    Reactor::StartCall(std::forward<Args>(args)...);
  }
  template <class... Args>
  void StartRead(Args&&... args) {
    __tsan_release(tsan::Key(this, tsan::kRead));
    Reactor::StartRead(std::forward<Args>(args)...);
  }
  template <class... Args>
  void StartWrite(Args&&... args) {
    __tsan_release(tsan::Key(this, tsan::kWrite));
    Reactor::StartWrite(std::forward<Args>(args)...);
  }
  template <class... Args>
  void StartWriteLast(Args&&... args) {
    __tsan_release(tsan::Key(this, tsan::kWrite));
    Reactor::StartWriteLast(std::forward<Args>(args)...);
  }
  template <class... Args>
  void StartWritesDone(Args&&... args) {
    __tsan_release(tsan::Key(this, tsan::kWrite));
    Reactor::StartWritesDone(std::forward<Args>(args)...);
  }
  template <class... Args>
  void Finish(Args&&... args) {
    __tsan_release(tsan::Key(this, tsan::kCall));
    Reactor::Finish(std::forward<Args>(args)...);
  }
};

}  // namespace dhsa

#else
#define DHSA_HAPPENS_BEFORE(addr) static_cast<void>(0)
#define DHSA_HAPPENS_AFTER(addr) static_cast<void>(0)
#define DHSA_GRPC_READ_DONE(reactor) static_cast<void>(0)
#define DHSA_GRPC_WRITE_DONE(reactor) static_cast<void>(0)
#define DHSA_GRPC_BOUND(reactor) static_cast<void>(0)
#define DHSA_GRPC_CANCELLED(reactor) static_cast<void>(0)
#define DHSA_GRPC_DONE(reactor) static_cast<void>(0)

namespace dhsa {
template <class Reactor>
using GrpcHandover = Reactor;
}  // namespace dhsa
#endif

#endif  // DHSA_SERVICES_COMMON_TSAN_ANNOTATIONS_H_
