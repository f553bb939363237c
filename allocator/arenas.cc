// Arenas and capture marks: creating, retiring, reviving and trimming arenas, the lists the
// walks follow, and the count of CUDA graph captures underway. caching_allocator.h states what
// an arena is and what a capture changes; caching_allocator_impl.h has the lock order.
#include <algorithm>
#include <vector>

#include "absl/strings/str_format.h"
#include "allocator/caching_allocator_impl.h"

namespace tidepool {

std::vector<Shard*> Arena::Shards() const {
  MutexLock lock(&shards_mu);
  std::vector<Shard*> result;
  result.reserve(shards.size());
  for (const auto& [id, shard] : shards) result.push_back(shard.get());
  std::sort(result.begin(), result.end(), [](const Shard* a, const Shard* b) {
    return a->stream_id != b->stream_id ? a->stream_id < b->stream_id : a->lane < b->lane;
  });
  return result;
}

absl::StatusOr<Arena*> CachingAllocatorImpl::CreateArena(const ArenaOptions& options) {
  MutexLock growth(&growth_mu_);
  SegmentSource* source = options.source != nullptr ? options.source : &device_segments_;
  bool expandable = options.source == nullptr && config_.expandable_segments;
  const size_t index = arenas_.size();
  arenas_.push_back(std::make_unique<Arena>(index, options, source, expandable));
  arena_device_stats_.emplace_back();
  live_arenas_.push_back(arenas_.back().get());
  return arenas_.back().get();
}

std::vector<Arena*> CachingAllocatorImpl::Arenas() const {
  std::vector<Arena*> result;
  result.reserve(arenas_.size());
  for (const auto& arena : arenas_) result.push_back(arena.get());
  return result;
}

void CachingAllocatorImpl::NoteGone(Arena& arena) {
  live_arenas_.erase(std::find(live_arenas_.begin(), live_arenas_.end(), &arena));
  if (DeviceStats(arena).segments.current > 0) gone_holding_.push_back(&arena);
}

void CachingAllocatorImpl::ForgetIfEmpty(Arena& arena) {
  if (arena.state.load() != Arena::kGone || DeviceStats(arena).segments.current > 0) return;
  auto it = std::find(gone_holding_.begin(), gone_holding_.end(), &arena);
  if (it != gone_holding_.end()) gone_holding_.erase(it);
}

absl::Status CachingAllocatorImpl::TrimArena(Arena* arena) {
  if (absl::Status s = CheckArena(arena); !s.ok()) return s;
  MutexLock growth(&growth_mu_);
  if (absl::Status s = RefuseDuringCapture("trim"); !s.ok()) return s;
  // An explicit call that must give back all it can: see Unfinished::kSynchronize.
  absl::Status released =
      ReleaseArenaCache(*arena, AddressRanges::kRelease, Unfinished::kSynchronize);
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
  if (absl::Status s = ReleaseArenaCache(*arena, AddressRanges::kKeep, Unfinished::kSynchronize);
      !s.ok()) {
    return s;
  }
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
                                           return a->index < b->index;
                                         }),
                        arena);
  }
  arena->state.store(Arena::kActive, std::memory_order_release);
  return absl::OkStatus();
}

int64_t CachingAllocatorImpl::LiveBlocks(const Arena* arena) const {
  MutexLock growth(&growth_mu_);
  return LiveBlocksLocked(*arena);
}

int64_t CachingAllocatorImpl::walked_arenas() const {
  MutexLock growth(&growth_mu_);
  return static_cast<int64_t>(live_arenas_.size() + gone_holding_.size());
}

int64_t CachingAllocatorImpl::LiveBlocksLocked(const Arena& arena) const {
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
  if (absl::Status s = ReleaseArenaCache(arena, AddressRanges::kKeep, Unfinished::kSynchronize);
      !s.ok()) {
    return s;
  }
  arena.state.store(Arena::kGone, std::memory_order_release);
  NoteGone(arena);
  return absl::OkStatus();
}

// --- Capture marks ---------------------------------------------------------------------------

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
  // The last capture is over: what it held back can go ahead, once the device has finished the
  // work queued on the blocks' other streams (shard.h says why not those streams alone).
  bool synchronize = false;
  for (Arena* arena : live_arenas_) {
    for (Shard* shard : arena->Shards()) {
      MutexLock lock(&shard->mu);
      synchronize = synchronize || shard->HasDeferredFrees();
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

}  // namespace tidepool
