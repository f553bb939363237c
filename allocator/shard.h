// A shard: the cache of one stream.
//
// Each stream that allocates gets its own shard, with its own mutex, segments, best-fit indexes
// and statistics. A cached allocation or free on one stream therefore takes only that stream's
// lock, and threads that work on their own streams never contend. Everything a shard does is
// bookkeeping on blocks it owns: finding the best fit, splitting, coalescing, and harvesting the
// events of blocks that were used on other streams.
//
// The quick list makes the commonest pattern cheap: a small block freed and then asked for again
// at the same size. A freed small block is parked, uncoalesced, in a per-size LIFO; an
// allocation of exactly that size takes it back without touching the best-fit index. The first
// allocation the quick list cannot serve flushes it (coalescing every parked block) before
// searching, so parking never makes the allocator grow where it would not have. Large blocks are
// not parked: for them best fit's choice of place matters (measured on the bundled traces,
// parking them raised peak reserved memory by up to 0.2%). Talking to the device about memory (growth,
// trimming) is the allocator's job (caching_allocator_impl.h), done under its growth lock.
//
// While a CUDA graph capture is underway on the device, nothing may query or synchronize an
// event (the driver would invalidate the capture, or the capture would swallow the event). The
// shard then harvests nothing, and a block freed after use on other streams is deferred: it waits,
// unusable, until the allocator says the captures are over (ReleaseDeferredFrees). Its streams'
// handles are never touched again after the free: the caller may destroy a stream while a
// capture runs. Any of those streams may still have real work queued that uses the block, even
// one that was capturing when its use was recorded (work queued on it before its capture began),
// so the allocator synchronizes the device once before deferred blocks go ahead
// (HasDeferredFrees).
// A block used on its own stream only is reusable at once, during capture as outside it: inside
// a graph, stream order is the graph's dependency order.
//
// The stream fence. Before memory freed in stream order goes back to the device (or moves to
// another address), the work queued on its stream before the free must be done. A shard cannot
// simply record an event on its stream then: the caller may have destroyed the stream since
// (a destroyed stream's handle must never be touched). So the shard records a fence, an event on
// its stream, only while an allocation on that stream is under way, when the caller's handle is
// known to be alive, and only when growth or trimming asked for one (fence_wanted), or when the
// allocator grows this very shard. Every free block freed before the fence was recorded (its
// freed_epoch below fence_epoch_) is idle once the fence has completed: growth and trimming wait
// for that one stream's event, not for the whole device.
#ifndef TIDEPOOL_ALLOCATOR_SHARD_H_
#define TIDEPOOL_ALLOCATOR_SHARD_H_

#include <atomic>
#include <deque>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "allocator/block.h"
#include "allocator/device.h"
#include "allocator/mutex.h"
#include "allocator/stats.h"

namespace tidepool {

class Arena;

// Cache-line aligned: shards of different streams are used by different threads at once.
class alignas(64) Shard {
 public:
  // `free_epoch` is the allocator's epoch counter (see CachingAllocatorImpl::free_epoch_), and
  // `captures_underway` its count of captures running on the device (read under `mu`).
  Shard(Device* device, Arena* arena, StreamId stream_id, uint32_t lane, size_t max_split_size,
        std::atomic<uint64_t>* free_epoch, const std::atomic<int>* captures_underway);
  ~Shard();
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  // Guards everything below. Lock order: the allocator's growth lock, then this.
  Mutex mu;

  Arena* const arena;
  const StreamId stream_id;
  // Which of the stream's shards this is: 0, the one every thread starts on, or the lane of the
  // threads that found it contended (caching_allocator_impl.h, lanes).
  const uint32_t lane;
  // The stream handle allocations last reached this shard with, so that a free on the same
  // handle (FreeOnStream) need not ask the device for the stream's id. A handle reused by a
  // later stream after this one was destroyed only makes such a free skip recording: the block
  // then comes back to this shard, which serves this stream's id alone.
  std::atomic<Stream> last_handle{nullptr};

  // Takes the best-fitting free block for `rounded` bytes, splits it if worth it, and returns it
  // allocated and live; nullptr if no free block fits.
  Block* TakeFreeBlock(size_t rounded, size_t requested) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // The live block at `address`, or nullptr.
  Block* FindLive(uintptr_t address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Frees a live block: at once if it was used on this stream only, else after events recorded
  // now on each stream it was used on (or, during capture, deferred: see above).
  absl::Status FreeLive(Block* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Whether blocks were deferred during capture: then the device must be synchronized before
  // ReleaseDeferredFrees (see above).
  bool HasDeferredFrees() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return !deferred_.empty(); }
  // Frees the blocks deferred during capture, without touching their streams. Only once no
  // capture is underway, and after a device synchronization if HasDeferredFrees.
  absl::Status ReleaseDeferredFrees() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Coalesces every parked block into the best-fit index.
  void FlushQuick() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Turns a block not in any index into a free block, coalesced with free neighbours, and
  // indexes it. Returns the (possibly merged) block.
  Block* MakeFree(Block* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Turns the granule-aligned part [begin, end) of free block `block` into an unmapped block,
  // keeping any head and tail as free blocks. The caller has unmapped it on the device.
  Block* MarkUnmapped(Block* block, uintptr_t begin, uintptr_t end)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Turns [begin, begin + bytes) of an unmapped block into a free block (coalesced with free
  // neighbours); what is left on either side stays unmapped. The caller has mapped it on the
  // device. Returns the free block.
  Block* MarkMapped(Block* unmapped, uintptr_t begin, size_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // Asks the next allocation on this stream to record a fence (see the file comment). Set by
  // growth and trimming when they meet free memory that no fence covers; read, relaxed, by every
  // allocation on the shard.
  std::atomic<bool> fence_wanted{false};
  // Records a fence on `stream`, which must be a live handle of this shard's stream (the one an
  // allocation under way came with), never during a capture. A fence already recorded is
  // recorded again: it then covers everything freed so far, and completes later.
  absl::Status RecordFence(Stream stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Whether the fence was recorded after free block `block` (of this shard) was freed.
  bool FenceCovers(const Block& block) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return fence_epoch_ != 0 && block.freed_epoch < fence_epoch_;
  }
  // How long FenceDone may wait: not at all (one query); briefly (queries for up to
  // kBriefFenceWait, long enough for a fence just recorded on an idle stream to pass, far
  // shorter than any stream's queued work); or until the fence has passed (one stream's work,
  // never the device's).
  enum class FenceWait { kQuery, kBrief, kBlock };
  static constexpr int64_t kBriefFenceWaitNs = 100'000;
  // Whether the fence has completed, waiting as `how` says. False while a capture is underway,
  // when an event may be neither queried nor waited for.
  absl::StatusOr<bool> FenceDone(FenceWait how) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // Harvests completed events without blocking. `all` scans every pending block; otherwise it
  // stops at the first one still waiting (cheap enough for every allocation). Does nothing while
  // a capture is underway.
  absl::Status HarvestEvents(bool all) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  bool HasPendingEvents() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return !pending_.empty(); }
  // Blocks until every pending block's events have completed, then frees those blocks. Only for
  // paths that may block anyway (out-of-memory recovery, EmptyCache), never during capture
  // (FAILED_PRECONDITION).
  absl::Status WaitForEvents() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // Segment bookkeeping.
  void AddSegment(Segment* segment, BlockState initial) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Removes a segment whose blocks are all free or unmapped from the shard's indexes; returns
  // false (and changes nothing) if any block is live or awaiting events.
  bool RemoveSegmentIfIdle(Segment* segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  std::vector<Segment*>& segments() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return segments_; }
  const BlockIndex& unmapped(bool small) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return unmapped_[small];
  }

  // requested / allocated / active_blocks of this shard.
  const AllocatorStats& stats() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return stats_; }

 private:
  struct PendingFree {
    Block* block;
    absl::InlinedVector<Event, 1> events;
  };

  // A LIFO of parked blocks that served requests of one rounded size.
  struct QuickSlot {
    static constexpr int kDepth = 8;
    size_t rounded = 0;
    int count = 0;
    Block* blocks[kDepth];
  };
  static constexpr int kQuickSlots = 8;

  Block* TakeQuick(size_t rounded) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  bool ParkQuick(Block* block, size_t rounded) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Moves a parked block back to the best-fit index.
  void Unpark(Block* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void Activate(Block* block, size_t requested) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  Block* NewBlock() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void DeleteBlock(Block* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  BlockIndex* IndexFor(const Block* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Merges `right` into `left` (adjacent, same state); returns left.
  Block* Merge(Block* left, Block* right) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Splits `bytes` off the front of `block` (not indexed); returns the new tail block.
  Block* SplitFront(Block* block, size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::StatusOr<Event> TakeEvent() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  bool Capturing() const { return captures_underway_->load(std::memory_order_acquire) > 0; }
  // The second half of freeing a block used on other streams: records an event on each of them
  // and queues the block until they complete.
  absl::Status AwaitUses(Block* block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void FinishPending(PendingFree& pending) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  static absl::StatusOr<bool> AllDone(Device* device, const PendingFree& pending);

  Device* const device_;
  const size_t max_split_size_;
  // The allocator's free epoch: read by every free, advanced by a fence (and by a device
  // synchronization, in the allocator).
  std::atomic<uint64_t>* const free_epoch_;
  const std::atomic<int>* const captures_underway_;
  BlockIndex free_[2] ABSL_GUARDED_BY(mu);      // [small]
  BlockIndex unmapped_[2] ABSL_GUARDED_BY(mu);  // [small], expandable segments only
  std::vector<Segment*> segments_ ABSL_GUARDED_BY(mu);
  // Allocated and parked blocks by address (a parked block stays here, so a free followed by an
  // allocation of the same size costs no map update); FindLive answers allocated ones only.
  absl::flat_hash_map<uintptr_t, Block*> live_ ABSL_GUARDED_BY(mu);
  std::deque<PendingFree> pending_ ABSL_GUARDED_BY(mu);
  // Blocks freed during capture after use on other streams, their events not yet recorded.
  std::vector<Block*> deferred_ ABSL_GUARDED_BY(mu);
  std::vector<Event> spare_events_ ABSL_GUARDED_BY(mu);
  std::vector<Block*> spare_blocks_ ABSL_GUARDED_BY(mu);
  QuickSlot quick_[kQuickSlots] ABSL_GUARDED_BY(mu);
  int quick_count_ ABSL_GUARDED_BY(mu) = 0;  // blocks parked over all slots
  int quick_next_victim_ ABSL_GUARDED_BY(mu) = 0;
  AllocatorStats stats_ ABSL_GUARDED_BY(mu);
  // The fence: its event (nullptr before the first), the epoch it was recorded at (blocks freed
  // with a lower epoch are covered), and whether it is known to have completed.
  Event fence_ ABSL_GUARDED_BY(mu) = nullptr;
  uint64_t fence_epoch_ ABSL_GUARDED_BY(mu) = 0;
  bool fence_complete_ ABSL_GUARDED_BY(mu) = false;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_SHARD_H_
