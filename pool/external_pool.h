// A pool whose blocks come from somewhere other than the device's caching allocator.
//
// Most pools are arenas of the caching allocator (pool_manager.h). Some memory cannot be: a
// symmetric NCCL pool (nccl/symmetric_pool.h) places its blocks by a rule every rank follows
// alike, takes its segments from ncclMemAlloc, and reuses a freed block at once, in stream order,
// none of which an arena does. Such a pool is still a pool to its users: it has a PoolId, a
// thread's allocations are routed to it with the same begin / end / release
// (tidepool_begin_allocate_current_thread_to_pool), a free of one of its blocks comes in through
// the same tidepool_free, and it answers stats, snapshot and trim like any other. The pool
// manager routes to it through this seam; whoever made it owns it and attaches it to the manager
// (PoolManager::Attach).
//
// Conventions, the caching allocator's: Free and BlockSize answer INVALID_ARGUMENT for an address
// outside the pool's memory (changing nothing), so that a pointer's owner is found by asking each
// in turn; anything else (a pointer inside a block, a freed block) is another error.
//
// Thread safety: every method may be called from any thread. An implementation never calls back
// into the pool manager (lock order: the manager's lock, then the pool's).
#ifndef TIDEPOOL_POOL_EXTERNAL_POOL_H_
#define TIDEPOOL_POOL_EXTERNAL_POOL_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/device.h"
#include "allocator/stats.h"

namespace tidepool {

class ExternalPool {
 public:
  virtual ~ExternalPool() = default;

  // A block of at least `bytes`, for use on `stream`.
  virtual absl::StatusOr<void*> Allocate(size_t bytes, Stream stream) = 0;
  // Returns a live block; INVALID_ARGUMENT for an address outside the pool.
  virtual absl::Status Free(void* ptr) = 0;
  // The size of the live block at `ptr`; INVALID_ARGUMENT for an address outside the pool.
  virtual absl::StatusOr<size_t> BlockSize(const void* ptr) const = 0;
  // Marks a live block as used on `stream` as well.
  virtual absl::Status RecordStream(void* ptr, Stream stream) = 0;
  // Gives back the memory no live block uses.
  virtual absl::Status Trim() = 0;
  virtual AllocatorStats Stats() const = 0;
  // The pool's segments and blocks, as JSON.
  virtual std::string SnapshotJson() const = 0;
};

}  // namespace tidepool

#endif  // TIDEPOOL_POOL_EXTERNAL_POOL_H_
