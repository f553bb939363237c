// The caching allocator's machinery behind caching_allocator.h: arenas and their shards, the
// page map from addresses to segments, and everything that talks to the device about memory
// (growth, trimming, out-of-memory recovery).
//
// Growth has two forms. A plain segment is one allocation from the arena's segment source,
// sized by the size policy. An expandable segment is a large reserved address range per shard
// and size class, in which physical chunks of the device's granularity are mapped where a request
// needs them, next to the free block they extend. Before it takes new chunks from the device,
// growth first unmaps whole free chunks elsewhere (in any arena that shares its free memory) and
// maps those again where they are needed, once the work queued on their streams before they were
// freed is done (blocks freed in stream order may still be in use by queued work): reserved
// memory then follows live memory instead of the history of the heap.
//
// Waiting for freed work. The allocator never synchronizes the whole device to grow. Each shard
// keeps a stream fence (shard.h): an event on its stream, recorded while an allocation on the
// stream proves its handle alive. Growth records the growing stream's fences and takes back its
// free memory once they pass, waiting for that at most 100 µs (long enough on an idle stream,
// never long for a busy one); from other streams it takes only chunks whose fence has completed.
// It waits for fences (one stream's event each) only when the device or the memory limit cannot
// supply the rest; chunks no fence covers yet are left alone, and their shard is asked for a
// fence. The whole device is synchronized only where nothing narrower is sound, each
// documented at its Unfinished mode below: an out-of-memory allocation's last retry, EmptyCache
// and trimming (explicit calls that must give everything back), a retired pool's last free, a
// graph pool's release (graph replays free nothing the allocator sees), and the end of a capture
// that deferred frees.
//
// The machinery is one class whose methods live in files by job: caching_allocator.cc (the hot
// paths), arenas.cc (arenas and capture marks), growth.cc, release.cc and observation.cc.
//
// Lanes. Threads that allocate on one stream share its shard, and so its lock; on a contended
// lock (an inference server's workers on one stream) they would take turns, each handing the
// shard's cache lines to the next. So a thread that finds a shard's lock taken when it allocates
// moves, for good, to a lane of its own: another shard of the same stream, picked by the
// thread's ordinal among 15, with its own lock, free lists and segments. Lanes are the stream's
// shards like any other: every block is freed to the shard it came from, and growth takes free
// runs back from every lane. A thread that never meets contention stays on lane 0, so a program
// whose threads do not allocate on one stream at once behaves as if lanes did not exist. What a
// lane costs: a block freed in one lane is reused by allocations in that lane only (reusing it
// in another would be allowed by the stream-ordering contract, never required), so threads in
// different lanes cache apart, as threads on different streams do.
//
// Lock order: growth_mu_, then one shard's mu (never two at once), then an arena's shards_mu (a
// leaf). The public entry points take what they need themselves: none may be called with any of
// these held (ABSL_LOCKS_EXCLUDED).
#ifndef TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_IMPL_H_
#define TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_IMPL_H_

#include <atomic>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/block.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/device.h"
#include "allocator/mutex.h"
#include "allocator/page_map.h"
#include "allocator/segment_source.h"
#include "allocator/shard.h"
#include "allocator/stats.h"

namespace tidepool {

// One arena: see caching_allocator.h. Never deleted before its allocator (a racing Free may
// still reach it through the page map), so pointers to it stay valid.
class Arena {
 public:
  enum State : int { kActive, kRetired, kGone };

  Arena(size_t index, const ArenaOptions& options, SegmentSource* source, bool expandable)
      : index(index),
        label(options.label),
        source(source),
        expandable(expandable),
        shares_free_memory(options.shares_free_memory) {}

  // The arena's place in creation order: walks visit arenas in this order, and the allocator
  // keeps the arena's device statistics at this index.
  const size_t index;
  const std::string label;
  SegmentSource* const source;
  const bool expandable;
  const bool shares_free_memory;
  // Written under the allocator's growth lock; read anywhere.
  std::atomic<int> state{kActive};

  // A leaf lock: nothing is acquired while it is held.
  mutable Mutex shards_mu;
  // By stream id and lane.
  absl::flat_hash_map<std::pair<StreamId, uint32_t>, std::unique_ptr<Shard>> shards
      ABSL_GUARDED_BY(shards_mu);

  // This arena's shards, ordered by stream id, then lane.
  std::vector<Shard*> Shards() const ABSL_LOCKS_EXCLUDED(shards_mu);
};

class CachingAllocatorImpl {
 public:
  CachingAllocatorImpl(Device* device, const Config& config, size_t total_memory);
  ~CachingAllocatorImpl();

  absl::StatusOr<void*> Allocate(Arena* arena, size_t bytes, Stream stream)
      ABSL_LOCKS_EXCLUDED(growth_mu_);
  absl::Status Free(void* ptr) ABSL_LOCKS_EXCLUDED(growth_mu_);
  absl::Status FreeOnStream(void* ptr, Stream stream) ABSL_LOCKS_EXCLUDED(growth_mu_);
  absl::Status RecordStream(void* ptr, Stream stream);
  absl::Status EmptyCache() ABSL_LOCKS_EXCLUDED(growth_mu_);
  void SetMemoryLimit(size_t bytes) ABSL_LOCKS_EXCLUDED(growth_mu_) {
    MutexLock lock(&growth_mu_);
    memory_limit_ = bytes;
  }
  size_t memory_limit() const ABSL_LOCKS_EXCLUDED(growth_mu_) {
    MutexLock lock(&growth_mu_);
    return memory_limit_;
  }
  absl::StatusOr<size_t> BlockSize(const void* ptr) const;
  bool Holds(const void* ptr) const {
    return page_map_.Lookup(reinterpret_cast<uintptr_t>(ptr)) != nullptr;
  }
  absl::StatusOr<CachingAllocator::SegmentRange> RangeOf(const void* ptr) const;
  void NoteCaptureBegin() ABSL_LOCKS_EXCLUDED(growth_mu_);
  absl::Status NoteCaptureEnd() ABSL_LOCKS_EXCLUDED(growth_mu_);
  int captures_underway() const { return captures_underway_.load(std::memory_order_acquire); }
  absl::StatusOr<StreamId> StreamIdOf(Stream stream) const {
    if (captures_underway_.load(std::memory_order_acquire) == 0) {
      return device_->GetStreamId(stream);
    }
    return CaptureSafeStreamId(*device_, stream);
  }

  absl::StatusOr<Arena*> CreateArena(const ArenaOptions& options)
      ABSL_LOCKS_EXCLUDED(growth_mu_);
  Arena* default_arena() const { return default_arena_; }
  absl::StatusOr<Arena*> ArenaOf(const void* ptr) const;
  absl::Status TrimArena(Arena* arena) ABSL_LOCKS_EXCLUDED(growth_mu_);
  absl::StatusOr<bool> RetireArena(Arena* arena) ABSL_LOCKS_EXCLUDED(growth_mu_);
  absl::Status ReviveArena(Arena* arena) ABSL_LOCKS_EXCLUDED(growth_mu_);
  int64_t LiveBlocks(const Arena* arena) const ABSL_LOCKS_EXCLUDED(growth_mu_);
  int64_t walked_arenas() const ABSL_LOCKS_EXCLUDED(growth_mu_);

  // Observation changes nothing; it takes the same locks as everything else.
  AllocatorStats GetStats(const Arena* arena) const  // nullptr: every arena
      ABSL_LOCKS_EXCLUDED(growth_mu_);
  std::string SnapshotJson(const Arena* arena) const  // nullptr: every arena
      ABSL_LOCKS_EXCLUDED(growth_mu_);

  Device* device() const { return device_; }
  const Config& config() const { return config_; }

 private:
  // The shard of `stream` in `arena` for the calling thread's lane, made on first use. Hot: a
  // per-thread cache answers most calls.
  absl::StatusOr<Shard*> ShardFor(Arena* arena, Stream stream);
  // Allocate's shard, its lock taken: the thread's shard of the stream, or, if that one's lock
  // was taken, the thread's own lane from now on (see lanes, above). Null with `status` set on
  // error.
  Shard* LockShardToAllocate(Arena* arena, Stream stream, absl::Status* status)
      ABSL_NO_THREAD_SAFETY_ANALYSIS;
  // The slow part of the above: moves the thread to its lane and returns that shard, unlocked.
  absl::StatusOr<Shard*> MoveToLane(Arena* arena, Stream stream);
  // Allocate's slow path: the growth lock, growth, out-of-memory recovery. Out of line.
  absl::StatusOr<void*> AllocateSlow(Arena& arena, Shard& shard, size_t bytes, size_t rounded,
                                     Stream stream) ABSL_LOCKS_EXCLUDED(growth_mu_);
  // Allocate's answer to fence_wanted: records the shard's fence on `stream`, the allocation's
  // own (live) handle. Out of line.
  void RecordWantedFence(Shard& shard, Stream stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(shard.mu);
  // Free's slow path: a retired arena whose last block may have gone. Out of line.
  absl::Status FinishRetiredAfterFree(Arena& arena) ABSL_LOCKS_EXCLUDED(growth_mu_);
  // An arena's reserved bytes, segments and device counters (its shards count its blocks).
  AllocatorStats& DeviceStats(const Arena& arena) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_) {
    return arena_device_stats_[arena.index];
  }
  const AllocatorStats& DeviceStats(const Arena& arena) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_) {
    return arena_device_stats_[arena.index];
  }
  // The segment holding an address tidepool handed out, or an error naming the pointer.
  absl::StatusOr<Segment*> SegmentOf(uintptr_t address, const char* operation) const;
  // INVALID_ARGUMENT for an address outside the memory tidepool holds: never allocated, or given
  // back to the device since (the segment that held it is dead).
  absl::Status NotHeld(uintptr_t address, const char* operation) const;
  // FAILED_PRECONDITION for a free of an address in held memory that is not a live block's start:
  // a double free, or a pointer into the middle of a block.
  static absl::Status NotLive(uintptr_t address);
  // Every arena, in creation order, gone ones included: for observation only. Growth, release
  // and capture marks walk live_arenas_ and gone_holding_, so their cost follows the pools in
  // use, not every pool there ever was (a program that captures often makes one per graph).
  std::vector<Arena*> Arenas() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // An arena that has just gone leaves live_arenas_, for gone_holding_ if it still holds
  // address ranges.
  void NoteGone(Arena& arena) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // A gone arena that holds nothing any more leaves gone_holding_: no walk visits it again.
  void ForgetIfEmpty(Arena& arena) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status CheckArena(const Arena* arena) const;
  // FAILED_PRECONDITION: an allocation from an arena that is not active.
  absl::Status Retired(const Arena& arena) const;
  // FAILED_PRECONDITION naming `operation` while a capture is underway: memory cannot go back to
  // the device then.
  absl::Status RefuseDuringCapture(const char* operation) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);

  // RESOURCE_EXHAUSTED: a request larger than the whole device.
  absl::Status TooLarge(size_t rounded) const;
  // RESOURCE_EXHAUSTED when taking `more` bytes from a source would pass the memory limit.
  absl::Status CheckMemoryLimit(size_t more) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Adds free memory for `rounded` bytes to the shard, whose stream `stream` (a live handle)
  // names. Takes shard locks itself, one at a time.
  absl::Status Grow(Shard& shard, size_t rounded, Stream stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status GrowPlain(Shard& shard, size_t rounded) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status GrowExpandable(Shard& shard, size_t rounded, Stream stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // What growth and trimming do with free memory whose stream work may still be running.
  enum class Unfinished {
    // Take only memory known idle (a completed fence, a synchronization since): growth first
    // looks for chunks this way, so that it never waits while the device has memory to give.
    kSkip,
    // As kSkip, but a fence still running gets a brief wait (Shard::FenceWait::kBrief): for the
    // growing stream's own memory, whose fence growth has just recorded; on an idle stream it
    // passes within microseconds, and a busy stream is not waited for.
    kBriefWait,
    // Wait for the fence that covers it (one stream's event); leave memory no fence covers
    // and ask its shard for a fence. Growth when the device cannot supply the rest, and an
    // out-of-memory allocation's first retry.
    kWaitFence,
    // As kWaitFence, then synchronize the device once for what no fence covers. Only where
    // everything must go back now: an out-of-memory allocation's last retry (failing would be
    // worse than a stall), EmptyCache and trimming (explicit calls, outside the allocation
    // path), and a retired pool draining (a gone arena holds nothing).
    kSynchronize,
  };
  // Where an expandable growth maps its chunks.
  struct ExpandablePlacement {
    Block* target = nullptr;         // the unmapped block the chunks go into
    uintptr_t map_at = 0;            // where, inside it
    size_t to_map = SIZE_MAX;        // how many bytes (whole granules)
    Segment* new_segment = nullptr;  // the range reserved for this growth, if it needed one
  };
  // GrowExpandable's steps: choose an unmapped block next to free memory (none: target null);
  // reserve a new range; map chunks. AbandonExpandable undoes a growth that failed part-way.
  ExpandablePlacement ChoosePlacement(Shard& shard, size_t rounded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status ReserveExpandable(Shard& shard, size_t rounded, ExpandablePlacement* placement)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status MapExpandable(Shard& shard, const ExpandablePlacement& placement, Stream stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Records the fence of every shard of `stream` (one per arena and lane that served it) whose
  // lock is free: the handle of an allocation under way is alive. A shard skipped, or a record
  // that fails, leaves that shard without a new fence (its memory is then only left alone).
  void FenceStream(StreamId id, Stream stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Whether the device (and the memory limit) can supply `bytes` more without taking cached
  // memory back.
  bool DeviceHasRoom(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // One device allocation on its way into a growth: a run (block.h) taken back from free memory,
  // or made for the growth, of `granules` granules.
  struct PhysicalRun {
    PhysicalHandle handle;
    size_t granules;
  };
  // What a growth gathers before it maps: runs taken back whole (`runs`, `taken` granules in
  // all), and granules of free runs too large to fit given back to the device (`released`), so
  // that the device has room for a run of exactly what is still missing.
  struct Reclaim {
    size_t wanted = 0;
    std::vector<PhysicalRun> runs;
    size_t taken = 0;
    size_t released = 0;
    size_t missing() const { return wanted - taken - released; }
  };
  absl::Status AbandonExpandable(Shard& shard, const ExpandablePlacement& placement,
                                 size_t mapped, const std::vector<PhysicalRun>& runs,
                                 absl::Status cause) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Undoes a growth that failed after the first `mapped` of its runs were mapped one after the
  // other from `map_at` inside unmapped block `target`: unmaps them and releases every run.
  // Returns `cause`.
  absl::Status RejectGrowth(Arena& arena, const Block* target, uintptr_t map_at, size_t mapped,
                            const std::vector<PhysicalRun>& runs, absl::Status cause)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Unmaps whole free runs of the shard's expandable segments (never in the free blocks next to
  // `keep`, the unmapped block about to be mapped, which growth extends) until the reclaim
  // misses nothing: adjacent runs that fit what is missing go into `reclaim->runs` (physical
  // memory is all alike, so a run freed by one stream, size class or arena can be mapped again
  // for any other); with `release_oversized`, free runs larger than that go back to the device
  // instead. Free memory whose stream work is not known done is handled by `mode` (never
  // kSynchronize).
  absl::Status ReclaimFreeRuns(Shard& shard, const Block* keep, Reclaim* reclaim,
                               bool release_oversized, Unfinished mode)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_, shard.mu);
  // The same over the growing shard, then every other shard of every expandable arena that
  // shares its free memory, each locked alone: first runs that fit, then oversized ones. Under
  // kSkip the shards of the growing stream itself get kBriefWait: growth has just recorded their
  // fences.
  absl::Status ReclaimAcrossShards(Shard& shard, const Block* keep, Reclaim* reclaim,
                                   Unfinished mode) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Unmaps the runs of granules [first, first + count) of `segment` (whole runs), in address
  // order, clearing their chunk-table entries and appending them to `runs`. Stops at the first
  // failure: `runs` then holds those unmapped before it.
  absl::Status UnmapRuns(Segment& segment, size_t first, size_t count,
                         std::vector<PhysicalRun>* runs) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // UnmapRuns, then gives the runs back to the device, counting them off `arena`'s reserved
  // bytes; `released` says how many granules, from `first`, are unmapped.
  absl::Status ReleaseRuns(Arena& arena, Segment& segment, size_t first, size_t count,
                           size_t* released) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Returns every whole free segment and free mapped granule of every arena that shares its
  // free memory (what `mode` lets go).
  absl::Status ReleaseCached(Unfinished mode) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Whether an expandable segment whose chunks are all unmapped also gives back its address
  // range. A retired arena keeps its ranges (they hold no memory), so that a pool begun again and
  // again reuses the same segments instead of making new ones each time; EmptyCache, Trim and
  // out-of-memory recovery release them.
  enum class AddressRanges { kKeep, kRelease };
  absl::Status ReleaseArenaCache(Arena& arena, AddressRanges ranges, Unfinished mode)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status ReleaseShardCache(Shard& shard, AddressRanges ranges, Unfinished mode)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_, shard.mu);
  // A retired arena whose last live block has gone returns everything and is gone.
  absl::Status FinishIfDrained(Arena& arena) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  int64_t LiveBlocksLocked(const Arena& arena) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Whether no work queued before free block `block` (of `shard`) was freed can still use its
  // memory, which must hold before the memory is unmapped or given back: true at once if a
  // device synchronization or the shard's completed fence came after the free; otherwise as
  // `mode` says (see Unfinished). Never the freeing stream itself: the caller may have destroyed
  // it, and a destroyed stream's handle can be neither touched (the driver reads freed memory:
  // seen crashing on the H200) nor trusted (it may name a newer stream). Only growth and
  // trimming come here, never a cached allocation.
  absl::StatusOr<bool> FreedWorkDone(Shard& shard, const Block& block, Unfinished mode)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_, shard.mu);
  // Synchronizes the device, after which every block freed so far is idle.
  absl::Status SynchronizeFreedWork() ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  Segment* NewSegment(Shard& shard, uintptr_t base, size_t size, bool expandable, bool small)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  void RetireSegment(Segment* segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  std::string OutOfMemoryMessage(size_t bytes, size_t rounded, const Shard& shard,
                                 const absl::Status& cause) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);

  Device* const device_;
  const Config config_;
  const size_t total_memory_;
  const size_t granularity_;
  // Identifies this allocator in per-thread caches (addresses of dead allocators are reused).
  const uint64_t serial_;
  DeviceSegments device_segments_;

  PageMap<Segment> page_map_;  // written under growth_mu_, read without a lock

  // Each Free stamps its block with this epoch (a read on the hot path; advanced only when a
  // shard records its fence or the device is synchronized). See FreedWorkDone.
  std::atomic<uint64_t> free_epoch_{1};

  // CUDA graph captures underway on the device. Changed only under growth_mu_ (so it is stable
  // there); read by shards under their own locks (see NoteCaptureBegin).
  std::atomic<int> captures_underway_{0};

  // Serializes growth, trimming, out-of-memory recovery and arena changes (the lock order is in
  // the file comment). Unmapped blocks and the segments' chunk tables change only under
  // growth_mu_, so growth may drop a shard's lock and take it again without losing its place.
  // Mutable: observation is const and takes it too.
  mutable Mutex growth_mu_;
  std::vector<std::unique_ptr<Arena>> arenas_ ABSL_GUARDED_BY(growth_mu_);  // incl. gone ones
  // Per arena, at Arena::index: reserved bytes, segments and device counters.
  std::vector<AllocatorStats> arena_device_stats_ ABSL_GUARDED_BY(growth_mu_);
  // SetMemoryLimit's cap on reserved bytes, every arena together.
  size_t memory_limit_ ABSL_GUARDED_BY(growth_mu_) = SIZE_MAX;
  // Active and retired arenas, in creation order.
  std::vector<Arena*> live_arenas_ ABSL_GUARDED_BY(growth_mu_);
  // Gone arenas that still hold address ranges (kept so that a pool begun again reuses them);
  // EmptyCache and out-of-memory recovery release them.
  std::vector<Arena*> gone_holding_ ABSL_GUARDED_BY(growth_mu_);
  std::vector<std::unique_ptr<Segment>> segments_ ABSL_GUARDED_BY(growth_mu_);  // incl. retired
  Arena* default_arena_ = nullptr;  // set once, in the constructor
  // Blocks freed with an epoch below this are idle: a device synchronization started after
  // their free has completed.
  uint64_t quiet_before_ ABSL_GUARDED_BY(growth_mu_) = 1;
  // Set by FreedWorkDone when it left free memory behind (Unfinished::kSkip, kWaitFence).
  bool left_unfinished_ ABSL_GUARDED_BY(growth_mu_) = false;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_IMPL_H_
