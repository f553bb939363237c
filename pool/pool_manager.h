// The pools of one device, and the routing table that sends each allocation to one of them.
//
// A pool is an arena of the device's caching allocator (its own segments, free lists, stats and
// segment source) with an identity (PoolId) and a reference count. Routing entries say which
// allocations go to which pool; they are searched newest first, and the first whose filter
// matches wins; no match means the default pool. The semantics, each rule with its reason, are
// in docs/pools.md. In short:
//
//   Begin(pool, filter)  creates the pool if needed (or revives a released one whose blocks are
//                        still live), adds a reference, and pushes a routing entry.
//   End(pool)            pops that entry (the calling thread's own newest one for the pool,
//                        else the newest other entry for it); the reference stays.
//   Release(pool)        drops a reference. At zero the pool's free memory goes back to its
//                        source, and the pool is gone once its last live block is freed.
//
// A pool may instead be an external pool (external_pool.h: a symmetric NCCL pool, say), made by
// its owner and attached here (Attach), so that routing, stats, snapshot and trim reach it like
// any other pool; its blocks come from it, not from an arena.
//
// A block always returns to the pool it came from, whatever routing is active when it is
// freed. Routing never changes reuse rules. Every misuse (End without Begin, Release of an
// unknown pool or of one with no references left, Release that would drop the last reference
// while the pool is still routed) returns an error and changes nothing.
//
// Cost: with no routing entry anywhere, Allocate pays one relaxed atomic load. Current-thread
// entries live in thread-local storage and are read without a lock; the other entries are
// copied to a per-thread snapshot whenever they change (a version counter tells).
//
// A thread that exits with current-thread entries still open has them ended, and the reference
// each Begin took released, as a scope would have done (docs/pools.md).
//
// Thread safety: every method may be called from any thread. Lock order: mu_, then the
// allocator's locks (the allocator never calls back into the manager).
#ifndef TIDEPOOL_POOL_POOL_MANAGER_H_
#define TIDEPOOL_POOL_POOL_MANAGER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/device.h"
#include "allocator/mutex.h"
#include "allocator/segment_source.h"
#include "allocator/stats.h"
#include "pool/external_pool.h"
#include "pool/pool_id.h"
#include "pool/route.h"

namespace tidepool {

// How a pool is made, when Begin creates it.
struct PoolOptions {
  // Where its segments come from (must outlive the pool); nullptr: the device.
  SegmentSource* source = nullptr;
  // Whether its free memory may be taken back for other pools, EmptyCache and out-of-memory
  // recovery (false for a CUDA graph's private pool).
  bool shares_free_memory = true;
};

// What Info() says of a pool.
struct PoolInfo {
  int64_t references = 0;
  int64_t routes = 0;       // routing entries pointing at it
  int64_t live_blocks = 0;
  bool released = false;    // references reached zero; gone once its last block is freed
  bool gone = false;        // released, and its last block freed: its memory has gone back
};

class PoolManager {
 public:
  // Manages the pools of `allocator`'s device; `allocator` must outlive the manager.
  explicit PoolManager(CachingAllocator* allocator);
  ~PoolManager();
  PoolManager(const PoolManager&) = delete;
  PoolManager& operator=(const PoolManager&) = delete;

  // Creates a new pool with `options` and one reference, and no routing entry (PyTorch's
  // MemPool(allocator=...)); ALREADY_EXISTS if the device has had this pool id.
  absl::Status Create(PoolId pool, const PoolOptions& options) ABSL_LOCKS_EXCLUDED(mu_);
  // Attaches an external pool under a new id, with one reference (its owner's) and no routing
  // entry; ALREADY_EXISTS as for Create. The manager keeps `pool` until it is destroyed itself,
  // so a pointer to it stays valid whatever the owner does; the owner closes it (its memory
  // given back, its allocations refused) and drops its reference with Detach when done. Release
  // never drops that last reference (FAILED_PRECONDITION): only the owner can end the pool. A
  // detached pool is not begun again (FAILED_PRECONDITION).
  absl::Status Attach(PoolId id, std::shared_ptr<ExternalPool> pool) ABSL_LOCKS_EXCLUDED(mu_);
  // The owner's end of an external pool: drops its reference. FAILED_PRECONDITION, changing
  // nothing, while anything else holds the pool (a route, a begin's reference); NOT_FOUND for an
  // id that is not an attached, undetached external pool.
  absl::Status Detach(PoolId id) ABSL_LOCKS_EXCLUDED(mu_);
  // The external pool that holds `ptr` in a live block (or inside one), for a free, a size or a
  // record_stream that no arena answers. INVALID_ARGUMENT when none does. Cheap when the device
  // has no external pool (one atomic load).
  absl::StatusOr<ExternalPool*> ExternalOwnerOf(const void* ptr) ABSL_LOCKS_EXCLUDED(mu_);
  // Whether any external pool was ever attached (one relaxed read).
  bool has_external() const { return external_count_.load(std::memory_order_relaxed) != 0; }
  // A pool with a graph id ({n, 0}) never shares its free memory, whatever `options` say.
  absl::Status Begin(PoolId pool, const RouteFilter& filter, const PoolOptions& options = {})
      ABSL_LOCKS_EXCLUDED(mu_);
  // Begin on a pool that something holds already, checked and done as one step: NOT_FOUND for
  // a pool the device has never had, FAILED_PRECONDITION for one with no references left (it is
  // not revived). For sharing a graph pool, whose last holder may be going away on another thread.
  absl::Status BeginHeld(PoolId pool, const RouteFilter& filter) ABSL_LOCKS_EXCLUDED(mu_);
  // BeginHeld's refusals without the begin: what a capture checks before it marks the device.
  absl::Status CheckHeld(PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status End(PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends the newest route to `pool` whose filter is exactly `filter` (for a current-thread
  // filter, this thread's): what a capture uses, since two captures may route to one pool.
  absl::Status End(PoolId pool, const RouteFilter& filter) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Release(PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);

  // The sequence the next routing entry will have: entries begun later have larger ones.
  uint64_t NextRouteSequence() ABSL_LOCKS_EXCLUDED(mu_);
  // For a capture whose own route was ended by hand (graph/capture.h): ends this thread's newest
  // current-thread route to `pool` with a sequence of at least `since`, the capture's route
  // resumed, and drops the reference its Begin took. Does nothing (OK) if there is none.
  absl::Status EndResumedRoute(PoolId pool, uint64_t since) ABSL_LOCKS_EXCLUDED(mu_);

  // An allocation, routed. A route to a pool released while still routed (by another thread's
  // Release) gives FAILED_PRECONDITION naming the pool. Takes mu_ only to refresh this thread's
  // copy of the stream, capture and everyone routes after they changed.
  absl::StatusOr<void*> Allocate(size_t bytes, Stream stream) ABSL_LOCKS_EXCLUDED(mu_);
  // The pool Allocate would use for `stream` on this thread now.
  absl::StatusOr<PoolId> RouteOf(Stream stream) ABSL_LOCKS_EXCLUDED(mu_);
  // The pool a live block came from.
  absl::StatusOr<PoolId> PoolOf(const void* ptr) ABSL_LOCKS_EXCLUDED(mu_);

  // Returns the pool's whole free segments and chunks to their source (an external pool's
  // Trim, called without the manager's lock: it may be collective). Refused
  // (FAILED_PRECONDITION) for a graph pool that still has references: a graph that holds it may
  // replay into any of its memory.
  absl::Status Trim(PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<AllocatorStats> Stats(PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<std::string> Snapshot(PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<PoolInfo> Info(PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);

  CachingAllocator* allocator() const { return allocator_; }

  // Internal (public for the thread-local storage in pool_manager.cc) ----------------------
  struct Pool {
    Pool(PoolId id, const PoolOptions& options, size_t index,
         std::shared_ptr<ExternalPool> external = nullptr)
        : id(id), options(options), index(index), external(std::move(external)) {}

    const PoolId id;
    const PoolOptions options;
    // The pool's place in creation order: its counts are the manager's counts_[index].
    const size_t index;
    // Set for an external pool, whose blocks come from it (no arena then); kept for the
    // manager's life, so Allocate reads it without mu_.
    const std::shared_ptr<ExternalPool> external;
    // Replaced when a pool that was gone is begun again; read by Allocate without mu_.
    std::atomic<Arena*> arena{nullptr};
  };

  // A routing entry. Pools are never deleted while the manager lives, so the pointer is stable.
  struct Route {
    uint64_t sequence;  // newer entries have larger sequences
    RouteFilter filter;
    Pool* pool;
  };
  // Called at thread exit for the current-thread routes that thread left open.
  void EndThreadRoutes(const std::vector<Route>& routes) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // What mu_ guards of one pool. Kept here, at Pool::index in counts_, rather than in Pool: an
  // annotation inside the nested Pool can name only a lock reached from the Pool itself, so
  // ABSL_GUARDED_BY(mu_) there would mean a Pool's own `mu_`, not this manager's.
  struct PoolCounts {
    int64_t references = 0;
    int64_t routes = 0;  // routing entries pointing at the pool
    // References dropped because the thread that began a route exited with it open (for the
    // message of a release that then finds none left).
    int64_t dropped_at_thread_exit = 0;
  };

  Pool* FindPool(PoolId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes pool `id` with its arena and no references (Create's and Begin's first half); on error
  // nothing has changed.
  absl::StatusOr<Pool*> NewPool(PoolId id, const PoolOptions& options)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Pushes a routing entry to `pool` and takes a reference (Begin's second half).
  void AddRoute(Pool& pool, const RouteFilter& filter) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives `pool` a new arena made from its options.
  absl::Status MakeArena(Pool& pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Pool*> KnownPool(PoolId id, const char* operation)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // KnownPool for a begin, also refusing a pool that nothing holds.
  absl::StatusOr<Pool*> HeldPool(PoolId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Trim of an arena pool (a graph pool's refusal included).
  absl::Status TrimArena(Pool& pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The refusal of `operation` on an external pool its owner released.
  absl::Status ReleasedExternal(const Pool& pool, const char* operation) const;
  // Drops one reference; retires the arena at zero.
  absl::Status DropReference(Pool& pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // End of the newest route to `pool` that `filter` matches exactly (nullptr: any filter).
  absl::Status EndMatching(PoolId pool, const RouteFilter* filter) ABSL_LOCKS_EXCLUDED(mu_);
  // Removes one route of `pool` (from this thread's routes when `mine`, else a global one).
  void EraseRoute(Pool& pool, bool mine) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status EndWithoutBegin(PoolId pool) const;
  // The pool for an allocation on `stream` by this thread, or nullptr for the default pool.
  absl::StatusOr<Pool*> Choose(Stream stream) ABSL_LOCKS_EXCLUDED(mu_);
  const std::vector<Route>& GlobalRoutes() ABSL_LOCKS_EXCLUDED(mu_);

  CachingAllocator* const allocator_;
  const uint64_t serial_;  // names this manager in thread-local storage

  // Routing entries of every thread and kind; 0 means Allocate need not look.
  std::atomic<int64_t> active_routes_{0};
  // Bumped whenever global_routes_ changes; per-thread snapshots compare against it.
  std::atomic<uint64_t> global_version_{1};
  // Entries in global_routes_: 0 lets a routed allocation skip them altogether.
  std::atomic<int64_t> global_route_count_{0};

  Mutex mu_;
  absl::flat_hash_map<PoolId, std::unique_ptr<Pool>> pools_ ABSL_GUARDED_BY(mu_);
  std::vector<PoolCounts> counts_ ABSL_GUARDED_BY(mu_);  // per pool, at Pool::index
  // External pools, in attach order; their count is read without mu_.
  std::vector<ExternalPool*> externals_ ABSL_GUARDED_BY(mu_);
  std::atomic<int64_t> external_count_{0};
  absl::flat_hash_map<const Arena*, PoolId> pool_of_arena_ ABSL_GUARDED_BY(mu_);
  // Stream, capture and everyone entries, oldest first.
  std::vector<Route> global_routes_ ABSL_GUARDED_BY(mu_);
  uint64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 1;
};

// The re-entrant RAII form of Begin(current thread) / End / Release, for one pool: sglang's
// pattern. Entering the same pool again inside the scope nests.
class PoolScope {
 public:
  PoolScope(PoolManager* manager, PoolId pool, const PoolOptions& options = {});
  ~PoolScope();
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;

  // Whether the scope was entered; if not, it does nothing on exit.
  const absl::Status& status() const { return status_; }

 private:
  PoolManager* const manager_;
  const PoolId pool_;
  absl::Status status_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_POOL_POOL_MANAGER_H_
