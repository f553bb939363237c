// The caching allocator of one device: the core of tidepool.
//
// It grows by taking segments (or physical chunks of an expandable segment) from a `Device`,
// carves them into blocks for callers, and takes blocks back in stream order without
// synchronizing.
//
// THE STREAM-ORDERING CONTRACT (stated once, here):
//   * A block belongs to the stream it was allocated on. `Free` makes it reusable at once by later
//     allocations on that same stream: work the caller queues on the stream after the free runs
//     after the work queued before it, so no event and no synchronization are needed.
//   * If the caller used the block on other streams, it must say so with `RecordStream` before
//     freeing. Then, at `Free`, an event is recorded on each of those streams, and the block is
//     reusable only once all those events have completed. Completed events are harvested without
//     blocking.
//   * Memory is returned to the device, or moved to another address by growth (`EmptyCache`,
//     out-of-memory recovery, trimming, reclaiming), only after the work that may still use it
//     is done: its stream's fence, an event recorded on the stream after the free while an
//     allocation on it proved the handle alive, has completed; or, where no fence covers it and
//     everything must go back, a device synchronization that began after the free (the freeing
//     stream may be gone by then). Growth never synchronizes the device
//     (caching_allocator_impl.h).
//   * `Free` takes no stream: a block is always freed on the stream it was allocated on.
//
// DURING CUDA GRAPH CAPTURE (between NoteCaptureBegin and NoteCaptureEnd; graph/ calls them):
//   * Nothing queries or synchronizes an event, and nothing synchronizes a stream or the device.
//   * A capturing stream is known by its capture-time id (StreamIdOf): its blocks live in shards of
//     their own, apart from the blocks the stream allocated outside captures.
//   * A block freed after use on other streams is deferred: its events are recorded, and its
//     wait begins, once no capture is underway any more. A block used on its own stream only is
//     reusable at once, in stream order, as always.
//   * Growth still takes new memory from the device (that does not break a capture), but no
//     memory goes back to it: EmptyCache and TrimArena fail with FAILED_PRECONDITION, free chunks
//     are not reclaimed from other arenas, out-of-memory recovery does not release the cache, and
//     a retired arena keeps its memory until the captures are over.
//
// ARENAS. An arena is a cache of its own: its own segments, free lists per stream, statistics and
// segment source. Every allocator has a default arena; pools (pool/) are arenas with an identity
// and a routing rule. A block always returns to the arena it came from. An arena can be retired:
// its free memory goes back at once, the rest as its last live blocks are freed (it is then
// gone), and it can be revived at any time, with the same segments and address ranges.
//
// Concurrency: allocations on different streams take different locks (one shard per stream), and
// a free finds its shard through a lock-free page map, so threads on their own streams do not
// contend. One device-wide lock serializes growth, trimming and out-of-memory recovery.
// Lock order: growth_mu_ before any shard's mutex; a shard's mutex is never held while
// acquiring growth_mu_.
#ifndef TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_H_
#define TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/config.h"
#include "allocator/device.h"
#include "allocator/segment_source.h"
#include "allocator/stats.h"

namespace tidepool {

class CachingAllocatorImpl;
class Arena;

struct ArenaOptions {
  // Where plain segments come from; must outlive the arena. nullptr: the allocator's device,
  // and then the arena grows by expandable segments when Config::expandable_segments says so.
  SegmentSource* source = nullptr;
  // Whether the allocator may take this arena's free memory back: to give its free chunks to
  // another arena that grows, and on EmptyCache and out-of-memory recovery. False for memory
  // that must stay where it is (a CUDA graph's private pool); TrimArena still trims it.
  bool shares_free_memory = true;
  // For messages and snapshots.
  std::string label;
};

class CachingAllocator {
 public:
  // `device` must outlive the allocator.
  static absl::StatusOr<std::unique_ptr<CachingAllocator>> Create(Device* device,
                                                                  const Config& config);
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Returns a block of at least `bytes` usable on `stream`, 512-byte aligned, from the default
  // arena. INVALID_ARGUMENT for 0; RESOURCE_EXHAUSTED (with the breakdown of where memory is)
  // when the device is full even after returning the cache, and for any size larger than the
  // device could hold.
  absl::StatusOr<void*> Allocate(size_t bytes, Stream stream);
  // The same from `arena`; FAILED_PRECONDITION if the arena is retired or gone.
  absl::StatusOr<void*> Allocate(Arena* arena, size_t bytes, Stream stream);
  // Returns a block. INVALID_ARGUMENT for a pointer outside the memory tidepool holds now (never
  // allocated, or given back to the device since it was freed); FAILED_PRECONDITION for a pointer
  // inside that memory that is not a live block (a double free, a pointer into a block).
  absl::Status Free(void* ptr);
  // Frees a block as ordered on `stream` (cudaFreeAsync's contract): Free when `stream` is the
  // block's own stream, else the stream is recorded first (RecordStream), in one step.
  absl::Status FreeOnStream(void* ptr, Stream stream);
  // Marks a live block as used on `stream` (see the contract above).
  absl::Status RecordStream(void* ptr, Stream stream);
  // Returns every whole free segment (and every free mapped chunk) to the device.
  absl::Status EmptyCache();
  // Caps the memory the allocator holds, every pool together (reserved bytes: segments and
  // mapped chunks, whatever their source), at `bytes`; SIZE_MAX lifts the cap. A growth that
  // would pass it is refused as if the device were full: the cache goes back and growth is tried
  // once more, then the allocation fails with RESOURCE_EXHAUSTED, whose message names the cap.
  // Memory held already stays (PyTorch's set_per_process_memory_fraction does the same).
  void SetMemoryLimit(size_t bytes);
  size_t memory_limit() const;

  // Marks the beginning and end of a CUDA graph capture on this device (see the contract above).
  // NoteCaptureBegin must come before the capture begins and NoteCaptureEnd after it has ended
  // (or failed): when it returns, no call that began before it can still touch an event.
  // NoteCaptureEnd of the last capture underway starts the deferred frees' waits and finishes the
  // retired arenas. A mark is not routing: pool/ routes a capture's allocations.
  void NoteCaptureBegin();
  absl::Status NoteCaptureEnd();
  int captures_underway() const;
  // The id this allocator knows `stream` by now: its device id, or, while a capture is underway
  // and the stream takes part in one, its capture-time id (CaptureSafeStreamId in device.h), so
  // that no capturing stream is ever asked for its device id. Routes and traces use the same.
  absl::StatusOr<StreamId> StreamIdOf(Stream stream) const;

  // Size of the live block at ptr (its rounded size), or an error as for Free.
  absl::StatusOr<size_t> BlockSize(const void* ptr) const;
  // Whether `ptr` lies in memory this allocator holds now: one read of the page map, no error
  // spelled out. For a caller with other owners to ask (another device, an external pool), so
  // that a pointer of theirs costs no message built only to be dropped.
  bool Holds(const void* ptr) const;
  // The segment that holds the live block at `ptr` (errors as for Free): its base and size, and
  // whether it is expandable (then the range is reserved address space, mapped in part).
  // PyTorch's base_alloc hook asks it, to share a block's whole allocation between processes.
  struct SegmentRange {
    uintptr_t base = 0;
    size_t size = 0;
    bool expandable = false;
  };
  absl::StatusOr<SegmentRange> SegmentOf(const void* ptr) const;

  // --- Arenas ---
  absl::StatusOr<Arena*> CreateArena(const ArenaOptions& options);
  Arena* default_arena() const;
  // The arena of a live block.
  absl::StatusOr<Arena*> ArenaOf(const void* ptr) const;
  // Returns the arena's whole free segments and free chunks to where they came from.
  absl::Status TrimArena(Arena* arena);
  // Retires an arena (not the default one): see ARENAS above. Returns whether it is gone.
  absl::StatusOr<bool> RetireArena(Arena* arena);
  // Makes a retired (or gone) arena active again.
  absl::Status ReviveArena(Arena* arena);
  // Live blocks of one arena.
  int64_t LiveBlocks(const Arena* arena) const;
  bool IsActive(const Arena* arena) const;
  bool IsGone(const Arena* arena) const;

  // How many arenas growth, release, out-of-memory recovery and capture marks visit: the active
  // and retired ones, and gone ones that still hold address ranges. Gone arenas that hold
  // nothing are never visited again, so that cost follows the pools in use.
  int64_t walked_arenas() const;

  // All arenas together, or one.
  AllocatorStats GetStats() const;
  AllocatorStats GetStats(const Arena* arena) const;
  // Every segment and block as JSON (of one arena, or all when `arena` is nullptr).
  std::string SnapshotJson(const Arena* arena = nullptr) const;

  Device* device() const;
  const Config& config() const;

 private:
  explicit CachingAllocator(std::unique_ptr<CachingAllocatorImpl> impl);
  std::unique_ptr<CachingAllocatorImpl> impl_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_H_
