// Giving memory back: EmptyCache, trimming and out-of-memory recovery return whole free
// segments and free mapped chunks, each only once the work that may still use it is done: the
// shard's stream fence, or a device synchronization where nothing narrower is sound
// (caching_allocator_impl.h, Unfinished). Runs under the growth lock.
#include <vector>

#include "allocator/caching_allocator_impl.h"
#include "allocator/size_policy.h"

namespace tidepool {

absl::Status CachingAllocatorImpl::EmptyCache() {
  MutexLock growth(&growth_mu_);
  if (absl::Status s = RefuseDuringCapture("empty_cache"); !s.ok()) return s;
  return ReleaseCached(Unfinished::kSynchronize);
}

absl::Status CachingAllocatorImpl::ReleaseCached(Unfinished mode) {
  for (Arena* arena : live_arenas_) {
    if (!arena->shares_free_memory) continue;
    if (absl::Status s = ReleaseArenaCache(*arena, AddressRanges::kRelease, mode); !s.ok()) {
      return s;
    }
  }
  // A gone arena holds nothing anyone may use, whether or not it shares its free memory: its
  // address ranges go too (a graph's pool, once its last graph is gone, is never begun again).
  // Once they have, no walk visits it again.
  for (Arena* arena : std::vector<Arena*>(gone_holding_)) {
    if (absl::Status s = ReleaseArenaCache(*arena, AddressRanges::kRelease, mode); !s.ok()) {
      return s;
    }
    ForgetIfEmpty(*arena);
  }
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::ReleaseArenaCache(Arena& arena, AddressRanges ranges,
                                                     Unfinished mode) {
  // An arena that keeps its memory (a graph's pool) is used by work the allocator never sees
  // free anything (graph replays, on any stream), so neither free epochs nor fences say anything
  // about it: synchronize first. A graph pool's memory goes back once, when its graphs are gone.
  if (!arena.shares_free_memory) {
    if (absl::Status s = SynchronizeFreedWork(); !s.ok()) return s;
  }
  for (Shard* shard : arena.Shards()) {
    MutexLock lock(&shard->mu);
    if (absl::Status s = ReleaseShardCache(*shard, ranges, mode); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::ReleaseShardCache(Shard& shard, AddressRanges ranges,
                                                     Unfinished mode) {
  if (absl::Status s = shard.WaitForEvents(); !s.ok()) return s;
  Arena& arena = *shard.arena;
  const size_t g = granularity_;
  std::vector<Segment*> segments = shard.segments();  // the loop removes from the original
  for (Segment* segment : segments) {
    if (!segment->expandable) {
      Block* only = segment->first;
      if (only->next != nullptr || only->state != BlockState::kFree) continue;
      absl::StatusOr<bool> idle = FreedWorkDone(shard, *only, mode);
      if (!idle.ok()) return idle.status();
      if (!*idle) continue;
      if (absl::Status s = arena.source->FreeSegment(segment->base, segment->size); !s.ok()) {
        return s;
      }
      shard.RemoveSegmentIfIdle(segment);
      ++DeviceStats(arena).device_frees;
      DeviceStats(arena).reserved_bytes.Decrease(static_cast<int64_t>(segment->size));
      RetireSegment(segment);
      continue;
    }
    // Expandable: unmap and release every run lying wholly in free memory.
    std::vector<Block*> free_blocks;
    for (Block* block = segment->first; block != nullptr; block = block->next) {
      if (block->state == BlockState::kFree) free_blocks.push_back(block);
    }
    for (Block* block : free_blocks) {
      uintptr_t begin = RoundUp(block->address, g);
      uintptr_t end = RoundDown(block->address + block->size, g);
      if (end <= begin) continue;
      const std::vector<Segment::Run> inside = segment->RunsInside(begin, end, g);
      if (inside.empty()) continue;
      absl::StatusOr<bool> idle = FreedWorkDone(shard, *block, mode);
      if (!idle.ok()) return idle.status();
      if (!*idle) continue;
      // The runs inside are adjacent: one stretch, marked unmapped as far as it went.
      const size_t first_run = inside.front().first;
      const size_t count = inside.back().first + inside.back().count - first_run;
      size_t released = 0;
      absl::Status s = ReleaseRuns(arena, *segment, first_run, count, &released);
      if (released > 0) {
        shard.MarkUnmapped(block, segment->base + first_run * g,
                           segment->base + (first_run + released) * g);
      }
      if (!s.ok()) return s;
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

absl::StatusOr<bool> CachingAllocatorImpl::FreedWorkDone(Shard& shard, const Block& block,
                                                         Unfinished mode) {
  if (block.freed_epoch < quiet_before_) return true;
  if (shard.FenceCovers(block)) {
    const Shard::FenceWait how = mode == Unfinished::kSkip        ? Shard::FenceWait::kQuery
                                 : mode == Unfinished::kBriefWait ? Shard::FenceWait::kBrief
                                                                  : Shard::FenceWait::kBlock;
    absl::StatusOr<bool> done = shard.FenceDone(how);
    if (!done.ok() || *done) return done;
    left_unfinished_ = true;  // kSkip, kBriefWait: the fence is still running
    return false;
  }
  if (mode == Unfinished::kSynchronize) {
    if (absl::Status s = SynchronizeFreedWork(); !s.ok()) return s;
    return true;
  }
  // Only an allocation on the stream may record its fence (shard.h says why).
  shard.fence_wanted.store(true, std::memory_order_relaxed);
  left_unfinished_ = true;
  return false;
}

absl::Status CachingAllocatorImpl::SynchronizeFreedWork() {
  // Blocks freed from here on read an epoch >= start; those freed before read less, and the
  // work their streams queued before freeing them is done once the synchronization returns.
  const uint64_t start = free_epoch_.fetch_add(1) + 1;
  if (absl::Status s = device_->SynchronizeDevice(); !s.ok()) return s;
  quiet_before_ = start;
  return absl::OkStatus();
}

}  // namespace tidepool
