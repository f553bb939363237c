// The caching allocator's public face (CachingAllocator, a thin forwarder) and its hot paths:
// Allocate, Free, RecordStream and the lookups of a live block. The contract is in
// caching_allocator.h; the machinery's layout in caching_allocator_impl.h; block bookkeeping in
// shard.h. The other jobs live in files of their own: arenas and capture marks (arenas.cc),
// growth (growth.cc), giving memory back (release.cc), statistics, snapshots and the
// out-of-memory message (observation.cc).
//
// The hot path's shape, as in mimalloc's `mi_malloc` / `_mi_malloc_generic`: `Allocate` is the
// fast path (the per-thread shard cache, the shard's lock, a quick list or best-fit take) and
// everything else (the growth lock, growing, out-of-memory recovery) is `AllocateSlow`, kept out
// of line so the fast path stays small. `Free` likewise: a retired arena's finishing is
// `FinishRetiredAfterFree`.
#include "allocator/caching_allocator.h"

#include <atomic>
#include <utility>

#include "absl/base/attributes.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator_impl.h"
#include "allocator/size_policy.h"

namespace tidepool {
namespace {

std::atomic<uint64_t> next_allocator_serial{1};

// Other threads on the same stream can take a freshly grown block before the growing thread
// does; past this many growths for one request, something is wrong with growth itself.
constexpr int kMaxGrowthsPerAllocation = 64;

// Per-thread cache of (arena, stream id) -> shard (of the thread's lane), so the hot path skips
// the shard table's lock.
struct ShardCacheEntry {
  uint64_t serial = 0;
  const Arena* arena = nullptr;
  StreamId stream_id = 0;
  Shard* shard = nullptr;
};
constexpr int kShardCacheSize = 4;
thread_local ShardCacheEntry shard_cache[kShardCacheSize];
thread_local int shard_cache_next = 0;

// Lanes (caching_allocator_impl.h): the calling thread's, 0 until it meets a contended shard.
constexpr uint32_t kLanes = 16;
std::atomic<uint32_t> next_thread_ordinal{0};
thread_local uint32_t thread_lane = 0;

}  // namespace

// ---------------------------------------------------------------------------------------------
// CachingAllocatorImpl: construction and the hot paths

CachingAllocatorImpl::CachingAllocatorImpl(Device* device, const Config& config,
                                           size_t total_memory)
    : device_(device),
      config_(config),
      total_memory_(total_memory),
      granularity_(device->granularity()),
      serial_(next_allocator_serial.fetch_add(1)),
      device_segments_(device) {
  ArenaOptions options;
  options.label = "default";
  absl::StatusOr<Arena*> arena = CreateArena(options);
  default_arena_ = *arena;  // cannot fail: the options are valid
}

CachingAllocatorImpl::~CachingAllocatorImpl() {
  // Blocks still live at destruction are the caller's bug; their memory is returned anyway, as
  // every other allocator does, after the device has finished with it.
  device_->SynchronizeDevice().IgnoreError();
  MutexLock growth(&growth_mu_);
  for (const auto& segment : segments_) {
    if (!segment->live) continue;
    if (segment->expandable) {
      // Run by run (block.h): each is unmapped and released whole, once.
      for (const Segment::Run& run :
           segment->RunsInside(segment->base, segment->base + segment->size, granularity_)) {
        device_->Unmap(segment->base + run.first * granularity_, run.count * granularity_)
            .IgnoreError();
        device_->ReleasePhysical(segment->chunks[run.first]).IgnoreError();
      }
      device_->ReleaseAddressRange(segment->base, segment->size).IgnoreError();
    } else {
      segment->shard->arena->source->FreeSegment(segment->base, segment->size).IgnoreError();
    }
  }
  // Shards are destroyed outside their arena's shards_mu: a shard's mutex is never taken under
  // it.
  for (const auto& arena : arenas_) {
    decltype(arena->shards) shards;
    {
      MutexLock lock(&arena->shards_mu);
      shards.swap(arena->shards);
    }
  }
}
absl::StatusOr<Shard*> CachingAllocatorImpl::ShardFor(Arena* arena, Stream stream) {
  absl::StatusOr<StreamId> id = StreamIdOf(stream);
  if (!id.ok()) return id.status();
  for (const ShardCacheEntry& entry : shard_cache) {
    if (entry.serial == serial_ && entry.arena == arena && entry.stream_id == *id) {
      if (entry.shard->last_handle.load(std::memory_order_relaxed) != stream) {
        entry.shard->last_handle.store(stream, std::memory_order_relaxed);
      }
      return entry.shard;
    }
  }
  Shard* shard;
  {
    MutexLock lock(&arena->shards_mu);
    std::unique_ptr<Shard>& slot = arena->shards[{*id, thread_lane}];
    if (slot == nullptr) {
      slot = std::make_unique<Shard>(device_, arena, *id, thread_lane,
                                     arena->expandable ? SIZE_MAX : config_.max_split_size,
                                     &free_epoch_, &captures_underway_);
    }
    shard = slot.get();
  }
  shard->last_handle.store(stream, std::memory_order_relaxed);
  shard_cache[shard_cache_next] = ShardCacheEntry{serial_, arena, *id, shard};
  shard_cache_next = (shard_cache_next + 1) % kShardCacheSize;
  return shard;
}

Shard* CachingAllocatorImpl::LockShardToAllocate(Arena* arena, Stream stream,
                                                absl::Status* status) {
  absl::StatusOr<Shard*> found = ShardFor(arena, stream);
  if (!found.ok()) {
    *status = found.status();
    return nullptr;
  }
  Shard* shard = *found;
  if (ABSL_PREDICT_TRUE(shard->mu.TryLock())) return shard;
  if (thread_lane == 0) {
    found = MoveToLane(arena, stream);
    if (!found.ok()) {
      *status = found.status();
      return nullptr;
    }
    shard = *found;
  }
  shard->mu.Lock();
  return shard;
}

ABSL_ATTRIBUTE_NOINLINE absl::StatusOr<Shard*> CachingAllocatorImpl::MoveToLane(Arena* arena,
                                                                               Stream stream) {
  thread_lane = 1 + next_thread_ordinal.fetch_add(1, std::memory_order_relaxed) % (kLanes - 1);
  for (ShardCacheEntry& entry : shard_cache) entry = ShardCacheEntry{};  // lane 0's shards
  return ShardFor(arena, stream);
}

absl::StatusOr<void*> CachingAllocatorImpl::Allocate(Arena* arena, size_t bytes,
                                                     Stream stream) {
  absl::StatusOr<size_t> rounded = RoundRequest(bytes);
  if (!rounded.ok()) return rounded.status();
  absl::Status status;
  Shard* const locked = LockShardToAllocate(arena, stream, &status);
  if (locked == nullptr) return status;
  Shard& shard = *locked;
  {
    MutexLock lock(&shard.mu, std::adopt_lock);
    // Read under the shard's lock: RetireArena stores the state before it takes this lock to
    // count live blocks, so an allocation either sees the arena retired here or holds a block
    // that count sees. No block ever comes from an arena that is gone.
    if (arena->state.load(std::memory_order_acquire) != Arena::kActive) return Retired(*arena);
    if (ABSL_PREDICT_FALSE(shard.fence_wanted.load(std::memory_order_relaxed))) {
      RecordWantedFence(shard, stream);
    }
    if (shard.HasPendingEvents()) {
      if (absl::Status s = shard.HarvestEvents(/*all=*/false); !s.ok()) return s;
    }
    if (Block* block = shard.TakeFreeBlock(*rounded, bytes)) {
      return reinterpret_cast<void*>(block->address);
    }
  }
  return AllocateSlow(*arena, shard, bytes, *rounded, stream);
}

ABSL_ATTRIBUTE_NOINLINE void CachingAllocatorImpl::RecordWantedFence(Shard& shard,
                                                                      Stream stream) {
  // During a capture the record would join the graph: the request waits for a later allocation.
  if (captures_underway_.load(std::memory_order_acquire) != 0) return;
  // A failed record leaves no fence: growth then leaves the shard's free memory alone, and only
  // an out-of-memory allocation's last retry synchronizes for it.
  if (shard.RecordFence(stream).ok()) shard.fence_wanted.store(false, std::memory_order_relaxed);
}

// Slow path, under the growth lock: look again (another thread may have freed or grown), grow,
// and take. Growth locks shards itself, one at a time, so the shard is not held across it; a
// thread on the same stream may take the new block first, and then this one grows again. If the
// device is full, the cache goes back to it and growth is tried again: first what the shards'
// fences show idle (waiting for them), then, if memory no fence covers was left behind,
// everything, after a device synchronization (caching_allocator_impl.h, Unfinished).
ABSL_ATTRIBUTE_NOINLINE absl::StatusOr<void*> CachingAllocatorImpl::AllocateSlow(
    Arena& arena, Shard& shard, size_t bytes, size_t rounded, Stream stream) {
  MutexLock growth(&growth_mu_);
  int retries = 0;
  for (int growths = 0;; ++growths) {
    // The state changes only under growth_mu_: a release that ran since the fast path looked
    // is seen here, before any growth.
    if (arena.state.load(std::memory_order_acquire) != Arena::kActive) return Retired(arena);
    {
      MutexLock lock(&shard.mu);
      if (absl::Status s = shard.HarvestEvents(/*all=*/true); !s.ok()) return s;
      if (Block* block = shard.TakeFreeBlock(rounded, bytes)) {
        return reinterpret_cast<void*>(block->address);
      }
    }
    if (growths == kMaxGrowthsPerAllocation) {
      return absl::InternalError(absl::StrFormat(
          "tidepool: grew %d times for %u bytes and found no block to serve them", growths,
          rounded));
    }
    absl::Status grown = Grow(shard, rounded, stream);
    if (grown.ok()) continue;
    if (!absl::IsResourceExhausted(grown)) return grown;
    if (retries < 2 && captures_underway_.load() == 0) {
      Unfinished mode = Unfinished::kWaitFence;
      if (retries == 0) {
        // The allocating stream is alive: its free memory, in every arena, needs no more than
        // its fences.
        FenceStream(shard.stream_id, stream);
        left_unfinished_ = false;
      } else if (left_unfinished_) {
        mode = Unfinished::kSynchronize;
      } else {
        retries = 2;  // nothing was left behind: a last retry would find nothing more
      }
      if (retries < 2) {
        ++retries;
        ++DeviceStats(arena).retries;
        if (absl::Status released = ReleaseCached(mode); !released.ok()) return released;
        continue;
      }
    }
    ++DeviceStats(arena).ooms;
    return absl::ResourceExhaustedError(OutOfMemoryMessage(bytes, rounded, shard, grown));
  }
}

absl::Status CachingAllocatorImpl::Free(void* ptr) {
  uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  absl::StatusOr<Segment*> segment = SegmentOf(address, "free");
  if (!segment.ok()) return segment.status();
  Shard& shard = *(*segment)->shard;
  {
    MutexLock lock(&shard.mu);
    // A racing release may have given the segment back since the lookup.
    if (!(*segment)->live) return NotHeld(address, "free");
    Block* block = shard.FindLive(address);
    if (block == nullptr) return NotLive(address);
    if (absl::Status s = shard.FreeLive(block); !s.ok()) return s;
  }
  if (shard.arena->state.load(std::memory_order_acquire) == Arena::kRetired) {
    return FinishRetiredAfterFree(*shard.arena);
  }
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::FreeOnStream(void* ptr, Stream stream) {
  uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  absl::StatusOr<Segment*> segment = SegmentOf(address, "free");
  if (!segment.ok()) return segment.status();
  Shard& shard = *(*segment)->shard;
  // The stream's id only when it is not the handle the shard's allocations come with.
  bool other_stream = false;
  StreamId other_id = 0;
  if (stream != shard.last_handle.load(std::memory_order_relaxed)) {
    absl::StatusOr<StreamId> id = StreamIdOf(stream);
    if (!id.ok()) return id.status();
    other_stream = *id != shard.stream_id;
    other_id = *id;
  }
  {
    MutexLock lock(&shard.mu);
    if (!(*segment)->live) return NotHeld(address, "free");
    Block* block = shard.FindLive(address);
    if (block == nullptr) return NotLive(address);
    if (other_stream) {
      bool recorded = false;
      for (const StreamUse& use : block->uses) recorded = recorded || use.id == other_id;
      if (!recorded) block->uses.push_back(StreamUse{stream, other_id});
    }
    if (absl::Status s = shard.FreeLive(block); !s.ok()) return s;
  }
  if (shard.arena->state.load(std::memory_order_acquire) == Arena::kRetired) {
    return FinishRetiredAfterFree(*shard.arena);
  }
  return absl::OkStatus();
}

// The free of a retired arena's block may have been its last: then the arena is finished (its
// memory goes back) and gone.
ABSL_ATTRIBUTE_NOINLINE absl::Status CachingAllocatorImpl::FinishRetiredAfterFree(Arena& arena) {
  MutexLock growth(&growth_mu_);
  return FinishIfDrained(arena);
}

absl::Status CachingAllocatorImpl::RecordStream(void* ptr, Stream stream) {
  uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  absl::StatusOr<StreamId> id = StreamIdOf(stream);
  if (!id.ok()) return id.status();
  absl::StatusOr<Segment*> segment = SegmentOf(address, "record_stream");
  if (!segment.ok()) return segment.status();
  Shard& shard = *(*segment)->shard;
  MutexLock lock(&shard.mu);
  if (!(*segment)->live) return NotHeld(address, "record_stream");
  Block* block = shard.FindLive(address);
  if (block == nullptr) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: record_stream on %#x, which is not a live allocation (freed already?)",
        address));
  }
  if (*id == shard.stream_id) return absl::OkStatus();
  for (const StreamUse& use : block->uses) {
    if (use.id == *id) return absl::OkStatus();
  }
  block->uses.push_back(StreamUse{stream, *id});
  return absl::OkStatus();
}

absl::StatusOr<CachingAllocator::SegmentRange> CachingAllocatorImpl::RangeOf(
    const void* ptr) const {
  absl::StatusOr<size_t> live = BlockSize(ptr);  // a live block, or the error Free would give
  if (!live.ok()) return live.status();
  absl::StatusOr<Segment*> segment = SegmentOf(reinterpret_cast<uintptr_t>(ptr), "segment query");
  if (!segment.ok()) return segment.status();
  return CachingAllocator::SegmentRange{(*segment)->base, (*segment)->size,
                                        (*segment)->expandable};
}

absl::StatusOr<size_t> CachingAllocatorImpl::BlockSize(const void* ptr) const {
  uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  absl::StatusOr<Segment*> segment = SegmentOf(address, "size query");
  if (!segment.ok()) return segment.status();
  Shard& shard = *(*segment)->shard;
  MutexLock lock(&shard.mu);
  if (!(*segment)->live) return NotHeld(address, "size query");
  Block* block = shard.FindLive(address);
  if (block == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrFormat("tidepool: %#x is not a live allocation", address));
  }
  return block->size;
}

absl::StatusOr<Arena*> CachingAllocatorImpl::ArenaOf(const void* ptr) const {
  uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  absl::StatusOr<Segment*> segment = SegmentOf(address, "arena query");
  if (!segment.ok()) return segment.status();
  Shard& shard = *(*segment)->shard;
  MutexLock lock(&shard.mu);
  if (!(*segment)->live) return NotHeld(address, "arena query");
  if (shard.FindLive(address) == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrFormat("tidepool: %#x is not a live allocation", address));
  }
  return shard.arena;
}

absl::StatusOr<Segment*> CachingAllocatorImpl::SegmentOf(uintptr_t address,
                                                         const char* operation) const {
  Segment* segment = page_map_.Lookup(address);
  if (segment == nullptr) return NotHeld(address, operation);
  return segment;
}

absl::Status CachingAllocatorImpl::NotHeld(uintptr_t address, const char* operation) const {
  return absl::InvalidArgumentError(absl::StrFormat(
      "tidepool: %s of %#x, which is not in memory tidepool holds on device %d: it was not "
      "allocated by tidepool, or its memory has gone back to the device since it was freed (a "
      "double free after empty_cache, a pool's release or trim, say); nothing was changed",
      operation, address, device_->ordinal()));
}

absl::Status CachingAllocatorImpl::NotLive(uintptr_t address) {
  return absl::FailedPreconditionError(absl::StrFormat(
      "tidepool: free of %#x, which is not a live allocation (a double free, or a pointer into "
      "the middle of a block); nothing was changed",
      address));
}

absl::Status CachingAllocatorImpl::Retired(const Arena& arena) const {
  return absl::FailedPreconditionError(absl::StrFormat(
      "tidepool: allocation from arena '%s', which has been retired", arena.label));
}

absl::Status CachingAllocatorImpl::CheckArena(const Arena* arena) const {
  if (arena == nullptr) return absl::InvalidArgumentError("tidepool: no arena");
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// CachingAllocator: forwards to the machinery

absl::StatusOr<std::unique_ptr<CachingAllocator>> CachingAllocator::Create(Device* device,
                                                                          const Config& config) {
  if (device == nullptr) return absl::InvalidArgumentError("tidepool: no device");
  absl::StatusOr<MemoryInfo> info = device->GetMemoryInfo();
  if (!info.ok()) return info.status();
  if (device->granularity() == 0 || (device->granularity() & (device->granularity() - 1)) != 0) {
    return absl::InternalError("tidepool: device granularity is not a power of two");
  }
  return std::unique_ptr<CachingAllocator>(new CachingAllocator(
      std::make_unique<CachingAllocatorImpl>(device, config, info->total_bytes)));
}

CachingAllocator::CachingAllocator(std::unique_ptr<CachingAllocatorImpl> impl)
    : impl_(std::move(impl)) {}
CachingAllocator::~CachingAllocator() = default;
absl::StatusOr<void*> CachingAllocator::Allocate(size_t bytes, Stream stream) {
  return impl_->Allocate(impl_->default_arena(), bytes, stream);
}
absl::StatusOr<void*> CachingAllocator::Allocate(Arena* arena, size_t bytes, Stream stream) {
  if (arena == nullptr) return absl::InvalidArgumentError("tidepool: no arena");
  return impl_->Allocate(arena, bytes, stream);
}
absl::Status CachingAllocator::Free(void* ptr) { return impl_->Free(ptr); }
absl::Status CachingAllocator::RecordStream(void* ptr, Stream stream) {
  return impl_->RecordStream(ptr, stream);
}
absl::Status CachingAllocator::FreeOnStream(void* ptr, Stream stream) {
  return impl_->FreeOnStream(ptr, stream);
}
absl::Status CachingAllocator::EmptyCache() { return impl_->EmptyCache(); }
void CachingAllocator::SetMemoryLimit(size_t bytes) { impl_->SetMemoryLimit(bytes); }
size_t CachingAllocator::memory_limit() const { return impl_->memory_limit(); }
void CachingAllocator::NoteCaptureBegin() { impl_->NoteCaptureBegin(); }
absl::Status CachingAllocator::NoteCaptureEnd() { return impl_->NoteCaptureEnd(); }
int CachingAllocator::captures_underway() const { return impl_->captures_underway(); }
absl::StatusOr<StreamId> CachingAllocator::StreamIdOf(Stream stream) const {
  return impl_->StreamIdOf(stream);
}
absl::StatusOr<size_t> CachingAllocator::BlockSize(const void* ptr) const {
  return impl_->BlockSize(ptr);
}
bool CachingAllocator::Holds(const void* ptr) const { return impl_->Holds(ptr); }
absl::StatusOr<CachingAllocator::SegmentRange> CachingAllocator::SegmentOf(const void* ptr) const {
  return impl_->RangeOf(ptr);
}
absl::StatusOr<Arena*> CachingAllocator::CreateArena(const ArenaOptions& options) {
  return impl_->CreateArena(options);
}
Arena* CachingAllocator::default_arena() const { return impl_->default_arena(); }
absl::StatusOr<Arena*> CachingAllocator::ArenaOf(const void* ptr) const {
  return impl_->ArenaOf(ptr);
}
absl::Status CachingAllocator::TrimArena(Arena* arena) { return impl_->TrimArena(arena); }
absl::StatusOr<bool> CachingAllocator::RetireArena(Arena* arena) {
  return impl_->RetireArena(arena);
}
absl::Status CachingAllocator::ReviveArena(Arena* arena) { return impl_->ReviveArena(arena); }
int64_t CachingAllocator::LiveBlocks(const Arena* arena) const {
  return impl_->LiveBlocks(arena);
}
bool CachingAllocator::IsActive(const Arena* arena) const {
  return arena->state.load(std::memory_order_acquire) == Arena::kActive;
}
bool CachingAllocator::IsGone(const Arena* arena) const {
  return arena->state.load(std::memory_order_acquire) == Arena::kGone;
}
int64_t CachingAllocator::walked_arenas() const { return impl_->walked_arenas(); }
AllocatorStats CachingAllocator::GetStats() const { return impl_->GetStats(nullptr); }
AllocatorStats CachingAllocator::GetStats(const Arena* arena) const {
  return impl_->GetStats(arena);
}
std::string CachingAllocator::SnapshotJson(const Arena* arena) const {
  return impl_->SnapshotJson(arena);
}
Device* CachingAllocator::device() const { return impl_->device(); }
const Config& CachingAllocator::config() const { return impl_->config(); }

}  // namespace tidepool
