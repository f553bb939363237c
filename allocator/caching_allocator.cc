// The caching allocator: the public face (CachingAllocator) and its machinery
// (CachingAllocatorImpl). The contract is in caching_allocator.h; the growth strategy in
// caching_allocator_impl.h; block bookkeeping in shard.h.
#include "allocator/caching_allocator.h"

#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator_impl.h"
#include "allocator/size_policy.h"

namespace tidepool {
namespace {

size_t RoundUp(size_t bytes, size_t to) { return (bytes + to - 1) / to * to; }
size_t RoundDown(size_t bytes, size_t to) { return bytes / to * to; }

std::string HumanBytes(size_t bytes) {
  if (bytes >= (size_t{1} << 30)) return absl::StrFormat("%.2f GiB", bytes / 1073741824.0);
  if (bytes >= (size_t{1} << 20)) return absl::StrFormat("%.2f MiB", bytes / 1048576.0);
  if (bytes >= (size_t{1} << 10)) return absl::StrFormat("%.2f KiB", bytes / 1024.0);
  return absl::StrFormat("%u B", bytes);
}

const char* StateName(BlockState state) {
  switch (state) {
    case BlockState::kFree:
      return "free";
    case BlockState::kAllocated:
      return "allocated";
    case BlockState::kAwaitingEvents:
      return "awaiting_events";
    case BlockState::kUnmapped:
      return "unmapped";
    case BlockState::kQuick:
      return "free_parked";
  }
  return "unknown";
}

std::atomic<uint64_t> next_allocator_serial{1};

// Other threads on the same stream can take a freshly grown block before the growing thread
// does; past this many growths for one request, something is wrong with growth itself.
constexpr int kMaxGrowthsPerAllocation = 64;

// Per-thread cache of (arena, stream id) -> shard, so the hot path skips the shard table's lock.
struct ShardCacheEntry {
  uint64_t serial = 0;
  const Arena* arena = nullptr;
  StreamId stream_id = 0;
  Shard* shard = nullptr;
};
constexpr int kShardCacheSize = 4;
thread_local ShardCacheEntry shard_cache[kShardCacheSize];
thread_local int shard_cache_next = 0;

}  // namespace

// ---------------------------------------------------------------------------------------------
// CachingAllocatorImpl

std::vector<Shard*> Arena::Shards() {
  MutexLock lock(&shards_mu);
  std::vector<Shard*> result;
  result.reserve(shards.size());
  for (const auto& [id, shard] : shards) result.push_back(shard.get());
  std::sort(result.begin(), result.end(),
            [](const Shard* a, const Shard* b) { return a->stream_id < b->stream_id; });
  return result;
}

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
      for (size_t i = 0; i < segment->chunks.size(); ++i) {
        if (segment->chunks[i] == 0) continue;
        device_->Unmap(segment->base + i * granularity_, granularity_).IgnoreError();
        device_->ReleasePhysical(segment->chunks[i]).IgnoreError();
      }
      device_->ReleaseAddressRange(segment->base, segment->size).IgnoreError();
    } else {
      segment->shard->arena->source->FreeSegment(segment->base, segment->size).IgnoreError();
    }
  }
  // Shards are destroyed outside their arena's shards_mu: a shard's mutex is never taken under
  // it.
  for (const auto& arena : arenas_) {
    absl::flat_hash_map<StreamId, std::unique_ptr<Shard>> shards;
    {
      MutexLock lock(&arena->shards_mu);
      shards.swap(arena->shards);
    }
  }
}

absl::StatusOr<Arena*> CachingAllocatorImpl::CreateArena(const ArenaOptions& options) {
  MutexLock growth(&growth_mu_);
  SegmentSource* source = options.source != nullptr ? options.source : &device_segments_;
  bool expandable = options.source == nullptr && config_.expandable_segments;
  uint64_t id = arenas_.size() + 1;
  arenas_.push_back(std::make_unique<Arena>(id, options, source, expandable));
  live_arenas_.push_back(arenas_.back().get());
  return arenas_.back().get();
}

std::vector<Arena*> CachingAllocatorImpl::Arenas() {
  std::vector<Arena*> result;
  result.reserve(arenas_.size());
  for (const auto& arena : arenas_) result.push_back(arena.get());
  return result;
}

void CachingAllocatorImpl::NoteGone(Arena& arena) {
  live_arenas_.erase(std::find(live_arenas_.begin(), live_arenas_.end(), &arena));
  if (arena.device_stats.segments.current > 0) gone_holding_.push_back(&arena);
}

void CachingAllocatorImpl::ForgetIfEmpty(Arena& arena) {
  if (arena.state.load() != Arena::kGone || arena.device_stats.segments.current > 0) return;
  auto it = std::find(gone_holding_.begin(), gone_holding_.end(), &arena);
  if (it != gone_holding_.end()) gone_holding_.erase(it);
}

absl::Status CachingAllocatorImpl::CheckArena(const Arena* arena) const {
  if (arena == nullptr) return absl::InvalidArgumentError("tidepool: no arena");
  return absl::OkStatus();
}

absl::StatusOr<Shard*> CachingAllocatorImpl::ShardFor(Arena* arena, Stream stream) {
  absl::StatusOr<StreamId> id = StreamIdOf(stream);
  if (!id.ok()) return id.status();
  for (const ShardCacheEntry& entry : shard_cache) {
    if (entry.serial == serial_ && entry.arena == arena && entry.stream_id == *id) {
      return entry.shard;
    }
  }
  Shard* shard;
  {
    MutexLock lock(&arena->shards_mu);
    std::unique_ptr<Shard>& slot = arena->shards[*id];
    if (slot == nullptr) {
      slot = std::make_unique<Shard>(device_, arena, *id,
                                     arena->expandable ? SIZE_MAX : config_.max_split_size,
                                     &free_epoch_, &captures_underway_);
    }
    shard = slot.get();
  }
  shard_cache[shard_cache_next] = ShardCacheEntry{serial_, arena, *id, shard};
  shard_cache_next = (shard_cache_next + 1) % kShardCacheSize;
  return shard;
}

absl::StatusOr<void*> CachingAllocatorImpl::Allocate(Arena* arena, size_t bytes,
                                                     Stream stream) {
  absl::StatusOr<size_t> rounded = RoundRequest(bytes);
  if (!rounded.ok()) return rounded.status();
  absl::StatusOr<Shard*> found = ShardFor(arena, stream);
  if (!found.ok()) return found.status();
  Shard& shard = **found;
  {
    MutexLock lock(&shard.mu);
    // Read under the shard's lock: RetireArena stores the state before it takes this lock to
    // count live blocks, so an allocation either sees the arena retired here or holds a block
    // that count sees. No block ever comes from an arena that is gone.
    if (arena->state.load(std::memory_order_acquire) != Arena::kActive) return Retired(*arena);
    if (shard.HasPendingEvents()) {
      if (absl::Status s = shard.HarvestEvents(/*all=*/false); !s.ok()) return s;
    }
    if (Block* block = shard.TakeFreeBlock(*rounded, bytes)) {
      return reinterpret_cast<void*>(block->address);
    }
  }
  // Slow path, under the growth lock: look again (another thread may have freed or grown), grow,
  // and take. Growth locks shards itself, one at a time, so the shard is not held across it; a
  // thread on the same stream may take the new block first, and then this one grows again. If
  // the device is full, the whole cache goes back to it and growth is tried once more.
  MutexLock growth(&growth_mu_);
  bool retried = false;
  for (int growths = 0;; ++growths) {
    // The state changes only under growth_mu_: a release that ran since the fast path looked
    // is seen here, before any growth.
    if (arena->state.load(std::memory_order_acquire) != Arena::kActive) return Retired(*arena);
    {
      MutexLock lock(&shard.mu);
      if (absl::Status s = shard.HarvestEvents(/*all=*/true); !s.ok()) return s;
      if (Block* block = shard.TakeFreeBlock(*rounded, bytes)) {
        return reinterpret_cast<void*>(block->address);
      }
    }
    if (growths == kMaxGrowthsPerAllocation) {
      return absl::InternalError(absl::StrFormat(
          "tidepool: grew %d times for %u bytes and found no block to serve them", growths,
          *rounded));
    }
    absl::Status grown = Grow(shard, *rounded);
    if (grown.ok()) continue;
    if (!absl::IsResourceExhausted(grown)) return grown;
    if (!retried && captures_underway_.load() == 0) {
      retried = true;
      ++arena->device_stats.retries;
      if (absl::Status released = ReleaseCached(); !released.ok()) return released;
      continue;
    }
    ++arena->device_stats.ooms;
    return absl::ResourceExhaustedError(OutOfMemoryMessage(bytes, *rounded, shard, grown));
  }
}

absl::Status CachingAllocatorImpl::Retired(const Arena& arena) const {
  return absl::FailedPreconditionError(absl::StrFormat(
      "tidepool: allocation from arena '%s', which has been retired", arena.label));
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
    if (block == nullptr) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "tidepool: free of %#x, which is not a live allocation (a double free, or a pointer "
          "into the middle of a block); nothing was changed",
          address));
    }
    if (absl::Status s = shard.FreeLive(block); !s.ok()) return s;
  }
  Arena& arena = *shard.arena;
  if (arena.state.load(std::memory_order_acquire) == Arena::kRetired) {
    MutexLock growth(&growth_mu_);
    return FinishIfDrained(arena);
  }
  return absl::OkStatus();
}

void CachingAllocatorImpl::NoteCaptureBegin() {
  MutexLock growth(&growth_mu_);
  // The last chance to harvest before the capture: a capturing stream has shards of its own
  // (StreamIdOf), which no allocation outside a capture visits, so blocks of those shards that
  // wait for events (freed after a capture, with uses recorded since) become reusable for this
  // capture here, once their events have completed.
  if (captures_underway_.load() == 0) {
    for (Arena* arena : live_arenas_) {  // a gone arena has no blocks
      for (Shard* shard : arena->Shards()) {
        MutexLock lock(&shard->mu);
        shard->HarvestEvents(/*all=*/true).IgnoreError();  // a failed query: harvested later
      }
    }
  }
  captures_underway_.fetch_add(1, std::memory_order_acq_rel);
  // A barrier: a shard reads the count under its own lock, so once every shard's lock has been
  // taken once, no call that read "no capture" is still at work, and none can start again. A
  // gone arena has no blocks to free or harvest (and is revived only under growth_mu_).
  for (Arena* arena : live_arenas_) {
    for (Shard* shard : arena->Shards()) {
      MutexLock lock(&shard->mu);
    }
  }
}

absl::Status CachingAllocatorImpl::NoteCaptureEnd() {
  MutexLock growth(&growth_mu_);
  if (captures_underway_.load() == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: end of a capture on device %d, where none is underway; nothing was changed",
        device_->ordinal()));
  }
  if (captures_underway_.fetch_sub(1, std::memory_order_acq_rel) != 1) return absl::OkStatus();
  // The last capture is over: what it held back can go ahead. Deferred frees used on a stream
  // outside the captures wait for the device first (shard.h says why not for their streams).
  bool synchronize = false;
  for (Arena* arena : live_arenas_) {
    for (Shard* shard : arena->Shards()) {
      MutexLock lock(&shard->mu);
      synchronize = synchronize || shard->DeferredNeedSynchronization();
    }
  }
  if (synchronize) {
    // Should it fail, the deferred blocks stay unusable (leaked, never handed out early).
    if (absl::Status s = SynchronizeFreedWork(); !s.ok()) return s;
  }
  absl::Status first_error;
  // A gone arena went before the capture began: it deferred nothing. FinishIfDrained may take
  // an arena off the list, so the loop walks a copy.
  for (Arena* arena : std::vector<Arena*>(live_arenas_)) {
    for (Shard* shard : arena->Shards()) {
      MutexLock lock(&shard->mu);
      if (absl::Status s = shard->ReleaseDeferredFrees(); !s.ok() && first_error.ok()) {
        first_error = s;
      }
    }
    if (absl::Status s = FinishIfDrained(*arena); !s.ok() && first_error.ok()) first_error = s;
  }
  return first_error;
}

absl::Status CachingAllocatorImpl::RefuseDuringCapture(const char* operation) const {
  if (captures_underway_.load() == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "tidepool: %s on device %d while %d CUDA graph capture(s) are underway: giving memory back "
      "needs a device synchronization, which would break the capture. Nothing was changed; try "
      "again after the capture ends",
      operation, device_->ordinal(), captures_underway_.load()));
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

absl::Status CachingAllocatorImpl::EmptyCache() {
  MutexLock growth(&growth_mu_);
  if (absl::Status s = RefuseDuringCapture("empty_cache"); !s.ok()) return s;
  return ReleaseCached();
}

absl::StatusOr<Arena*> CachingAllocatorImpl::ArenaOf(const void* ptr) {
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

absl::Status CachingAllocatorImpl::TrimArena(Arena* arena) {
  if (absl::Status s = CheckArena(arena); !s.ok()) return s;
  MutexLock growth(&growth_mu_);
  if (absl::Status s = RefuseDuringCapture("trim"); !s.ok()) return s;
  absl::Status released = ReleaseArenaCache(*arena, AddressRanges::kRelease);
  ForgetIfEmpty(*arena);
  return released;
}

absl::StatusOr<bool> CachingAllocatorImpl::RetireArena(Arena* arena) {
  if (absl::Status s = CheckArena(arena); !s.ok()) return s;
  if (arena == default_arena_) {
    return absl::InvalidArgumentError("tidepool: the default arena cannot be retired");
  }
  MutexLock growth(&growth_mu_);
  if (arena->state.load() == Arena::kGone) {
    return absl::FailedPreconditionError(
        absl::StrFormat("tidepool: arena '%s' is already gone", arena->label));
  }
  arena->state.store(Arena::kRetired, std::memory_order_release);
  if (captures_underway_.load() > 0) return false;  // NoteCaptureEnd finishes it
  if (absl::Status s = ReleaseArenaCache(*arena, AddressRanges::kKeep); !s.ok()) return s;
  if (absl::Status s = FinishIfDrained(*arena); !s.ok()) return s;
  return arena->state.load() == Arena::kGone;
}

absl::Status CachingAllocatorImpl::ReviveArena(Arena* arena) {
  if (absl::Status s = CheckArena(arena); !s.ok()) return s;
  MutexLock growth(&growth_mu_);
  if (arena->state.load() == Arena::kGone) {
    auto holding = std::find(gone_holding_.begin(), gone_holding_.end(), arena);
    if (holding != gone_holding_.end()) gone_holding_.erase(holding);
    // Back in creation order, so that walks stay deterministic.
    live_arenas_.insert(std::upper_bound(live_arenas_.begin(), live_arenas_.end(), arena,
                                         [](const Arena* a, const Arena* b) {
                                           return a->id < b->id;
                                         }),
                        arena);
  }
  arena->state.store(Arena::kActive, std::memory_order_release);
  return absl::OkStatus();
}

int64_t CachingAllocatorImpl::LiveBlocks(Arena* arena) {
  MutexLock growth(&growth_mu_);
  return LiveBlocksLocked(*arena);
}

int64_t CachingAllocatorImpl::walked_arenas() {
  MutexLock growth(&growth_mu_);
  return static_cast<int64_t>(live_arenas_.size() + gone_holding_.size());
}

int64_t CachingAllocatorImpl::LiveBlocksLocked(Arena& arena) {
  int64_t live = 0;
  for (Shard* shard : arena.Shards()) {
    MutexLock lock(&shard->mu);
    live += shard->stats().active_blocks.current;
  }
  return live;
}

// Blocks freed with events pending are not live: ReleaseArenaCache waits for their events.
absl::Status CachingAllocatorImpl::FinishIfDrained(Arena& arena) {
  if (arena.state.load() != Arena::kRetired || captures_underway_.load() > 0 ||
      LiveBlocksLocked(arena) != 0) {
    return absl::OkStatus();
  }
  if (absl::Status s = ReleaseArenaCache(arena, AddressRanges::kKeep); !s.ok()) return s;
  arena.state.store(Arena::kGone, std::memory_order_release);
  NoteGone(arena);
  return absl::OkStatus();
}

absl::StatusOr<size_t> CachingAllocatorImpl::BlockSize(const void* ptr) {
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

// --- Growth ----------------------------------------------------------------------------------

absl::Status CachingAllocatorImpl::TooLarge(size_t rounded) const {
  return absl::ResourceExhaustedError(absl::StrFormat(
      "%u bytes is more than the device's %u bytes of memory", rounded, total_memory_));
}

absl::Status CachingAllocatorImpl::Grow(Shard& shard, size_t rounded) {
  return shard.arena->expandable ? GrowExpandable(shard, rounded) : GrowPlain(shard, rounded);
}

Segment* CachingAllocatorImpl::NewSegment(Shard& shard, uintptr_t base, size_t size,
                                          bool expandable, bool small) {
  auto segment = std::make_unique<Segment>();
  segment->base = base;
  segment->size = size;
  segment->expandable = expandable;
  segment->small = small;
  segment->shard = &shard;
  if (expandable) segment->chunks.assign(size / granularity_, 0);
  segments_.push_back(std::move(segment));
  shard.arena->device_stats.segments.Increase(1);
  return segments_.back().get();
}

void CachingAllocatorImpl::RetireSegment(Segment* segment) {
  page_map_.Unregister(segment->base, segment->size, segment);
  segment->live = false;
  std::vector<PhysicalHandle>().swap(segment->chunks);  // the record stays; its table need not
  segment->shard->arena->device_stats.segments.Decrease(1);
}

absl::Status CachingAllocatorImpl::GrowPlain(Shard& shard, size_t rounded) {
  Arena& arena = *shard.arena;
  size_t size = PlainSegmentSize(rounded, config_.max_split_size);
  if (size > total_memory_) return TooLarge(rounded);
  absl::StatusOr<uintptr_t> base = arena.source->AllocateSegment(size);
  if (!base.ok()) return base.status();
  if (!PageMap<Segment>::Covers(*base, size)) {
    arena.source->FreeSegment(*base, size).IgnoreError();
    return absl::InternalError(
        absl::StrFormat("tidepool: device address %#x is outside the page map", *base));
  }
  ++arena.device_stats.device_allocations;
  arena.device_stats.reserved_bytes.Increase(static_cast<int64_t>(size));
  Segment* segment = NewSegment(shard, *base, size, /*expandable=*/false, IsSmall(rounded));
  // The page map first: once the shard has the segment, another thread's fast path may hand out
  // a block of it, and a free of that block must find it.
  page_map_.Register(segment->base, segment->size, segment);
  MutexLock lock(&shard.mu);
  shard.AddSegment(segment, BlockState::kFree);
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::GrowExpandable(Shard& shard, size_t rounded) {
  Arena& arena = *shard.arena;
  const bool small = IsSmall(rounded);
  const size_t g = granularity_;
  if (RoundUp(rounded, g) > total_memory_) return TooLarge(rounded);
  // Where to map: inside an unmapped block, extending the free block before it, or the one
  // after it, or bridging both. The placement that needs the fewest new bytes wins; the index
  // is ordered, so ties go to the smaller, then lower, unmapped block (deterministic).
  Block* target = nullptr;
  uintptr_t map_at = 0;
  size_t to_map = SIZE_MAX;
  auto consider = [&](Block* unmapped, size_t have, bool at_end, bool whole) {
    if (have >= rounded) return;  // a free block that big would have served the request
    size_t need = whole ? unmapped->size : RoundUp(rounded - have, g);
    if (need > unmapped->size || need >= to_map) return;
    to_map = need;
    target = unmapped;
    map_at = at_end ? unmapped->address + unmapped->size - need : unmapped->address;
  };
  auto free_size = [](const Block* block) {
    return block != nullptr && block->state == BlockState::kFree ? block->size : 0;
  };
  {
    MutexLock lock(&shard.mu);
    for (Block* unmapped : shard.unmapped(small)) {
      size_t before = free_size(unmapped->prev);
      size_t after = free_size(unmapped->next);
      consider(unmapped, before, /*at_end=*/false, /*whole=*/false);
      consider(unmapped, after, /*at_end=*/true, /*whole=*/false);
      if (before + unmapped->size + after >= rounded) {
        consider(unmapped, 0, /*at_end=*/false, /*whole=*/true);
      }
    }
  }
  Segment* new_segment = nullptr;
  if (target == nullptr) {
    size_t reserve = config_.expandable_reserve != 0
                         ? config_.expandable_reserve
                         : RoundUp(std::min(total_memory_, kMaxExpandableReserve), g);
    if (small) reserve = std::max(g, RoundUp(reserve / 16, g));
    reserve = std::max(reserve, RoundUp(rounded, g));
    absl::StatusOr<uintptr_t> base = device_->ReserveAddressRange(reserve);
    if (!base.ok()) return base.status();
    if (!PageMap<Segment>::Covers(*base, reserve)) {
      device_->ReleaseAddressRange(*base, reserve).IgnoreError();
      return absl::InternalError(
          absl::StrFormat("tidepool: device address %#x is outside the page map", *base));
    }
    new_segment = NewSegment(shard, *base, reserve, /*expandable=*/true, small);
    page_map_.Register(new_segment->base, new_segment->size, new_segment);  // before any block
    MutexLock lock(&shard.mu);
    shard.AddSegment(new_segment, BlockState::kUnmapped);
    target = new_segment->first;
    map_at = target->address;
    to_map = RoundUp(rounded, g);
  }
  // A growth that fails leaves nothing behind: not even the address range it reserved.
  auto fail = [&](size_t mapped, const std::vector<PhysicalHandle>& handles,
                  absl::Status cause) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_) {
    absl::Status status = RejectGrowth(arena, target, map_at, mapped, handles, cause);
    if (new_segment != nullptr) {
      bool idle;
      {
        MutexLock lock(&shard.mu);
        idle = shard.RemoveSegmentIfIdle(new_segment);
      }
      if (idle && device_->ReleaseAddressRange(new_segment->base, new_segment->size).ok()) {
        RetireSegment(new_segment);
      }
    }
    return status;
  };

  const size_t granules = to_map / g;
  std::vector<PhysicalHandle> handles;
  handles.reserve(granules);
  // Reclaiming waits for freed work (a device synchronization), which a capture forbids.
  if (config_.release_free_chunks_on_growth && captures_underway_.load() == 0) {
    absl::Status s = ReclaimAcrossShards(shard, granules, target, &handles);
    arena.device_stats.reserved_bytes.Increase(static_cast<int64_t>(handles.size() * g));
    if (!s.ok()) return fail(/*mapped=*/0, handles, s);
  }
  // Fail fast when the device plainly lacks the memory, rather than map thousands of chunks
  // only to give them back.
  if (absl::StatusOr<MemoryInfo> info = device_->GetMemoryInfo();
      info.ok() && (granules - handles.size()) * g > info->free_bytes) {
    return fail(/*mapped=*/0, handles,
                absl::ResourceExhaustedError(
                    absl::StrFormat("the device has %u bytes free", info->free_bytes)));
  }
  absl::Status status;
  while (status.ok() && handles.size() < granules) {
    absl::StatusOr<PhysicalHandle> handle = device_->CreatePhysical(g);
    status = handle.status();
    if (!status.ok()) break;
    ++arena.device_stats.device_allocations;
    arena.device_stats.reserved_bytes.Increase(static_cast<int64_t>(g));
    handles.push_back(*handle);
  }
  Segment* segment = target->segment;
  size_t mapped = 0;
  while (status.ok() && mapped < granules) {
    uintptr_t address = map_at + mapped * g;
    status = device_->Map(address, g, handles[mapped]);
    if (!status.ok()) break;
    segment->chunks[(address - segment->base) / g] = handles[mapped];
    ++mapped;
  }
  if (!status.ok()) return fail(mapped, handles, status);
  MutexLock lock(&shard.mu);
  shard.MarkMapped(target, map_at, to_map);
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::RejectGrowth(Arena& arena, const Block* target,
                                                uintptr_t map_at,
                                                size_t mapped,
                                                const std::vector<PhysicalHandle>& handles,
                                                absl::Status cause) {
  // Nothing of a failed growth stays mapped, and every chunk it holds goes back to the device
  // (the reclaimed ones were free memory anyway).
  Segment* segment = target->segment;
  for (size_t i = 0; i < handles.size(); ++i) {
    if (i < mapped) {
      uintptr_t address = map_at + i * granularity_;
      device_->Unmap(address, granularity_).IgnoreError();
      segment->chunks[(address - segment->base) / granularity_] = 0;
    }
    if (device_->ReleasePhysical(handles[i]).ok()) {
      ++arena.device_stats.device_frees;
      arena.device_stats.reserved_bytes.Decrease(static_cast<int64_t>(granularity_));
    }
  }
  return cause;
}

absl::Status CachingAllocatorImpl::ReclaimAcrossShards(Shard& shard, size_t wanted,
                                                       const Block* keep,
                                                       std::vector<PhysicalHandle>* handles) {
  // The growing shard first, then the others, each locked alone. An arena that keeps its memory
  // (a graph's pool) gives none of it up, not even to itself: a graph replays into the addresses
  // it captured, so a chunk must never move from one address of its pool to another.
  if (shard.arena->shares_free_memory) {
    MutexLock lock(&shard.mu);
    absl::Status s = ReclaimFreeGranules(shard, wanted, keep, handles);
    if (!s.ok()) return s;
  }
  for (Arena* arena : live_arenas_) {  // a gone arena has no free chunks, only ranges
    if (!arena->expandable || !arena->shares_free_memory) continue;
    for (Shard* other : arena->Shards()) {
      if (handles->size() == wanted) return absl::OkStatus();
      if (other == &shard) continue;
      MutexLock lock(&other->mu);
      absl::Status s = ReclaimFreeGranules(*other, wanted, nullptr, handles);
      if (!s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::WaitForFreedWork(const Block& block) {
  if (block.freed_epoch < quiet_before_) return absl::OkStatus();
  return SynchronizeFreedWork();
}

absl::Status CachingAllocatorImpl::SynchronizeFreedWork() {
  // Blocks freed from here on read an epoch >= start; those freed before read less, and the
  // work their streams queued before freeing them is done once the synchronization returns.
  const uint64_t start = free_epoch_.fetch_add(1) + 1;
  if (absl::Status s = device_->SynchronizeDevice(); !s.ok()) return s;
  quiet_before_ = start;
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::ReclaimFreeGranules(Shard& shard, size_t wanted,
                                                       const Block* keep,
                                                       std::vector<PhysicalHandle>* handles) {
  const size_t g = granularity_;
  shard.FlushQuick();
  struct Candidate {
    Block* block;
    uintptr_t begin;
    uintptr_t end;
  };
  std::vector<Candidate> candidates;
  for (Segment* segment : shard.segments()) {
    if (!segment->expandable) continue;
    for (Block* block = segment->first; block != nullptr; block = block->next) {
      if (block->state != BlockState::kFree) continue;
      if (keep != nullptr && (block == keep->prev || block == keep->next)) continue;
      uintptr_t begin = RoundUp(block->address, g);
      uintptr_t end = RoundDown(block->address + block->size, g);
      if (end > begin) candidates.push_back(Candidate{block, begin, end});
    }
  }
  if (candidates.empty() || handles->size() >= wanted) return absl::OkStatus();
  // Unmapping never merges free blocks, and the only blocks it merges (unmapped neighbours) are
  // not candidates, so the candidate pointers stay valid throughout.
  for (const Candidate& candidate : candidates) {
    if (handles->size() == wanted) break;
    size_t take = std::min((candidate.end - candidate.begin) / g, wanted - handles->size());
    Segment* segment = candidate.block->segment;
    // Blocks freed in stream order may still be read or written by work queued on the stream.
    if (absl::Status s = WaitForFreedWork(*candidate.block); !s.ok()) return s;
    for (size_t i = 0; i < take; ++i) {
      uintptr_t address = candidate.begin + i * g;
      if (absl::Status s = device_->Unmap(address, g); !s.ok()) return s;
      size_t index = (address - segment->base) / g;
      handles->push_back(segment->chunks[index]);
      segment->chunks[index] = 0;
    }
    // The chunks now belong to the growing arena, which counts them when it maps them.
    shard.arena->device_stats.reserved_bytes.Decrease(static_cast<int64_t>(take * g));
    shard.MarkUnmapped(candidate.block, candidate.begin, candidate.begin + take * g);
  }
  return absl::OkStatus();
}

// --- Returning memory ------------------------------------------------------------------------

absl::Status CachingAllocatorImpl::ReleaseCached() {
  for (Arena* arena : live_arenas_) {
    if (!arena->shares_free_memory) continue;
    if (absl::Status s = ReleaseArenaCache(*arena, AddressRanges::kRelease); !s.ok()) return s;
  }
  // A gone arena holds nothing anyone may use, whether or not it shares its free memory: its
  // address ranges go too (a graph's pool, once its last graph is gone, is never begun again).
  // Once they have, no walk visits it again.
  for (Arena* arena : std::vector<Arena*>(gone_holding_)) {
    if (absl::Status s = ReleaseArenaCache(*arena, AddressRanges::kRelease); !s.ok()) return s;
    ForgetIfEmpty(*arena);
  }
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::ReleaseArenaCache(Arena& arena, AddressRanges ranges) {
  // An arena that keeps its memory (a graph's pool) is used by work the allocator never sees
  // free anything (graph replays), so free epochs say nothing about it: synchronize first.
  if (!arena.shares_free_memory) {
    if (absl::Status s = SynchronizeFreedWork(); !s.ok()) return s;
  }
  for (Shard* shard : arena.Shards()) {
    MutexLock lock(&shard->mu);
    if (absl::Status s = ReleaseShardCache(*shard, ranges); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::ReleaseShardCache(Shard& shard, AddressRanges ranges) {
  if (absl::Status s = shard.WaitForEvents(); !s.ok()) return s;
  Arena& arena = *shard.arena;
  const size_t g = granularity_;
  std::vector<Segment*> segments = shard.segments();  // the loop removes from the original
  for (Segment* segment : segments) {
    if (!segment->expandable) {
      Block* only = segment->first;
      if (only->next != nullptr || only->state != BlockState::kFree) continue;
      if (absl::Status s = WaitForFreedWork(*only); !s.ok()) return s;
      if (absl::Status s = arena.source->FreeSegment(segment->base, segment->size); !s.ok()) {
        return s;
      }
      shard.RemoveSegmentIfIdle(segment);
      ++arena.device_stats.device_frees;
      arena.device_stats.reserved_bytes.Decrease(static_cast<int64_t>(segment->size));
      RetireSegment(segment);
      continue;
    }
    // Expandable: unmap and release every whole free granule.
    std::vector<Block*> free_blocks;
    for (Block* block = segment->first; block != nullptr; block = block->next) {
      if (block->state == BlockState::kFree) free_blocks.push_back(block);
    }
    for (Block* block : free_blocks) {
      uintptr_t begin = RoundUp(block->address, g);
      uintptr_t end = RoundDown(block->address + block->size, g);
      if (end <= begin) continue;
      if (absl::Status s = WaitForFreedWork(*block); !s.ok()) return s;
      for (uintptr_t address = begin; address < end; address += g) {
        size_t index = (address - segment->base) / g;
        if (absl::Status s = device_->Unmap(address, g); !s.ok()) return s;
        if (absl::Status s = device_->ReleasePhysical(segment->chunks[index]); !s.ok()) return s;
        segment->chunks[index] = 0;
        ++arena.device_stats.device_frees;
        arena.device_stats.reserved_bytes.Decrease(static_cast<int64_t>(g));
      }
      shard.MarkUnmapped(block, begin, end);
    }
    Block* first = segment->first;
    if (ranges == AddressRanges::kRelease && first->next == nullptr &&
        first->state == BlockState::kUnmapped) {
      if (absl::Status s = device_->ReleaseAddressRange(segment->base, segment->size); !s.ok()) {
        return s;
      }
      shard.RemoveSegmentIfIdle(segment);
      RetireSegment(segment);
    }
  }
  return absl::OkStatus();
}

std::string CachingAllocatorImpl::OutOfMemoryMessage(size_t bytes, size_t rounded,
                                                     const Shard& shard,
                                                     const absl::Status& cause) {
  size_t reserved = 0;
  size_t allocated = 0;
  std::string by_pool;
  for (Arena* arena : live_arenas_) {  // gone arenas hold no memory
    size_t arena_reserved = static_cast<size_t>(arena->device_stats.reserved_bytes.current);
    size_t arena_allocated = 0;
    for (Shard* other : arena->Shards()) {
      MutexLock lock(&other->mu);
      arena_allocated += static_cast<size_t>(other->stats().allocated_bytes.current);
    }
    reserved += arena_reserved;
    allocated += arena_allocated;
    if (arena_reserved == 0) continue;
    absl::StrAppendFormat(&by_pool, "%s'%s' %u reserved (%s), %u in live blocks", by_pool.empty() ? "" : "; ",
                          arena->label, arena_reserved, HumanBytes(arena_reserved),
                          arena_allocated);
  }
  size_t cached = reserved > allocated ? reserved - allocated : 0;
  std::string device_free = "unknown";
  if (absl::StatusOr<MemoryInfo> info = device_->GetMemoryInfo(); info.ok()) {
    device_free = absl::StrCat(HumanBytes(info->free_bytes), " free of ",
                               HumanBytes(info->total_bytes));
  }
  return absl::StrFormat(
      "tidepool: out of memory on device %d: tried to allocate %s (%u bytes requested, %u "
      "rounded) in pool '%s' on stream %u. tidepool has %u bytes reserved (%s): %u bytes (%s) "
      "in live blocks and %u bytes (%s) cached but free, too fragmented for this request, "
      "awaiting events on other streams, or held by pools that keep their memory. By pool: %s. "
      "The device has %s.%s The device said: %s",
      device_->ordinal(), HumanBytes(bytes), bytes, rounded, shard.arena->label,
      shard.stream_id, reserved, HumanBytes(reserved), allocated, HumanBytes(allocated), cached,
      HumanBytes(cached), by_pool.empty() ? "none" : by_pool, device_free,
      captures_underway_.load() > 0
          ? " A CUDA graph capture is underway, so the cache was not given back to the device."
          : "",
      cause.message());
}

// --- Observation -----------------------------------------------------------------------------

AllocatorStats CachingAllocatorImpl::GetStats(Arena* only) {
  MutexLock growth(&growth_mu_);
  AllocatorStats total;
  for (Arena* arena : Arenas()) {
    if (only != nullptr && arena != only) continue;
    total += arena->device_stats;
    for (Shard* shard : arena->Shards()) {
      MutexLock lock(&shard->mu);
      total += shard->stats();
    }
  }
  return total;
}

std::string CachingAllocatorImpl::SnapshotJson(Arena* only) {
  MutexLock growth(&growth_mu_);
  std::string json = absl::StrFormat(R"({"device":%d,"granularity":%u,"segments":[)",
                                     device_->ordinal(), granularity_);
  bool first_segment = true;
  for (Arena* arena : Arenas()) {
    if (only != nullptr && arena != only) continue;
    for (Shard* shard : arena->Shards()) {
      MutexLock lock(&shard->mu);
      for (const Segment* segment : shard->segments()) {
        absl::StrAppendFormat(
            &json,
            R"(%s{"pool":"%s","address":%u,"size":%u,"stream":%u,"expandable":%s,"small":%s,)"
            R"("blocks":[)",
            first_segment ? "" : ",", arena->label, segment->base, segment->size,
            shard->stream_id, segment->expandable ? "true" : "false",
            segment->small ? "true" : "false");
        first_segment = false;
        for (const Block* block = segment->first; block != nullptr; block = block->next) {
          absl::StrAppendFormat(&json,
                                R"(%s{"address":%u,"size":%u,"requested":%u,"state":"%s"})",
                                block == segment->first ? "" : ",", block->address, block->size,
                                block->requested, StateName(block->state));
        }
        json += "]}";
      }
    }
  }
  json += "]}";
  return json;
}

// ---------------------------------------------------------------------------------------------
// CachingAllocator

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
absl::Status CachingAllocator::EmptyCache() { return impl_->EmptyCache(); }
void CachingAllocator::NoteCaptureBegin() { impl_->NoteCaptureBegin(); }
absl::Status CachingAllocator::NoteCaptureEnd() { return impl_->NoteCaptureEnd(); }
int CachingAllocator::captures_underway() const { return impl_->captures_underway(); }
absl::StatusOr<StreamId> CachingAllocator::StreamIdOf(Stream stream) const {
  return impl_->StreamIdOf(stream);
}
absl::StatusOr<size_t> CachingAllocator::BlockSize(const void* ptr) const {
  return impl_->BlockSize(ptr);
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
  return impl_->LiveBlocks(const_cast<Arena*>(arena));
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
  return impl_->GetStats(const_cast<Arena*>(arena));
}
std::string CachingAllocator::SnapshotJson(const Arena* arena) const {
  return impl_->SnapshotJson(const_cast<Arena*>(arena));
}
Device* CachingAllocator::device() const { return impl_->device(); }
const Config& CachingAllocator::config() const { return impl_->config(); }

}  // namespace tidepool
