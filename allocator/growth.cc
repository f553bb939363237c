// Growth: new plain segments from the arena's source, and expandable segments mapped chunk by
// chunk, taking free chunks back from anywhere in the allocator first (caching_allocator_impl.h
// says why, and how growth waits for freed work without synchronizing the device). Everything
// here runs under the growth lock, taking shard locks one at a time.
#include <algorithm>
#include <vector>

#include "absl/strings/str_format.h"
#include "allocator/caching_allocator_impl.h"
#include "allocator/size_policy.h"

namespace tidepool {

absl::Status CachingAllocatorImpl::TooLarge(size_t rounded) const {
  return absl::ResourceExhaustedError(absl::StrFormat(
      "%u bytes is more than the device's %u bytes of memory", rounded, total_memory_));
}

absl::Status CachingAllocatorImpl::CheckMemoryLimit(size_t more) const {
  if (memory_limit_ == SIZE_MAX) return absl::OkStatus();
  size_t reserved = 0;
  for (const Arena* arena : live_arenas_) {
    reserved += static_cast<size_t>(DeviceStats(*arena).reserved_bytes.current);
  }
  if (reserved <= memory_limit_ && more <= memory_limit_ - reserved) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrFormat(
      "the memory limit of %u bytes (set_per_process_memory_fraction, or SetMemoryLimit) would "
      "be passed: %u bytes are reserved, and this growth needs %u more",
      memory_limit_, reserved, more));
}

absl::Status CachingAllocatorImpl::Grow(Shard& shard, size_t rounded, Stream stream) {
  return shard.arena->expandable ? GrowExpandable(shard, rounded, stream)
                                 : GrowPlain(shard, rounded);
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
  DeviceStats(*shard.arena).segments.Increase(1);
  return segments_.back().get();
}

void CachingAllocatorImpl::RetireSegment(Segment* segment) {
  page_map_.Unregister(segment->base, segment->size, segment);
  segment->live = false;
  std::vector<PhysicalHandle>().swap(segment->chunks);  // the record stays; its table need not
  DeviceStats(*segment->shard->arena).segments.Decrease(1);
}

absl::Status CachingAllocatorImpl::GrowPlain(Shard& shard, size_t rounded) {
  Arena& arena = *shard.arena;
  size_t size = PlainSegmentSize(rounded, config_.max_split_size);
  if (size > total_memory_) return TooLarge(rounded);
  if (absl::Status s = CheckMemoryLimit(size); !s.ok()) return s;
  absl::StatusOr<uintptr_t> base = arena.source->AllocateSegment(size);
  if (!base.ok()) return base.status();
  if (!PageMap<Segment>::Covers(*base, size)) {
    arena.source->FreeSegment(*base, size).IgnoreError();
    return absl::InternalError(
        absl::StrFormat("tidepool: device address %#x is outside the page map", *base));
  }
  ++DeviceStats(arena).device_allocations;
  DeviceStats(arena).reserved_bytes.Increase(static_cast<int64_t>(size));
  Segment* segment = NewSegment(shard, *base, size, /*expandable=*/false, IsSmall(rounded));
  // The page map first: once the shard has the segment, another thread's fast path may hand out
  // a block of it, and a free of that block must find it.
  page_map_.Register(segment->base, segment->size, segment);
  MutexLock lock(&shard.mu);
  shard.AddSegment(segment, BlockState::kFree);
  return absl::OkStatus();
}

// An expandable growth in three steps: choose where to map (an unmapped block next to free
// memory), reserve a new address range when there is no such place, then map chunks there
// (reclaimed free chunks first, new ones for the rest). A growth that fails leaves nothing
// behind, not even the address range it reserved.
absl::Status CachingAllocatorImpl::GrowExpandable(Shard& shard, size_t rounded, Stream stream) {
  if (RoundUp(rounded, granularity_) > total_memory_) return TooLarge(rounded);
  ExpandablePlacement placement = ChoosePlacement(shard, rounded);
  if (placement.target == nullptr) {
    if (absl::Status s = ReserveExpandable(shard, rounded, &placement); !s.ok()) return s;
  }
  return MapExpandable(shard, placement, stream);
}

namespace {

size_t FreeSize(const Block* block) {
  return block != nullptr && block->state == BlockState::kFree ? block->size : 0;
}

}  // namespace

// Where to map: inside an unmapped block, extending the free block before it, or the one after
// it, or bridging both. The placement that needs the fewest new bytes wins; the index is
// ordered, so ties go to the smaller, then lower, unmapped block (deterministic).
CachingAllocatorImpl::ExpandablePlacement CachingAllocatorImpl::ChoosePlacement(Shard& shard,
                                                                              size_t rounded) {
  const size_t g = granularity_;
  ExpandablePlacement best;
  // `have` free bytes already beside the unmapped block; `whole`: map all of it.
  auto consider = [&](Block* unmapped, size_t have, bool at_end, bool whole) {
    if (have >= rounded) return;  // a free block that big would have served the request
    size_t need = whole ? unmapped->size : RoundUp(rounded - have, g);
    if (need > unmapped->size || need >= best.to_map) return;
    best.to_map = need;
    best.target = unmapped;
    best.map_at = at_end ? unmapped->address + unmapped->size - need : unmapped->address;
  };
  MutexLock lock(&shard.mu);
  for (Block* unmapped : shard.unmapped(IsSmall(rounded))) {
    size_t before = FreeSize(unmapped->prev);
    size_t after = FreeSize(unmapped->next);
    consider(unmapped, before, /*at_end=*/false, /*whole=*/false);
    consider(unmapped, after, /*at_end=*/true, /*whole=*/false);
    if (before + unmapped->size + after >= rounded) {
      consider(unmapped, 0, /*at_end=*/false, /*whole=*/true);
    }
  }
  return best;
}

// A new reserved range for the shard's size class: the configured reserve, or as much as the
// device has (a sixteenth for small requests), and never less than the request.
absl::Status CachingAllocatorImpl::ReserveExpandable(Shard& shard, size_t rounded,
                                                     ExpandablePlacement* placement) {
  const size_t g = granularity_;
  const bool small = IsSmall(rounded);
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
  Segment* segment = NewSegment(shard, *base, reserve, /*expandable=*/true, small);
  page_map_.Register(segment->base, segment->size, segment);  // before any block
  MutexLock lock(&shard.mu);
  shard.AddSegment(segment, BlockState::kUnmapped);
  placement->new_segment = segment;
  placement->target = segment->first;
  placement->map_at = segment->first->address;
  placement->to_map = RoundUp(rounded, g);
  return absl::OkStatus();
}

void CachingAllocatorImpl::FenceStream(StreamId id, Stream stream) {
  for (Arena* arena : live_arenas_) {
    for (Shard* shard : arena->Shards()) {  // every lane of the stream
      if (shard->stream_id != id) continue;
      // A shard busy with an allocation gets no fence now: waiting for it would stall growth
      // behind another thread's cached path (its memory is then only left alone).
      if (!shard->mu.TryLock()) continue;
      shard->RecordFence(stream).IgnoreError();
      shard->mu.Unlock();
    }
  }
}

bool CachingAllocatorImpl::DeviceHasRoom(size_t bytes) {
  if (!CheckMemoryLimit(bytes).ok()) return false;
  absl::StatusOr<MemoryInfo> info = device_->GetMemoryInfo();
  return !info.ok() || bytes <= info->free_bytes;
}

absl::Status CachingAllocatorImpl::MapExpandable(Shard& shard,
                                                 const ExpandablePlacement& placement,
                                                 Stream stream) {
  Arena& arena = *shard.arena;
  const size_t g = granularity_;
  Reclaim reclaim;
  reclaim.wanted = placement.to_map / g;
  // Reclaiming queries and waits for events, which a capture forbids. First this stream's free
  // runs, after fences recorded now (so they cover all of it), and other streams' runs known
  // idle; then, only if the device cannot supply the rest, other streams' runs a fence covers,
  // waiting for it.
  if (config_.release_free_chunks_on_growth && captures_underway_.load() == 0) {
    FenceStream(shard.stream_id, stream);
    absl::Status s = ReclaimAcrossShards(shard, placement.target, &reclaim, Unfinished::kSkip);
    if (s.ok() && reclaim.missing() > 0 && !DeviceHasRoom(reclaim.missing() * g)) {
      s = ReclaimAcrossShards(shard, placement.target, &reclaim, Unfinished::kWaitFence);
    }
    DeviceStats(arena).reserved_bytes.Increase(static_cast<int64_t>(reclaim.taken * g));
    if (!s.ok()) return AbandonExpandable(shard, placement, /*mapped=*/0, reclaim.runs, s);
  }
  const size_t missing = reclaim.wanted - reclaim.taken;
  if (missing > 0) {
    if (absl::Status s = CheckMemoryLimit(missing * g); !s.ok()) {
      return AbandonExpandable(shard, placement, /*mapped=*/0, reclaim.runs, s);
    }
    // Fail fast when the device plainly lacks the memory.
    if (absl::StatusOr<MemoryInfo> info = device_->GetMemoryInfo();
        info.ok() && missing * g > info->free_bytes) {
      return AbandonExpandable(shard, placement, /*mapped=*/0, reclaim.runs,
                               absl::ResourceExhaustedError(absl::StrFormat(
                                   "the device has %u bytes free", info->free_bytes)));
    }
    // What is missing is taken from the device in runs of at most expandable_run_mb: fewer,
    // larger physical allocations cost the driver fewer calls (a run is created, mapped and
    // given access once), but a run moves or goes back only whole, so a long-lived block pins
    // all of its run. docs/benchmarks.md has the trade, measured on the bundled traces.
    const size_t most = std::max<size_t>(1, config_.expandable_run / g);
    for (size_t left = missing; left > 0;) {
      const size_t granules = std::min(left, most);
      absl::StatusOr<PhysicalHandle> handle = device_->CreatePhysical(granules * g);
      if (!handle.ok()) {
        return AbandonExpandable(shard, placement, /*mapped=*/0, reclaim.runs, handle.status());
      }
      ++DeviceStats(arena).device_allocations;
      DeviceStats(arena).reserved_bytes.Increase(static_cast<int64_t>(granules * g));
      reclaim.runs.push_back(PhysicalRun{*handle, granules});
      left -= granules;
    }
  }
  Segment* segment = placement.target->segment;
  size_t mapped = 0;
  uintptr_t address = placement.map_at;
  absl::Status status;
  for (const PhysicalRun& run : reclaim.runs) {
    status = device_->Map(address, run.granules * g, run.handle);
    if (!status.ok()) break;
    const size_t first = (address - segment->base) / g;
    std::fill(segment->chunks.begin() + first, segment->chunks.begin() + first + run.granules,
              run.handle);
    address += run.granules * g;
    ++mapped;
  }
  if (!status.ok()) return AbandonExpandable(shard, placement, mapped, reclaim.runs, status);
  MutexLock lock(&shard.mu);
  shard.MarkMapped(placement.target, placement.map_at, placement.to_map);
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::AbandonExpandable(Shard& shard,
                                                     const ExpandablePlacement& placement,
                                                     size_t mapped,
                                                     const std::vector<PhysicalRun>& runs,
                                                     absl::Status cause) {
  absl::Status status = RejectGrowth(*shard.arena, placement.target, placement.map_at, mapped,
                                     runs, std::move(cause));
  Segment* reserved = placement.new_segment;
  if (reserved != nullptr) {
    bool idle;
    {
      MutexLock lock(&shard.mu);
      idle = shard.RemoveSegmentIfIdle(reserved);
    }
    if (idle && device_->ReleaseAddressRange(reserved->base, reserved->size).ok()) {
      RetireSegment(reserved);
    }
  }
  return status;
}

absl::Status CachingAllocatorImpl::RejectGrowth(Arena& arena, const Block* target,
                                                uintptr_t map_at, size_t mapped,
                                                const std::vector<PhysicalRun>& runs,
                                                absl::Status cause) {
  // Nothing of a failed growth stays mapped, and every run it holds goes back to the device
  // (the reclaimed ones were free memory anyway).
  Segment* segment = target->segment;
  uintptr_t address = map_at;
  for (size_t i = 0; i < runs.size(); ++i) {
    const size_t bytes = runs[i].granules * granularity_;
    if (i < mapped) {
      device_->Unmap(address, bytes).IgnoreError();
      const size_t first = (address - segment->base) / granularity_;
      std::fill(segment->chunks.begin() + first,
                segment->chunks.begin() + first + runs[i].granules, 0);
    }
    address += bytes;
    if (device_->ReleasePhysical(runs[i].handle).ok()) {
      ++DeviceStats(arena).device_frees;
      DeviceStats(arena).reserved_bytes.Decrease(static_cast<int64_t>(bytes));
    }
  }
  return cause;
}

absl::Status CachingAllocatorImpl::UnmapRuns(Segment& segment, size_t first, size_t count,
                                             std::vector<PhysicalRun>* runs) {
  const size_t g = granularity_;
  for (const Segment::Run& run :
       segment.RunsInside(segment.base + first * g, segment.base + (first + count) * g, g)) {
    const PhysicalHandle handle = segment.chunks[run.first];
    absl::Status s = device_->Unmap(segment.base + run.first * g, run.count * g);
    if (!s.ok()) return s;
    std::fill(segment.chunks.begin() + run.first,
              segment.chunks.begin() + run.first + run.count, 0);
    runs->push_back(PhysicalRun{handle, run.count});
  }
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::ReleaseRuns(Arena& arena, Segment& segment, size_t first,
                                               size_t count, size_t* released) {
  std::vector<PhysicalRun> runs;
  absl::Status status = UnmapRuns(segment, first, count, &runs);
  *released = 0;
  for (const PhysicalRun& run : runs) {
    // Unmapped either way: a run the device would not take back is lost, not left mapped.
    *released += run.granules;
    absl::Status s = device_->ReleasePhysical(run.handle);
    if (!s.ok()) {
      if (status.ok()) status = s;
      continue;
    }
    ++DeviceStats(arena).device_frees;
    DeviceStats(arena).reserved_bytes.Decrease(static_cast<int64_t>(run.granules * granularity_));
  }
  return status;
}

absl::Status CachingAllocatorImpl::ReclaimAcrossShards(Shard& shard, const Block* keep,
                                                       Reclaim* reclaim, Unfinished mode) {
  // The growing shard first, then the others, each locked alone; runs that fit before oversized
  // ones go back. An arena that keeps its memory (a graph's pool) gives none of it up, not even
  // to itself: a graph replays into the addresses it captured, so a run must never move from
  // one address of its pool to another.
  // The growing stream's own memory gets a brief wait for its fresh fences (see the
  // declaration).
  auto mode_for = [&](const Shard& owner) {
    return owner.stream_id == shard.stream_id && mode == Unfinished::kSkip ? Unfinished::kBriefWait
                                                                          : mode;
  };
  for (bool release_oversized : {false, true}) {
    if (shard.arena->shares_free_memory) {
      MutexLock lock(&shard.mu);
      absl::Status s = ReclaimFreeRuns(shard, keep, reclaim, release_oversized, mode_for(shard));
      if (!s.ok()) return s;
    }
    for (Arena* arena : live_arenas_) {  // a gone arena has no free runs, only ranges
      if (!arena->expandable || !arena->shares_free_memory) continue;
      for (Shard* other : arena->Shards()) {
        if (reclaim->missing() == 0) return absl::OkStatus();
        if (other == &shard) continue;
        // A shard busy with an allocation is passed over rather than waited for (its memory
        // stays; an out-of-memory retry takes every lock).
        if (!other->mu.TryLock()) continue;
        absl::Status s =
            ReclaimFreeRuns(*other, nullptr, reclaim, release_oversized, mode_for(*other));
        other->mu.Unlock();
        if (!s.ok()) return s;
      }
    }
    if (reclaim->missing() == 0) break;
  }
  return absl::OkStatus();
}

absl::Status CachingAllocatorImpl::ReclaimFreeRuns(Shard& shard, const Block* keep,
                                                   Reclaim* reclaim, bool release_oversized,
                                                   Unfinished mode) {
  const size_t g = granularity_;
  if (reclaim->missing() == 0) return absl::OkStatus();
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
  // Unmapping never merges free blocks, and the only blocks it merges (unmapped neighbours) are
  // not candidates, so the candidate pointers stay valid throughout.
  for (const Candidate& candidate : candidates) {
    if (reclaim->missing() == 0) break;
    Segment& segment = *candidate.block->segment;
    const std::vector<Segment::Run> inside = segment.RunsInside(candidate.begin, candidate.end, g);
    if (inside.empty()) continue;
    // Blocks freed in stream order may still be read or written by work queued on the stream.
    absl::StatusOr<bool> idle = FreedWorkDone(shard, *candidate.block, mode);
    if (!idle.ok()) return idle.status();
    if (!*idle) continue;
    // Adjacent runs: those that fit what is missing, or (release_oversized) any, until nothing
    // is missing.
    size_t first = 0;
    size_t count = 0;
    for (const Segment::Run& run : inside) {
      const size_t room = reclaim->missing() - (release_oversized ? 0 : count);
      if (release_oversized ? count >= reclaim->missing() : run.count > room) {
        if (count == 0) continue;
        break;
      }
      if (count == 0) first = run.first;
      count += run.count;
    }
    if (count == 0) continue;
    // What was unmapped is marked so, even when the device refused part of it.
    size_t unmapped = 0;
    absl::Status status;
    if (release_oversized) {
      status = ReleaseRuns(*shard.arena, segment, first, count, &unmapped);
      reclaim->released += std::min(unmapped, reclaim->missing());
    } else {
      const size_t had = reclaim->runs.size();
      status = UnmapRuns(segment, first, count, &reclaim->runs);
      for (size_t i = had; i < reclaim->runs.size(); ++i) unmapped += reclaim->runs[i].granules;
      reclaim->taken += unmapped;
      // The runs now belong to the growing arena, which counts them when it maps them.
      DeviceStats(*shard.arena).reserved_bytes.Decrease(static_cast<int64_t>(unmapped * g));
    }
    if (unmapped > 0) {
      shard.MarkUnmapped(candidate.block, segment.base + first * g,
                         segment.base + (first + unmapped) * g);
    }
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

}  // namespace tidepool
