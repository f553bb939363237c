// Per-thread state that every other thread-exit destructor can still use.
//
// Programs free memory from `thread_local` destructors (runtimes destroy their tensors there),
// and the C API promises that every call works from any thread at any time. A `thread_local`
// object with a destructor of its own would break that promise: C++ destroys a thread's
// thread_local objects in the reverse order of their construction, so a destructor that runs
// after tidepool's state was destroyed would touch freed memory.
//
// ThreadExitSafe<T> keeps the calling thread's T on the heap, owned by a POSIX thread-specific
// key, and reachable through a trivial thread_local pointer (no guard, no destructor: one load on
// the hot path). glibc runs every C++ thread_local destructor of a thread before any key
// destructor, so the T outlives all of them. If a later key destructor (another library's) calls
// tidepool after T was destroyed, Get() makes a new T and sets the key again, and glibc destroys
// it in its next round (it makes up to PTHREAD_DESTRUCTOR_ITERATIONS rounds). T's destructor runs
// with the pointer already cleared, so whatever it calls sees no state rather than a dying one.
//
// The main thread's T is never destroyed: exit() runs no key destructors.
#ifndef TIDEPOOL_ALLOCATOR_THREAD_EXIT_SAFE_H_
#define TIDEPOOL_ALLOCATOR_THREAD_EXIT_SAFE_H_

#include <pthread.h>

#include "absl/base/attributes.h"

namespace tidepool {

template <typename T>
class ThreadExitSafe {
 public:
  // The calling thread's T, made on first use.
  static T& Get() {
    if (ABSL_PREDICT_FALSE(current_ == nullptr)) return Make();
    return *current_;
  }
  // The calling thread's T, or nullptr if it has none (yet, or any more).
  static T* Find() { return current_; }

 private:
  struct Key {
    bool made = false;
    pthread_key_t key{};
  };

  ABSL_ATTRIBUTE_NOINLINE static T& Make() {
    T* made = new T();
    // Without a key (the process has used up its keys) the T is left to the process: it is
    // never destroyed, a leak rather than a use after free.
    if (const Key& key = TheKey(); key.made) pthread_setspecific(key.key, made);
    current_ = made;
    return *made;
  }
  static void Destroy(void* state) {
    current_ = nullptr;
    delete static_cast<T*>(state);
  }
  static const Key& TheKey() {
    static const Key key = [] {
      Key created;
      created.made = pthread_key_create(&created.key, &Destroy) == 0;
      return created;
    }();
    return key;
  }

  static inline thread_local T* current_ = nullptr;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_THREAD_EXIT_SAFE_H_
