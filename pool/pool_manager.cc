// Pools and routing of one device: see pool_manager.h; the rules with their reasons are in
// docs/pools.md.
#include "pool/pool_manager.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/thread_exit_safe.h"

namespace tidepool {
namespace {

std::atomic<uint64_t> next_manager_serial{1};

// Live managers by serial, so that a thread leaving with routes open can end them. Leaked on
// purpose: threads may exit after static destructors have run. Lock order: registry_mu, then a
// manager's mu_.
Mutex registry_mu;
absl::flat_hash_map<uint64_t, PoolManager*>& Registry() ABSL_EXCLUSIVE_LOCKS_REQUIRED(registry_mu) {
  static auto* registry = new absl::flat_hash_map<uint64_t, PoolManager*>();
  return *registry;
}

// One thread's routing state. Only its own thread reads or writes it.
struct ThreadRoutes {
  uint64_t serial = 0;
  std::vector<PoolManager::Route> routes;  // current-thread entries, oldest first
};
struct GlobalSnapshot {
  uint64_t serial = 0;
  uint64_t version = 0;
  std::vector<PoolManager::Route> routes;
};

struct ThreadState {
  std::vector<ThreadRoutes> managers;
  std::vector<GlobalSnapshot> snapshots;

  ThreadRoutes* Find(uint64_t serial) {
    for (ThreadRoutes& mine : managers) {
      if (mine.serial == serial) return &mine;
    }
    return nullptr;
  }
  ThreadRoutes& FindOrAdd(uint64_t serial) {
    if (ThreadRoutes* mine = Find(serial)) return *mine;
    managers.push_back(ThreadRoutes{serial, {}});
    return managers.back();
  }

  // Thread exit: the routes this thread left open are ended and their references released.
  ~ThreadState();
};

// The hot path reads the thread's state through ThreadExitSafe (one load of a trivial
// thread_local pointer). The state outlives every thread_local destructor, so a program that
// allocates, frees or begins a route from one at thread exit finds it intact
// (allocator/thread_exit_safe.h).
using ThreadStates = ThreadExitSafe<ThreadState>;

ThreadState::~ThreadState() {
  for (ThreadRoutes& mine : managers) {
    if (mine.routes.empty()) continue;
    MutexLock lock(&registry_mu);
    auto it = Registry().find(mine.serial);
    if (it != Registry().end()) it->second->EndThreadRoutes(mine.routes);
  }
}

ThreadState& MyThreadState() { return ThreadStates::Get(); }

}  // namespace

PoolManager::PoolManager(CachingAllocator* allocator)
    : allocator_(allocator), serial_(next_manager_serial.fetch_add(1)) {
  {
    MutexLock lock(&mu_);
    auto pool = std::make_unique<Pool>(kDefaultPool, PoolOptions{}, counts_.size());
    pool->arena.store(allocator_->default_arena());
    pool_of_arena_[allocator_->default_arena()] = kDefaultPool;
    counts_.emplace_back();
    pools_[kDefaultPool] = std::move(pool);
  }
  MutexLock lock(&registry_mu);
  Registry()[serial_] = this;
}

PoolManager::~PoolManager() {
  MutexLock lock(&registry_mu);
  Registry().erase(serial_);
}

PoolManager::Pool* PoolManager::FindPool(PoolId id) {
  auto it = pools_.find(id);
  return it == pools_.end() ? nullptr : it->second.get();
}

absl::StatusOr<PoolManager::Pool*> PoolManager::NewPool(PoolId id, const PoolOptions& options) {
  auto pool = std::make_unique<Pool>(id, options, counts_.size());
  if (absl::Status s = MakeArena(*pool); !s.ok()) return s;
  counts_.emplace_back();
  Pool* made = pool.get();
  pools_[id] = std::move(pool);
  return made;
}

absl::StatusOr<PoolManager::Pool*> PoolManager::KnownPool(PoolId id, const char* operation) {
  Pool* pool = FindPool(id);
  if (pool == nullptr) {
    return absl::NotFoundError(absl::StrFormat(
        "tidepool: %s of pool %s, which device %d has never had", operation, id.ToString(),
        allocator_->device()->ordinal()));
  }
  return pool;
}

absl::Status PoolManager::MakeArena(Pool& pool) {
  ArenaOptions arena_options;
  arena_options.source = pool.options.source;
  // A graph may replay into a graph pool's memory at any time: it stays where it is.
  arena_options.shares_free_memory = pool.options.shares_free_memory && pool.id.first == 0;
  arena_options.label = absl::StrCat("pool ", pool.id.ToString());
  absl::StatusOr<Arena*> arena = allocator_->CreateArena(arena_options);
  if (!arena.ok()) return arena.status();
  pool.arena.store(*arena, std::memory_order_release);
  pool_of_arena_[*arena] = pool.id;
  return absl::OkStatus();
}

absl::Status PoolManager::Create(PoolId id, const PoolOptions& options) {
  MutexLock lock(&mu_);
  if (FindPool(id) != nullptr) {
    return absl::AlreadyExistsError(absl::StrFormat(
        "tidepool: device %d has had pool %s already; a new pool needs a new id. Nothing was "
        "changed",
        allocator_->device()->ordinal(), id.ToString()));
  }
  absl::StatusOr<Pool*> created = NewPool(id, options);
  if (!created.ok()) return created.status();
  counts_[(*created)->index].references = 1;
  return absl::OkStatus();
}

absl::Status PoolManager::Attach(PoolId id, std::shared_ptr<ExternalPool> external) {
  if (external == nullptr) {
    return absl::InvalidArgumentError("tidepool: attach of a null external pool");
  }
  MutexLock lock(&mu_);
  if (FindPool(id) != nullptr) {
    return absl::AlreadyExistsError(absl::StrFormat(
        "tidepool: device %d has had pool %s already; an external pool needs a new id. Nothing "
        "was changed",
        allocator_->device()->ordinal(), id.ToString()));
  }
  auto pool = std::make_unique<Pool>(id, PoolOptions{}, counts_.size(), std::move(external));
  counts_.emplace_back();
  counts_.back().references = 1;
  externals_.push_back(pool->external.get());
  external_count_.fetch_add(1, std::memory_order_release);
  pools_[id] = std::move(pool);
  return absl::OkStatus();
}

absl::Status PoolManager::Detach(PoolId id) {
  MutexLock lock(&mu_);
  Pool* pool = FindPool(id);
  if (pool == nullptr || pool->external == nullptr || counts_[pool->index].references == 0) {
    return absl::NotFoundError(absl::StrFormat(
        "tidepool: detach of pool %s on device %d, which is not an attached external pool",
        id.ToString(), allocator_->device()->ordinal()));
  }
  const PoolCounts& counts = counts_[pool->index];
  if (counts.references > 1 || counts.routes > 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: pool %s on device %d is still held by %d begin(s) and %d route(s); end and "
        "release them first. Nothing was changed",
        id.ToString(), allocator_->device()->ordinal(), counts.references - 1, counts.routes));
  }
  return DropReference(*pool);
}

absl::StatusOr<ExternalPool*> PoolManager::ExternalOwnerOf(const void* ptr) {
  if (external_count_.load(std::memory_order_acquire) != 0) {
    MutexLock lock(&mu_);
    for (ExternalPool* external : externals_) {
      absl::StatusOr<size_t> size = external->BlockSize(ptr);
      if (!absl::IsInvalidArgument(size.status())) return external;
    }
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "tidepool: %p is in no external pool of device %d", ptr, allocator_->device()->ordinal()));
}

absl::Status PoolManager::Begin(PoolId id, const RouteFilter& filter,
                                const PoolOptions& options) {
  MutexLock lock(&mu_);
  Pool* pool = FindPool(id);
  if (pool == nullptr) {
    absl::StatusOr<Pool*> created = NewPool(id, options);
    if (!created.ok()) return created.status();
    pool = *created;
  } else if (pool->external != nullptr && counts_[pool->index].references == 0) {
    return ReleasedExternal(*pool, "begin");
  } else if (!id.is_default() && counts_[pool->index].references == 0) {
    // Released earlier (its blocks may still be live, or all gone): the same arena serves again.
    if (absl::Status s = allocator_->ReviveArena(pool->arena.load()); !s.ok()) return s;
  }
  AddRoute(*pool, filter);
  return absl::OkStatus();
}

absl::Status PoolManager::BeginHeld(PoolId id, const RouteFilter& filter) {
  MutexLock lock(&mu_);
  absl::StatusOr<Pool*> pool = HeldPool(id);
  if (!pool.ok()) return pool.status();
  AddRoute(**pool, filter);
  return absl::OkStatus();
}

absl::Status PoolManager::CheckHeld(PoolId id) {
  MutexLock lock(&mu_);
  return HeldPool(id).status();
}

absl::StatusOr<PoolManager::Pool*> PoolManager::HeldPool(PoolId id) {
  absl::StatusOr<Pool*> pool = KnownPool(id, "begin");
  if (!pool.ok()) return pool.status();
  if (!id.is_default() && counts_[(*pool)->index].references == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: begin of pool %s on device %d, which nothing holds any more (released); "
        "nothing was changed",
        id.ToString(), allocator_->device()->ordinal()));
  }
  return pool;
}

void PoolManager::AddRoute(Pool& pool, const RouteFilter& filter) {
  PoolCounts& counts = counts_[pool.index];
  if (!pool.id.is_default()) ++counts.references;
  ++counts.routes;
  Route route{next_sequence_++, filter, &pool};
  if (filter.kind == RouteFilter::Kind::kCurrentThread) {
    MyThreadState().FindOrAdd(serial_).routes.push_back(route);
  } else {
    global_routes_.push_back(route);
    global_version_.fetch_add(1, std::memory_order_release);
    global_route_count_.fetch_add(1, std::memory_order_release);
  }
  active_routes_.fetch_add(1, std::memory_order_relaxed);
}

absl::Status PoolManager::End(PoolId id) { return EndMatching(id, nullptr); }

absl::Status PoolManager::End(PoolId id, const RouteFilter& filter) {
  return EndMatching(id, &filter);
}

absl::Status PoolManager::EndMatching(PoolId id, const RouteFilter* filter) {
  MutexLock lock(&mu_);
  Pool* pool = FindPool(id);
  if (pool == nullptr) return EndWithoutBegin(id);
  const bool any = filter == nullptr;
  if (any || filter->kind == RouteFilter::Kind::kCurrentThread) {
    if (ThreadRoutes* mine = MyThreadState().Find(serial_)) {
      for (auto it = mine->routes.rbegin(); it != mine->routes.rend(); ++it) {
        if (it->pool != pool) continue;
        mine->routes.erase(std::next(it).base());
        EraseRoute(*pool, /*mine=*/true);
        return absl::OkStatus();
      }
    }
  }
  if (any || filter->kind != RouteFilter::Kind::kCurrentThread) {
    for (auto it = global_routes_.rbegin(); it != global_routes_.rend(); ++it) {
      if (it->pool != pool || (!any && !(it->filter == *filter))) continue;
      global_routes_.erase(std::next(it).base());
      EraseRoute(*pool, /*mine=*/false);
      return absl::OkStatus();
    }
  }
  return EndWithoutBegin(id);
}

void PoolManager::EraseRoute(Pool& pool, bool mine) {
  if (!mine) {
    global_version_.fetch_add(1, std::memory_order_release);
    global_route_count_.fetch_sub(1, std::memory_order_release);
  }
  --counts_[pool.index].routes;
  active_routes_.fetch_sub(1, std::memory_order_relaxed);
}

absl::Status PoolManager::EndWithoutBegin(PoolId id) const {
  return absl::FailedPreconditionError(absl::StrFormat(
      "tidepool: end of pool %s on device %d without a matching begin (no route to it from this "
      "thread, nor for a stream, a capture or everyone); nothing was changed",
      id.ToString(), allocator_->device()->ordinal()));
}

absl::Status PoolManager::Release(PoolId id) {
  MutexLock lock(&mu_);
  if (id.is_default()) {
    return absl::InvalidArgumentError("tidepool: the default pool cannot be released");
  }
  absl::StatusOr<Pool*> pool = KnownPool(id, "release");
  if (!pool.ok()) return pool.status();
  const PoolCounts& counts = counts_[(*pool)->index];
  if (counts.references == 0) {
    const int64_t dropped = counts.dropped_at_thread_exit;
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: release of pool %s, which has no references left (%s); nothing was changed",
        id.ToString(),
        dropped == 0
            ? "a double release"
            : absl::StrFormat("%d of them were dropped when threads exited with routes to it "
                              "still open, as their scopes would have done (docs/pools.md rule "
                              "10), so this release had none left to drop",
                              dropped)));
  }
  // Every Begin takes a reference and makes a route, so a pool keeps at least as many
  // references as routes as long as routes are ended before their references are released.
  // Holding that line means no route ever outlives its pool, whoever releases and in what order
  // (a thread's exit ends its routes and releases their references).
  if ((*pool)->external != nullptr && counts.references == 1) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: release of pool %s would drop its owner's reference: it is an external pool "
        "(a symmetric NCCL pool, say), which only its owner ends (symmetric-pool destroy). "
        "Nothing was changed",
        id.ToString()));
  }
  if (counts.references - 1 < counts.routes) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: release of pool %s would leave it %d references for %d routing entries that "
        "still send allocations to it; end them first. Nothing was changed",
        id.ToString(), counts.references - 1, counts.routes));
  }
  return DropReference(**pool);
}

uint64_t PoolManager::NextRouteSequence() {
  MutexLock lock(&mu_);
  return next_sequence_;
}

absl::Status PoolManager::EndResumedRoute(PoolId id, uint64_t since) {
  MutexLock lock(&mu_);
  Pool* pool = FindPool(id);
  ThreadRoutes* mine = MyThreadState().Find(serial_);
  if (pool == nullptr || mine == nullptr) return absl::OkStatus();
  for (auto it = mine->routes.rbegin(); it != mine->routes.rend(); ++it) {
    if (it->pool != pool || it->sequence < since) continue;
    mine->routes.erase(std::next(it).base());
    EraseRoute(*pool, /*mine=*/true);
    // Its Begin took a reference, and the route was the reason for it.
    return id.is_default() ? absl::OkStatus() : DropReference(*pool);
  }
  return absl::OkStatus();
}

absl::Status PoolManager::ReleasedExternal(const Pool& pool, const char* operation) const {
  return absl::FailedPreconditionError(absl::StrFormat(
      "tidepool: %s of pool %s on device %d, an external pool its owner has released (a "
      "destroyed symmetric pool, say); nothing was changed",
      operation, pool.id.ToString(), allocator_->device()->ordinal()));
}

absl::Status PoolManager::DropReference(Pool& pool) {
  if (--counts_[pool.index].references > 0) return absl::OkStatus();
  if (pool.external != nullptr) return absl::OkStatus();  // its owner gives its memory back
  return allocator_->RetireArena(pool.arena.load()).status();
}

void PoolManager::EndThreadRoutes(const std::vector<Route>& routes) {
  MutexLock lock(&mu_);
  for (const Route& route : routes) {
    PoolCounts& counts = counts_[route.pool->index];
    --counts.routes;
    active_routes_.fetch_sub(1, std::memory_order_relaxed);
    if (!route.pool->id.is_default() && counts.references > 0) {
      ++counts.dropped_at_thread_exit;
      DropReference(*route.pool).IgnoreError();  // nothing to report to: the thread is gone
    }
  }
}

const std::vector<PoolManager::Route>& PoolManager::GlobalRoutes() {
  GlobalSnapshot* snapshot = nullptr;
  ThreadState& thread_state = MyThreadState();
  for (GlobalSnapshot& candidate : thread_state.snapshots) {
    if (candidate.serial == serial_) snapshot = &candidate;
  }
  if (snapshot == nullptr) {
    thread_state.snapshots.push_back(GlobalSnapshot{serial_, 0, {}});
    snapshot = &thread_state.snapshots.back();
  }
  if (snapshot->version != global_version_.load(std::memory_order_acquire)) {
    MutexLock lock(&mu_);
    snapshot->routes = global_routes_;
    snapshot->version = global_version_.load(std::memory_order_relaxed);
  }
  return snapshot->routes;
}

absl::StatusOr<PoolManager::Pool*> PoolManager::Choose(Stream stream) {
  const Route* best = nullptr;
  if (ThreadState* state = ThreadStates::Find(); state != nullptr) {
    if (ThreadRoutes* mine = state->Find(serial_); mine != nullptr && !mine->routes.empty()) {
      best = &mine->routes.back();
    }
  }
  if (global_route_count_.load(std::memory_order_acquire) == 0) {
    return best == nullptr ? nullptr : best->pool;
  }
  const std::vector<Route>& global = GlobalRoutes();
  Device* device = allocator_->device();
  for (auto it = global.rbegin(); it != global.rend(); ++it) {
    if (best != nullptr && it->sequence < best->sequence) break;
    bool matches = false;
    switch (it->filter.kind) {
      case RouteFilter::Kind::kEveryone:
        matches = true;
        break;
      case RouteFilter::Kind::kStream: {
        absl::StatusOr<StreamId> id = allocator_->StreamIdOf(stream);
        if (!id.ok()) return id.status();
        matches = *id == it->filter.stream_id;
        break;
      }
      case RouteFilter::Kind::kCapture: {
        absl::StatusOr<CaptureInfo> capture = device->GetCaptureInfo(stream);
        if (!capture.ok()) return capture.status();
        matches = capture->capturing && capture->capture_id == it->filter.capture_id;
        break;
      }
      case RouteFilter::Kind::kCallable:
        matches = (*it->filter.callable)(stream);
        break;
      case RouteFilter::Kind::kCurrentThread:
        break;  // kept in thread-local storage, never here
    }
    if (matches) {
      best = &*it;
      break;
    }
  }
  return best == nullptr ? nullptr : best->pool;
}

absl::StatusOr<void*> PoolManager::Allocate(size_t bytes, Stream stream) {
  if (active_routes_.load(std::memory_order_relaxed) == 0) {
    return allocator_->Allocate(bytes, stream);
  }
  absl::StatusOr<Pool*> pool = Choose(stream);
  if (!pool.ok()) return pool.status();
  if (*pool == nullptr) return allocator_->Allocate(bytes, stream);
  if ((*pool)->external != nullptr) return (*pool)->external->Allocate(bytes, stream);
  absl::StatusOr<void*> block =
      allocator_->Allocate((*pool)->arena.load(std::memory_order_acquire), bytes, stream);
  // Only the arena's own refusal (FAILED_PRECONDITION) is explained by the release: a request
  // no device could hold stays RESOURCE_EXHAUSTED, whatever happened to the pool meanwhile.
  if (absl::IsFailedPrecondition(block.status()) &&
      !allocator_->IsActive((*pool)->arena.load(std::memory_order_acquire))) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: allocation routed to pool %s, which was released while still routed: %s",
        (*pool)->id.ToString(), block.status().message()));
  }
  return block;
}

absl::StatusOr<PoolId> PoolManager::RouteOf(Stream stream) {
  if (active_routes_.load(std::memory_order_relaxed) == 0) return kDefaultPool;
  absl::StatusOr<Pool*> pool = Choose(stream);
  if (!pool.ok()) return pool.status();
  return *pool == nullptr ? kDefaultPool : (*pool)->id;
}

absl::StatusOr<PoolId> PoolManager::PoolOf(const void* ptr) {
  absl::StatusOr<Arena*> arena = allocator_->ArenaOf(ptr);
  if (absl::IsInvalidArgument(arena.status()) &&
      external_count_.load(std::memory_order_acquire) != 0) {
    MutexLock lock(&mu_);
    for (const auto& [id, pool] : pools_) {
      if (pool->external == nullptr) continue;
      absl::StatusOr<size_t> size = pool->external->BlockSize(ptr);
      if (size.ok()) return id;
      if (!absl::IsInvalidArgument(size.status())) return size.status();
    }
  }
  if (!arena.ok()) return arena.status();
  MutexLock lock(&mu_);
  auto it = pool_of_arena_.find(*arena);
  if (it == pool_of_arena_.end()) {
    return absl::InternalError("tidepool: a live block in an arena that belongs to no pool");
  }
  return it->second;
}

absl::Status PoolManager::Trim(PoolId id) {
  ExternalPool* external = nullptr;
  {
    MutexLock lock(&mu_);
    absl::StatusOr<Pool*> pool = KnownPool(id, "trim");
    if (!pool.ok()) return pool.status();
    external = (*pool)->external.get();
    if (external == nullptr) return TrimArena(**pool);
  }
  // Outside mu_: an external pool's trim may be collective and wait for other ranks. The pool
  // outlives this call (the manager keeps it).
  return external->Trim();
}

absl::Status PoolManager::TrimArena(Pool& pool) {
  const int64_t references = counts_[pool.index].references;
  if (pool.id.first != 0 && references > 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: trim of graph pool %s, which %d graph(s) or handle(s) still hold: a graph may "
        "replay into any of its memory. Nothing was changed",
        pool.id.ToString(), references));
  }
  return allocator_->TrimArena(pool.arena.load());
}

absl::StatusOr<AllocatorStats> PoolManager::Stats(PoolId id) {
  MutexLock lock(&mu_);
  absl::StatusOr<Pool*> pool = KnownPool(id, "stats");
  if (!pool.ok()) return pool.status();
  if ((*pool)->external != nullptr) return (*pool)->external->Stats();
  return allocator_->GetStats((*pool)->arena.load());
}

absl::StatusOr<std::string> PoolManager::Snapshot(PoolId id) {
  MutexLock lock(&mu_);
  absl::StatusOr<Pool*> pool = KnownPool(id, "snapshot");
  if (!pool.ok()) return pool.status();
  if ((*pool)->external != nullptr) return (*pool)->external->SnapshotJson();
  return allocator_->SnapshotJson((*pool)->arena.load());
}

absl::StatusOr<PoolInfo> PoolManager::Info(PoolId id) {
  MutexLock lock(&mu_);
  absl::StatusOr<Pool*> pool = KnownPool(id, "info");
  if (!pool.ok()) return pool.status();
  const PoolCounts& counts = counts_[(*pool)->index];
  PoolInfo info;
  info.references = counts.references;
  info.routes = counts.routes;
  info.released = !id.is_default() && counts.references == 0;
  if (const ExternalPool* external = (*pool)->external.get(); external != nullptr) {
    info.live_blocks = external->Stats().active_blocks.current;
    info.gone = info.released && info.live_blocks == 0;
    return info;
  }
  info.live_blocks = allocator_->LiveBlocks((*pool)->arena.load());
  info.gone = allocator_->IsGone((*pool)->arena.load());
  return info;
}

// --- PoolScope -------------------------------------------------------------------------------

PoolScope::PoolScope(PoolManager* manager, PoolId pool, const PoolOptions& options)
    : manager_(manager),
      pool_(pool),
      status_(manager->Begin(pool, RouteFilter::CurrentThread(), options)) {}

PoolScope::~PoolScope() {
  if (!status_.ok()) return;
  // Both succeed: this scope's Begin made the route and took the reference they undo.
  manager_->End(pool_).IgnoreError();
  if (!pool_.is_default()) manager_->Release(pool_).IgnoreError();
}

}  // namespace tidepool
