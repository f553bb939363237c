// tidepool's lock: a std::mutex with Abseil's thread-safety annotations.
//
// Why not absl::Mutex: Debian ships Abseil prebuilt, without sanitizer instrumentation, so
// ThreadSanitizer cannot see its synchronization and reports false races. std::mutex goes
// through pthreads, which every sanitizer understands, and costs the same uncontended.
#ifndef TIDEPOOL_ALLOCATOR_MUTEX_H_
#define TIDEPOOL_ALLOCATOR_MUTEX_H_

#include <mutex>

#include "absl/base/thread_annotations.h"

namespace tidepool {

class ABSL_LOCKABLE Mutex {
 public:
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  bool TryLock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) { return mu_.try_lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }

 private:
  std::mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  // Takes over a lock the caller already holds (taken by a function the analysis cannot follow,
  // such as one that picks which mutex to lock), and releases it at the end of the scope.
  MutexLock(Mutex* mu, std::adopt_lock_t) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) {}
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_MUTEX_H_
